"""The one evaluation callback: any measure of :mod:`dmm.measures` on a fixed seeded image subset.

Everything an experiment shares lives here, so a new experiment is one pure measure file, a registration in
``dmm.measures`` and one YAML: loading the manifold model, the seeded subset (its dataset indices saved with
the records), model checks before the first attack, the batch cache keyed by weights, settings and images,
DDP gathering, JSON written atomically, W&B media through the logger's guarded path, and a progress bar.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import default_collate

from dmm.callbacks.batches import cached_batches, evaluation_cache
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.measures import Decomposition, Measure, Models, make_batch, model_checks
from dmm.media import titled_grid, to_rgb
from dmm.models.loading import load_autoencoder

log = logging.getLogger(__name__)

CHECK_IMAGES = 64
"""Images of the subset the model checks run on (they attack them once more, with FGM and the measure's attack)."""
EXACT_MANIFOLD = "data"
"""``autoencoder`` value that takes the manifold from the data module's ``exact_manifold()``."""


def finite_or_none(value):
    """``value`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fixed_subset(
    dataset, count: int, seed: int, rank: int = 0, world: int = 1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This process's shard of a seeded subset of ``count`` images: x, y, ``valid`` and dataset ``index``.

    The subset is ``randperm(len(dataset), seed)[:count]``; shard r takes positions r, r + world, ..., padded
    (``valid`` False) to equal length so that all_gather works.
    """
    count = min(count, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    per_rank = math.ceil(count / world)
    positions = torch.arange(rank, per_rank * world, world)
    valid = positions < count
    index = order[positions.clamp(max=count - 1)]
    x, y = default_collate([dataset[int(i)][:2] for i in index])
    return x, y, valid, index


def exact_manifold(trainer: L.Trainer):
    """The data module's known manifold (an autoencoder's ``encoder``, ``decoder``, ``latent_dim``, ``input_shape``)."""
    exact = getattr(trainer.datamodule, "exact_manifold", None)
    if exact is None:
        raise DmmError(
            "--evaluation.autoencoder data needs a data module with a known manifold, e.g. KnownManifoldDataModule"
        )
    return exact()


class Evaluation(L.Callback):
    """Run ``measure`` at validation and test on a fixed seeded subset of the stage's dataset.

    Every ``every_n_epochs`` validation epochs of ``dmm fit`` (unless ``during_fit`` is off; never in the sanity
    check), at ``dmm validate`` and at ``dmm test``, it measures ``num_images`` images (the same ones every
    time: ``randperm(seed)``), logs ``{stage}/{measure.name}/<figure>``, W&B histograms, a table and titled
    image grids, and writes ``<run>/{measure.name}/{stage}-epoch{N}.json`` (settings, summary, model checks),
    ``...-samples.pt`` (per-image records with their dataset ``index``) and ``.png`` (grid). Under DDP each
    process measures a shard and the records are gathered, so figures do not depend on the number of
    processes. At ``dmm validate``/``test`` finished batches are cached (:mod:`dmm.callbacks.batches`).

    Args:
        measure: what to measure, e.g. ``Decomposition`` (default) or ``Detection`` (YAML: ``class_path``).
        autoencoder: a ``dmm fit`` autoencoder checkpoint (the manifold model); ``"data"``: the data module's
            exact manifold (its ``exact_manifold()``, e.g. :class:`~dmm.data.KnownManifoldDataModule`'s generator
            and its exact inverse) instead of a learned one; ``None`` turns off measures that need one (the CLI
            always registers this callback, so its keys stay short).
        num_images: size of the fixed subset.
        batch_size: images measured at once.
        seed: seeds the subset and each image's random draws (by dataset index).
        every_n_epochs: measure every this many validation epochs during fit.
        during_fit: measure during ``dmm fit`` at all.
        num_grid: images shown in the grid.
        checks: run the model checks of :func:`dmm.measures.model_checks` first and save them.
        cache_dir: the batch cache; ``None``: ``cache/`` beside the autoencoder (or the run), ``""``: off.
    """

    def __init__(
        self,
        measure: Measure = lazy_instance(Decomposition),
        autoencoder: str | None = None,
        num_images: int = 500,
        batch_size: int = 250,
        seed: int = 0,
        every_n_epochs: int = 1,
        during_fit: bool = True,
        num_grid: int = 8,
        checks: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        for name, value in (("num_images", num_images), ("batch_size", batch_size), ("every_n_epochs", every_n_epochs)):
            if value < 1:
                raise DmmError(f"evaluation.{name} must be >= 1, got {value}")
        if num_grid < 0:
            raise DmmError(f"evaluation.num_grid must be >= 0, got {num_grid}")
        self.measure = measure
        self.autoencoder_path, self.num_images, self.batch_size, self.seed = autoencoder, num_images, batch_size, seed
        self.every_n_epochs, self.during_fit, self.num_grid = every_n_epochs, during_fit, num_grid
        self.checks, self.cache_dir = checks, cache_dir
        self.autoencoder = None
        self.last_summary: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return not self.measure.needs_manifold or self.autoencoder is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.autoencoder_path is None:
            if self.measure.needs_manifold and stage != "fit" and type(self.measure) is not Decomposition:
                rank_zero_warn(f"{type(self.measure).__name__} is off: no autoencoder checkpoint given")
            return
        if self.autoencoder_path == EXACT_MANIFOLD:
            self.autoencoder = exact_manifold(trainer)
            return
        shape = getattr(pl_module, "hparams", {}).get("input_shape")
        self.autoencoder = load_autoencoder(self.autoencoder_path, shape)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (not self.during_fit or (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        self.run(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            self.run(trainer, pl_module, "test", trainer.test_dataloaders)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, dataloaders) -> dict[str, float]:
        """Measure the subset of ``dataloaders``' dataset, log and write the results; return the summary."""
        dataset = (dataloaders[0] if isinstance(dataloaders, list) else dataloaders).dataset
        x, y, valid, index = fixed_subset(dataset, self.num_images, self.seed, trainer.global_rank, trainer.world_size)
        device = pl_module.device
        autoencoder = self.autoencoder.to(device) if self.autoencoder is not None else None
        models = Models(pl_module, *((autoencoder.encoder, autoencoder.decoder) if autoencoder else ()))
        exact = None
        if autoencoder is not None and self.autoencoder_path != EXACT_MANIFOLD:  # a learned model of a known manifold
            if hasattr(trainer.datamodule, "exact_manifold"):
                exact = trainer.datamodule.exact_manifold().to(device)
                models = models._replace(exact=(exact.encoder, exact.decoder))
        if self.measure.needs_subset:  # the whole subset, the same on every process
            self.measure.prepare(*(fixed_subset(dataset, self.num_images, self.seed)[i] for i in (0, 1, 3)))
        # On the first images of the whole subset, the same on every process.
        checks = self._checks(pl_module, *fixed_subset(dataset, min(self.num_images, CHECK_IMAGES), self.seed)[:2])

        def compute(rows: slice) -> dict[str, Tensor]:
            batch = make_batch(x[rows].to(device), y[rows].to(device), index[rows], self.seed)
            records = self.measure.measure(models, batch)
            if "_images" in records:
                records["_images"] = records["_images"][: self.num_grid]  # at most the grid's images are kept
            return records

        name = self.measure.name
        settings = {"measure": type(self.measure).__name__, **self.measure.settings(), "seed": self.seed}
        settings["num_grid"] = self.num_grid
        weights = {"classifier": pl_module, **({"autoencoder": autoencoder} if autoencoder else {})}
        weights |= {"exact": exact} if exact is not None else {}
        # Beside the autoencoder by default: every classifier evaluated against it shares one cache folder.
        exact = self.autoencoder_path in (None, EXACT_MANIFOLD)  # no checkpoint to share a folder with: the run's
        near = Path(trainer.default_root_dir) if exact else Path(self.autoencoder_path).parent
        cache = evaluation_cache(trainer, f"{name}-{stage}", self.cache_dir, near / "cache", weights, settings)
        batches = list(cached_batches(trainer, f"{name} {stage}", cache, (index, x, y), self.batch_size, compute))
        local = {key: torch.cat([b[key].to(device) for b in batches]) for key in batches[0]}
        images = local.pop("_images", None)
        images = None if images is None else images[: self.num_grid]
        local["valid"], local["index"] = valid.to(device), index.to(device)
        records = self._gather(trainer, pl_module, local)
        summary = self.measure.summarize(records)
        self.last_summary = summary
        # Every process holds the same gathered figures: the sync is a mean of equal values that tells
        # Lightning so (it warns about each unsynced epoch-level key under DDP).
        pl_module.log_dict({f"{stage}/{name}/{key}": value for key, value in summary.items()}, sync_dist=True)
        self._write(trainer, stage, summary, records, images, checks)
        return summary

    def _checks(self, model, x: Tensor, y: Tensor) -> list[dict]:
        attack = getattr(self.measure, "attack", None)
        if not self.checks or attack is None:
            return []
        results = model_checks(model, x.to(model.device), y.to(model.device), attack)
        for result in results:
            if result["status"] != "PASS":
                rank_zero_warn(f"model check failed: {result['name']} ({result['detail']})")
        return results

    @staticmethod
    def _gather(trainer: L.Trainer, pl_module: L.LightningModule, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """All processes' records in subset order, on the CPU, padding dropped."""
        dtypes = {key: value.dtype for key, value in local.items()}
        # Gathered as float64 (exact for int64 indices below 2^53): not every backend gathers bool tensors.
        gathered = pl_module.all_gather({key: value.double() for key, value in local.items()})
        records = {}
        for key, value in gathered.items():
            if trainer.world_size > 1:
                value = value.transpose(0, 1).reshape(-1)  # back to subset order: position j*world + r
            records[key] = value.cpu().to(dtypes[key])
        keep = records.pop("valid")
        return {key: value[keep] for key, value in records.items()}

    @rank_zero_only
    def _write(self, trainer, stage: str, summary: dict, records: dict, images: Tensor | None, checks: list) -> None:
        measure = self.measure
        folder = Path(trainer.default_root_dir) / measure.name
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{stage}-epoch{trainer.current_epoch}"
        settings = measure.settings()
        payload = {
            "measure": type(measure).__name__,
            "stage": stage,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "autoencoder": None if self.autoencoder_path is None else str(self.autoencoder_path),
            "settings": settings,
            "arms": settings.get("arms"),
            "eps_curve": settings.get("eps_curve"),
            "latent_dim": None if self.autoencoder is None else self.autoencoder.latent_dim,
            "input_shape": None if self.autoencoder is None else list(self.autoencoder.input_shape),
            "num_images": int(records["index"].numel()),
            "seed": self.seed,
            "summary": summary,
            "model_checks": checks,
        }
        text = json.dumps(finite_or_none(payload), indent=2, allow_nan=False)
        atomic_write(folder / f"{stem}.json", lambda p: p.write_text(text))
        atomic_write(folder / f"{stem}-samples.pt", lambda p: torch.save(records, p))
        figure = None
        if images is not None and len(images):
            columns = dict(zip(measure.image_columns, images.detach().float().cpu().unbind(1), strict=True))
            figure = titled_grid(columns, signed=set(measure.image_columns[2:]))
            atomic_write(folder / f"{stem}.png", lambda p: figure.savefig(p, format="png", dpi=100))
        for logger in trainer.loggers:
            if hasattr(logger, "log_to_experiment"):
                try:
                    media = self._media(stage, records, figure)
                except Exception as error:  # W&B media must never cost a run whose results are on disk
                    log.warning("W&B media of %s not logged (%s: %s)", self.measure.name, type(error).__name__, error)
                else:
                    logger.log_to_experiment(media)

    def _media(self, stage: str, records: dict[str, Tensor], figure) -> dict:
        """W&B histograms of every per-image figure, the records as a table, the titled grid."""
        import wandb

        prefix = f"{stage}/{self.measure.name}"
        columns = [key for key, value in records.items() if value.dim() == 1]
        media = {}
        for key in columns:
            values = records[key].double()
            values = values[torch.isfinite(values)]
            if records[key].is_floating_point() and values.numel():
                media[f"{prefix}/hist/{key}"] = wandb.Histogram(values.numpy())
        rows = torch.stack([records[c].double() for c in columns], dim=1).tolist()
        media[f"{prefix}/records"] = wandb.Table(columns=columns, data=rows)
        if figure is not None:
            media[f"{prefix}/grid"] = wandb.Image(to_rgb(figure).numpy())
        return media
