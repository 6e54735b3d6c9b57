"""The DMM decomposition measure: properties of its records, exact answers on a linear model, its null models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.manifold import Subspace, random_basis, random_fraction_mean
from dmm.measures import Decomposition, Models, make_batch
from dmm.measures.decomposition import ARMS
from dmm.nets import MLP, MLPDecoder, MLPEncoder

SHAPE = (1, 8, 8)
N, K = math.prod(SHAPE), 3
RESTRICTED = ("on", "off", "random", "random_off")


@pytest.fixture
def models() -> Models:
    torch.manual_seed(0)
    return Models(MLP(SHAPE, 3, hidden=(32,), dropout=0.0), MLPEncoder(SHAPE, K, hidden=(16,)),
                  MLPDecoder(K, SHAPE, hidden=(16,)))  # fmt: skip


def images(size: int = 32, seed: int = 1):
    """A batch of uniform random images (many pixels near the box's faces) with random labels."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.rand(size, *SHAPE, generator=generator), torch.randint(0, 3, (size,), generator=generator)
    return make_batch(x, y, torch.arange(size), seed=0)


@pytest.mark.parametrize("clamp", [True, False])
def test_records_are_consistent(models: Models, clamp: bool) -> None:
    measure = Decomposition(PGD(eps=2.0, steps=30, step_size=0.1, clamp=clamp, early_stop=True))
    batch = images()
    out = measure.measure(models, batch)
    assert measure.arms == ("full", "on", "off", "random", "random_off")
    for key, value in out.items():
        assert value.shape[0] == 32, key
    for arm in measure.arms:
        assert (out[f"{arm}_l2"] <= 2.0 + 1e-5).all()
        assert (out[f"{arm}_linf"] <= out[f"{arm}_l2"] + 1e-6).all()
        assert not (out[f"{arm}_success"] & ~out["correct"]).any()  # only correct images can be fooled
    for key in ("on_fraction", "random_fraction", *(f"leak_{a}" for a in RESTRICTED)):
        assert ((0 <= out[key]) & (out[key] <= 1 + 1e-6)).all(), key
    assert out["full_success"].any()
    assert (out["tangent_condition"] >= 1).all() and (out["recon_error"] > 0).all()
    if not clamp:  # no box: the restricted attacks never leave their subspaces
        assert max(out[f"leak_{a}"].max().item() for a in RESTRICTED) < 1e-4
    grid = out["_images"]
    assert grid.shape == (32, 5, *SHAPE)
    x_adv, d, d_on, d_off = grid[:, 1], grid[:, 2], grid[:, 3], grid[:, 4]
    assert torch.allclose(x_adv - batch.x, d, atol=1e-6) and torch.allclose(d_on + d_off, d, atol=1e-6)
    assert torch.allclose(d.flatten(1).norm(dim=1), out["full_l2"], atol=1e-5)


def test_random_baseline_has_the_expected_mean_and_is_the_random_arms_subspace(models: Models) -> None:
    """E||P d|| / ||d|| over uniformly random k-subspaces is Γ((k+1)/2)Γ(n/2)/(Γ(k/2)Γ((n+1)/2)), about sqrt(k/n)."""
    batch = images(256)
    out = Decomposition(PGD(eps=1.0, steps=2)).measure(models, batch)  # no early stop: every image moves
    moved = out["full_l2"] > 0
    assert moved.all()
    fractions = out["random_fraction"][moved].double()
    exact = math.exp(math.lgamma((K + 1) / 2) + math.lgamma(N / 2) - math.lgamma(K / 2) - math.lgamma((N + 1) / 2))
    assert random_fraction_mean(K, N) == pytest.approx(exact, rel=1e-12)
    standard_error = fractions.std().item() / math.sqrt(fractions.numel())
    assert abs(fractions.mean().item() - exact) < 4 * standard_error
    # The baseline is measured in the random arm's own subspace: the first draw of each image's generator.
    generators = make_batch(batch.x, batch.y, batch.index, seed=0).generators
    random = Subspace(random_basis(len(batch.y), N, K, generator=generators))
    assert torch.allclose(out["random_fraction"], random.fraction(out["_images"][:, 2]), atol=1e-6)


class Recorded:
    """The measure's attack, keeping every (subspace, x_adv) it returns."""

    def __init__(self, attack: PGD) -> None:
        self.attack, self.returned = attack, []

    def __call__(self, model, x, y, project=None, **kwargs):
        x_adv = self.attack(model, x, y, project=project, **kwargs)
        self.returned.append((project, x_adv))
        return x_adv

    def __getattr__(self, name: str):
        return getattr(self.attack, name)


@pytest.mark.parametrize("clamp", [True, False, "exact"])
def test_exact_clamp_keeps_every_arm_in_its_subspace_and_in_the_box(models: Models, clamp) -> None:
    """With ``clamp="exact"`` every arm's x + d is an image in [0, 1] while each restricted arm's leak stays at
    rounding; clamp=True leaks out of the subspaces, clamp=False leaves the box."""
    measure = Decomposition(PGD(eps=2.0, steps=30, step_size=0.1, clamp=clamp, early_stop=True))
    measure.attack = recorded = Recorded(measure.attack)
    batch = images()
    out = measure.measure(models, batch)
    restricted = [x_adv for project, x_adv in recorded.returned if project is not None]
    assert [project is None for project, _ in recorded.returned[:5]] == [True, False, False, False, False]
    assert len(restricted) == len(RESTRICTED)
    assert out["full_success"].any() and all((out[f"{a}_l2"] >= 0.1).any() for a in RESTRICTED)
    # The leak is a fraction of ||d||, and d = x_adv - x carries float32 rounding of the pixels (~1e-7): so the
    # part outside the subspace is compared absolutely, and as a fraction where ||d|| is not itself tiny.
    outside = max((out[f"leak_{a}"] * out[f"{a}_l2"]).max().item() for a in RESTRICTED)
    leak = max(out[f"leak_{a}"][out[f"{a}_l2"] >= 0.1].max().item() for a in RESTRICTED)
    in_subspace = outside < 1e-5 and leak < 1e-5
    in_box = all(x_adv.min() >= 0 and x_adv.max() <= 1 for x_adv in restricted)
    assert (in_subspace, in_box) == {True: (False, True), False: (True, False), "exact": (True, True)}[clamp]
    for arm, (project, x_adv) in zip(RESTRICTED, recorded.returned[1:], strict=False):  # arms in canonical order
        d = x_adv - batch.x
        outside_norm = project.split(d)[1].flatten(1).norm(dim=1)
        torch.testing.assert_close(out[f"leak_{arm}"] * out[f"{arm}_l2"], outside_norm, rtol=1e-4, atol=1e-6)


def test_summary_curve_starts_at_clean_accuracy_and_falls(models: Models) -> None:
    curve_eps = [0.0, 0.25, 0.5, 1.0, 3.0]
    measure = Decomposition(PGD(eps=3.0, steps=40, step_size=0.1, early_stop=True), eps_curve=curve_eps)
    summary = measure.summarize(measure.measure(models, images(64)))
    assert summary["robust_acc@0"] == pytest.approx(summary["clean_acc"])
    curve = [summary[f"robust_acc@{e:g}"] for e in curve_eps]
    assert curve == sorted(curve, reverse=True)
    assert summary["num_images"] == 64
    for arm in ("full", "on", "off", "random", "random_off"):
        low, high = summary[f"{arm}/success_ci_low"], summary[f"{arm}/success_ci_high"]
        assert 0 <= low <= summary[f"{arm}/success_rate"] <= high <= 1


def test_censored_median_and_ratios_of_constructed_records() -> None:
    """Six images, the last misclassified: failures count as needing more than eps (+inf), the upper median."""
    t, f = True, False
    records = {
        "correct": torch.tensor([t, t, t, t, t, f]),
        "full_success": torch.tensor([t, f, t, t, f, f]),
        "full_l2": torch.tensor([0.3, 4.0, 0.1, 0.2, 4.0, 0.0]),
        "on_success": torch.tensor([t, f, f, t, f, f]),
        "on_l2": torch.tensor([0.9, 4.0, 4.0, 0.4, 4.0, 0.0]),
        "leak_on": torch.zeros(6),
        "on_fraction": torch.full((6,), 0.5),
        "random_fraction": torch.full((6,), 0.2),
        "tangent_condition": torch.ones(6),
        "on_part_fools": torch.tensor([f, f, t, f, f, f]),
        "off_part_fools": torch.tensor([t, f, t, f, f, f]),
    }
    records |= {f"{arm}_linf": records[f"{arm}_l2"] / 8 for arm in ("full", "on")}
    s = Decomposition(nulls=[], eps_curve=[0.25, 0.35]).summarize(records)
    # full, needed by the 5 correct images: 0.1, 0.2, 0.3, inf, inf -> rank 5 // 2 = 2 -> 0.3
    assert s["full/l2_needed_median"] == pytest.approx(0.3)
    # on: 0.4, 0.9, inf, inf, inf -> inf: at least half were not fooled within eps
    assert math.isinf(s["on/l2_needed_median"])
    # Over each arm's own successes instead: 0.1, 0.2, 0.3 -> 0.2 (not comparable across arms).
    assert s["full/l2_median"] == pytest.approx(0.2) and s["on/l2_median"] == pytest.approx(0.4)
    assert s["full/success_rate"] == pytest.approx(3 / 5) and s["on/success_rate"] == pytest.approx(2 / 5)
    # Images both fooled: 0 (0.9 / 0.3 = 3) and 3 (0.4 / 0.2 = 2); the lower median is 2.
    assert s["ratio/on_over_full"] == pytest.approx(2.0) and s["ratio/on_over_full/pairs"] == 2
    assert s["on_part_fools_rate"] == pytest.approx(1 / 3) and s["off_part_fools_rate"] == pytest.approx(2 / 3)
    assert s["robust_acc@0.25"] == pytest.approx(3 / 6) and s["robust_acc@0.35"] == pytest.approx(2 / 6)
    assert not any(key.startswith(("off/", "random")) and "/" in key for key in s)


def test_support_arms_run_in_the_images_own_pixels(models: Models) -> None:
    """Dark images with one bright 3x3 patch: the support null's directions live on the patch dilated by one
    pixel (5x5, cut at the border), and its arms run, measured and summarised, next to the others."""
    generator = torch.Generator().manual_seed(3)
    x, mask = torch.zeros(16, *SHAPE), torch.zeros(16, *SHAPE, dtype=torch.bool)
    for i, (r, c) in enumerate(torch.randint(0, 6, (16, 2), generator=generator).tolist()):
        x[i, 0, r : r + 3, c : c + 3] = 0.9
        mask[i, 0, max(r - 1, 0) : r + 4, max(c - 1, 0) : c + 4] = True
    batch = make_batch(x, torch.randint(0, 3, (16,), generator=generator), torch.arange(16), seed=0)
    measure = Decomposition(PGD(eps=2.0, steps=20, step_size=0.1, clamp=False, early_stop=True),
                            nulls=["random", "support"])  # fmt: skip
    assert measure.arms == ARMS[:7]  # without the other-image arms
    spaces = measure.subspaces(models, batch)[0]
    basis = spaces["support"].basis
    assert basis[~mask.flatten(1)].abs().max() < 1e-6  # zero but for the QR's rounding
    assert torch.allclose(basis.transpose(1, 2) @ basis, torch.eye(K).expand(16, K, K), atol=1e-5)
    out = measure.measure(models, batch)
    for arm in ("support", "support_off"):
        assert {f"{arm}_success", f"{arm}_l2", f"leak_{arm}"} <= out.keys()
        assert out[f"leak_{arm}"].max() < 1e-4
    summary = measure.summarize(out)
    assert {"support/success_rate", "support_off/l2_needed_median", "ratio/on_over_support"} <= summary.keys()


def test_linf_attack_runs_the_unconstrained_arm_only(models: Models) -> None:
    linf = PGD(eps=0.1, norm="linf", steps=10, step_size=0.02, early_stop=True)
    with pytest.raises(DmmError, match="L2 only"):
        Decomposition(linf, nulls=["random"])
    measure = Decomposition(linf, nulls=[], eps_curve=[0.05, 0.1])
    assert measure.arms == ("full",)
    out = measure.measure(models, images())
    assert {key for key in out if key.endswith("_success")} == {"full_success"}
    assert not any(key.startswith("leak_") for key in out)
    assert (out["full_linf"] <= 0.1 + 1e-6).all() and out["full_success"].any()
    assert torch.allclose(out["_images"][:, 3] + out["_images"][:, 4], out["_images"][:, 2], atol=1e-6)  # still split
    summary = measure.summarize(out)
    assert "full/success_rate" in summary and not any(key.startswith(("on/", "off/", "ratio/")) for key in summary)
    fooled = out["full_success"] & (out["full_linf"] <= 0.05 + 1e-6)  # the curve reads the L∞ norms
    assert summary["robust_acc@0.05"] == pytest.approx((out["correct"] & ~fooled).float().mean().item())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"nulls": ["random", "pca"]}, "pca"), ({"eps_curve": [1.0, -1.0]}, "eps_curve"),
     ({"eps_curve": [math.nan]}, "eps_curve"), ({"support_dilation": -1}, "support_dilation")],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(DmmError, match=message):
        Decomposition(**kwargs)


