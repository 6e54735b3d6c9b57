"""The attack-free smoothness measure: records against a brute-force reference, exact zeros and first-order
theory on linear models, its directions, batch independence, the matrix-free tangent, the summary."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from planes import SHAPE, K, LinearDecoder, LinearEncoder, N
from torch import nn

from dmm.cli import main
from dmm.errors import DmmError
from dmm.manifold import MatrixFreeTangent, Subspace, random_basis, random_fraction_mean, tangent_subspace
from dmm.measures import ManifoldSmoothness, Models, make_batch
from dmm.measures import smoothness as module
from dmm.measures.smoothness import gaussians, unit_directions
from dmm.nets import MLP, MLPDecoder, MLPEncoder

ARMS = ("on", "off", "random", "random_off")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def plane(dtype: torch.dtype = torch.float64) -> tuple[LinearEncoder, LinearDecoder, torch.Tensor]:
    """The linear autoencoder of 0.5 + span(A), A (N, K) orthonormal: its tangent space is span(A) everywhere."""
    a = torch.linalg.qr(torch.randn(N, K, generator=torch.Generator().manual_seed(3), dtype=dtype)).Q
    return LinearEncoder(a), LinearDecoder(a), a


def linear(weight: torch.Tensor) -> nn.Module:
    """f(x) = W x on flattened images, in W's dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return nn.Sequential(nn.Flatten(), layer)


