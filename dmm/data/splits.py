"""A data module's train and val splits for ``dmm predict``: unshuffled, every image with where it came from."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from dmm.errors import DmmError

SPLITS = ("train", "val")
NOT_IMAGES = ("batch_size", "num_workers", "download", "data_dir")  # settings that do not change the images


class PredictSplits(L.LightningDataModule):
    """The wrapped module's train and val splits as one predict loader, in order: train, then val, by index.

    Batches are ``(x, y, split, index)``: x float32 (B, C, H, W) in [0, 1], y int64 (B,) the true labels,
    split int64 (B,) the item's split as its position in :data:`SPLITS` (0 train, 1 val) and index int64 (B,)
    its position in that split. A prediction can thus be keyed by (split, index) whatever the batch size,
    and :meth:`skip` leaves out what a killed run already wrote (see :class:`dmm.callbacks.ShardWriter`).

    Args:
        data: the wrapped data module, e.g. ``MNISTDataModule`` (a nested class_path in YAML); its
            ``train_dataloader`` and ``val_dataloader`` datasets give items starting with (x, y).
        max_images: only the first this many images of each split (quick runs); ``None``: all.
        batch_size: images per predict batch.
    """

    def __init__(self, data: L.LightningDataModule, max_images: int | None = None, batch_size: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters(ignore="data")  # a module among the hparams would not load with weights_only
        if batch_size < 1 or (max_images is not None and max_images < 1):
            raise DmmError(
                f"--data.init_args.batch_size and max_images must be >= 1, got {batch_size} and {max_images}"
            )
        self.data = wrapped(data)
        self.num_classes, self.input_shape = data.num_classes, tuple(data.input_shape)
        self.splits = SPLITS
        self.datasets: dict[str, Dataset] = {}
        self.skipped: dict[str, set[int]] = {split: set() for split in SPLITS}

    @property
    def sizes(self) -> dict[str, int]:
        """Images per split (after ``max_images``); known after ``setup``."""
        return {split: len(dataset) for split, dataset in self.datasets.items()}

    def provenance(self) -> dict:
        """What the images depend on: the wrapped module's class and image settings, and ``max_images``."""
        return {**data_provenance(self.data), "max_images": self.hparams.max_images}

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.data.setup("fit")
        limit = self.hparams.max_images
        for position, split in enumerate(SPLITS):
            dataset = getattr(self.data, f"{split}_dataloader")().dataset
            size = len(dataset) if limit is None else min(limit, len(dataset))
            if size == 0:
                raise DmmError(f"{type(self.data).__name__} has an empty {split} split: nothing to predict")
            self.datasets[split] = _Indexed(dataset, position, size)

    def skip(self, split: str, indices: Iterable[int]) -> None:
        """Leave these indices of ``split`` out of the predict loader (their predictions exist already)."""
        self.skipped[split].update(indices)

    def predict_dataloader(self) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("setup() has not been called yet")
        parts = []
        for split, dataset in self.datasets.items():
            parts.append(Subset(dataset, [i for i in range(len(dataset)) if i not in self.skipped[split]]))
        return DataLoader(ConcatDataset(parts), batch_size=self.hparams.batch_size, shuffle=False)


class _Indexed(Dataset):
    """The first ``size`` items of a dataset as ``(x, y, split, index)``."""

    def __init__(self, dataset: Dataset, split: int, size: int) -> None:
        self.dataset, self.split, self.size = dataset, split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = self.dataset[index][:2]
        return x, torch.as_tensor(y, dtype=torch.int64), torch.tensor(self.split), torch.tensor(index)


def data_provenance(data: L.LightningDataModule) -> dict:
    """A data module's class and the settings that shape its images (not where files live or batch sizes)."""
    hparams = getattr(data, "hparams", {}).items()  # "_class_path" etc. are LightningCLI's, not settings
    return {
        "data": f"{type(data).__module__}.{type(data).__qualname__}",
        "data_init_args": {k: v for k, v in hparams if k not in NOT_IMAGES and not k.startswith("_")},
    }


def wrapped(data: L.LightningDataModule) -> L.LightningDataModule:
    """Check a data module given to a wrapper, and undo a LightningCLI mix-up of its ``hparams``.

    LightningCLI hands its whole ``data`` config to every data module it builds, so the wrapped module, built
    first, saved the WRAPPER's settings as its hparams (its own sit under their ``data`` key); its init
    arguments themselves were right. Its hparams are its provenance, so they are put back.
    """
    if not hasattr(data, "num_classes") or not hasattr(data, "input_shape"):
        raise DmmError(f"--data.init_args.data must set num_classes and input_shape; {type(data).__name__} does not")
    nested = data.hparams.get("data")
    if isinstance(nested, dict) and "init_args" in nested and "class_path" in nested:
        data.hparams.clear()
        data.hparams.update({"_class_path": nested["class_path"], **(nested["init_args"] or {})})
    return data
