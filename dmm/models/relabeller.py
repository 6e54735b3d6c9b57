"""Ilyas et al.'s relabelling as a prediction: each image moved by targeted PGD on N1 towards a wrong class."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.models.loading import TRAIN_HINT, load_classifier

ATTACK = PGD(eps=2.0, steps=25, targeted=True)  # 25 steps: 69 % targeted success on MNIST, 71 % with 100


class Relabeller(L.LightningModule):
    """The ``dmm predict`` system that makes Ilyas et al.'s relabelled set: x_i moved towards t_i, labelled t_i.

    Reference: Ilyas et al., "Adversarial Examples Are Not Bugs, They Are Features", 2019. Every image x with
    true label y is attacked by targeted PGD on the classifier N1 towards the wrong class t = (y + o) mod C,
    o in [1, C): o = 1 for ``target="next"``; for ``"random"`` o is drawn uniformly from a hash of (seed,
    split, index), so every image's target is fixed by where it sits in the data, whatever the batch size,
    order or resume. N2, trained on {(x_adv, t)} by :class:`dmm.data.RelabelledDataModule`, never sees a
    correct label. Nothing here draws from the global RNG (N1 is loaded under a forked one), and the attack is
    deterministic, so a resumed generation ends with the same tensors.

    ``predict_step`` takes the batches of :class:`dmm.data.PredictSplits`, ``(x, y, split, index)``, and
    returns a dict of (B, ...) tensors: ``x`` float32 (B, C, H, W) x_adv in [0, 1], ``y`` int64 the targets t,
    ``label`` int64 the true labels, ``success`` bool N1(x_adv) == t (its mean is the targeted success rate),
    and ``split``, ``index`` as given. :class:`dmm.callbacks.ShardWriter` writes them to disk.

    Args:
        classifier: N1, a ``dmm fit`` Classifier checkpoint.
        input_shape: (C, H, W) of the images, linked from the data module; N1 must take them.
        num_classes: C, linked from the data module; N1 must have as many.
        attack: a targeted PGD (YAML: ``attack: {eps: 2.0, steps: 25, targeted: true}``); every x_i takes all
            its steps unless ``early_stop``; a random start is refused (a resumed run would differ).
        target: "next": t = (y + 1) mod C, Ilyas et al.'s deterministic set; "random": a uniformly random wrong
            class, drawn from ``seed``.
        seed: seeds the random targets.

    Example:
        ``dmm predict --config configs/mnist/relabel.yaml --model.init_args.classifier N1.ckpt
        --trainer.callbacks.init_args.output_dir relabelled/next``
    """

    def __init__(
        self,
        classifier: str,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        attack: PGD = ATTACK,
        target: Literal["random", "next"] = "next",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if isinstance(attack, dict):  # hyperparameters read back, or a plain dict
            attack = PGD(**attack)
        self.hparams["attack"] = attack.as_dict()  # plain data for loggers
        if not attack.targeted or attack.random_start or attack.restarts > 1:
            raise DmmError(
                "--model.init_args.attack must be targeted and deterministic for relabelling: set targeted: true, "
                f"random_start: false, restarts: 1 (got {attack.targeted}, {attack.random_start}, {attack.restarts})"
            )
        if target not in ("random", "next"):
            raise DmmError(f"--model.init_args.target must be 'random' or 'next', got {target!r}")
        if not Path(classifier).is_file():
            raise DmmError(
                f"classifier checkpoint {classifier} not found: {TRAIN_HINT} as --model.init_args.classifier"
            )
        self.attack = attack
        with torch.random.fork_rng(devices=[]):  # building N1 draws initial weights before loading its own
            self.classifier = load_classifier(classifier, input_shape and tuple(input_shape), num_classes)
        self.num_classes = self.classifier.hparams.num_classes
        if self.num_classes < 2:
            raise DmmError(f"relabelling needs at least 2 classes, N1 has {self.num_classes}")
        self.classifier_sha256 = hashlib.sha256(Path(classifier).read_bytes()).hexdigest()

    def provenance(self) -> dict:
        """What the predictions depend on besides the images: N1's file contents and the relabelling settings."""
        hp = self.hparams
        return {"classifier_sha256": self.classifier_sha256, "attack": hp.attack, "target": hp.target, "seed": hp.seed}

    def targets(self, y: Tensor, split: Tensor, index: Tensor) -> Tensor:
        """Wrong classes t (B,) int64 for true labels y (B,) of the images at (split, index), each (B,) int64."""
        places = zip(split.tolist(), index.tolist(), strict=True)
        if self.hparams.target == "next":
            offsets = [1] * len(y)
        else:
            offsets = [1 + _draw(f"{self.hparams.seed}/{s}/{i}") % (self.num_classes - 1) for s, i in places]
        return (y + torch.tensor(offsets, dtype=y.dtype, device=y.device)) % self.num_classes

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y, split, index = batch
        target = self.targets(y, split, index)
        x_adv = self.attack(self.classifier, x, target)
        with torch.no_grad():
            success = self.classifier(x_adv).argmax(dim=1) == target
        return {"x": x_adv, "y": target, "label": y, "success": success, "split": split, "index": index}


def _draw(key: str) -> int:
    """A uniform 64-bit integer fixed by ``key``: sha256, so one independent draw per image and no generator state."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
