"""CIFAR-10 and ImageNet data modules on small files written in the real on-disk formats, and their configs.

No CIFAR-10 or ImageNet files exist on the test machines: the fixtures write a few images in exactly the
formats the real data come in (CIFAR's pickled batches, ImageNet's ImageFolder of JPEGs), and everything
else goes through the real code.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets

from dmm.cli import main
from dmm.data import CIFAR10DataModule, ImageNetDataModule
from dmm.data.cifar10 import random_crop_flip
from dmm.errors import DmmError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
PER_BATCH, TEST_SIZE = 20, 30  # the real files hold 10 000 each


# ---------------------------------------------------------------- fake files


def _pickle_like_python2(obj: object) -> bytes:
    """Protocol 2 with numpy's pre-2.0 module path: how the official files (Python 2's cPickle) name arrays."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/cifar-10-batches-py`` with the official files and keys; returns each batch's (data, labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate(CIFAR_FILES[:-1]):
        n = TEST_SIZE if name == "test_batch" else PER_BATCH
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows: 1024 red, 1024 green, 1024 blue
        labels = [(7 * j + i) % 10 for j in range(n)]
        batch = {
            "batch_label": f"batch {i}",
            "labels": labels,
            "data": data,
            "filenames": [f"{j}.png" for j in range(n)],
        }
        (folder / name).write_bytes(_pickle_like_python2(batch))
        batches[name] = (data, np.array(labels))
    meta = {"num_cases_per_batch": PER_BATCH, "label_names": CIFAR_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_pickle_like_python2(meta))
    return batches


# Class colours (a horizontal brightness ramp makes crops and flips visible); n04 is greyscale, as some
# real ImageNet JPEGs are, and one n03 image is CMYK.
WNID_COLOURS = {"n01": (220, 30, 30), "n02": (30, 220, 30), "n03": (30, 30, 220), "n04": (128, 128, 128)}


