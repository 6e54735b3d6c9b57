"""Reliability: resume after a real kill, determinism, W&B failures, NaN losses, safe and atomic files."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmm.cli import main
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.models import load_autoencoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# Small but not instant: 1024 batches of 16 per epoch, so a kill lands inside an epoch.
SLOW_SYNTHETIC = [
    "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--data.batch_size", "16", "--data.num_train", "16384"
]  # fmt: skip


def run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]


def final_val(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("val/acc")]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    epochs = ["--trainer.max_epochs", "3", "--trainer.logger", "false"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("DMM_RUN_DIR", None)
    killed_root = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "dmm", "fit", *SLOW_SYNTHETIC, *epochs, *QUIET,
         "--trainer.default_root_dir", str(killed_root)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(killed_root.glob("*/checkpoints/last.ckpt")):  # end of epoch 0
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        assert process.poll() is None, "the run finished before it could be killed mid-epoch"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()  # never leave a training process behind, whatever failed above
        process.wait()
    assert process.returncode == -signal.SIGKILL
    (last,) = killed_root.glob("*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] < 2  # killed before the last epoch ended

    run("fit", *SLOW_SYNTHETIC, *epochs, *QUIET, "--trainer.default_root_dir", str(tmp_path / "resumed"),
        "--ckpt_path", str(last))  # fmt: skip
    run("fit", *SLOW_SYNTHETIC, *epochs, *QUIET, "--trainer.default_root_dir", str(tmp_path / "straight"))
    (resumed,) = (tmp_path / "resumed").glob("*/checkpoints/last.ckpt")
    (straight,) = (tmp_path / "straight").glob("*/checkpoints/last.ckpt")
    a, b = weights(resumed), weights(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(tmp_path: Path) -> None:
    # Monitoring "step" in mode min makes epoch 0 the best forever; Lightning >= 2.6 alone would leave
    # last.ckpt at epoch 0 too, and a resume from it would repeat epochs 1 and 2.
    run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs", "3", *QUIET,
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--checkpoint.monitor", "step", "--checkpoint.mode", "min",
        "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    (folder,) = tmp_path.glob("*")
    (best,) = folder.glob("checkpoints/best-*.ckpt")
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert best.name == "best-epoch=0-step=2.ckpt"
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert any(not torch.equal(w, weights(best)[name]) for name, w in last["state_dict"].items())
    # Saved under Lightning's own key, so a checkpoint from a plain ModelCheckpoint resumes its state here.
    assert any(key.startswith("ModelCheckpoint{") for key in last["callbacks"])


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    for name in ("a", "b"):
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs", "2", *QUIET,
            "--trainer.limit_train_batches", "8", "--trainer.log_every_n_steps", "2",
            "--trainer.default_root_dir", str(tmp_path / name))  # fmt: skip
    (a,), (b,) = (tmp_path / "a").glob("*"), (tmp_path / "b").glob("*")
    assert final_val(a) and final_val(a) == final_val(b)
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()


def test_wandb_failure_mid_run_does_not_stop_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb.sdk.wandb_run

    def broken(*args, **kwargs):
        raise ConnectionError("simulated W&B outage")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken)
    run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs", "2", *QUIET,
        "--trainer.limit_train_batches", "4", "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    (folder,) = tmp_path.glob("*")
    assert len(final_val(folder)) == 2
    assert (folder / "checkpoints" / "last.ckpt").is_file()


def test_nan_loss_stops_with_a_message_naming_the_step(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs", "1", *QUIET,
            "--trainer.logger", "false", "--model.init_args.optimizer.init_args.lr", "1e30")  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "global step" in err and "Traceback" not in err


class Payload:
    """A pickled object that would run code on load without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_checkpoints_load_without_running_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, path)
    with pytest.raises(DmmError, match="cannot load autoencoder checkpoint"):
        load_autoencoder(path)
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_corrupt_autoencoder_checkpoint_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(DmmError, match="dmm fit --config configs/<dataset>/autoencoder.yaml"):
        load_autoencoder(path)


def testatomic_write_leaves_nothing_behind_on_a_crash(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old, complete")

    def crash(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
