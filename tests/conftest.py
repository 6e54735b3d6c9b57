"""Shared fixtures: offline W&B, a fresh run-folder root per test, the real MNIST files when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny nets gain nothing from intra-op threads, and on a shared 2-core machine extra threads (and the DDP
# test's second process) oversubscribe the cores many times over.
torch.set_num_threads(1)

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


@pytest.fixture
def train_synthetic_autoencoder(tmp_path: Path):
    """Factory: train the synthetic autoencoder for two steps through the CLI, return its last.ckpt.

    Each call makes a new run folder under ``tmp_path / "ae"``; the checkpoint of that call's folder is returned.
    """
    from dmm.cli import main

    def train() -> Path:
        root = tmp_path / "ae"
        before = set(root.glob("*"))
        os.environ.pop("DMM_RUN_DIR", None)
        main([
            "fit", "--config", str(CONFIGS / "synthetic" / "autoencoder.yaml"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        ])  # fmt: skip
        (folder,) = set(root.glob("*")) - before
        return folder / "checkpoints" / "last.ckpt"

    return train
