"""Several processes: DDP gives the decomposition the figures of one process; the SLURM script resumes.

The DDP run is a real ``python -m dmm`` subprocess on CPU (gloo): Lightning starts the second worker by
re-running that command, which it cannot do from inside pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmm.cli import main
from dmm.data import SyntheticManifoldDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SBATCH = ROOT / "slurm" / "train.sbatch"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
NUM_IMAGES = 31  # odd: the second of two processes attacks one padding image that the gather drops
RANDOM_BASELINE = "random_fraction"

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def _run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)  # each in-process CLI call makes its own run folder
    main(list(args))


def _fit(root: Path, config: str) -> Path:
    """Two training steps of a synthetic config; the last checkpoint of its run folder."""
    args = ["fit", "--config", str(CONFIGS / "synthetic" / config), "--trainer.default_root_dir", str(root), *QUIET]
    _run(*args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    (checkpoint,) = root.glob("*/checkpoints/last.ckpt")
    return checkpoint


@pytest.fixture(scope="module")
def validations(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``dmm validate`` of one classifier with the decomposition on 1 process and on 2 DDP processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("DMM_RUN_DIR", "")  # so that leaving the context removes what the runs set
        patch.chdir(tmp)
        autoencoder, classifier = _fit(tmp / "ae", "autoencoder.yaml"), _fit(tmp / "clf", "classifier.yaml")
        validate = ["validate", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), *QUIET]
        validate += ["--ckpt_path", str(classifier), "--evaluation.autoencoder", str(autoencoder)]
        validate += ["--evaluation.num_images", str(NUM_IMAGES), "--evaluation.measure.attack.steps", "5"]
        validate += ["--evaluation.batch_size", "16"]  # two batches on one process, one on each of two
        _run(*validate, "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", "one")
        # The preset as a cluster user stacks it, moved to CPU: gloo, and no SyncBatchNorm (GPU only).
        ddp = ["--config", str(CONFIGS / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu"]
        ddp += ["--trainer.devices", "2", "--trainer.sync_batchnorm", "false", "--trainer.default_root_dir", "two"]
        env = {key: value for key, value in os.environ.items() if key != "DMM_RUN_DIR"}
        done = subprocess.run(
            [sys.executable, "-m", "dmm", *validate, *ddp],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"one": tmp / "one", "two": tmp / "two", "output": done.stdout + done.stderr}


def _results(root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    (summary,) = root.glob("*/decomposition/val-epoch0.json")
    samples = summary.with_name("val-epoch0-samples.pt")
    return json.loads(summary.read_text()), torch.load(samples, weights_only=True)


@pytest.mark.slow
def test_ddp_workers_write_into_one_run_folder(validations: dict) -> None:
    assert "MEMBER: 2/2" in validations["output"]  # two processes really ran
    assert len(list(validations["two"].iterdir())) == 1


@pytest.mark.slow
def test_decomposition_is_the_same_on_one_and_two_processes(validations: dict) -> None:
    (one, one_samples), (two, two_samples) = _results(validations["one"]), _results(validations["two"])
    summary_one, summary_two = one.pop("summary"), two.pop("summary")
    checks_one, checks_two = one.pop("model_checks"), two.pop("model_checks")
    assert two == one  # stage, epoch, settings, autoencoder, shapes, seed
    assert [c["name"] for c in checks_two] == [c["name"] for c in checks_one]
    kept = [key for key in summary_one if not key.startswith(RANDOM_BASELINE)]
    assert summary_one["num_images"] == NUM_IMAGES and set(summary_two) == set(summary_one)
    # Strict JSON writes NaN (e.g. the median of an attack that fooled no image) as null.
    nulls = {k for k in kept if summary_one[k] is None}
    assert nulls == {k for k in kept if summary_two[k] is None}
    finite = [k for k in kept if k not in nulls]
    assert {k: summary_two[k] for k in finite} == pytest.approx({k: summary_one[k] for k in finite}, rel=1e-5, abs=1e-6)
    # Per sample and in subset order: the gather's padding and reordering put every image back in place.
    assert set(two_samples) == set(one_samples)
    num_val = SyntheticManifoldDataModule().hparams.num_val  # the seeded subset: randperm(len(dataset), seed)
    subset = torch.randperm(num_val, generator=torch.Generator().manual_seed(0))[:NUM_IMAGES]
    assert torch.equal(one_samples["index"], subset) and torch.equal(two_samples["index"], subset)
    for key in sorted(set(one_samples) - {RANDOM_BASELINE}):
        assert torch.allclose(
            two_samples[key].double(), one_samples[key].double(), rtol=1e-5, atol=1e-6, equal_nan=True
        ), key


@pytest.mark.slow
def test_model_checks_are_the_same_on_one_and_two_processes(validations: dict) -> None:
    (one, _), (two, _) = _results(validations["one"]), _results(validations["two"])
    assert two["model_checks"] == one["model_checks"]


@pytest.mark.slow
def test_random_subspace_baseline_is_the_same_on_one_and_two_processes(validations: dict) -> None:
    (one, one_samples), (two, two_samples) = _results(validations["one"]), _results(validations["two"])
    torch.testing.assert_close(two_samples[RANDOM_BASELINE], one_samples[RANDOM_BASELINE], rtol=1e-5, atol=1e-6)
    for key in ("random_fraction_mean", "random_fraction_median"):
        assert two["summary"][key] == pytest.approx(one["summary"][key], rel=1e-5)


def _fake_slurm(tmp: Path, srun: str) -> dict[str, str]:
    """Environment of a one-node SLURM job whose `srun` runs ``srun`` (a bash body) and `scontrol` logs."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    shutil.copytree(CONFIGS, tmp / "configs", dirs_exist_ok=True)  # the script runs in the submit folder
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_") and key != "DMM_RUN_DIR"}
    return env | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(tmp),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "dmm",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "WANDB_MODE": "offline",
    }


