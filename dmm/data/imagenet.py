"""ImageNet (ILSVRC-2012) from an ImageFolder tree, with the standard crops, optionally a subset of classes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from dmm.data.loading import EpochRandomSampler
from dmm.errors import DmmError

SPLITS = ("train", "val")


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a damaged file is named in one clear error instead of a PIL traceback."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # a few ImageNet JPEGs are greyscale or CMYK
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DmmError(f"{path} is not a readable image ({err}); delete or replace it.") from err


class _ClassSubsetFolder(datasets.ImageFolder):
    """ImageFolder over the given class folders only, labelled by their position in ``wnids``."""

    def __init__(self, root: Path, wnids: tuple[str, ...], transform: v2.Transform) -> None:
        self.wnids = wnids  # read by find_classes, which ImageFolder's __init__ calls
        super().__init__(str(root), transform=transform, loader=_load_rgb)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        missing = [w for w in self.wnids if not (Path(directory) / w).is_dir()]
        if missing:
            raise FileNotFoundError(f"class folders missing from {Path(directory).resolve()}: {', '.join(missing[:5])}")
        return list(self.wnids), {w: i for i, w in enumerate(self.wnids)}


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet from ``<data_dir>/{train,val}/<wnid>/*.JPEG``, read with PIL by DataLoader workers.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 3, image_size, image_size)`` in [0, 1] (normalisation
    belongs to the model), ``y`` int64 ``(B,)`` in [0, num_classes). Training images get
    ``RandomResizedCrop(image_size)`` and a random horizontal flip; the others the standard evaluation
    crop, ``Resize(image_size * 256 / 224)`` then ``CenterCrop(image_size)``. The official val images
    serve val, test and predict (the test labels are not public); sort them into one folder per wnid
    first (e.g. with the widely used ``valprep.sh``). Class folders are listed when the module is built,
    so ``num_classes`` is known before any image is read.

    Args:
        data_dir: Folder that contains ``train/`` and ``val/``.
        classes: The classes to keep: a list of wnids (labelled 0, 1, ... in that order), or a count n
            for the first n wnids in sorted order; ``None`` keeps every folder of ``train/``.
        image_size: Side of the square crops.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes decoding JPEGs; 0 decodes in the main process.
        seed: Seed of the shuffle order (``seed + epoch``).
    """

    def __init__(
        self,
        data_dir: str,
        classes: list[str] | int | None = None,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise DmmError(
                "--data.image_size and --data.batch_size must be >= 1 and --data.num_workers >= 0, "
                f"got {image_size}, {batch_size} and {num_workers}."
            )
        self.root = Path(data_dir)
        missing = [split for split in SPLITS if not (self.root / split).is_dir()]
        if missing:
            raise DmmError(
                f"ImageNet folder {self.root.resolve()} has no {' or '.join(f'{s}/' for s in missing)}; expected "
                "<data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG. "
                "Pass --data.data_dir <folder that contains train and val>."
            )
        available = sorted(entry.name for entry in (self.root / "train").iterdir() if entry.is_dir())
        self.wnids = self._choose(available, classes)
        self.num_classes = len(self.wnids)
        self.input_shape = (3, image_size, image_size)
        self.train_set: datasets.ImageFolder | None = None
        self.val_set: datasets.ImageFolder | None = None

    def _choose(self, available: list[str], classes: list[str] | int | None) -> tuple[str, ...]:
        if classes is None:
            chosen = available
        elif isinstance(classes, int):
            chosen = available[:classes] if classes <= len(available) else []
        else:
            unknown = sorted(set(classes) - set(available))
            if unknown:
                raise DmmError(
                    f"--data.classes names wnids with no folder in {(self.root / 'train').resolve()}: "
                    f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}."
                )
            chosen = list(classes)
        if len(chosen) < 2 or len(set(chosen)) != len(chosen):
            raise DmmError(
                f"--data.classes must choose two or more distinct classes of the {len(available)} folders in "
                f"{(self.root / 'train').resolve()}, got {classes}."
            )
        return tuple(chosen)

    def setup(self, stage: str | None = None) -> None:
        """Index the image files of the splits that ``stage`` needs (all when ``None``)."""
        size = self.hparams.image_size
        to_unit = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]  # uint8 -> float32 in [0, 1]
        if stage in ("fit", None) and self.train_set is None:
            train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_unit])
            self.train_set = self._folder("train", train)
        if self.val_set is None:
            evaluation = v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size), *to_unit])
            self.val_set = self._folder("val", evaluation)

    def _folder(self, split: str, transform: v2.Transform) -> datasets.ImageFolder:
        try:
            return _ClassSubsetFolder(self.root / split, self.wnids, transform)
        except FileNotFoundError as err:  # a missing class folder, or one without images
            raise DmmError(f"ImageNet {split}/ is incomplete: {str(err).splitlines()[0]}.") from err

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: datasets.ImageFolder | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("setup() has not indexed this split yet")
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=EpochRandomSampler(dataset, hp.seed) if shuffle else None,  # resumable shuffle order
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )
