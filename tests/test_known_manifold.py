"""The known-manifold data: images, labels and tangents against independent references, the exact inverse, the
chunked cache, and the DMM decomposition run through the CLI on the exact manifold (``--evaluation.autoencoder data``).

Everything runs at a tiny size (12x12 images on a 3-d manifold, 64/32/32 samples; upsampled to 24x24 for the ambient
embedding): the maths, not the scale.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from cli_runs import fit, run

from dmm.callbacks.batches import module_digest
from dmm.data import KnownManifoldDataModule
from dmm.data import known_manifold as known
from dmm.data.synthetic import ManifoldGenerator
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


def finite_difference_basis(generator, z: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Orthonormal (B, n, k) basis of the central differences of a float64 generator at latents z (B, k)."""
    columns = [(generator(z + h * e) - generator(z - h * e)).flatten(1) / (2 * h)
               for e in torch.eye(z.shape[1], dtype=torch.float64)]  # fmt: skip
    return torch.linalg.qr(torch.stack(columns, dim=2))[0]


def test_tangent_matches_finite_differences_of_the_generator_in_float64() -> None:
    data = tiny()
    indices = [0, 5, 17, 31]
    basis = data.tangent("val", indices)  # (B, n, k)
    assert basis.shape == (4, 144, 3)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    # Independent reference: central differences of a float64 copy of G, orthonormalised by QR.
    g64, z = copy.deepcopy(data.generator).double(), data.latents["val"][indices].double()
    reference = finite_difference_basis(g64, z)
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
        ({"ambient_size": 11}, r"--data.ambient_size must be >= --data.image_size=12"),
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


# --- The ambient embedding: the same manifold, latents and labels in more pixels (U∘G, U bilinear upsampling) ---


def bilinear_matrix(size: int, ambient: int) -> torch.Tensor:
    """Reference 1-d upsampling (ambient, size) float64, written from align_corners=False's definition: output
    pixel i samples the input at (i + 0.5) * size / ambient - 0.5, clamped at 0, linearly between neighbours."""
    matrix = torch.zeros(ambient, size, dtype=torch.float64)
    for i in range(ambient):
        source = max((i + 0.5) * size / ambient - 0.5, 0.0)
        low = int(source)
        weight = source - low
        matrix[i, low] += 1 - weight
        matrix[i, min(low + 1, size - 1)] += weight
    return matrix


def test_ambient_size_none_is_the_plain_generator_with_its_old_cache_folder() -> None:
    data = tiny()
    assert type(data.generator) is ManifoldGenerator and data.input_shape == (1, 12, 12)
    with torch.no_grad():
        direct = ManifoldGenerator(3, 12, 16, seed=0)(data.latents["test"])
    assert torch.equal(images(data, "test"), direct)  # bit for bit G(z), as before the option
    # The cache digest of settings without ambient_size is the one from before the option: old caches stay valid.
    folder = KnownManifoldDataModule(**TINY, cache_dir="cache").cache_folder
    assert folder.name == "known_manifold-e962398e854030f2"
    assert KnownManifoldDataModule(**TINY, cache_dir="cache", ambient_size=24).cache_folder != folder


def test_ambient_images_are_the_upsampled_base_images_with_the_same_latents_and_labels() -> None:
    base, up, same = tiny(), tiny(ambient_size=24), tiny(ambient_size=12)
    assert up.input_shape == (1, 24, 24) and type(up.generator) is known.Embedded
    for split in SPLITS:
        assert torch.equal(up.latents[split], base.latents[split])
        assert torch.equal(up.datasets[split].tensors[1], base.datasets[split].tensors[1])
        x = images(up, split)
        assert x.shape == (len(x), 1, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        upsampled = F.interpolate(images(base, split), size=(24, 24), mode="bilinear", align_corners=False)
        assert torch.equal(x, upsampled)
        assert torch.equal(images(same, split), images(base, split))  # U at the same size is the identity
    # Latents and labels do not depend on the ambient size; images are the 2-d reference U = M ⊗ M applied to G's.
    flat = images(base, "val").flatten(1).double()  # (N, 144)
    m = bilinear_matrix(12, 24)
    reference = flat @ torch.kron(m, m).T  # (N, 576), row-major pixels: U[(i, j), (a, b)] = M[i, a] M[j, b]
    torch.testing.assert_close(images(up, "val").flatten(1).double(), reference, atol=1e-6, rtol=0)
    x, _ = next(iter(up.train_dataloader()))
    assert x.shape == (16, 1, 24, 24)


@pytest.mark.parametrize(("size", "ambient"), [(12, 24), (16, 16), (16, 28), (16, 56)])
def test_the_embedding_is_a_convex_injective_linear_map(size: int, ambient: int) -> None:
    # U as a matrix (ambient², size²), read off the module on the basis images: G replaced by the identity.
    class Identity(torch.nn.Module):
        image_size, latent_dim = size, size * size

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z.reshape(*z.shape[:-1], 1, size, size)

    embed = known.Embedded(Identity(), ambient)
    u = embed(torch.eye(size * size, dtype=torch.float64)).flatten(1).T  # (ambient², size²)
    m = bilinear_matrix(size, ambient)
    torch.testing.assert_close(u, torch.kron(m, m), atol=1e-12, rtol=0)  # the textbook bilinear weights
    # Convex combinations: [0, 1] images stay in [0, 1]. Full column rank: U is injective, U∘G a k-manifold.
    assert (u >= 0).all()
    torch.testing.assert_close(u.sum(dim=1), torch.ones(ambient * ambient, dtype=torch.float64))
    assert torch.linalg.matrix_rank(u) == size * size
    with pytest.raises(DmmError, match="size must be >= the generator's image_size"):
        known.Embedded(Identity(), size - 1)


def test_ambient_tangent_matches_finite_differences_of_the_embedded_generator_in_float64() -> None:
    base, data = tiny(), tiny(ambient_size=24)
    indices = [0, 5, 17, 31]
    basis = data.tangent("val", indices)  # (B, n, k)
    assert basis.shape == (4, 576, 3)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    # Independent reference: central differences of a float64 copy of U∘G, orthonormalised by QR.
    g64, z = copy.deepcopy(data.generator).double(), data.latents["val"][indices].double()
    reference = finite_difference_basis(g64, z)
    angles = principal_angles(reference, basis.double())
    assert angles.max() < 1e-4, angles
    # The same space as U applied to G's own tangent space: span(U J) = span(U Q).
    m = bilinear_matrix(12, 24)
    mapped, _ = torch.linalg.qr(torch.kron(m, m) @ base.tangent("val", indices).double())
    assert principal_angles(mapped, basis.double()).max() < 1e-4
    torch.testing.assert_close(g64(z).float(), images(data, "val")[indices], atol=1e-6, rtol=0)


def test_exact_manifold_at_ambient_size_inverts_the_embedded_generator() -> None:
    data = tiny(ambient_size=24)
    manifold = data.exact_manifold()
    assert (manifold.latent_dim, manifold.input_shape) == (3, (1, 24, 24))
    assert type(manifold.decoder) is known.Embedded and manifold.decoder is not data.generator
    assert manifold.encoder.images.shape == (128, 576)
    for split in SPLITS:
        z = manifold.encoder(images(data, split))
        assert torch.equal(z, data.latents[split])
        with torch.no_grad():
            torch.testing.assert_close(manifold.decoder(z), images(data, split), atol=1e-6, rtol=0)


def test_ambient_cache_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(known, "CHUNK", 32)
    settings = {"ambient_size": 24, "noise_std": 0.05, "cache_dir": str(tmp_path)}
    first = KnownManifoldDataModule(**(TINY | settings))
    first.setup()
    again = KnownManifoldDataModule(**(TINY | settings))
    monkeypatch.setattr(again.generator, "forward", lambda z: pytest.fail("regenerated a cached chunk"))
    again.setup()
    for split in SPLITS:
        assert torch.equal(images(again, split), images(first, split)) and images(first, split).shape[-1] == 24
    # The noise is drawn in the ambient pixels: off the manifold in every direction, the latents unchanged.
    assert torch.equal(first.latents["val"], tiny().latents["val"])
    noise = (images(first, "val") - images(tiny(ambient_size=24), "val")).flatten(1).double()  # (N, 576)
    # Drawn at 24x24, not upsampled from 12x12: most of it lies outside U's range (3/4 for white noise).
    q, _ = torch.linalg.qr(torch.kron(*(bilinear_matrix(12, 24),) * 2))  # (576, 144) basis of range(U)
    outside = noise - noise @ q @ q.T
    assert 0.6 < outside.pow(2).sum() / noise.pow(2).sum() < 0.9


def test_ambient_fit_and_exact_decomposition_through_the_cli(tmp_path: Path) -> None:
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    data = [f"--data.{key}={value}" for key, value in TINY.items()] + ["--data.ambient_size=24"]
    cheap = ["--evaluation.num_images=16", "--evaluation.batch_size=8", "--evaluation.checks=false",
             "--evaluation.measure.attack.steps=5"]  # fmt: skip
    # The config's two commands: fit (measuring on the exact manifold after the last epoch), then test.
    checkpoint = fit(CONFIGS / "ambient.yaml", tmp_path / "clf", *data, *quiet, *cheap, "--trainer.max_epochs=1",
                     "--evaluation.every_n_epochs=1", "--trainer.limit_train_batches=2",
                     "--trainer.limit_val_batches=1")  # fmt: skip
    fitted = json.loads((checkpoint.parents[1] / "decomposition" / "val-epoch0.json").read_text())
    assert fitted["input_shape"] == [1, 24, 24] and "full/success_rate" in fitted["summary"]  # the sweep's metric
    root = tmp_path / "exact"
    run("test", "--config", str(CONFIGS / "decomposition_exact.yaml"), *data, *quiet, *cheap,
        "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(root))  # fmt: skip
    (folder,) = root.iterdir()
    result = json.loads((folder / "decomposition" / "test-epoch0.json").read_text())
    assert (result["autoencoder"], result["latent_dim"], result["input_shape"]) == ("data", 3, [1, 24, 24])
    samples = torch.load(folder / "decomposition" / "test-epoch0-samples.pt", weights_only=True)
    assert samples["recon_error"].max() < 1e-5  # the embedded images lie on the embedded manifold
    assert torch.isfinite(samples["tangent_condition"]).all() and (samples["tangent_condition"] >= 1).all()


def test_the_two_layer_regime_configs_agree_and_a_point_fits_and_measures_through_the_cli(tmp_path: Path) -> None:
    classifier = yaml.safe_load((CONFIGS / "two_layer.yaml").read_text())
    geometry = yaml.safe_load((CONFIGS / "two_layer_geometry.yaml").read_text())
    for key in ("network", "mean", "std"):
        assert classifier["model"]["init_args"][key] == geometry["model"]["init_args"][key], key
    assert classifier["evaluation"]["measure"] == geometry["evaluation"]["measure"]
    assert classifier["evaluation"]["every_n_epochs"] == classifier["trainer"]["max_epochs"]  # once, at the end
    data = [f"--data.{key}={value}" for key, value in TINY.items()]
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cheap = ["--evaluation.num_images=8", "--evaluation.checks=false", "--evaluation.measure.attack.steps=5"]
    checkpoint = fit(CONFIGS / "two_layer.yaml", tmp_path / "clf", *data, *quiet, *cheap, "--trainer.max_epochs=1",
                     "--evaluation.every_n_epochs=1", "--model.init_args.network.init_args.init_scale=0.1",
                     "--model.init_args.optimizer.init_args.weight_decay=0.01")  # fmt: skip
    fitted = json.loads((checkpoint.parents[1] / "geometry" / "val-epoch0.json").read_text())
    assert fitted["autoencoder"] == "data" and "grad_on/ce" in fitted["summary"]  # the regimes sweep's metric
    root = tmp_path / "test"
    run("test", "--config", str(CONFIGS / "two_layer_geometry.yaml"), *data, *quiet, *cheap,
        "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(root))  # fmt: skip
    (folder,) = root.iterdir()
    result = json.loads((folder / "geometry" / "test-epoch0.json").read_text())
    assert 0 <= result["summary"]["grad_on/ce"] <= 1 and result["latent_dim"] == 3
