"""The per-batch DMM measurement: properties, and an exact answer on a linear classifier and decoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmm.decomposition import ATTACKS, AttackSettings, measure, summarize
from dmm.nets import MLP, MLPDecoder, MLPEncoder

SHAPE = (1, 8, 8)


@pytest.fixture
def models() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    return (
        MLP(SHAPE, 3, hidden=(32,), dropout=0.0),
        MLPEncoder(SHAPE, 3, hidden=(16,)),
        MLPDecoder(3, SHAPE, hidden=(16,)),
    )


def batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(size, *SHAPE, generator=generator), torch.randint(0, 3, (size,), generator=generator)


@pytest.mark.parametrize("clamp", [True, False])
def test_records_are_consistent(models, clamp: bool) -> None:
    x, y = batch()
    settings = AttackSettings(eps=2.0, steps=30, step_size=0.1, clamp=clamp)
    out = measure(*models, x, y, settings, generator=torch.Generator().manual_seed(0))
    for key, value in out.items():
        assert value.shape[0] == 32, key
    for name in ATTACKS:
        assert (out[f"{name}_l2"] <= settings.eps + 1e-5).all()
        assert not (out[f"{name}_success"] & ~out["correct"]).any()  # only correct images can be fooled
    assert ((0 <= out["on_fraction"]) & (out["on_fraction"] <= 1 + 1e-6)).all()
    assert out["full_success"].any()
    if not clamp:  # the exact variant: constrained attacks never leave their subspace
        assert out["leak_on"].max() < 1e-4 and out["leak_off"].max() < 1e-4
    grid = out["_images"]
    x_adv, d, d_on, d_off = grid[:, 1], grid[:, 2], grid[:, 3], grid[:, 4]
    assert torch.allclose(x_adv - x, d, atol=1e-6) and torch.allclose(d_on + d_off, d, atol=1e-6)


def test_random_baseline_is_about_sqrt_k_over_n(models) -> None:
    x, y = batch(128)
    out = measure(*models, x, y, AttackSettings(eps=1.0, steps=5), generator=torch.Generator().manual_seed(0))
    moved = out["full_l2"] > 0
    assert moved.sum() > 32
    assert out["random_fraction"][moved].mean().item() == pytest.approx(math.sqrt(3 / 64), rel=0.25)


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
    n = math.prod(SHAPE)
    w = torch.randn(n)
    w -= w.mean()  # so that w . (0.5, ..., 0.5) = 0 and the margin below is exactly 0.05 |w|
    basis = torch.linalg.qr(torch.randn(n, 3)).Q
    basis = basis - (basis.T @ w)[None, :] * w[:, None] / w.dot(w)  # now orthogonal to w
    columns = torch.cat([w[:, None], basis[:, :2]], dim=1) if aligned else basis
    classifier = Linear2(w)
    x = torch.full((8, *SHAPE), 0.5) - 0.05 * w.view(1, *SHAPE) / w.norm()  # class 0, margin 0.05*|w|
    y = torch.zeros(8, dtype=torch.long)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(n, columns.shape[1]))
    settings = AttackSettings(eps=1.0, steps=40, step_size=0.02, clamp=False)
    out = measure(classifier, encoder, FixedSpan(columns), x, y, settings)
    assert out["full_success"].all()
    expected = 1.0 if aligned else 0.0
    assert out["on_fraction"] == pytest.approx(torch.full((8,), expected), abs=1e-4)
    assert out["on_success"].all() == aligned
    assert out["off_success"].all() != aligned


def test_summary_curve_starts_at_clean_accuracy_and_falls(models) -> None:
    x, y = batch(64)
    out = measure(*models, x, y, AttackSettings(eps=3.0, steps=40, step_size=0.1))
    summary = summarize(out, [0.0, 0.25, 0.5, 1.0, 3.0])
    assert summary["robust_acc@0"] == pytest.approx(summary["clean_acc"])
    curve = [summary[f"robust_acc@{e:g}"] for e in (0.0, 0.25, 0.5, 1.0, 3.0)]
    assert curve == sorted(curve, reverse=True)
    assert summary["num_images"] == 64
