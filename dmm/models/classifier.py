"""The classifier system: a network, its input normalisation, cross-entropy, accuracy and optional PGD training."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.models.optim import configure_optimizers
from dmm.nets import MLP, ClassifierFactory, Shape


class Classifier(L.LightningModule):
    """Image classifier. Takes images in [0, 1], (B, C, H, W); returns logits (B, num_classes).

    The system owns the input normalisation, so attacks and decompositions work in [0, 1] pixel space.

    Adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    2018) is on when an ``adversary`` is given: the first ``round(adv_fraction * B)`` images of each (shuffled)
    training batch, at least one, are replaced by PGD examples of the current network, and the
    cross-entropy is taken on the mixed batch, so ``train/loss`` and ``train/acc`` are those of the
    mixed batch and ``train/adv_acc`` is the accuracy on its adversarial part. The attack runs the
    network in eval mode and restores train mode (the choice of MadryLab/robustness): BatchNorm uses
    its running statistics and dropout is off, so the attack targets the network that is evaluated and
    attack iterates never enter the running statistics. Validation and test stay clean.

    Args:
        network: builds the network from ``(input_shape, num_classes)``, e.g. ``dmm.nets.CNN``.
        input_shape: (C, H, W) of the images (linked from the data module by the CLI).
        num_classes: number of classes (linked from the data module by the CLI).
        mean: per-channel mean subtracted before the network (one value broadcasts to all channels).
        std: per-channel standard deviation divided out before the network.
        optimizer: optimiser factory, called with the parameters.
        scheduler: optional learning-rate scheduler factory, called with the optimiser; stepped per epoch.
        adversary: the attack of adversarial training, e.g. ``PGD(eps=2.0, steps=7, random_start=True)``
            (YAML: ``adversary: {eps: 2.0, steps: 7, random_start: true}``); ``None`` trains on clean images.
        adv_fraction: share of each training batch replaced by adversarial examples, in (0, 1].
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
        adversary: PGD | None = None,
        adv_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if isinstance(adversary, dict):  # a checkpoint's hyperparameters, or a plain dict
            adversary = PGD(**adversary)
        if isinstance(adversary, PGD):  # plain data in the checkpoint: it loads with weights_only=True
            self.hparams["adversary"] = adversary.as_dict()
        self.adversary = adversary
        if min(std) <= 0:
            raise DmmError(f"model.std must be positive, got {list(std)}")
        channels = input_shape[0]
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise DmmError(
                    f"model.{name} has {len(values)} values but the images have {channels} channels: "
                    f"give 1 value or {channels}"
                )
        if not 0 < adv_fraction <= 1:
            raise DmmError(f"model.adv_fraction must be in (0, 1], got {adv_fraction}")
        self.network = network(tuple(input_shape), num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
        self.optimizer, self.scheduler = optimizer, scheduler
        # Keys carry a suffix: ModuleDict refuses "train", which is an nn.Module method. Metric states are
        # not persistent, so the extra "train_adv_acc" leaves checkpoints unchanged.
        self.accuracy = torch.nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train", "train_adv", "val", "test")
            }
        )
        self.example_input_array = torch.zeros(2, *input_shape)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images x in [0, 1], (B, C, H, W)."""
        return self.network((x - self.mean) / self.std)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        """Loss and logits (B, num_classes) of one batch; logs ``{stage}/loss`` and ``{stage}/acc``."""
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
        return loss, logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        num_adv = max(1, round(self.hparams.adv_fraction * len(y))) if self.adversary else 0
        if num_adv:  # rows [0, num_adv) become adversarial; the batch is shuffled, so they are a random share
            x = torch.cat([self.adversary(self, x[:num_adv], y[:num_adv]), x[num_adv:]])
        loss, logits = self._step((x, y), "train")
        if num_adv:
            adv_accuracy = self.accuracy["train_adv_acc"]
            adv_accuracy(logits[:num_adv], y[:num_adv])
            self.log("train/adv_acc", adv_accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer, self.scheduler)