def write_imagenet(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG``: tiny JPEGs of several sizes and modes, coloured by class."""
    per_class = per_class or {"train": 3, "val": 2}
    for split, count in per_class.items():
        for wnid, colour in WNID_COLOURS.items():
            (root / split / wnid).mkdir(parents=True)
            for j in range(count):
                width, height = 40 + 8 * j, 30 + 6 * j
                ramp = np.linspace(0.5, 1.0, width)[None, :, None]
                pixels = (np.array(colour)[None, None, :] * ramp).repeat(height, 0).round().astype(np.uint8)
                image = Image.fromarray(pixels)
                if wnid == "n04":
                    image = image.convert("L")
                elif wnid == "n03" and j == 0:
                    image = image.convert("CMYK")
                image.save(root / split / wnid / f"{wnid}_{j}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar(root)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


def cifar_module(root: Path, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(data_dir=str(root), download=False, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def images_of(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(x), torch.stack(y)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_shapes_range_layout_and_split(cifar, monkeypatch):
    root, batches = cifar
    # Files present: download=True must not try to download.
    monkeypatch.setattr("dmm.data.cifar10.download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    dm = CIFAR10DataModule(data_dir=str(root), download=True, batch_size=8)
    dm.prepare_data()
    dm.setup()
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10 and dm.class_names == CIFAR_NAMES
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (90, 10, TEST_SIZE)
    # Test images in file order, rows read as (R, G, B) planes of 32x32, scaled to [0, 1].
    x, y = images_of(dm.test_set)
    data, labels = batches["test_batch"]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.from_numpy(data).float().view(-1, 3, 32, 32) / 255)
    assert y.tolist() == labels.tolist()
    # The documented split: val = the first 10 of a permutation seeded by `seed`, train the rest.
    all_data = torch.from_numpy(np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dm.val_set.images.flatten(1), all_data[order[:10]])
    assert torch.equal(dm.train_set.images.flatten(1), all_data[order[10:]])
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
    assert yb.shape == (8,) and yb.dtype == torch.int64


def test_cifar_split_is_seeded_and_stages_load_what_they_need(cifar):
    root, _ = cifar
    a, b, c = (CIFAR10DataModule(data_dir=str(root), download=False, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("validate")
    assert a.test_set is None
    assert torch.equal(a.val_set.images, b.val_set.images) and not torch.equal(a.val_set.images, c.val_set.images)
    a.setup("test")
    assert len(a.test_set) == TEST_SIZE


def test_cifar_class_subset_is_relabelled_in_the_given_order(cifar):
    root, batches = cifar
    dm = CIFAR10DataModule(data_dir=str(root), download=False, classes=[5, 3])
    assert dm.num_classes == 2  # known before any file is read: the CLI links it into the model
    dm.setup()
    assert dm.class_names == ["dog", "cat"]
    data, labels = batches["test_batch"]
    keep = np.isin(labels, [5, 3])
    x, y = images_of(dm.test_set)
    assert y.tolist() == [0 if label == 5 else 1 for label in labels[keep]]
    torch.testing.assert_close(x, torch.from_numpy(data[keep]).float().view(-1, 3, 32, 32) / 255)
    train_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert len(dm.train_set) + len(dm.val_set) == np.isin(train_labels, [5, 3]).sum()


@pytest.mark.parametrize("classes", [[3], [3, 3], [3, 10]])
def test_cifar_bad_class_subsets_are_refused(classes):
    with pytest.raises(DmmError, match="--data.classes"):
        CIFAR10DataModule(classes=classes)


def _candidates(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Every image torchvision's RandomCrop(32, padding) + RandomHorizontalFlip() can make: (2 * 81, C, H, W)."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    crops = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_random_crop_flip_makes_only_torchvisions_crops():
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, 4, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    drawn = []
    for image, augmented in zip(x, out, strict=True):
        (match,) = (_candidates(image) == augmented).flatten(1).all(1).nonzero()[:, 0].tolist()
        drawn.append(match)
    assert len(set(drawn)) > 20  # offsets and flips differ from image to image
    assert any(m < 81 for m in drawn) and any(m >= 81 for m in drawn)  # both flipped and unflipped
    as_bytes = random_crop_flip(x.mul(255).byte(), 4)  # uint8 works too, zero-padded
    assert as_bytes.shape == x.shape and as_bytes.dtype == torch.uint8


def test_cifar_augments_training_batches_only(cifar):
    root, _ = cifar
    plain = cifar_module(root, augment=False, batch_size=40)
    augmented = cifar_module(root, batch_size=40)
    # The same seed gives the same split and shuffle order; only the pixels of training batches differ.
    (x_plain, y_plain), (x_aug, y_aug) = next(iter(plain.train_dataloader())), next(iter(augmented.train_dataloader()))
    assert torch.equal(y_plain, y_aug)
    assert x_aug.shape == (40, 3, 32, 32) and x_aug.dtype == torch.float32 and 0 <= x_aug.min() and x_aug.max() <= 1
    assert sum(not torch.equal(a, b) for a, b in zip(x_plain, x_aug, strict=True)) > 35
    for a, b in zip(x_plain, x_aug, strict=True):
        assert (_candidates(a) == b).flatten(1).all(1).any()
    for loader, dataset in (
        (augmented.val_dataloader(), augmented.val_set),
        (augmented.test_dataloader(), augmented.test_set),
    ):
        x, y = next(iter(loader))
        expected_x, expected_y = images_of(dataset)
        assert torch.equal(x, expected_x[: len(x)]) and torch.equal(y, expected_y[: len(y)])


def test_missing_cifar_files_say_what_to_do(tmp_path, cifar):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DmmError, match="--data.data_dir") as info:
            step()
        message = str(info.value)
        assert "cifar-10-batches-py" in message and all(name in message for name in CIFAR_FILES)
        assert "\n" not in message
    shutil.copytree(cifar[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DmmError, match="missing test_batch"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).setup()


def test_failed_cifar_download_raises_quickly(tmp_path, monkeypatch):
    # A closed local port stands in for a machine without network, so this never downloads.
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    start = time.perf_counter()
    with pytest.raises(DmmError, match="download failed") as info:
        dm.prepare_data()
    assert time.perf_counter() - start < 10
    assert "--data.data_dir" in str(info.value)


class _RunsCode:
    """A pickle payload that would run a shell command when loaded by a plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rewrite(path: Path, **changes) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    path.write_bytes(_pickle_like_python2({**batch, **changes}))


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("data_batch_3", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a CIFAR pickle"),
        ("test_batch", lambda p: p.write_bytes(bytes(range(256)) * 8), "not a CIFAR pickle"),
        ("data_batch_1", lambda p: _rewrite(p, data=np.zeros((PER_BATCH, 3072), np.float32)), "uint8"),
        ("data_batch_2", lambda p: _rewrite(p, data=np.zeros((PER_BATCH, 1024), np.uint8)), "(N, 3072)"),
        ("data_batch_5", lambda p: _rewrite(p, labels=[10] * PER_BATCH), "integers in 0..9"),
        ("data_batch_4", lambda p: _rewrite(p, labels=[0] * (PER_BATCH - 1)), "integers in 0..9"),
        ("batches.meta", lambda p: _rewrite(p, label_names=CIFAR_NAMES[:4]), "label_names"),
        ("data_batch_1", lambda p: p.write_bytes(pickle.dumps(_RunsCode(p.parent / "ran"))), "refusing to load"),
    ],
)
def test_corrupt_cifar_file_is_named(tmp_path, cifar, name, damage, message):
    shutil.copytree(cifar[0], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "cifar-10-batches-py" / name
    damage(path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # the files exist, so nothing to download
    with pytest.raises(DmmError, match="Delete cifar-10-batches-py") as info:
        dm.setup()
    assert str(path.resolve()) in str(info.value) and message in str(info.value)
    assert not (path.parent / "ran").exists()  # the payload did not run


# ---------------------------------------------------------------- ImageNet


def _dominant(x: torch.Tensor) -> list[int]:
    """Per image (B, 3, H, W): the index of the brightest channel, or 3 when all channels are within 3 %."""
    means = x.mean(dim=(2, 3))
    grey = (means.max(1).values - means.min(1).values) < 0.03
    return torch.where(grey, 3, means.argmax(1)).tolist()


def test_imagenet_shapes_range_and_labels(imagenet):
    dm = ImageNetDataModule(str(imagenet), image_size=32, batch_size=16, num_workers=0)
    assert dm.num_classes == 4 and dm.input_shape == (3, 32, 32)  # before setup, for the CLI's links
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (12, 8)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.dtype == torch.int64 and _dominant(x) == y.tolist()  # n01 red = 0, ..., n04 grey = 3
    # Evaluation crops are fixed; training crops and flips are random.
    assert torch.equal(next(iter(dm.val_dataloader()))[0], next(iter(dm.val_dataloader()))[0])
    train = [torch.cat([x for x, _ in dm.train_dataloader()]) for _ in range(2)]
    assert not torch.equal(*train)


def test_imagenet_class_subsets(imagenet):
    dm = ImageNetDataModule(str(imagenet), classes=["n03", "n01"], image_size=32, batch_size=16, num_workers=0)
    assert dm.num_classes == 2
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert len(dm.train_set) == 6 and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert [{0: 2, 1: 0}[label] for label in y.tolist()] == _dominant(x)  # n03 (blue) is 0, n01 (red) is 1
    first_two = ImageNetDataModule(str(imagenet), classes=2, num_workers=0)
    assert first_two.wnids == ("n01", "n02") and first_two.num_classes == 2


@pytest.mark.parametrize(
    ("classes", "message"), [(["n01", "n09"], "n09"), (["n01"], "two or more"), (9, "two or more"), (1, "two or more")]
)
def test_imagenet_bad_class_subsets_are_refused(imagenet, classes, message):
    with pytest.raises(DmmError, match=message):
        ImageNetDataModule(str(imagenet), classes=classes)


def test_imagenet_missing_or_incomplete_folders_say_what_to_do(tmp_path, imagenet):
    with pytest.raises(DmmError, match="--data.data_dir") as info:
        ImageNetDataModule(str(tmp_path / "nowhere"))
    assert str((tmp_path / "nowhere").resolve()) in str(info.value) and "\n" not in str(info.value)
    root = tmp_path / "copy"
    shutil.copytree(imagenet, root)
    shutil.rmtree(root / "val" / "n02")
    dm = ImageNetDataModule(str(root), num_workers=0)
    with pytest.raises(DmmError, match="val/ is incomplete.*n02"):
        dm.setup("validate")
    shutil.rmtree(root / "val")
    with pytest.raises(DmmError, match="no val/"):
        ImageNetDataModule(str(root))


def test_imagenet_damaged_jpeg_is_named(tmp_path, imagenet):
    shutil.copytree(imagenet, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "val" / "n01" / "n01_0.JPEG"
    path.write_bytes(path.read_bytes()[:100])
    dm = ImageNetDataModule(str(tmp_path), image_size=32, num_workers=0)
    dm.setup("validate")
    with pytest.raises(DmmError, match="not a readable image") as info:
        next(iter(dm.val_dataloader()))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- configs, through the CLI on the fake files

IMAGENET_CHEAP = ["--data.batch_size", "2", "--data.num_workers", "0"]
TINY_SEGNET = "[[8], [8], [8], [8], [8]]"
CHEAP = {  # what makes each config seconds-long on a CPU; the rest is the config as committed
    "cifar10/classifier.yaml": ["--data.batch_size", "4"],
    # Geometry metrics: 128 forward-mode passes per validation image; two images are enough here.
    "cifar10/autoencoder.yaml": ["--data.batch_size", "4", "--model.init_args.geometry_samples", "2"],
    "imagenet/classifier.yaml": [
        *IMAGENET_CHEAP,
        "--data.image_size",
        "64",  # at 32 the last stage is 1x1: BatchNorm over 2 values, gradients ~1e3, NaN after one SGD step
        "--model.init_args.network.init_args.width",
        "8",
    ],
    "imagenet/autoencoder.yaml": [
        *IMAGENET_CHEAP,
        "--data.image_size",
        "32",
        "--model.init_args.latent_dim",
        "16",  # 16 channels of 1x1 at 32x32
        "--model.init_args.encoder.init_args.blocks",
        TINY_SEGNET,
        "--model.init_args.decoder.init_args.blocks",
        TINY_SEGNET,
    ],
}


def large_configs() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS)) for d in ("cifar10", "imagenet") for p in (CONFIGS / d).glob("*.yaml"))


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("config", large_configs())
def test_config_runs_on_fake_files(config, cifar, imagenet, monkeypatch):
    monkeypatch.delenv("DMM_RUN_DIR", raising=False)
    data_dir = cifar[0] if config.startswith("cifar10") else imagenet
    debug = str(CONFIGS / "trainer" / "debug.yaml")
    args = ["fit", "--config", str(CONFIGS / config), "--config", debug, "--data.data_dir", str(data_dir)]
    main([*args, *CHEAP[config]])
