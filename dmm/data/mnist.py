"""MNIST and Fashion-MNIST held whole in memory as [0, 1] float tensors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from dmm.data.loading import tensor_loader
from dmm.errors import DmmError

# (file name in <data_dir>/<Name>/raw, expected shape) for each split.
_FILES = {
    "train": (("train-images-idx3-ubyte", (60000, 28, 28)), ("train-labels-idx1-ubyte", (60000,))),
    "test": (("t10k-images-idx3-ubyte", (10000, 28, 28)), ("t10k-labels-idx1-ubyte", (10000,))),
}
# What torchvision's idx reader raises on a truncated or garbled file.
_PARSE_ERRORS = (AssertionError, RuntimeError, ValueError, TypeError, KeyError, IndexError)


class MNISTDataModule(L.LightningDataModule):
    """MNIST digits, loaded once into memory; no PIL transforms and no normalisation.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` in [0, 1], ``y`` int64 ``(B,)`` in [0, 10).
    The 60 000 training images are split by ``seed`` into train and val; the official 10 000 test
    images serve test and predict. Files follow torchvision's layout ``<data_dir>/MNIST/raw/``.

    Args:
        data_dir: Folder that contains ``MNIST/raw`` (torchvision layout).
        download: Download the files into ``data_dir`` when they are missing (needs internet).
        val_size: Training images held out for validation.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of the train/val split.
    """

    dataset_cls = datasets.MNIST

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        val_size: int = 5000,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= val_size < 60000:
            raise DmmError(f"--data.val_size must be in [0, 60000), got {val_size}.")
        if batch_size < 1 or num_workers < 0:
            raise DmmError(
                f"--data.batch_size must be >= 1 and --data.num_workers >= 0, got {batch_size} and {num_workers}."
            )
        self.num_classes = 10
        self.input_shape = (1, 28, 28)
        self.name = self.dataset_cls.__name__
        self.raw_dir = Path(data_dir) / self.name / "raw"
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Download the raw files if they are missing and ``download`` is on."""
        if self._files_exist():
            return
        if not self.hparams.download:
            raise self._missing_error("download is off")
        try:
            # Loads the train split as a side effect; 0.2 s, and it keeps us on torchvision's API.
            self.dataset_cls(self.hparams.data_dir, train=True, download=True)
        except (RuntimeError, OSError, EOFError) as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise self._missing_error(f"download failed: {reason}") from err
        if not self._files_exist():
            raise self._missing_error("download finished but files are missing")

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs (all when ``None``); later calls reuse them."""
        if not self._files_exist():
            raise self._missing_error("call prepare_data() first" if self.hparams.download else "")
        if stage in ("fit", "validate", None) and self.train_set is None:
            x, y = self._load("train")
            # (60000,) permutation: first val_size indices are val, the rest train.
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
            val_idx, train_idx = order[: self.hparams.val_size], order[self.hparams.val_size :]
            self.train_set = TensorDataset(x[train_idx], y[train_idx])
            self.val_set = TensorDataset(x[val_idx], y[val_idx])
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = TensorDataset(*self._load("test"))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not loaded this split yet")
        hp = self.hparams
        return tensor_loader(dataset, hp.batch_size, hp.num_workers, shuffle, hp.seed)

    def _files_exist(self) -> bool:
        return all((self.raw_dir / name).is_file() for pair in _FILES.values() for name, _ in pair)

    def _missing_error(self, reason: str) -> DmmError:
        names = ", ".join(name for pair in _FILES.values() for name, _ in pair)
        why = f" ({reason})" if reason else ""
        return DmmError(
            f"{self.name} files not found in {self.raw_dir.resolve()}{why}; expected {names}. "
            f"Pass --data.data_dir <folder that contains {self.name}/raw>, "
            f"or --data.download true on a machine with internet access."
        )

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)."""
        (image_name, image_shape), (label_name, label_shape) = _FILES[split]
        images = self._read(image_name, read_image_file, image_shape)
        labels = self._read(label_name, read_label_file, label_shape)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise self._corrupt_error(label_name, f"labels outside [0, {self.num_classes})")
        return images.unsqueeze(1).float().div_(255), labels.long()

    def _read(self, name: str, reader, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            tensor = reader(str(self.raw_dir / name))
        except _PARSE_ERRORS as err:
            raise self._corrupt_error(name, "not a valid idx file") from err
        if tuple(tensor.shape) != shape:
            raise self._corrupt_error(name, f"shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def _corrupt_error(self, name: str, detail: str) -> DmmError:
        return DmmError(
            f"{self.raw_dir.resolve() / name} is corrupt or truncated ({detail}). "
            f"Delete it and download it again (--data.download true, needs internet)."
        )


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST, same contract as :class:`MNISTDataModule`; files in ``<data_dir>/FashionMNIST/raw/``.

    Args:
        data_dir: Folder that contains ``FashionMNIST/raw`` (torchvision layout).
        download: Download the files into ``data_dir`` when they are missing (needs internet).
        val_size: Training images held out for validation.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of the train/val split.
    """

    dataset_cls = datasets.FashionMNIST
