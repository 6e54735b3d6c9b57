"""Ilyas et al.'s relabelled training set: targeted PGD examples of a classifier N1, labelled as their targets."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from importlib import metadata
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from dmm.attacks import pgd
from dmm.data.loading import tensor_loader
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.models.classifier import TRAIN_HINT, Classifier, load_classifier

log = logging.getLogger(__name__)

NOT_IMAGES = ("batch_size", "num_workers", "download", "data_dir")  # wrapped settings that do not change images
SPLITS = ("train", "val")
COLUMNS = ("x", "y", "label", "success")
SHARD = 4096  # images per resumable piece of a generation: a kill loses at most this much work


class RelabelledAdversarialDataModule(L.LightningDataModule):
    """Every image moved by targeted PGD on N1 towards a wrong class t_i, and labelled t_i alone.

    Reference: Ilyas et al., "Adversarial Examples Are Not Bugs, They Are Features", 2019 (retold by the
    DMM paper, Shamir et al., 2021). x_i stays within eps of the clean s_i and still shows class y_i to
    a person, so a network N2 trained on {(x_i, t_i)} that beats chance on the CLEAN test set has learned
    from the features the attack put in.

    Batches are ``(x, y)``: x float32 (B, C, H, W) in [0, 1], y int64 (B,).
    train: {(x_i, t_i)} from the wrapped module's training split. val: the same generation on its
    validation split, labelled with the targets t_i (val/acc is the fit to the relabelled task);
    ``clean_val_dataloader()`` gives the clean val split with true labels. test, predict: the wrapped
    module's CLEAN test split with true labels, or with ``test_labels="next"`` labelled (y + 1) mod C:
    test/acc is then the share of clean images N2 maps by the relabelling rule, as it would if it had
    learnt the digits' visible (robust) features and the label shift rather than the attack's features.

    Generation runs in ``prepare_data`` (one process per node) and is cached in
    ``<cache_dir>/relabelled-<hash>.pt`` with its provenance in ``.json``: the hash covers N1's file
    contents, the wrapped module's class and the settings that shape its images, every setting
    below but ``batch_size`` and ``cache_dir``, and the dmm version. The log reports the targeted
    success rate, the share of x_i that N1 classifies as t_i. While it runs, every finished piece of
    ``SHARD`` images is saved in ``relabelled-<hash>.parts/``; a killed generation restarted with the same
    settings resumes after the last saved piece and ends with the same tensors as an uninterrupted one
    (the attack has no random start; the targets are drawn up front). The folder goes once the cache exists.

    Args:
        data: the wrapped data module, e.g. ``MNISTDataModule`` (a nested class_path in YAML).
        classifier: N1, a ``dmm fit`` Classifier checkpoint.
        target: "next": t = (y + 1) mod C, Ilyas et al.'s deterministic set; "random": a uniformly
            random wrong class, drawn from ``seed``.
        eps: PGD radius in [0, 1] pixel space; 0 is a control (clean images, wrong labels).
        norm: "l2" or "linf".
        steps: PGD steps; every x_i takes all of them (no early stop).
        step_size: PGD step length; ``None`` means 2.5 * eps / steps.
        batch_size: images per batch, for generation and for the relabelled loaders.
        cache_dir: folder of the cache; ``None`` means ``relabelled/`` beside the checkpoint.
        seed: seeds the random targets and the shuffling.
        max_images: relabel only the first this many images of each split (quick runs); ``None``: all.
        test_labels: "true" or "next": the labels of the clean test split (not part of the cache).
    """

    def __init__(
        self,
        data: L.LightningDataModule,
        classifier: str,
        target: Literal["random", "next"] = "next",
        eps: float = 2.0,
        norm: Literal["l2", "linf"] = "l2",
        steps: int = 100,
        step_size: float | None = None,
        batch_size: int = 128,
        cache_dir: str | None = None,
        seed: int = 0,
        max_images: int | None = None,
        test_labels: Literal["true", "next"] = "true",
    ) -> None:
        super().__init__()
        # A module object among the hyperparameters would stop checkpoints loading with weights_only=True.
        self.save_hyperparameters(ignore="data")
        key = "--data.init_args."
        if target not in ("random", "next") or norm not in ("l2", "linf"):
            raise DmmError(f"{key}target must be 'random' or 'next' and {key}norm 'l2' or 'linf'")
        if test_labels not in ("true", "next"):
            raise DmmError(f"{key}test_labels must be 'true' or 'next', got {test_labels!r}")
        if not (math.isfinite(eps) and eps >= 0):
            raise DmmError(f"{key}eps must be a finite number >= 0, got {eps}")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise DmmError(f"{key}step_size must be a finite number > 0 or null, got {step_size}")
        if steps < 1 or batch_size < 1 or (max_images is not None and max_images < 1):
            raise DmmError(
                f"{key}steps, batch_size and max_images must be >= 1, got {steps}, {batch_size}, {max_images}"
            )
        if not hasattr(data, "num_classes") or not hasattr(data, "input_shape"):
            raise DmmError(f"{key}data must set num_classes and input_shape; {type(data).__name__} does not")
        _restore_own_hparams(data)
        self.data = data
        self.num_classes, self.input_shape = data.num_classes, tuple(data.input_shape)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(classifier).parent / "relabelled"
        self.datasets: dict[str, TensorDataset] = {}
        self.success_rate: dict[str, float] = {}
        self._cache_file: tuple[Path, dict] | None = None

    def prepare_data(self) -> None:
        """Generate and cache the relabelled train and val splits unless a cache of the same provenance exists."""
        self.data.prepare_data()
        if self.trainer is not None and self.trainer.state.fn in ("test", "predict"):
            return  # those stages read only the clean test split
        path, provenance = self.cache_file()
        if path.is_file() and path.with_suffix(".json").is_file():  # the .json is written last
            rates = json.loads(path.with_suffix(".json").read_text()).get("success_rate", {})
            log.info("relabelled data: reusing %s (targeted success rate %s)", path, rates)
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Building N1 draws its initial weights from the global RNG; fork it, so that N2 trains the same
        # (dropout, ...) whether this run generated the cache or found it.
        with torch.random.fork_rng(devices=[]):
            self._generate(path, provenance)

    def _generate(self, path: Path, provenance: dict) -> None:
        """Attack both splits with N1 and write the cache at ``path``, its provenance last."""
        model = load_classifier(self.hparams.classifier, self.input_shape, self.num_classes)
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        model.to(device)
        self.data.setup("fit")
        datasets = {}
        for split in SPLITS:  # the datasets behind the wrapped loaders; items start with (x, y)
            dataset = getattr(self.data, f"{split}_dataloader")().dataset
            datasets[split] = Subset(dataset, range(min(len(dataset), self.hparams.max_images or len(dataset))))
        if not all(len(d) for d in datasets.values()):
            raise DmmError(f"{type(self.data).__name__} has an empty train or val split: nothing to relabel")
        # Offsets in [1, C) drawn up front for both splits, so the targets do not depend on the batch size.
        generator = torch.Generator().manual_seed(self.hparams.seed)
        parts = path.with_suffix(".parts")
        payload = {}
        for split, dataset in datasets.items():
            offsets = torch.randint(1, self.num_classes, (len(dataset),), generator=generator)
            if self.hparams.target == "next":
                offsets.fill_(1)
            payload.update(self._relabel(model, split, dataset, offsets, device, parts))
            self.success_rate[split] = payload[f"{split}_success"].float().mean().item()
            log.info(
                "relabelled %s: N1 classifies %.1f %% of %d x_i as their target t_i (targeted success rate)",
                split, 100 * self.success_rate[split], len(dataset),
            )  # fmt: skip
        atomic_write(path, lambda p: torch.save(payload, p))
        record = {**provenance, "success_rate": self.success_rate}
        atomic_write(path.with_suffix(".json"), lambda p: p.write_text(json.dumps(record, indent=2)))
        shutil.rmtree(parts, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached relabelled splits for fit/validate and the wrapped module's clean splits."""
        self.data.setup(stage)
        if stage not in ("fit", "validate", None) or self.datasets:
            return
        path, _ = self.cache_file()
        if not path.is_file():
            raise DmmError(f"relabelled cache {path} is missing: call prepare_data() first (the Trainer does)")
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch/pickle raise many types for a truncated file
            raise DmmError(
                f"relabelled cache {path} is unreadable ({type(error).__name__}); delete it to regenerate"
            ) from None
        for split in SPLITS:
            self.datasets[split] = TensorDataset(cache[f"{split}_x"], cache[f"{split}_y"])
            self.success_rate[split] = cache[f"{split}_success"].float().mean().item()

    def cache_file(self) -> tuple[Path, dict]:
        """The cache file and the provenance whose hash names it."""
        if self._cache_file is None:
            path = Path(self.hparams.classifier)
            if not path.is_file():
                raise DmmError(
                    f"classifier checkpoint {path} not found: {TRAIN_HINT}, with --data.init_args.classifier"
                )
            hparams = getattr(self.data, "hparams", {}).items()  # "_class_path" etc. are LightningCLI's, not settings
            data_args = {k: v for k, v in hparams if k not in NOT_IMAGES and not k.startswith("_")}
            names = ("target", "eps", "norm", "steps", "step_size", "seed", "max_images")
            provenance = {
                "classifier_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "data": f"{type(self.data).__module__}.{type(self.data).__qualname__}",
                "data_init_args": data_args,
                **{name: self.hparams[name] for name in names},
                "dmm_version": metadata.version("dmm"),
            }
            digest = hashlib.sha256(json.dumps(provenance, sort_keys=True, default=str).encode()).hexdigest()
            # The path is recorded but not hashed: the file contents identify N1 wherever it lives.
            self._cache_file = (
                self.cache_dir / f"relabelled-{digest[:16]}.pt",
                {"classifier": str(path.resolve()), **provenance},
            )
        return self._cache_file

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        loader = self.data.test_dataloader()
        if self.hparams.test_labels == "true":
            return loader
        dataset = _NextLabels(loader.dataset, self.num_classes)
        return DataLoader(dataset, batch_size=loader.batch_size, num_workers=loader.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.data.predict_dataloader()

    def clean_val_dataloader(self) -> DataLoader:
        """The wrapped module's clean validation split, true labels."""
        return self.data.val_dataloader()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError("setup() has not loaded the relabelled splits yet")
        return tensor_loader(self.datasets[split], self.hparams.batch_size, 0, shuffle, self.hparams.seed)

    def _relabel(
        self, model: Classifier, split: str, dataset: Dataset, offsets: Tensor, device, parts: Path
    ) -> dict[str, Tensor]:
        """Targeted PGD on one split: ``{split}_x`` (N, C, H, W), ``_y`` targets, ``_label`` true, ``_success``.

        Works through pieces of ``SHARD`` images; a piece already saved in ``parts`` (by a killed run of the
        same provenance, which names the folder) is loaded instead of recomputed.
        """
        ranges = [(start, min(start + SHARD, len(dataset))) for start in range(0, len(dataset), SHARD)]
        files = {r: parts / f"{split}-{r[0]:07d}-{r[1]:07d}.pt" for r in ranges}
        done = sum(stop - start for (start, stop), file in files.items() if file.is_file())
        if done:
            log.info(
                "relabelled %s: resuming, %d of %d images already generated in %s", split, done, len(dataset), parts
            )
        show = self.trainer is None or self.trainer.progress_bar_callback is not None
        pieces = []
        with tqdm(total=len(dataset), initial=done, desc=f"relabelling {split}", unit="img", disable=not show) as bar:
            for (start, stop), file in files.items():
                if file.is_file():
                    pieces.append(_load_piece(file, stop - start))
                    continue
                piece = self._attack(model, Subset(dataset, range(start, stop)), offsets[start:stop], device, bar)
                parts.mkdir(exist_ok=True)
                atomic_write(file, lambda p, piece=piece: torch.save(piece, p))
                pieces.append(piece)
        return {f"{split}_{name}": torch.cat([p[name] for p in pieces]) for name in COLUMNS}

    def _attack(self, model: Classifier, images: Dataset, offsets: Tensor, device, bar: tqdm) -> dict[str, Tensor]:
        """One piece: every image moved towards (y + offset) mod C; columns as in :data:`COLUMNS`."""
        hp, rows, done = self.hparams, [], 0
        for batch in DataLoader(images, batch_size=hp.batch_size):
            x, y = batch[0], batch[1].long()
            target = (y + offsets[done : done + len(y)]) % self.num_classes
            x_adv = pgd(
                model, x.to(device), target.to(device),
                eps=hp.eps, norm=hp.norm, steps=hp.steps, step_size=hp.step_size, targeted=True,
            )  # fmt: skip
            with torch.no_grad():
                success = model(x_adv).argmax(dim=1).cpu() == target
            rows.append((x_adv.cpu(), target, y, success))
            done += len(y)
            bar.update(len(y))
        return {name: torch.cat(column) for name, column in zip(COLUMNS, zip(*rows, strict=True), strict=True)}


class _NextLabels(Dataset):
    """A dataset of ``(x, y, ...)`` items seen as ``(x, (y + 1) mod C)``."""

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index][:2]
        return x, (torch.as_tensor(y) + 1) % self.num_classes


def _load_piece(file: Path, size: int) -> dict[str, Tensor]:
    """A saved piece of a generation, checked to hold ``size`` images in every column."""
    try:
        piece = torch.load(file, map_location="cpu", weights_only=True)
        if sorted(piece) != sorted(COLUMNS) or any(len(piece[name]) != size for name in COLUMNS):
            raise ValueError("wrong columns or length")
    except Exception as error:  # torch/pickle raise many types for a damaged file
        raise DmmError(
            f"relabelled piece {file} is unreadable ({type(error).__name__}); delete it to regenerate that piece"
        ) from None
    return piece


def _restore_own_hparams(data: L.LightningDataModule) -> None:
    """Undo a LightningCLI mix-up: it hands its whole ``data`` config to every data module it builds.

    The wrapped module, built first, then saved OUR settings as its ``hparams`` (its own sit under our
    ``data`` key) and would fail in ``setup``; its init arguments themselves were right.
    """
    nested = data.hparams.get("data")
    if "classifier" in data.hparams and isinstance(nested, dict) and "init_args" in nested:
        data.hparams.clear()
        data.hparams.update({"_class_path": nested["class_path"], **nested["init_args"]})
