"""Cached, resumable batches of the evaluation callback, with the decomposition and the detection measures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dmm.callbacks.batches import BatchCache, module_digest
from dmm.cli import main
from dmm.errors import DmmError
from dmm.measures import Decomposition, Detection

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
NO_GRID = ["--evaluation.num_grid=0"]  # the image grid is tested in test_evaluation.py, and takes seconds to draw


class Killed(Exception):
    """Stands for the process being killed mid-evaluation."""


def run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))


def calls_to(monkeypatch: pytest.MonkeyPatch, measure: type, die_on: int | None = None) -> list[int]:
    """Wrap ``measure.measure``: record each batch size; raise ``Killed`` at call number ``die_on``."""
    calls: list[int] = []
    original = measure.measure

    def wrapper(self, models, batch):
        calls.append(len(batch.x))
        if len(calls) == die_on:
            raise Killed
        return original(self, models, batch)

    monkeypatch.setattr(measure, "measure", wrapper)
    return calls


def test_module_digest_sees_every_weight_and_buffer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = module_digest(net)
    assert module_digest(net) == before
    net[1].running_mean += 1e-7  # a buffer, not a parameter
    assert module_digest(net) != before


def test_cache_keys_on_provenance_and_batch_contents(tmp_path: Path) -> None:
    index, x = torch.arange(4), torch.rand(4, 1, 2, 2)
    records = {"value": torch.rand(4)}
    cache = BatchCache(tmp_path, "test", {"setting": 1})
    assert cache.load((index, x)) is None
    cache.save((index, x), records)
    assert torch.equal(BatchCache(tmp_path, "test", {"setting": 1}).load((index, x))["value"], records["value"])
    assert BatchCache(tmp_path, "test", {"setting": 2}).load((index, x)) is None
    assert BatchCache(tmp_path, "test", {"setting": 1}).load((index, x + 1e-3)) is None  # other images
    off = BatchCache(None, "test", {"setting": 1})
    off.save((index, x), records)
    assert off.load((index, x)) is None
    (damaged,) = cache.folder.glob("batch-*.pt")
    damaged.write_bytes(b"truncated")
    with pytest.raises(DmmError, match=r"batch-.*\.pt is unreadable.*delete it"):
        cache.load((index, x))


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    run("fit", "--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *QUIET,
        "--trainer.default_root_dir", str(tmp_path / "clf"))  # fmt: skip
    (checkpoint,) = (tmp_path / "clf").glob("*/checkpoints/last.ckpt")
    return checkpoint


def test_killed_decomposition_resumes_from_its_finished_batches(
    tmp_path: Path, classifier: Path, train_synthetic_autoencoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    autoencoder = train_synthetic_autoencoder()
    cache = tmp_path / "cache"
    common = ["--config", str(CONFIGS / "synthetic" / "classifier.yaml"), "--ckpt_path", str(classifier), *QUIET,
              "--evaluation.autoencoder", str(autoencoder), "--evaluation.num_images=40",
              "--evaluation.measure.attack.steps=5", "--evaluation.batch_size=16",
              "--trainer.limit_test_batches=1", *NO_GRID]  # fmt: skip

    def test(name: str, *args: str) -> dict:
        run("test", *common, *args, "--trainer.default_root_dir", str(tmp_path / name))
        (folder,) = (tmp_path / name).glob("*/decomposition")
        return torch.load(folder / "test-epoch0-samples.pt", weights_only=True)

    uncached = test("uncached", "--evaluation.cache_dir=")
    assert not cache.exists() and not (autoencoder.parent / "cache").exists()

    calls = calls_to(monkeypatch, Decomposition, die_on=2)
    with pytest.raises(Killed):  # the first of three batches was finished
        test("killed", f"--evaluation.cache_dir={cache}")
    calls = calls_to(monkeypatch, Decomposition)
    resumed = test("resumed", f"--evaluation.cache_dir={cache}")
    assert calls == [16, 8]  # only the two unfinished batches
    assert resumed.keys() == uncached.keys()
    for key, value in uncached.items():
        assert torch.allclose(resumed[key].float(), value.float(), equal_nan=True), key

    again = test("again", f"--evaluation.cache_dir={cache}")
    assert calls == [16, 8]  # nothing recomputed: the very same records
    torch.testing.assert_close(again, resumed, rtol=0, atol=0, equal_nan=True)
    (provenance,) = cache.glob("decomposition-test-*/provenance.json")
    assert json.loads(provenance.read_text())["settings"]["steps"] == 5
    test("other_eps", f"--evaluation.cache_dir={cache}", "--evaluation.measure.attack.eps=2.0")
    assert calls == [16, 8, 16, 16, 8]  # another setting, another cache


def test_detection_rerun_reads_its_cache(
    tmp_path: Path, classifier: Path, train_synthetic_autoencoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    autoencoder = train_synthetic_autoencoder()
    settings = {"autoencoder": autoencoder, "num_images": 24, "batch_size": 16, "measure.attack.steps": 5}
    callback = [f"--evaluation.{key}={value}" for key, value in settings.items()]
    calls = calls_to(monkeypatch, Detection)
    summaries = []
    for name in ("first", "second"):
        run("test", "--config", str(CONFIGS / "synthetic" / "detection.yaml"), *callback, *QUIET, *NO_GRID,
            "--ckpt_path", str(classifier), "--trainer.limit_test_batches=1",
            "--trainer.default_root_dir", str(tmp_path / name))  # fmt: skip
        (written,) = (tmp_path / name).glob("*/detection/test-epoch0.json")
        summaries.append(json.loads(written.read_text())["summary"])
    assert calls == [16, 8]  # the second run attacked nothing
    assert summaries[0] == summaries[1]
    assert list((autoencoder.parent / "cache").glob("detection-test-*/batch-*.pt"))  # the default folder
