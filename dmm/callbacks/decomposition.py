"""Lightning callbacks: the on/off-manifold decomposition of adversarial perturbations at validation/test."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.utils import make_grid, save_image

from dmm.callbacks.batches import cached_batches, evaluation_cache
from dmm.decomposition import ATTACKS, AttackSettings, measure, summarize
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.models.autoencoder import Autoencoder

log = logging.getLogger(__name__)


def _finite_or_none(value):
    """``value`` with every NaN or infinite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _autoencoder_class(path: Path) -> type[Autoencoder]:
    """The Autoencoder subclass a CLI checkpoint was trained as (Lightning would otherwise rebuild the base)."""
    hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    module_name, _, name = str(hparams.get("_class_path", "")).rpartition(".")
    if not module_name:
        return Autoencoder
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
        raise TypeError(f"the checkpoint holds a {hparams['_class_path']}, not an autoencoder")
    return cls


def load_autoencoder(path: str | Path, input_shape: tuple[int, ...] | None = None) -> Autoencoder:
    """Load any :class:`Autoencoder` (plain or isometric) from a ``dmm fit`` checkpoint, weights only.

    Raises:
        DmmError: the file is missing, unreadable, not an autoencoder, or made for other image shapes.
    """
    train_hint = (
        "train one with `dmm fit --config configs/<dataset>/autoencoder.yaml` "
        "and pass its runs/<run>/checkpoints/last.ckpt"
    )
    path = Path(path)
    if not path.is_file():
        raise DmmError(f"autoencoder checkpoint {path} not found: {train_hint}")
    try:
        model = _autoencoder_class(path).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch/pickle raise many types for a corrupt or foreign file
        raise DmmError(
            f"cannot load autoencoder checkpoint {path} ({type(error).__name__}: {error}); {train_hint}"
        ) from None
    if input_shape is not None and tuple(model.input_shape) != tuple(input_shape):
        raise DmmError(
            f"autoencoder checkpoint {path} was trained on images {tuple(model.input_shape)} but the classifier "
            f"takes {tuple(input_shape)}: {train_hint} on the classifier's dataset"
        )
    return model.eval().requires_grad_(False)