def test_an_images_records_do_not_depend_on_its_batch(models: Models) -> None:
    """Seeded by dataset index, each image draws the same null subspaces in any batch (or DDP process)."""
    measure = Decomposition(PGD(eps=2.0, steps=10, step_size=0.2, early_stop=True))
    batch = images(24)
    whole = measure.measure(models, batch)
    parts = [measure.measure(models, make_batch(batch.x[s], batch.y[s], batch.index[s], seed=0))
             for s in (slice(0, 10), slice(10, 24))]  # fmt: skip
    for key, value in whole.items():
        joined = torch.cat([p[key] for p in parts]).double()
        assert torch.allclose(joined, value.double(), atol=1e-5, equal_nan=True), key
    other_seed = measure.measure(models, make_batch(batch.x, batch.y, batch.index, seed=1))
    assert not torch.allclose(other_seed["random_fraction"], whole["random_fraction"])


class Linear2(nn.Module):
    """Two-class linear classifier: its loss gradient always points along w1 - w0."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.stack([torch.zeros_like(w), w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


class FixedSpan(nn.Module):
    """Linear decoder whose tangent space is the span of the given columns (n, k)."""

    def __init__(self, columns: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", columns)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 + z @ self.a.T).view(-1, *SHAPE)


@pytest.mark.parametrize("aligned", [True, False])
def test_linear_case_is_exact(aligned: bool) -> None:
    """Gradient in the tangent space -> on-fraction 1; orthogonal to it -> 0 and the on-attack fails."""
    torch.manual_seed(0)
    w = torch.randn(N)
    w -= w.mean()  # so that w . (0.5, ..., 0.5) = 0 and the margin below is exactly 0.05 |w|
    basis = torch.linalg.qr(torch.randn(N, K)).Q
    basis = basis - (basis.T @ w)[None, :] * w[:, None] / w.dot(w)  # now orthogonal to w
    columns = torch.cat([w[:, None], basis[:, :2]], dim=1) if aligned else basis
    x = torch.full((8, *SHAPE), 0.5) - 0.05 * w.view(1, *SHAPE) / w.norm()  # class 0, margin 0.05*|w|
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(N, columns.shape[1]))
    measure = Decomposition(PGD(eps=1.0, steps=40, step_size=0.02, clamp=False, early_stop=True), nulls=[])
    models = Models(Linear2(w), encoder, FixedSpan(columns))
    out = measure.measure(models, make_batch(x, torch.zeros(8, dtype=torch.long), torch.arange(8), seed=0))
    assert out["full_success"].all()
    expected = 1.0 if aligned else 0.0
    assert out["on_fraction"] == pytest.approx(torch.full((8,), expected), abs=1e-4)
    assert out["on_success"].all() == aligned
    assert out["off_success"].all() != aligned
    # Early stopped in steps of 0.02 along the gradient: the first iterate past the margin 0.05.
    assert out["full_l2"] == pytest.approx(torch.full((8,), 0.06), abs=1e-5)
