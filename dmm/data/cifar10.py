"""CIFAR-10 held in memory, an optional class subset, and crop-and-flip augmentation done on whole batches."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from dmm.data.loading import EpochRandomSampler
from dmm.errors import DmmError

FOLDER = datasets.CIFAR10.base_folder  # "cifar-10-batches-py", what the official archive unpacks to
TRAIN_FILES = tuple(name for name, _ in datasets.CIFAR10.train_list)  # data_batch_1 .. data_batch_5
TEST_FILES = tuple(name for name, _ in datasets.CIFAR10.test_list)  # test_batch
META_FILE = datasets.CIFAR10.meta["filename"]  # batches.meta
ALL_FILES = (*TRAIN_FILES, *TEST_FILES, META_FILE)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches, but nothing that could run code: only numpy's array rebuilders."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # what the official (Python 2) files name
        ("numpy._core.multiarray", "_reconstruct"),  # ... and numpy >= 2 when it writes protocol 2
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` for a whole batch at once.

    Each image is zero-padded by ``padding``, cropped back to (H, W) at an offset drawn uniformly from
    [0, 2 * padding] along each axis, and mirrored left-right with probability 1/2; one draw per image.

    Args:
        x: images (B, C, H, W), any dtype (zero is the padding value).
        padding: pixels of zero padding on every side.
        generator: source of the random draws (``None``: torch's global generator).

    Returns:
        Augmented images, same shape, dtype and device as ``x``.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator).to(x.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(height, device=x.device)  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(width, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the crop's columns backwards
    index = torch.arange(batch, device=x.device)[:, None, None]
    # Advanced indices around a slice put their broadcast shape first: (B, H, W, C).
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class RandomCropFlipCollate:
    """A DataLoader ``collate_fn``: stacks (image, label) pairs, then applies :func:`random_crop_flip`."""

    def __init__(self, padding: int = 4) -> None:
        self.padding = padding

    def __call__(self, samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x, y = default_collate(samples)
        return random_crop_flip(x, self.padding), y


class ByteImages(Dataset):
    """Images kept as uint8 (a quarter of float32's memory), served as float32 in [0, 1].

    Items are ``(x, y)``: ``x`` float32 (C, H, W) in [0, 1], ``y`` int64 scalar.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].float().div_(255), self.labels[index]


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (or a subset of its classes), loaded once into memory; no PIL and no normalisation.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 3, 32, 32)`` in [0, 1], ``y`` int64 ``(B,)`` in
    [0, num_classes). The 50 000 training images (of the chosen classes) are split by ``seed`` into
    train and val; the 10 000 test images serve test and predict. Training batches only are augmented,
    as tensors: a random 32x32 crop of the image zero-padded by 4, and a random horizontal flip.

    Files are the official python version, ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch,
    batches.meta}``. They are read here rather than by ``torchvision.datasets.CIFAR10``, which refuses any
    file whose md5 differs from the official one (so also small test fixtures) and unpickles without
    restriction; the checks here are on structure: keys, dtype, shapes and label range.

    Args:
        data_dir: Folder that contains ``cifar-10-batches-py``.
        download: Download and unpack the official archive into ``data_dir`` when files are missing.
        classes: CIFAR-10 labels to keep (e.g. ``[3, 5]`` for cat vs dog), relabelled 0, 1, ... in this
            order; ``None`` keeps all ten.
        val_fraction: Fraction of the (kept) training images held out for validation.
        augment: Random crop and flip on training batches.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of the train/val split and of the shuffle order (``seed + epoch``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        classes: list[int] | None = None,
        val_fraction: float = 0.1,
        augment: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = tuple(range(10)) if classes is None else tuple(classes)
        if (
            len(self.classes) < 2
            or len(set(self.classes)) != len(self.classes)
            or not set(self.classes) <= set(range(10))
        ):
            raise DmmError(f"--data.classes must be two or more distinct labels in 0..9, got {classes}.")
        if not 0 <= val_fraction < 1:
            raise DmmError(f"--data.val_fraction must be in [0, 1), got {val_fraction}.")
        if batch_size < 1 or num_workers < 0:
            raise DmmError(
                f"--data.batch_size must be >= 1 and --data.num_workers >= 0, got {batch_size} and {num_workers}."
            )
        self.num_classes = len(self.classes)
        self.input_shape = (3, 32, 32)
        self.folder = Path(data_dir) / FOLDER
        self.class_names: list[str] = []  # of the kept classes, in label order; read by setup()
        self.train_set: ByteImages | None = None
        self.val_set: ByteImages | None = None
        self.test_set: ByteImages | None = None

    def prepare_data(self) -> None:
        """Download and unpack the official archive if files are missing and ``download`` is on."""
        if not self._missing():
            return
        if not self.hparams.download:
            raise self._missing_error("download is off")
        cifar = datasets.CIFAR10
        try:
            download_and_extract_archive(cifar.url, self.hparams.data_dir, filename=cifar.filename, md5=cifar.tgz_md5)
        except (RuntimeError, OSError, EOFError) as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise self._missing_error(f"download failed: {reason}") from err
        if self._missing():
            raise self._missing_error("download finished but files are missing")

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs (all when ``None``); later calls reuse them."""
        if self._missing():
            raise self._missing_error("call prepare_data() first" if self.hparams.download else "")
        if not self.class_names:
            names = self._unpickle(META_FILE).get("label_names")
            if not isinstance(names, list) or len(names) != 10:
                raise self._corrupt_error(META_FILE, "no list of 10 'label_names'")
            self.class_names = [str(names[c]) for c in self.classes]
        if stage in ("fit", "validate", None) and self.train_set is None:
            x, y = self._load(TRAIN_FILES)
            n_val = round(self.hparams.val_fraction * len(y))
            if n_val >= len(y):
                raise DmmError(f"--data.val_fraction {self.hparams.val_fraction} leaves no training images.")
            # First n_val of a seeded permutation are val, the rest train.
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
            self.train_set = ByteImages(x[order[n_val:]], y[order[n_val:]])
            self.val_set = ByteImages(x[order[:n_val]], y[order[:n_val]])
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = ByteImages(*self._load(TEST_FILES))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def _loader(self, dataset: ByteImages | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not loaded this split yet")
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=EpochRandomSampler(dataset, hp.seed) if train else None,  # resumable shuffle order
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=RandomCropFlipCollate() if train and hp.augment else None,
        )

    def _missing(self) -> list[str]:
        return [name for name in ALL_FILES if not (self.folder / name).is_file()]

    def _missing_error(self, reason: str) -> DmmError:
        why = "; ".join(filter(None, [reason, f"missing {', '.join(self._missing())}"]))
        return DmmError(
            f"CIFAR-10 files not found in {self.folder.resolve()} ({why}); expected {', '.join(ALL_FILES)}. "
            f"Pass --data.data_dir <folder that contains {FOLDER}>, "
            f"or --data.download true on a machine with internet access."
        )

    def _corrupt_error(self, name: str, detail: str) -> DmmError:
        return DmmError(
            f"{self.folder.resolve() / name} is corrupt or truncated ({detail}). "
            f"Delete {FOLDER} and download it again (--data.download true, needs internet)."
        )

    def _unpickle(self, name: str) -> dict:
        try:
            with open(self.folder / name, "rb") as file:
                # latin1: the official files were written by Python 2, whose str holds the pixel bytes.
                content = _ArrayUnpickler(file, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise self._corrupt_error(name, f"not a CIFAR pickle: {err}") from err
        if not isinstance(content, dict):
            raise self._corrupt_error(name, f"holds a {type(content).__name__}, not a dict")
        return content

    def _load(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Read batches, keep the chosen classes: images uint8 (N, 3, 32, 32), labels int64 (N,) relabelled."""
        images, labels = [], []
        for name in names:
            batch = self._unpickle(name)
            data, label = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise self._corrupt_error(name, "'data' is not a uint8 array of shape (N, 3072)")
            try:
                label = np.asarray(label, dtype=np.int64)
            except (TypeError, ValueError):
                label = None
            if label is None or label.shape != (len(data),) or label.min(initial=0) < 0 or label.max(initial=0) > 9:
                raise self._corrupt_error(name, f"'labels' are not {len(data)} integers in 0..9")
            images.append(data)
            labels.append(label)
        x = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
        y = torch.from_numpy(np.concatenate(labels))
        # new_label[old] = position of old in classes, -1 for classes left out.
        new_label = torch.full((10,), -1, dtype=torch.int64)
        new_label[list(self.classes)] = torch.arange(self.num_classes)
        y = new_label[y]
        keep = y >= 0
        return x[keep], y[keep]