def _image_seed(seed: int, index: int) -> int:
    """A 32-bit seed per (seed, image index); hashed because torch keeps only a CPU seed's low 32 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "little")


class ManifoldDecomposition(L.Callback):
    """Attack a fixed image subset, split the perturbations into on/off-manifold parts, log the figures.

    Every ``every_n_epochs`` validation epochs (after the sanity check), at ``dmm validate`` and at test, on a
    fixed seeded subset of ``num_images`` images of the stage's dataset, it runs unconstrained,
    on-manifold and off-manifold early-stopped PGD with one shared budget (see
    :mod:`dmm.decomposition`) and logs ``{stage}/dmm/...`` metrics, W&B histograms, a table and an image
    grid, and writes ``decomposition/{stage}-epoch{N}.json`` (+ per-sample ``.pt`` and a ``.png`` grid) in
    the run folder. Under DDP each process attacks a shard and the per-sample results are gathered, so the
    figures do not depend on the number of processes. A progress bar counts the attacked images; at
    ``dmm validate`` and ``dmm test`` every finished batch is cached (see :mod:`dmm.callbacks.batches`), so a
    killed or repeated evaluation of the same classifier, autoencoder and settings recomputes nothing it has.

    Args:
        autoencoder: path of a ``dmm fit`` autoencoder checkpoint (the manifold model); ``None`` turns
            the callback off (it is always registered by the CLI, so its keys stay short).
        num_images: size of the fixed evaluation subset.
        eps: attack budget (the largest norm an attack may use).
        norm: threat-model norm, "l2" or "linf".
        steps: PGD iterations.
        step_size: PGD step length, equal for the three attacks; ``None`` means 2.5 * eps / steps.
        clamp: clamp iterates to [0, 1]; ``False`` keeps the constrained attacks exactly in their subspace.
        eps_curve: budgets at which robust accuracy is reported (from the same early-stopped run).
        every_n_epochs: run every this many validation epochs during fit.
        batch_size: images attacked at once.
        seed: seeds the subset and the random-subspace baseline.
        num_grid: images shown in the grid (x, x_adv, d, d_on, d_off; perturbations amplified).
        cache_dir: folder of the batch cache; ``None`` means ``cache/`` beside the autoencoder checkpoint,
            ``""`` turns caching off. Never used during fit, whose weights change every epoch.
    """

    def __init__(
        self,
        autoencoder: str | None = None,
        num_images: int = 500,
        eps: float = 4.0,
        norm: Literal["l2", "linf"] = "l2",
        steps: int = 100,
        step_size: float | None = 0.05,
        clamp: bool = True,
        eps_curve: list[float] = (0.5, 1.0, 1.5, 2.0, 3.0),
        every_n_epochs: int = 1,
        batch_size: int = 250,
        seed: int = 0,
        num_grid: int = 8,
        cache_dir: str | None = None,
    ) -> None:
        if not (math.isfinite(eps) and eps >= 0):
            raise DmmError(f"decomposition.eps must be a finite number >= 0, got {eps}")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise DmmError(f"decomposition.step_size must be a finite number > 0 or null, got {step_size}")
        for name, value in (
            ("num_images", num_images),
            ("steps", steps),
            ("every_n_epochs", every_n_epochs),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise DmmError(f"decomposition.{name} must be >= 1, got {value}")
        if norm not in ("l2", "linf"):
            raise DmmError(f"decomposition.norm must be 'l2' or 'linf', got {norm!r}")
        self.autoencoder_path = autoencoder
        self.settings = AttackSettings(eps, norm, steps, step_size, clamp, early_stop=True)
        self.num_images, self.every_n_epochs, self.batch_size = num_images, every_n_epochs, batch_size
        self.eps_curve, self.seed, self.num_grid = sorted(eps_curve), seed, num_grid
        self.cache_dir = cache_dir
        self.autoencoder: Autoencoder | None = None
        self.last_summary: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.autoencoder_path is None:
            return
        shape = getattr(pl_module, "hparams", {}).get("input_shape")
        self.autoencoder = load_autoencoder(self.autoencoder_path, shape).to(pl_module.device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.autoencoder is None or trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.autoencoder is None:
            return
        self._run(trainer, pl_module, "test", trainer.test_dataloaders)

    def _subset(self, dataloaders, rank: int, world: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dataset = (dataloaders[0] if isinstance(dataloaders, list) else dataloaders).dataset
        count = min(self.num_images, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:count]
        # Shard r takes positions r, r + world, ...; padding to equal length makes all_gather possible.
        per_rank = math.ceil(count / world)
        positions = torch.arange(rank, per_rank * world, world)
        valid = positions < count
        index = order[positions.clamp(max=count - 1)]  # dataset index of each image of this shard
        x, y = default_collate([dataset[int(i)][:2] for i in index])
        return x, y, valid, index

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, dataloaders) -> None:
        x, y, valid, index = self._subset(dataloaders, trainer.global_rank, trainer.world_size)
        device = pl_module.device

        def compute(rows: slice) -> dict[str, Tensor]:
            # One generator per image, seeded by its dataset index: its random baseline is the same
            # whatever batch and process the image lands in.
            generator = [torch.Generator().manual_seed(_image_seed(self.seed, int(i))) for i in index[rows]]
            xb, yb = x[rows].to(device), y[rows].to(device)
            records = measure(pl_module, self.autoencoder.encoder, self.autoencoder.decoder, xb, yb, self.settings,
                              generator=generator)  # fmt: skip
            records["_images"] = records["_images"][: self.num_grid]  # only the grid's images are kept
            return records

        models = {"classifier": pl_module, "autoencoder": self.autoencoder}
        settings = {**self.settings.as_dict(), "seed": self.seed, "num_grid": self.num_grid}
        cache = evaluation_cache(
            trainer, f"decomposition-{stage}", self.cache_dir, self.autoencoder_path, models, settings
        )
        batches = cached_batches(trainer, f"decomposition {stage}", cache, (index, x, y), self.batch_size, compute)
        shards = [{key: value.to(device) for key, value in records.items()} for records in batches]
        local = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
        images = local.pop("_images")[: self.num_grid]
        local["valid"] = valid.to(device)
        local["index"] = index.to(device)  # dataset index of each image, saved with the per-image records
        dtypes = {key: value.dtype for key, value in local.items()}
        # Gathered as float: not every backend (gloo) gathers bool tensors.
        gathered = pl_module.all_gather({key: value.float() for key, value in local.items()})
        records = {}
        for key, value in gathered.items():
            if trainer.world_size > 1:
                value = value.transpose(0, 1).reshape(-1)  # back to subset order: position j*world + r
            records[key] = value.cpu().to(dtypes[key])
        keep = records.pop("valid")
        records = {key: value[keep] for key, value in records.items()}
        summary = summarize(records, self.eps_curve, self.settings.norm)
        self.last_summary = summary
        # Every process holds the same gathered figures: the sync is a mean of equal values that tells
        # Lightning so (it warns about each unsynced epoch-level key under DDP).
        pl_module.log_dict({f"{stage}/dmm/{key}": value for key, value in summary.items()}, sync_dist=True)
        self._write(trainer, stage, summary, records, images)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, stage: str, summary: dict, records: dict, images: Tensor) -> None:
        folder = Path(trainer.default_root_dir) / "decomposition"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{stage}-epoch{trainer.current_epoch}"
        payload = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "autoencoder": str(self.autoencoder_path),
            "settings": self.settings.as_dict(),
            "eps_curve": self.eps_curve,
            "latent_dim": self.autoencoder.latent_dim,
            "input_shape": list(self.autoencoder.input_shape),
            "summary": summary,
        }
        text = json.dumps(_finite_or_none(payload), indent=2, allow_nan=False)  # strict JSON: NaN -> null
        atomic_write(folder / f"{stem}.json", lambda p: p.write_text(text))
        atomic_write(folder / f"{stem}-samples.pt", lambda p: torch.save(records, p))
        grid = self._grid(images)
        atomic_write(folder / f"{stem}.png", lambda p: save_image(grid, p, format="png"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, stage, summary, records, grid)

    @staticmethod
    def _grid(images: Tensor) -> Tensor:
        """Rows of x, x_adv, d, d_on, d_off; perturbations amplified to fill [0, 1] around mid-grey."""
        images = images.detach().float().cpu().clone()
        d = images[:, 2:]
        scale = d.flatten(2).abs().amax(dim=2).clamp_min(1e-12)[..., None, None, None]
        images[:, 2:] = 0.5 + 0.5 * d / scale
        return make_grid(images.flatten(0, 1), nrow=5, pad_value=1.0)

    @staticmethod
    def _log_wandb(logger: WandbLogger, stage: str, summary: dict, records: dict, grid: Tensor) -> None:
        import wandb

        ok = records["full_success"]
        columns = ["correct"] + [f"{a}_{k}" for a in ATTACKS for k in ("success", "l2")]
        columns += ["on_fraction", "random_fraction"]
        rows = torch.stack([records[c].float() for c in columns], dim=1).tolist()
        try:
            logger.experiment.log(
                {
                    f"{stage}/dmm/on_fraction_hist": wandb.Histogram(records["on_fraction"][ok].numpy()),
                    f"{stage}/dmm/random_fraction_hist": wandb.Histogram(records["random_fraction"][ok].numpy()),
                    **{
                        f"{stage}/dmm/{a}_l2_hist": wandb.Histogram(records[f"{a}_l2"][records[f"{a}_success"]].numpy())
                        for a in ATTACKS
                    },
                    f"{stage}/dmm/samples": wandb.Table(columns=columns, data=rows),
                    f"{stage}/dmm/grid": wandb.Image(grid, caption="x | x_adv | d | d_on | d_off"),
                }
            )
        except Exception as error:  # a W&B failure must not end a run whose results are already on disk
            log.warning("W&B logging of the decomposition failed (%s); figures are in the run folder", error)