def images(size: int, dtype: torch.dtype = torch.float64, seed: int = 1, classes: int = 3):
    """Uniform random images (B, 1, 8, 8) with random labels, each with its generator (seed 0)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, *SHAPE, generator=generator, dtype=dtype)
    return make_batch(x, torch.randint(0, classes, (size,), generator=generator), torch.arange(size), seed=0)


def sphere_abs_mean(d: int) -> float:
    """E |v_1| for v uniform on the unit sphere of R^d: Γ(d/2) / (√π Γ((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


@pytest.mark.parametrize("clamp", [False, True])
def test_records_are_the_brute_force_expectation_in_the_documented_draw_order(clamp: bool) -> None:
    """Image by image, in float64: the tangent directions from the projector A A^T, the random ones from the QR of
    the next Gaussian (n, k) of the image's generator, softmax L1 changes and flips one forward pass at a time."""
    encoder, decoder, a = plane()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(N, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batch = images(5)
    measure = ManifoldSmoothness(eps_curve=[0.5, 2.0], draws=3, clamp=clamp)
    out = measure.measure(Models(model, encoder, decoder), batch)
    assert set(out) == {"correct"} | {f"{arm}/{kind}@{e}" for arm in ARMS for kind in ("change", "flip")
                                      for e in ("0.5", "2")}  # fmt: skip

    fresh = make_batch(batch.x, batch.y, batch.index, seed=0).generators
    for i, g in enumerate(fresh):
        x = batch.x[i].flatten()
        clean = model(x.view(1, *SHAPE)).softmax(dim=1)[0]
        assert out["correct"][i] == (clean.argmax() == batch.y[i])
        directions = {arm: [] for arm in ARMS}
        for _ in range(3):
            v = torch.randn(N, generator=g, dtype=torch.float64)
            directions["on"].append(a @ (a.T @ v) / (a.T @ v).norm())
            directions["off"].append((v - a @ (a.T @ v)) / (v - a @ (a.T @ v)).norm())
        q = torch.linalg.qr(torch.randn(N, K, generator=g, dtype=torch.float64)).Q
        for _ in range(3):
            v = torch.randn(N, generator=g, dtype=torch.float64)
            directions["random"].append(q @ (q.T @ v) / (q.T @ v).norm())
            directions["random_off"].append((v - q @ (q.T @ v)) / (v - q @ (q.T @ v)).norm())
        for arm, us in directions.items():
            for e in (0.5, 2.0):
                moved = [(x + e * u).clamp(0, 1) if clamp else x + e * u for u in us]
                probs = [model(m.view(1, *SHAPE)).softmax(dim=1)[0] for m in moved]
                change = sum((p - clean).abs().sum() for p in probs) / 3
                flip = sum(float(p.argmax() != clean.argmax()) for p in probs) / 3
                torch.testing.assert_close(out[f"{arm}/change@{e:g}"][i].item(), change.item(), rtol=1e-9, atol=1e-12)
                assert out[f"{arm}/flip@{e:g}"][i].item() == pytest.approx(flip)
    for key, value in out.items():
        if key != "correct":
            assert (value >= 0).all() and (value <= 2 if "change" in key else value <= 1).all(), key


@pytest.mark.parametrize("reads", ["tangent", "normal"])
def test_a_linear_classifier_blind_to_one_side_does_not_change_there(reads: str) -> None:
    """Rows of W in span(A): the off-manifold change is 0 up to rounding and the on-manifold one is not; rows
    orthogonal to span(A): the other way round."""
    encoder, decoder, a = plane()
    mix = torch.randn(4, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 4
    weight = mix @ a @ a.T if reads == "tangent" else mix - mix @ a @ a.T
    batch = images(16, classes=4)
    measure = ManifoldSmoothness(eps_curve=[0.5, 4.0], draws=4, nulls=False)
    out = measure.measure(Models(linear(weight), encoder, decoder), batch)
    blind, seeing = ("off", "on") if reads == "tangent" else ("on", "off")
    for e in ("0.5", "4"):
        assert out[f"{blind}/change@{e}"].max() < 1e-12
        assert (out[f"{blind}/flip@{e}"] == 0).all()
        assert (out[f"{seeing}/change@{e}"] > 1e-6).all()


def test_small_eps_changes_follow_first_order_theory_on_a_two_class_linear_classifier() -> None:
    """Two classes, f(x) = W x: to first order ||Δsoftmax||_1 = 2 eps p0 p1 |a·u|, a = w1 − w0, and E|a·u| is
    ||P a|| E|v_1| over the unit sphere of the subspace: ||P_T a|| m(k) on, ||P_⊥ a|| m(n − k) off, and
    ||a|| m(n) for both random arms, a uniform direction in a uniformly random subspace being uniform on the
    sphere of R^n (so their ratio is 1 whatever k is)."""
    # The random arm's theory two ways: E_V ||P_V a|| m(k) with E_V ||P_V a|| = ||a|| random_fraction_mean(k, n).
    assert random_fraction_mean(K, N) * sphere_abs_mean(K) == pytest.approx(sphere_abs_mean(N), rel=1e-12)
    encoder, decoder, a_basis = plane()
    w = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64) / 4
    weight = torch.stack([torch.zeros_like(w), w])
    eps, count = 1e-5, 64
    batch = images(count, classes=2)
    measure = ManifoldSmoothness(eps_curve=[eps], draws=64)
    out = measure.measure(Models(linear(weight), encoder, decoder), batch)
    p = linear(weight)(batch.x).softmax(dim=1)
    scale = 2 * eps * p[:, 0] * p[:, 1] * w.norm()  # (B,)
    on_part = (a_basis @ (a_basis.T @ w)).norm() / w.norm()
    off_part = (w - a_basis @ (a_basis.T @ w)).norm() / w.norm()
    theory = {"on": on_part * sphere_abs_mean(K), "off": off_part * sphere_abs_mean(N - K),
              "random": sphere_abs_mean(N), "random_off": sphere_abs_mean(N)}  # fmt: skip
    for arm in ARMS:
        normalised = out[f"{arm}/change@{eps:g}"] / scale  # per image: the mean of |a·u| / ||a|| over draws
        standard_error = normalised.std().item() / math.sqrt(count)
        assert abs(normalised.mean().item() - float(theory[arm])) < 4.5 * standard_error, arm
    summary = measure.summarize(out)
    assert summary[f"random_off_over_random@{eps:g}"] == pytest.approx(1.0, rel=0.15)
    assert summary[f"off_over_on@{eps:g}"] == pytest.approx(float(theory["off"] / theory["on"]), rel=0.15)


def test_directions_are_unit_vectors_of_their_subspaces() -> None:
    torch.manual_seed(0)
    decoder, batch = MLPDecoder(K, SHAPE, hidden=(16,)), images(12, dtype=torch.float32)
    z = torch.randn(12, K)
    dense, _ = tangent_subspace(decoder, z, N)
    random = Subspace(random_basis(12, N, K, generator=torch.Generator().manual_seed(1)))
    _, plane_decoder, _ = plane(torch.float32)
    free = MatrixFreeTangent(plane_decoder, torch.randn(12, K))
    for space in (dense, random, free):
        inside, outside = unit_directions(space, gaussians(batch.x, batch.generators))
        assert inside.shape == outside.shape == batch.x.shape
        for u in (inside, outside):
            torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(12), rtol=0, atol=1e-5)
        assert space.split(inside)[1].flatten(1).norm(dim=1).max() < 1e-5
        assert space.split(outside)[0].flatten(1).norm(dim=1).max() < 1e-5


def test_an_images_records_do_not_depend_on_its_batch() -> None:
    torch.manual_seed(0)
    models = Models(MLP(SHAPE, 3, hidden=(32,), dropout=0.0), MLPEncoder(SHAPE, K, hidden=(16,)),
                    MLPDecoder(K, SHAPE, hidden=(16,)))  # fmt: skip
    batch = images(6, dtype=torch.float32)
    measure = ManifoldSmoothness(draws=3)
    whole = measure.measure(models, batch)
    parts = [measure.measure(models, make_batch(batch.x[s], batch.y[s], batch.index[s], seed=0))
             for s in (slice(0, 3), slice(3, 6))]  # fmt: skip
    for key, value in whole.items():
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=1e-5, atol=1e-6, msg=key)
    other_seed = measure.measure(models, make_batch(batch.x, batch.y, batch.index, seed=1))
    assert not torch.allclose(other_seed["random/change@1"], whole["random/change@1"])


def test_the_tangent_arms_run_matrix_free_with_the_dense_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, decoder, _ = plane()
    torch.manual_seed(0)
    models = Models(nn.Sequential(nn.Flatten(), nn.Linear(N, 3)).double(), encoder, decoder)
    batch = images(8)
    dense = ManifoldSmoothness(draws=2, nulls=False).measure(models, batch)
    monkeypatch.setattr(module, "tangent_subspace", functools.partial(tangent_subspace, dense_limit=0))
    free = ManifoldSmoothness(draws=2, nulls=False).measure(models, make_batch(batch.x, batch.y, batch.index, seed=0))
    for key, value in dense.items():
        torch.testing.assert_close(free[key], value, rtol=1e-6, atol=1e-9, msg=key)
    with pytest.raises(DmmError, match="dense tangent basis"):
        ManifoldSmoothness(nulls=True).measure(models, batch)


def test_summary_means_intervals_and_ratios() -> None:
    """Constant records give point intervals and exact ratios; a zero denominator gives inf; random records'
    intervals hold their mean and the ratio is the ratio of the means."""
    measure = ManifoldSmoothness(eps_curve=[1.0])
    count = 50
    records = {"correct": torch.arange(count) % 5 != 0, "on/change@1": torch.full((count,), 0.2),
               "off/change@1": torch.full((count,), 0.5), "random/change@1": torch.zeros(count),
               "random_off/change@1": torch.full((count,), 0.1)}  # fmt: skip
    records |= {f"{arm}/flip@1": (torch.arange(count) % 4 == 0).float() for arm in ARMS}
    s = measure.summarize(records)
    assert s["num_images"] == count and s["clean_acc"] == pytest.approx(0.8)
    assert (s["on/change@1"], s["on/change@1/ci_low"], s["on/change@1/ci_high"]) == pytest.approx((0.2, 0.2, 0.2))
    assert s["off_over_on@1"] == pytest.approx(2.5) and s["off_over_on@1/ci_low"] == pytest.approx(2.5)
    assert s["random_off_over_random@1"] == math.inf and s["random_off_over_random@1/ci_high"] == math.inf
    assert s["on/flip@1"] == pytest.approx(13 / 50)

    generator = torch.Generator().manual_seed(0)
    records |= {f"{arm}/change@1": 2 * torch.rand(count, generator=generator) ** 3 for arm in ARMS}
    s = measure.summarize(records)
    for arm in ARMS:
        mean = records[f"{arm}/change@1"].double().mean().item()
        assert s[f"{arm}/change@1"] == pytest.approx(mean)
        assert s[f"{arm}/change@1/ci_low"] < mean < s[f"{arm}/change@1/ci_high"]
    assert s["off_over_on@1"] == pytest.approx(s["off/change@1"] / s["on/change@1"])
    assert s == measure.summarize(records)  # the bootstrap's seed is fixed


def test_settings_and_arms() -> None:
    measure = ManifoldSmoothness(eps_curve=[2.0, 0.5, 2.0], draws=3, nulls=False)
    assert measure.settings() == {"eps_curve": [0.5, 2.0], "draws": 3, "arms": ["on", "off"], "clamp": False}
    assert measure.name == "smoothness" and measure.needs_manifold


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"eps_curve": [0.5, 0.0]}, "eps_curve"), ({"eps_curve": [-1.0]}, "eps_curve"),
     ({"eps_curve": [math.inf]}, "eps_curve"), ({"eps_curve": []}, "eps_curve"), ({"draws": 0}, "draws"),
     ({"draws": 1.5}, "draws")],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(DmmError, match=message):
        ManifoldSmoothness(**kwargs)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_the_synthetic_config_measures_through_the_evaluation_callback(
    tmp_path: Path, train_synthetic_autoencoder
) -> None:
    """``dmm validate`` of an untrained classifier with the config: the records and summary of every arm, and no
    model checks (they need an attack)."""
    autoencoder = train_synthetic_autoencoder()
    os.environ.pop("DMM_RUN_DIR", None)
    main(["validate", "--config", str(CONFIGS / "synthetic" / "smoothness.yaml"), "--evaluation.autoencoder",
          str(autoencoder), "--evaluation.num_images=12", "--evaluation.batch_size=8", "--evaluation.measure.draws=2",
          "--trainer.limit_val_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          "--trainer.default_root_dir", str(tmp_path / "clf")])  # fmt: skip
    (folder,) = (tmp_path / "clf").glob("*/smoothness")
    result = json.loads((folder / "val-epoch0.json").read_text())
    assert result["measure"] == "ManifoldSmoothness" and result["model_checks"] == []
    assert result["settings"] == {"eps_curve": [0.25, 0.5, 1.0, 2.0], "draws": 2, "arms": list(ARMS), "clamp": False}
    assert result["summary"]["num_images"] == 12 and "off_over_on@2" in result["summary"]
    samples = torch.load(folder / "val-epoch0-samples.pt", weights_only=True)
    assert all(samples[f"{arm}/change@0.25"].shape == (12,) for arm in ARMS)
