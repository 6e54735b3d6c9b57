"""Data modules: the synthetic manifold's geometry, MNIST's contract, and clear errors on bad files."""

import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from dmm.data import FashionMNISTDataModule, ManifoldGenerator, MNISTDataModule, SyntheticManifoldDataModule
from dmm.errors import DmmError

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
RAW_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
needs_mnist = pytest.mark.skipif(
    not all((MNIST_ROOT / "MNIST" / "raw" / name).is_file() for name in RAW_NAMES),
    reason=f"MNIST raw files not found under {MNIST_ROOT / 'MNIST' / 'raw'}",
)


# ---------------------------------------------------------------- synthetic manifold


def synthetic(**kwargs) -> SyntheticManifoldDataModule:
    dm = SyntheticManifoldDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_synthetic_shapes_and_range():
    dm = synthetic(latent_dim=3, image_size=12, num_train=300, num_val=40, num_test=50, batch_size=32)
    assert dm.input_shape == (1, 12, 12) and dm.num_classes == 4
    for split, n in (("train", 300), ("val", 40), ("test", 50)):
        x, y = dm.datasets[split].tensors
        assert x.shape == (n, 1, 12, 12) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert dm.latents[split].shape == (n, 3)
        assert 0 <= x.min() and x.max() <= 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 12, 12) and y.shape == (32,)
    # Images vary visibly across the manifold, not just by a rounding error.
    assert dm.datasets["train"].tensors[0].std(dim=0).mean() > 0.1


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    for split in ("train", "val", "test"):
        assert torch.equal(a.latents[split], b.latents[split])
        assert torch.equal(a.datasets[split].tensors[0], b.datasets[split].tensors[0])
        assert not torch.equal(a.latents[split], c.latents[split])
    assert not torch.equal(a.generator.out.weight, c.generator.out.weight)
    # The test split does not depend on which stage asked for it first.
    d = SyntheticManifoldDataModule(seed=3)
    d.setup("test")
    assert torch.equal(d.datasets["test"].tensors[0], a.datasets["test"].tensors[0])


def test_synthetic_labels_are_balanced_angular_sectors():
    dm = synthetic(num_train=4000)
    z, y = dm.latents["train"], dm.datasets["train"].tensors[1]
    counts = torch.bincount(y, minlength=4)
    assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000
    # Independent reference for C = 4: the sectors of atan2 + pi are the quadrants, counter-clockwise
    # from the negative z0 axis.
    quadrant = torch.where(z[:, 1] < 0, torch.where(z[:, 0] < 0, 0, 1), torch.where(z[:, 0] >= 0, 2, 3))
    assert torch.equal(y, quadrant)
    assert synthetic(num_classes=7).datasets["train"].tensors[1].unique().tolist() == list(range(7))


def test_synthetic_splits_have_disjoint_latents():
    dm = synthetic()
    z = dm.latents
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        assert torch.cdist(z[first], z[second]).min() > 1e-4


def test_generator_jacobian_has_full_rank_and_matches_autograd():
    k = 4
    generator = ManifoldGenerator(latent_dim=k, image_size=16, seed=0)
    points = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    batched = generator.jacobian(points)  # (5, 256, k), via torch.func.vmap + jacfwd
    assert batched.shape == (5, 256, k)
    for z, jac in zip(points, batched, strict=True):
        reference = torch.autograd.functional.jacobian(lambda v: generator(v[None]).reshape(-1), z)
        torch.testing.assert_close(jac, reference, rtol=1e-4, atol=1e-6)
        assert torch.linalg.matrix_rank(reference) == k
        singular = torch.linalg.svdvals(reference)
        assert singular[-1] / singular[0] > 0.02  # well conditioned, not just barely full rank
    # A JVP is a combination of tangent columns.
    v = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    _, tangent = torch.func.jvp(generator, (points,), (v,))
    torch.testing.assert_close(tangent.reshape(5, -1), torch.einsum("bnk,bk->bn", batched, v))


def test_generator_is_frozen():
    generator = ManifoldGenerator()
    generator.train()
    assert not generator.training
    assert not any(p.requires_grad for p in generator.parameters())


