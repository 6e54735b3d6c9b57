"""Shared fixtures: offline W&B, a fresh run-folder root per test, the real MNIST files when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny nets gain nothing from intra-op threads, and on a shared 2-core machine extra threads (and the DDP
# test's second process) oversubscribe the cores many times over.
torch.set_num_threads(1)

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for subprocesses
    monkeypatch.delenv("DMM_RUN_DIR", raising=False)  # each CLI call in a test makes its own run folder
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST files absent from {MNIST_ROOT} (see shared/data/README.md)")
    return MNIST_ROOT
