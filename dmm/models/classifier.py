"""The classifier system: a network, its input normalisation, cross-entropy, accuracy and optional PGD training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from dmm.attacks import pgd
from dmm.errors import DmmError
from dmm.models.optim import configure_optimizers
from dmm.nets import MLP, ClassifierFactory, Shape

TRAIN_HINT = (
    "train one with `dmm fit --config configs/mnist/classifier.yaml` (configs/<dataset>/classifier.yaml for other "
    "data) and pass its runs/<run>/checkpoints/<best>.ckpt"
)


class Classifier(L.LightningModule):
    """Image classifier. Takes images in [0, 1], (B, C, H, W); returns logits (B, num_classes).

    The system owns the input normalisation, so attacks and decompositions work in [0, 1] pixel space.

    Adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    2018) is on when ``adv_eps > 0``: the first ``round(adv_fraction * B)`` images of each (shuffled)
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
        adv_eps: PGD radius in [0, 1] pixel space for adversarial training; 0 turns it off.
        adv_norm: PGD threat model, "l2" or "linf".
        adv_steps: PGD steps per training batch (each one forward and backward).
        adv_step_size: PGD step length; ``None`` means 2.5 * adv_eps / adv_steps.
        adv_fraction: share of each training batch replaced by adversarial examples, in (0, 1].
        adv_random_start: start PGD uniformly inside the ball rather than at the clean image.
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
        adv_eps: float = 0.0,
        adv_norm: Literal["l2", "linf"] = "l2",
        adv_steps: int = 7,
        adv_step_size: float | None = None,
        adv_fraction: float = 1.0,
        adv_random_start: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if min(std) <= 0:
            raise DmmError(f"model.std must be positive, got {list(std)}")
        _check_adversarial(adv_eps, adv_norm, adv_steps, adv_step_size, adv_fraction)
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
        hp = self.hparams
        num_adv = max(1, round(hp.adv_fraction * len(y))) if hp.adv_eps > 0 else 0
        if num_adv:  # rows [0, num_adv) become adversarial; the batch is shuffled, so they are a random share
            x_adv = pgd(
                self,
                x[:num_adv],
                y[:num_adv],
                eps=hp.adv_eps,
                norm=hp.adv_norm,
                steps=hp.adv_steps,
                step_size=hp.adv_step_size,
                random_start=hp.adv_random_start,
            )
            x = torch.cat([x_adv, x[num_adv:]])
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


def _check_adversarial(eps: float, norm: str, steps: int, step_size: float | None, fraction: float) -> None:
    """Refuse adversarial-training settings that PGD would reject mid-training, naming the CLI key."""
    key = "--model.init_args.adv_"
    if not (math.isfinite(eps) and eps >= 0):
        raise DmmError(f"{key}eps must be a finite number >= 0 (0 turns adversarial training off), got {eps}")
    if norm not in ("l2", "linf"):
        raise DmmError(f"{key}norm must be 'l2' or 'linf', got {norm!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DmmError(f"{key}steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise DmmError(f"{key}step_size must be a finite number > 0 or null, got {step_size}")
    if not 0 < fraction <= 1:
        raise DmmError(f"{key}fraction must be in (0, 1], got {fraction}")


def load_classifier(path: str | Path, input_shape: Shape | None = None, num_classes: int | None = None) -> Classifier:
    """A :class:`Classifier` from a ``dmm fit`` checkpoint (weights only), in eval mode and frozen.

    Raises:
        DmmError: the file is missing, unreadable, not a classifier, or made for other images or classes.
    """
    path = Path(path)
    if not path.is_file():
        raise DmmError(f"classifier checkpoint {path} not found: {TRAIN_HINT}")
    try:
        model = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/pickle raise many types; their first line says what went wrong
        reason = (str(error).strip().splitlines() or [""])[0]
        raise DmmError(
            f"cannot load classifier checkpoint {path} ({type(error).__name__}: {reason}); {TRAIN_HINT}"
        ) from None
    shape, classes = tuple(model.hparams.input_shape), model.hparams.num_classes
    wanted = (tuple(input_shape or shape), num_classes or classes)
    if (shape, classes) != wanted:
        raise DmmError(
            f"classifier checkpoint {path} takes {shape} images and {classes} classes, not {wanted[0]} and "
            f"{wanted[1]}: {TRAIN_HINT} on this dataset"
        )
    return model.eval().requires_grad_(False)
