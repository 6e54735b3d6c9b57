"""`python -m dmm.seeds`: every classifier x autoencoder pair evaluated once, finished steps kept on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmm.seeds import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
FIT = "--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --trainer.logger false"
TEST = ["--trainer.logger", "false", "--trainer.limit_test_batches", "1", "--evaluation.num_images", "16",
        "--evaluation.measure.attack", '{"steps": 4, "eps": 1.0, "step_size": null}']  # fmt: skip


def _seeds(out: Path) -> None:
    main([
        "--out", str(out), "--classifier-config", str(CONFIGS / "classifier.yaml"),
        "--autoencoder-config", str(CONFIGS / "autoencoder.yaml"), "--classifier-seeds", "0", "1",
        "--autoencoder-seeds", "0", "--fit-args", FIT, "--", *TEST,
    ])  # fmt: skip


@pytest.mark.slow
def test_every_pair_is_measured_and_a_rerun_redoes_only_the_unfinished(tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    _seeds(out)
    tests = sorted(p.name for p in out.glob("test-*"))
    assert tests == ["test-c0-a0", "test-c1-a0"]
    assert all((out / name / "done").is_file() for name in [*tests, "classifier-seed0", "autoencoder-seed0"])
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["runs"]) == 2
    # The two classifiers differ by seed: their evaluations must differ too (not the same run twice).
    a, b = (json.loads(next((out / t / "decomposition").glob("*.json")).read_text())["summary"] for t in tests)
    assert a != b
    stamp = (out / "classifier-seed0" / "done").stat().st_mtime_ns
    (out / "test-c1-a0" / "done").unlink()  # as if killed before it finished
    _seeds(out)
    assert (out / "classifier-seed0" / "done").stat().st_mtime_ns == stamp  # kept, not retrained
    assert (out / "test-c1-a0" / "done").is_file()


def test_missing_checkpoint_is_one_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path), "--classifiers", str(tmp_path / "nope.ckpt"), "--autoencoders", "x.ckpt"])
    assert stopped.value.code == 2
    assert "nope.ckpt not found" in capsys.readouterr().err