def test_synthetic_noise_moves_data_off_the_manifold():
    clean, noisy = synthetic(), synthetic(noise_std=0.1)
    z = clean.latents["train"]
    on_manifold = clean.generator(z)
    assert torch.equal(clean.datasets["train"].tensors[0], on_manifold)
    x = noisy.datasets["train"].tensors[0]
    assert torch.equal(noisy.latents["train"], z)
    assert 0 <= x.min() and x.max() <= 1
    # Clamping to [0, 1] shrinks the noise a little near the ends of the range.
    assert 0.07 < (x - on_manifold).std() < 0.11


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(DmmError, match="latent_dim"):
        SyntheticManifoldDataModule(latent_dim=1)
    with pytest.raises(DmmError, match="noise_std"):
        SyntheticManifoldDataModule(noise_std=-1.0)


# ---------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist() -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(MNIST_ROOT), download=False)
    dm.prepare_data()
    dm.setup()
    return dm


@needs_mnist
def test_mnist_splits_range_and_statistics(mnist):
    assert (len(mnist.train_set), len(mnist.val_set), len(mnist.test_set)) == (55000, 5000, 10000)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    train_x, train_y = mnist.train_set.tensors
    val_x, val_y = mnist.val_set.tensors
    for images in (train_x, val_x, mnist.test_set.tensors[0]):
        assert images.min() == 0 and images.max() == 1
    # 0.1307 is the well-known mean pixel of all 60 000 training images.
    assert math.isclose(torch.cat([train_x, val_x]).mean().item(), 0.1307, abs_tol=1e-3)
    # Undo the documented split (val = first val_size of a seeded permutation) to see the file's order.
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    labels = torch.empty(60000, dtype=torch.int64)
    labels[order[:5000]], labels[order[5000:]] = val_y, train_y
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


@needs_mnist
def test_mnist_split_is_seeded(mnist):
    again = MNISTDataModule(data_dir=str(MNIST_ROOT), download=True)  # present files: no download
    again.prepare_data()
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[0], mnist.val_set.tensors[0])
    other = MNISTDataModule(data_dir=str(MNIST_ROOT), download=False, seed=1)
    other.setup("validate")
    assert not torch.equal(other.val_set.tensors[1], mnist.val_set.tensors[1])
    assert other.test_set is None  # only what the stage needs is loaded


@pytest.mark.parametrize("module", [MNISTDataModule, FashionMNISTDataModule])
def test_missing_files_without_download_say_what_to_do(tmp_path, module):
    dm = module(data_dir=str(tmp_path), download=False)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DmmError, match="--data.data_dir") as info:
            step()
        message = str(info.value)
        assert str((tmp_path / dm.name / "raw").resolve()) in message
        assert all(name in message for name in RAW_NAMES)
        assert "\n" not in message


def test_failed_download_raises_quickly(tmp_path, monkeypatch):
    # A closed local port stands in for a machine without network, so this never downloads.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    start = time.perf_counter()
    with pytest.raises(DmmError, match="download failed") as info:
        dm.prepare_data()
    assert time.perf_counter() - start < 10
    assert "--data.data_dir" in str(info.value)


def _copy_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_NAMES:
        shutil.copy(MNIST_ROOT / "MNIST" / "raw" / name, raw / name)
    return raw


@needs_mnist
@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("train-images-idx3-ubyte", lambda data: data[: len(data) // 2]),  # truncated download
        ("t10k-labels-idx1-ubyte", lambda data: bytes(range(256)) * 8),  # garbage
        ("t10k-images-idx3-ubyte", lambda data: data[:16]),  # header only
        # A well-formed idx file that holds 1000 labels instead of 60 000.
        ("train-labels-idx1-ubyte", lambda data: data[:4] + (1000).to_bytes(4, "big") + data[8:1008]),
    ],
)
def test_corrupt_file_is_named(tmp_path, name, damage):
    raw = _copy_raw(tmp_path)
    path = raw / name
    path.write_bytes(damage(path.read_bytes()))
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # the files exist, so nothing to download
    with pytest.raises(DmmError, match="Delete it") as info:
        dm.setup()
    assert str(path.resolve()) in str(info.value)
