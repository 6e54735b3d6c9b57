"""Each model check passes on a sound model and warns on a model built to fail it: none is true by construction."""

from __future__ import annotations

import torch
from torch import nn

from dmm.attacks import PGD
from dmm.measures.checks import model_checks, random_noise_fools

SHAPE = (1, 6, 6)
ATTACK = PGD(eps=1.0, steps=20, step_size=0.1)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, *SHAPE, generator=g)
    with torch.no_grad():
        y = _linear()(x).argmax(1)  # every image correctly classified
    return x, y


def _status(model: nn.Module, attack: PGD = ATTACK) -> dict[str, str]:
    return {c["name"]: c["status"] for c in model_checks(model, *_data(), attack)}


class Softmax(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).softmax(dim=1)


class Noisy(nn.Module):
    """Random logits noise at every call, in eval mode too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1e-3 * torch.randn(len(x), 3)


class Masked(nn.Module):
    """Quantised input with a zero gradient (a classic masked-gradient 'defence'): PGD cannot move, noise can."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 2) / 2)


class Trap(nn.Module):
    """Two classes whose margin along one direction w from the grey image, s = w . (x - 0.5), is
    m(s) = 1 - s + 0.3 cos(10 s): falling overall (the one-step attack, s = eps = 1, lands at m < 0) but with a
    local minimum at s ~ 0.35 (m ~ 0.4 > 0) where small iterative steps get stuck."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(36) / 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x.flatten(1) - 0.5) @ self.w
        margin = 1 - s + 0.3 * torch.cos(10 * s)
        return torch.stack([margin, torch.zeros_like(margin)], dim=1)


def test_a_sound_linear_model_passes_every_check() -> None:
    statuses = _status(_linear())
    assert len(statuses) == 5 and set(statuses.values()) == {"PASS"}


def test_each_check_warns_on_the_model_built_to_fail_it() -> None:
    assert _status(Softmax(_linear()))["model outputs logits, not probabilities"] == "WARN"
    assert _status(Noisy(_linear()))["model is deterministic"] == "WARN"
    masked = _status(Masked(_linear()))
    assert masked["input gradients are not vanishing"] == "WARN"
    assert masked["white-box attack beats random noise"] == "WARN"
    trap = model_checks(Trap(), torch.full((8, *SHAPE), 0.5), torch.zeros(8, dtype=torch.long), ATTACK)
    assert {c["name"]: c["status"] for c in trap}["iterative attack beats a one-step attack"] == "WARN"


def test_random_noise_stays_on_the_sphere_and_is_seeded() -> None:
    x, y = _data()
    first = random_noise_fools(_linear(), x, y, 1.0, "l2")
    assert torch.equal(first, random_noise_fools(_linear(), x, y, 1.0, "l2"))
    assert not random_noise_fools(_linear(), x, y, 1e-6, "l2").any()  # far too small to cross any boundary
    assert random_noise_fools(_linear(), x, y, 50.0, "linf").any()