def _srun_arguments(tmp: Path, *args: str) -> list[str]:
    """The arguments the script gives `srun`, for a job submitted as ``sbatch train.sbatch ARGS``."""
    env = _fake_slurm(tmp, f"printf '%s\\0' \"$@\" > {tmp}/srun.args")
    subprocess.run(["bash", str(SBATCH), *args], cwd=tmp, env=env, check=True, capture_output=True)
    return (tmp / "srun.args").read_text().split("\0")[:-1]


def test_sbatch_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_sbatch_command_parses(tmp_path: Path) -> None:
    args = _srun_arguments(tmp_path, "configs/synthetic/classifier.yaml", "--trainer.max_epochs", "3")
    assert args[:2] == ["dmm", "fit"] and "--ckpt_path" not in args  # a first attempt starts afresh
    assert args[-2:] == ["--trainer.max_epochs", "3"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args[1:], "--print_config"])
    assert exit_info.value.code == 0


def test_sbatch_resumes_from_the_newest_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "slurm-4242"  # where the CLI also puts a job's run without the script
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("first attempt\n")
    for age, name in ((30, "checkpoints/last.ckpt"), (20, "hpc_ckpt_1.ckpt"), (40, "hpc_ckpt_2.ckpt")):
        (run_dir / name).touch()
        os.utime(run_dir / name, (time.time() - age,) * 2)
    args = _srun_arguments(tmp_path, "configs/synthetic/classifier.yaml")
    assert args[args.index("--ckpt_path") + 1] == "runs/slurm-4242/hpc_ckpt_1.ckpt"
    assert not (run_dir / "config.yaml").exists()  # kept as config-attempt<time>.yaml: the CLI saves a new one
    assert [p.read_text() for p in run_dir.glob("config-attempt*.yaml")] == ["first attempt\n"]


@pytest.mark.slow
def test_requeued_job_resumes_where_the_signal_stopped_it(tmp_path: Path) -> None:
    """SIGUSR1 (SLURM's warning) saves an HPC checkpoint and requeues; the rerun script resumes from it."""
    env = _fake_slurm(tmp_path, f'echo $$ > {tmp_path}/srun.pid\nexec {sys.executable} -m dmm "${{@:2}}"')
    script = ["bash", str(SBATCH), "configs/synthetic/classifier.yaml", *QUIET, "--trainer.accelerator", "cpu"]
    script += ["--trainer.sync_batchnorm", "false", "--trainer.max_epochs", "1000"]
    script += ["--data.num_train", "1024", "--data.num_val", "64", "--data.batch_size", "16"]  # 64 steps an epoch
    first = subprocess.Popen(script, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "slurm-4242"
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # past the first epoch: training
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.5)
    pid = int((tmp_path / "srun.pid").read_text())
    os.kill(pid, signal.SIGUSR1)
    while not (tmp_path / "scontrol.log").exists():
        assert time.monotonic() < deadline, "no requeue after SIGUSR1"
        time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)  # what `scontrol requeue` does to the running job
    first.communicate(timeout=60)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")
    # Normally the HPC checkpoint; last.ckpt if an epoch ended between the two signals.
    newest = max([hpc, run_dir / "checkpoints" / "last.ckpt"], key=lambda p: p.stat().st_mtime)
    stopped = torch.load(newest, weights_only=False)
    stopped_at = stopped["epoch"]

    env["SLURM_RESTART_COUNT"] = "1"
    more = ["--trainer.max_epochs", str(stopped_at + 2)]
    second = subprocess.run([*script, *more], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    restored = f"Restoring states from the checkpoint path at {newest.relative_to(tmp_path)}"
    assert restored in second.stdout + second.stderr
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    # Whether the signal's checkpoint counts the interrupted epoch as done depends on where the epoch boundary
    # fell between SIGUSR1 and SIGTERM; either way the rerun continues from it and trains on.
    assert resumed["global_step"] > stopped["global_step"]
    assert resumed["epoch"] in (stopped_at, stopped_at + 1)
