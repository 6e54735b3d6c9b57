"""The known-manifold data: images, labels and tangents against independent references, the exact inverse, the
chunked cache, and the DMM decomposition run through the CLI on the exact manifold (``--evaluation.autoencoder data``).

Everything runs at a tiny size (12x12 images on a 3-d manifold, 64/32/32 samples): the maths, not the scale.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cli_runs import fit, run

from dmm.callbacks.batches import module_digest
from dmm.data import KnownManifoldDataModule
from dmm.data import known_manifold as known
from dmm.errors import DmmError
from dmm.manifold import ExactEncoder, principal_angles
from dmm.manifold import exact as exact_module
from dmm.report.provenance import autoencoder_facts
from dmm.report.runs import load_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "known_manifold"
TINY = {"latent_dim": 3, "image_size": 12, "hidden_dim": 16, "num_classes": 3, "num_train": 64, "num_val": 32,
        "num_test": 32, "batch_size": 16}  # fmt: skip
SPLITS = ("train", "val", "test")

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def tiny(**changes) -> KnownManifoldDataModule:
    data = KnownManifoldDataModule(**(TINY | changes))
    data.setup()
    return data


def images(data: KnownManifoldDataModule, split: str) -> torch.Tensor:
    return data.datasets[split].tensors[0]


def test_images_labels_and_latents_have_the_documented_shapes_and_ranges() -> None:
    data = tiny()
    assert (data.num_classes, data.input_shape) == (3, (1, 12, 12))
    for split, size in (("train", 64), ("val", 32), ("test", 32)):
        x, y = data.datasets[split].tensors
        assert x.shape == (size, 1, 12, 12) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05  # visible images, not a constant
        assert y.shape == (size,) and y.dtype == torch.int64 and data.latents[split].shape == (size, 3)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 1, 12, 12) and y.shape == (16,)
    noisy = tiny(noise_std=0.1)
    assert 0 <= images(noisy, "test").min() and images(noisy, "test").max() <= 1
    assert 0 < (images(noisy, "test") - images(data, "test")).abs().mean() < 0.1
    assert torch.equal(noisy.latents["test"], data.latents["test"])  # noise moves pixels, not latents


def test_the_seed_fixes_everything_and_another_seed_changes_everything() -> None:
    a, b, c = tiny(), tiny(), tiny(seed=1)
    for split in SPLITS:
        assert torch.equal(images(a, split), images(b, split)) and torch.equal(a.latents[split], b.latents[split])
        assert not torch.allclose(a.latents[split], c.latents[split])
        assert not torch.allclose(images(a, split), images(c, split))
    assert not torch.allclose(a.label_map, c.label_map)
    # Splits draw their own latents: no split repeats another's.
    assert not torch.allclose(a.latents["val"], a.latents["test"])


def test_labels_are_argmax_of_an_orthonormal_map_so_classes_are_balanced() -> None:
    data = tiny()
    v = data.label_map  # (C, k)
    torch.testing.assert_close(v @ v.T, torch.eye(3), atol=1e-6, rtol=0)
    for split in SPLITS:
        z, y = data.latents[split], data.datasets[split].tensors[1]
        # A linear probe on z with weights V is perfect: every label is the largest of V z.
        scores = z @ v.T
        assert torch.equal(y, scores.argmax(dim=1))
        assert (scores.gather(1, y[:, None]) >= scores).all()
    # V z ~ N(0, I_C) for z ~ N(0, I_k): each class has probability 1/C (binomial sd 0.0027 at 30 000 draws).
    z = torch.randn(30000, 3, generator=torch.Generator().manual_seed(0))
    shares = torch.bincount(data.label(z), minlength=3) / len(z)
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=0.015, rtol=0)
    big = KnownManifoldDataModule(num_train=4, num_val=4, num_test=4)  # the defaults: 10 classes on 10 latents
    z = torch.randn(30000, 10, generator=torch.Generator().manual_seed(1))
    shares = torch.bincount(big.label(z), minlength=10) / len(z)
    torch.testing.assert_close(shares, torch.full((10,), 0.1), atol=0.01, rtol=0)


def test_tangent_matches_finite_differences_of_the_generator_in_float64() -> None:
    data = tiny()
    indices = [0, 5, 17, 31]
    basis = data.tangent("val", indices)  # (B, n, k)
    assert basis.shape == (4, 144, 3)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    # Independent reference: central differences of a float64 copy of G, orthonormalised by QR.
    g64, z = copy.deepcopy(data.generator).double(), data.latents["val"][indices].double()
    h = 1e-6
    columns = [
        (g64(z + h * e) - g64(z - h * e)).flatten(1) / (2 * h) for e in torch.eye(3, dtype=torch.float64)
    ]  # k x (B, n)
    reference, _ = torch.linalg.qr(torch.stack(columns, dim=2))
    angles = principal_angles(reference, basis.double())
    assert angles.max() < 1e-4, angles
    # And the images are G of the latents: the data lie exactly on the manifold.
    torch.testing.assert_close(g64(z).float(), images(data, "val")[indices], atol=1e-6, rtol=0)


def test_exact_encoder_returns_the_stored_latent_of_every_data_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_module, "SEARCH_CHUNK", 10)  # several blocks: the search carries its best across
    data = tiny()
    manifold = data.exact_manifold()
    assert (manifold.latent_dim, manifold.input_shape) == (3, (1, 12, 12))
    assert manifold.decoder is not data.generator and manifold.encoder.decoder is manifold.decoder
    for split in SPLITS:
        z = manifold.encoder(images(data, split))
        assert torch.equal(z, data.latents[split])
        with torch.no_grad():
            torch.testing.assert_close(manifold.decoder(z), images(data, split), atol=1e-6, rtol=0)


def test_exact_encoder_off_the_data_is_never_farther_than_the_nearest_stored_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exact_module, "SEARCH_CHUNK", 10)
    data = tiny()
    stored = torch.cat([images(data, s).flatten(1) for s in SPLITS])
    latents = torch.cat([data.latents[s] for s in SPLITS])
    x = images(data, "test")[:8] + 0.03 * torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    # Brute-force nearest neighbour, without the |a|² - 2ab + |b|² expansion the encoder searches with.
    distances = torch.cdist(x.flatten(1), stored, compute_mode="donot_use_mm_for_euclid_dist")  # (8, N)
    nearest, distance = distances.argmin(dim=1), distances.min(dim=1).values
    lookup = ExactEncoder(data.generator, stored, latents, refine_steps=0)
    assert torch.equal(lookup(x), latents[nearest])
    index, found = lookup.nearest(x.flatten(1))
    assert torch.equal(index, nearest)
    torch.testing.assert_close(found, distance)
    refined = ExactEncoder(data.generator, stored, latents, refine_steps=3)(x)
    with torch.no_grad():
        error = (x - data.generator(refined)).flatten(1).norm(dim=1)
    assert (error <= distance + 1e-6).all()
    assert (error < distance - 1e-3).any()  # the refinement moved towards x's foot point
    with pytest.raises(DmmError, match="same N"):
        ExactEncoder(data.generator, stored, latents[:-1])
    with pytest.raises(DmmError, match="refine_steps must be >= 0"):
        ExactEncoder(data.generator, stored, latents, refine_steps=-1)


def test_the_exact_manifold_hashes_by_its_contents() -> None:
    # The evaluation cache keys on module_digest of the manifold model.
    first, again, other = (tiny(seed=s).exact_manifold() for s in (0, 0, 1))
    assert module_digest(first) == module_digest(again) != module_digest(other)


def test_cache_is_reused_and_a_partial_cache_resumes_to_the_same_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(known, "CHUNK", 16)  # 4 + 2 + 2 chunk files
    settings = {"noise_std": 0.05, "cache_dir": str(tmp_path / "cache")}  # noise too: drawn per chunk
    memory = tiny(noise_std=0.05)
    first = KnownManifoldDataModule(**(TINY | settings))
    first.prepare_data()
    folder = first.cache_folder
    # One file per chunk, and no temporary file left behind.
    assert sorted(p.name for p in folder.iterdir()) == [
        "test-00000.pt", "test-00001.pt", "train-00000.pt", "train-00001.pt", "train-00002.pt", "train-00003.pt",
        "val-00000.pt", "val-00001.pt"]  # fmt: skip
    first.setup()

    def counted(data: KnownManifoldDataModule) -> list[int]:
        calls = []
        forward = data.generator.forward
        monkeypatch.setattr(data.generator, "forward", lambda z: calls.append(len(z)) or forward(z))
        data.setup()
        return calls

    reused = KnownManifoldDataModule(**(TINY | settings))
    assert counted(reused) == []  # every chunk read back
    (folder / "train-00003.pt").unlink()  # as if killed before the last chunk was written
    resumed = KnownManifoldDataModule(**(TINY | settings))
    assert counted(resumed) == [16]  # only the missing chunk generated
    for data in (first, reused, resumed):
        for split in SPLITS:
            assert torch.equal(images(data, split), images(memory, split))
            assert torch.equal(data.datasets[split].tensors[1], memory.datasets[split].tensors[1])
    other = KnownManifoldDataModule(**(TINY | settings | {"seed": 1}))
    assert other.cache_folder != folder  # other settings, another folder: never another data set's files
    (folder / "val-00001.pt").write_bytes(b"truncated")
    with pytest.raises(DmmError, match="val-00001.pt is unreadable.*delete it to regenerate"):
        KnownManifoldDataModule(**(TINY | settings)).setup()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latent_dim": 20}, "--data.latent_dim must be in"),
        ({"num_classes": 4}, r"--data.num_classes must be in \[2, latent_dim=3\]"),
        ({"num_classes": 1}, "--data.num_classes must be in"),
        ({"num_val": 0}, "--data.num_train/num_val/num_test must be >= 1"),
        ({"noise_std": -0.1}, "--data.noise_std >= 0"),
        ({"refine_steps": -1}, "--data.refine_steps >= 0"),
        ({"batch_size": 0}, "--data.batch_size must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(changes: dict, message: str) -> None:
    with pytest.raises(DmmError, match=message) as error:
        KnownManifoldDataModule(**(TINY | changes))
    assert "\n" not in str(error.value)


def test_methods_before_setup_say_so() -> None:
    data = KnownManifoldDataModule(**TINY)
    for call in (data.exact_manifold, lambda: data.tangent("val", [0]), data.train_dataloader):
        with pytest.raises(RuntimeError, match="setup"):
            call()


def test_decomposition_on_the_exact_manifold_through_the_cli(tmp_path: Path) -> None:
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    data = [f"--data.{key}={value}" for key, value in TINY.items()]
    checkpoint = fit(CONFIGS / "classifier.yaml", tmp_path / "clf", *data, *quiet, "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")  # fmt: skip
    root = tmp_path / "exact"
    run("test", "--config", str(CONFIGS / "decomposition_exact.yaml"), *data, *quiet, "--ckpt_path", str(checkpoint),
        "--evaluation.num_images=16", "--evaluation.batch_size=8", "--evaluation.checks=false",
        "--evaluation.measure.attack.steps=5", "--trainer.default_root_dir", str(root))  # fmt: skip
    (folder,) = root.iterdir()
    result = json.loads((folder / "decomposition" / "test-epoch0.json").read_text())
    assert result["autoencoder"] == "data"
    assert (result["latent_dim"], result["input_shape"], result["num_images"]) == (3, [1, 12, 12], 16)
    samples = torch.load(folder / "decomposition" / "test-epoch0-samples.pt", weights_only=True)
    assert samples["recon_error"].max() < 1e-5  # the images lie on the exact manifold
    assert torch.isfinite(samples["tangent_condition"]).all() and (samples["tangent_condition"] >= 1).all()
    for key in ("leak_on", "leak_off", "on_fraction", "random_fraction", "on_l2", "off_l2"):
        assert key in samples and samples[key].shape == (16,), key
    assert (samples["leak_on"][samples["correct"]] >= 0).all()
    # The report names the exact manifold, even with a folder called "data" where a checkpoint path would be.
    Path("data").mkdir()
    facts = autoencoder_facts(load_run(folder, "test"))
    assert (facts["class"], facts["latent_dim"], facts["mse"]) == ("exact (data module)", 3, None)


def test_exact_manifold_needs_a_data_module_that_has_one(capsys: pytest.CaptureFixture) -> None:
    synthetic = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "classifier.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run("fit", "--config", str(synthetic), "--trainer.fast_dev_run=true", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--evaluation.autoencoder", "data")  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dmm: error:")]
    assert "--evaluation.autoencoder data needs a data module with a known manifold" in line
