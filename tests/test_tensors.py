"""dmm.tensors: the per-sample helpers and the mode/autograd context managers everything else leans on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmm.tensors import autograd_on, eval_mode, fools, fraction, norms, predict, rows


def test_rows_broadcasts_a_per_sample_value_over_each_sample() -> None:
    t, like = torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, 2, 4, 5)
    assert rows(t, like).shape == (3, 1, 1, 1)
    scaled = like * rows(t, like)
    for b in range(3):
        assert torch.equal(scaled[b], torch.full((2, 4, 5), t[b].item()))
    assert rows(t, torch.ones(3, 7)).shape == (3, 1)


def test_norms_and_fraction_against_float64_sums() -> None:
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    reference = v.double().pow(2).sum(dim=(1, 2, 3)).sqrt()
    assert norms(v).shape == (5,) and torch.allclose(norms(v).double(), reference, rtol=1e-6)
    expected = reference / w.double().pow(2).sum(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(fraction(v, w).double(), expected, rtol=1e-6)
    w[2] = 0  # an image the attack never had to move (its parts are 0 too): 0, not NaN
    part = w * 0.5
    assert fraction(part, w)[2] == 0 and torch.allclose(fraction(part, w)[[0, 1, 3, 4]], torch.full((4,), 0.5))


def _network() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_eval_mode_inside_and_every_flag_restored_after() -> None:
    outer, inner = _network(), _network()
    inner[1].eval()  # a frozen layer inside a training model must come back frozen, not training
    seen = []
    with eval_mode(outer, inner, torch.tanh):  # a plain function passes through
        seen = [m.training for m in (*outer.modules(), *inner.modules())]
    assert not any(seen)
    assert outer.training and all(m.training for m in outer.modules())
    assert inner.training and not inner[1].training and inner[2].training


def test_eval_mode_restores_on_error() -> None:
    model = _network()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_autograd_on_inside_inference_mode_and_no_grad(context) -> None:
    with context():
        with autograd_on():
            x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
            (grad,) = torch.autograd.grad((x**2).sum(), x)
        assert not torch.is_grad_enabled()  # the outer mode is back
        if context is torch.inference_mode:
            assert torch.is_inference_mode_enabled()
    assert torch.equal(grad, torch.tensor([2.0, 4.0, 6.0]))


def test_predict_and_fools_use_eval_mode_without_gradients() -> None:
    torch.manual_seed(0)
    model = _network()
    for _ in range(3):  # non-trivial running statistics
        model(3 * torch.randn(16, 4) + 1)
    x = torch.randn(6, 4)
    model.eval()
    expected = model(x).argmax(dim=1)
    model.train()
    predicted = predict(model, x)
    assert torch.equal(predicted, expected)  # eval mode: running statistics, no dropout
    assert model.training and not predicted.requires_grad
    y = expected.clone()
    y[:2] = (y[:2] + 1) % 3
    assert torch.equal(fools(model, x, y), torch.tensor([True, True, False, False, False, False]))
