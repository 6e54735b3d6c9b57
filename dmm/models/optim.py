"""The optimiser set-up every system shares: injected factories, an optional per-epoch scheduler."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


def configure_optimizers(
    module: L.LightningModule, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None
):
    """What ``LightningModule.configure_optimizers`` returns for ``optimizer(params)`` and ``scheduler(opt)``."""
    built = optimizer(module.parameters())
    if scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": scheduler(built)}
