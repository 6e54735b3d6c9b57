"""Lightning callback: detect adversarial examples by their off-manifold size, and project-then-classify."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import default_collate

from dmm.callbacks.batches import cached_batches, evaluation_cache
from dmm.callbacks.decomposition import load_autoencoder
from dmm.detection import Threat, measure, summarize
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.models.autoencoder import Autoencoder


class AdversarialDetection(L.Callback):
    """At ``dmm validate`` and ``dmm test``: can compression by the autoencoder catch or undo adversarial examples?

    On a fixed seeded subset of ``num_images`` images of the stage's dataset (see :mod:`dmm.detection`) it
    attacks the classifier with PGD at ``eps`` and reports how well the reconstruction error and the
    off-manifold residual separate the successful adversarial examples from their clean images (AUROC; the
    attacker does not know the detector), and the clean and robust accuracy of the classifier and of
    project-then-classify f(D(E(x))), attacked white-box through the autoencoder, at each budget of
    ``eps_curve``. Logs ``{stage}/detect/auroc_recon``, ``{stage}/detect/auroc_offmanifold``,
    ``{stage}/ptc/clean_acc``, ``{stage}/ptc/robust_acc@{eps}``, ``{stage}/classifier/...`` and writes
    ``detection/{stage}-epoch{N}.json`` into the run folder. It does nothing during ``dmm fit``. Under DDP every
    process evaluates the whole subset (same result) and rank 0 writes. A progress bar counts the images, and
    finished batches are cached (see :mod:`dmm.callbacks.batches`): a killed or repeated run of the same
    classifier, autoencoder and threat recomputes nothing it has.

    Args:
        autoencoder: path of a ``dmm fit`` autoencoder checkpoint; ``None`` turns the callback off.
        num_images: size of the fixed evaluation subset.
        eps: budget of the adversarial examples to detect.
        eps_curve: budgets of the robust accuracies (one PGD per budget and model).
        norm: threat-model norm, "l2" or "linf".
        steps: PGD iterations.
        step_size: PGD step; ``None`` means 2.5 * eps / steps.
        loss: attacked objective, "ce" or "margin".
        batch_size: images attacked at once.
        seed: seeds the subset.
        cache_dir: folder of the batch cache; ``None`` means ``cache/`` beside the autoencoder checkpoint,
            ``""`` turns caching off.
    """

    def __init__(
        self,
        autoencoder: str | None = None,
        num_images: int = 500,
        eps: float = 2.0,
        eps_curve: list[float] = (1.0, 2.0),
        norm: Literal["l2", "linf"] = "l2",
        steps: int = 40,
        step_size: float | None = None,
        loss: Literal["ce", "margin"] = "ce",
        batch_size: int = 250,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        for value in (eps, *eps_curve):
            if not (math.isfinite(value) and value >= 0):
                raise DmmError(f"AdversarialDetection eps and eps_curve must be finite and >= 0, got {value}")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise DmmError(f"AdversarialDetection step_size must be a finite number > 0 or null, got {step_size}")
        for name, value in (("num_images", num_images), ("steps", steps), ("batch_size", batch_size)):
            if value < 1:
                raise DmmError(f"AdversarialDetection {name} must be >= 1, got {value}")
        if norm not in ("l2", "linf") or loss not in ("ce", "margin"):
            raise DmmError(f"AdversarialDetection norm must be l2/linf and loss ce/margin, got {norm!r}, {loss!r}")
        self.autoencoder_path = autoencoder
        self.threat = Threat(eps, tuple(sorted(eps_curve)), norm, steps, step_size, loss)
        self.num_images, self.batch_size, self.seed, self.cache_dir = num_images, batch_size, seed, cache_dir
        self.autoencoder: Autoencoder | None = None
        self.last_summary: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("validate", "test"):
            return
        if self.autoencoder_path is None:
            rank_zero_warn("AdversarialDetection is off: no autoencoder checkpoint given")
            return
        self.autoencoder = load_autoencoder(self.autoencoder_path, getattr(pl_module, "hparams", {}).get("input_shape"))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.autoencoder is not None and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._run(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.autoencoder is not None:
            self._run(trainer, pl_module, "test", trainer.test_dataloaders)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, dataloaders) -> None:
        dataset = (dataloaders[0] if isinstance(dataloaders, list) else dataloaders).dataset
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(dataset), generator=generator)[: self.num_images]
        x, y = default_collate([dataset[int(i)][:2] for i in order])
        autoencoder = self.autoencoder.to(pl_module.device)  # not in setup: the model moves to its device later

        def compute(rows: slice) -> dict[str, Tensor]:
            xb, yb = x[rows].to(pl_module.device), y[rows].to(pl_module.device)
            return measure(pl_module, autoencoder.encoder, autoencoder.decoder, xb, yb, self.threat)

        models = {"classifier": pl_module, "autoencoder": autoencoder}
        cache = evaluation_cache(
            trainer, f"detection-{stage}", self.cache_dir, self.autoencoder_path, models, self.threat.as_dict()
        )
        shards = list(cached_batches(trainer, f"detection {stage}", cache, (order, x, y), self.batch_size, compute))
        records = {key: torch.cat([s[key].cpu() for s in shards]) for key in shards[0]}
        summary = summarize(records, self.threat)
        if summary["ptc/zero_grad_rate"] > 0:
            rank_zero_warn(
                f"project-then-classify has a zero input gradient at {summary['ptc/zero_grad_rate']:.1%} of the "
                "images: its robust accuracy there is not evidence of robustness (gradient masking)"
            )
        self.last_summary = summary
        for key, value in summary.items():
            pl_module.log(f"{stage}/{key}", value, sync_dist=True)  # equal on every process
        self._write(trainer, stage, summary)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, stage: str, summary: dict[str, float]) -> None:
        folder = Path(trainer.default_root_dir) / "detection"
        folder.mkdir(parents=True, exist_ok=True)
        payload = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "autoencoder": str(self.autoencoder_path),
            "threat": self.threat.as_dict(),
            "summary": {key: value if math.isfinite(value) else None for key, value in summary.items()},
        }
        text = json.dumps(payload, indent=2, allow_nan=False)
        atomic_write(folder / f"{stage}-epoch{trainer.current_epoch}.json", lambda path: path.write_text(text))
