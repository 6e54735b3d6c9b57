"""The classifier system: a network, its input normalisation, cross-entropy and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from dmm.errors import DmmError
from dmm.nets import MLP, ClassifierFactory, Shape


class Classifier(L.LightningModule):
    """Image classifier. Takes images in [0, 1], (B, C, H, W); returns logits (B, num_classes).

    The system owns the input normalisation, so attacks and decompositions work in [0, 1] pixel space.

    Args:
        network: builds the network from ``(input_shape, num_classes)``, e.g. ``dmm.nets.CNN``.
        input_shape: (C, H, W) of the images (linked from the data module by the CLI).
        num_classes: number of classes (linked from the data module by the CLI).
        mean: per-channel mean subtracted before the network (one value broadcasts to all channels).
        std: per-channel standard deviation divided out before the network.
        optimizer: optimiser factory, called with the parameters.
        scheduler: optional learning-rate scheduler factory, called with the optimiser; stepped per epoch.
    """

    def __init__(
        self,
        network: ClassifierFactory = MLP,
        input_shape: Shape = (1, 28, 28),
        num_classes: int = 10,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if min(std) <= 0:
            raise DmmError(f"model.std must be positive, got {list(std)}")
        self.network = network(tuple(input_shape), num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
        self.optimizer, self.scheduler = optimizer, scheduler
        # Keys carry a suffix: ModuleDict refuses "train", which is an nn.Module method.
        self.accuracy = torch.nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("train", "val", "test")}
        )
        self.example_input_array = torch.zeros(2, *input_shape)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images x in [0, 1], (B, C, H, W)."""
        return self.network((x - self.mean) / self.std)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise DmmError(
                f"{stage} loss is {loss.item()} at global step {self.global_step}: lower the learning rate "
                "(--model.optimizer.init_args.lr) or check the data for NaNs"
            )
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", sync_dist=stage != "train")
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler(optimizer)}
