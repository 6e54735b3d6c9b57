"""`dmm` commands run in-process by the tests, each in a fresh run folder."""

from __future__ import annotations

import os
from pathlib import Path

from dmm.cli import main


def run(*args: str) -> None:
    """``dmm <args>``; DMM_RUN_DIR is cleared before and after, so every call makes its own run folder."""
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))
    os.environ.pop("DMM_RUN_DIR", None)


def fit(config: Path, root: Path, *args: str) -> Path:
    """``dmm fit`` in a fresh folder under ``root``; returns its last checkpoint."""
    run("fit", "--config", str(config), "--trainer.default_root_dir", str(root), *args)
    (checkpoint,) = root.glob("*/checkpoints/last.ckpt")
    return checkpoint
