"""The adv-lib attack objects (APGD, FMN): threat-model contract, strength, exact answers on a linear model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmm.attacks import PGD
from dmm.attacks import library as library_module
from dmm.attacks.library import APGD, FMN, seeded
from dmm.errors import DmmError

SHAPE = (1, 6, 6)
D = 36
NORMS = {"l2": lambda v: v.flatten(1).norm(dim=1), "linf": lambda v: v.flatten(1).abs().amax(dim=1)}


@pytest.fixture
def adv_lib():
    return pytest.importorskip("adv_lib", reason='adv-lib absent: pip install -e ".[attacks]"')


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 10))


def images(b: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, *SHAPE, generator=torch.Generator().manual_seed(seed))


def two_class_linear(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Logits (0, w·x + b) with b centring the decision boundary on x = 0.5; and w."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(D), w]))
        model[1].bias.copy_(torch.tensor([0.0, -0.5 * w.sum().item()]))
    return model, w


def interior(b: int = 64, seed: int = 2) -> torch.Tensor:
    """Images in [0.3, 0.7]: a perturbation of L2 norm <= 0.3 cannot reach the box."""
    return 0.3 + 0.4 * images(b, seed)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_stays_in_the_box_and_the_per_sample_ball(adv_lib, norm: str, loss: str) -> None:
    model, x = mlp(), images()
    y = model(x).argmax(1)
    eps = torch.linspace(0.05, 1.0 if norm == "l2" else 0.2, 32)
    x_adv = APGD(norm=norm, loss=loss, steps=10)(model, x, y, eps=eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (NORMS[norm](x_adv - x) <= eps * (1 + 1e-5)).all()
    fooled = model(x_adv).argmax(1) != y
    assert fooled.any() and not fooled.all()  # the budgets span easy and hard
    assert torch.equal(x_adv[~fooled], x[~fooled])  # images never fooled come back unchanged


def test_apgd_ce_and_dlr_together_are_at_least_as_strong_as_ten_step_pgd(adv_lib) -> None:
    """The pair the robustness measure runs, per image, against dmm's 10-step PGD on the CE. (APGD-CE alone can
    end at a CE maximum that is not misclassified; DLR, a margin loss, goes for the misclassification.)"""
    model, x = mlp(), images(64)
    y = model(x).argmax(1)
    for eps in (0.3, 0.6, 1.0):
        robust = [model(APGD(eps=eps, loss=loss)(model, x, y)).argmax(1) == y for loss in ("ce", "dlr")]
        pgd = model(PGD(eps=eps, steps=10)(model, x, y)).argmax(1) == y
        assert (robust[0] & robust[1]).sum() <= pgd.sum(), eps


def test_apgd_fools_exactly_the_images_within_reach_of_a_linear_boundary(adv_lib) -> None:
    """Two classes, w·x + b: the L2 distance to the boundary is |w·x + b| / ‖w‖, and no clamping in between."""
    model, w = two_class_linear()
    x = interior()
    y = model(x).argmax(1)
    distance = (model(x)[:, 1]).abs() / w.norm()
    eps = 0.1
    fooled = model(APGD(eps=eps, loss="ce", steps=20)(model, x, y)).argmax(1) != y
    clear = (distance - eps).abs() > 1e-3  # leave out images on the rim
    assert clear.sum() > 40 and 0 < (distance < eps).sum() < 60
    assert torch.equal(fooled[clear], (distance < eps)[clear])


def test_fmn_finds_the_exact_minimal_norm_of_a_linear_boundary(adv_lib) -> None:
    model, w = two_class_linear()
    x = interior()
    y = model(x).argmax(1)
    distance = (model(x)[:, 1]).abs() / w.norm()
    near = distance < 0.25  # reachable without touching the box
    x, y, distance = x[near], y[near], distance[near]
    start = PGD(eps=1.0, steps=100, step_size=0.02, early_stop=True)(model, x, y)
    x_adv = FMN(steps=50)(model, x, y, start=start)
    assert (model(x_adv).argmax(1) != y).all()
    found = NORMS["l2"](x_adv - x)
    assert (found >= distance * (1 - 1e-4)).all()  # nothing closer than the boundary exists
    assert (found <= distance * 1.01).all()
    assert (found <= NORMS["l2"](start - x)).all()  # refines the early-stopped PGD's step-quantised norm


def test_fmn_stays_in_the_box_and_returns_x_when_it_finds_nothing(adv_lib) -> None:
    model, x = mlp(), images()
    y = model(x).argmax(1)
    x_adv = FMN(steps=20, step_size=0.1)(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    fooled = model(x_adv).argmax(1) != y
    assert fooled.any()
    assert torch.equal(x_adv[~fooled], x[~fooled])


def test_attacks_restore_modes_work_under_inference_mode_and_are_seeded(adv_lib) -> None:
    model = nn.Sequential(mlp(), nn.Dropout(0.5))
    model.train()
    model[0][1].eval()  # a mixed state, restored per submodule
    x = images(8)
    y = torch.zeros(8, dtype=torch.long)
    before = torch.random.get_rng_state()
    with torch.inference_mode():
        first = APGD(eps=0.5, steps=5, seed=3)(model, x, y)
    again = APGD(eps=0.5, steps=5, seed=3)(model, x, y)
    assert torch.equal(first, again)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left alone
    assert model.training and model[1].training and not model[0][1].training
    with torch.inference_mode():
        FMN(steps=3)(model, x, y)
    assert model.training


def test_zero_budget_returns_x(adv_lib) -> None:
    model, x = mlp(), images(4)
    y = model(x).argmax(1)
    assert torch.equal(APGD(eps=0.0)(model, x, y), x)
    mixed = APGD(eps=1.0, steps=5)(model, x, y, eps=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(mixed[[0, 2]], x[[0, 2]])


def test_refusals(adv_lib) -> None:
    model, w = two_class_linear()
    x = interior(4)
    y = model(x).argmax(1)
    with pytest.raises(DmmError, match="at least 3 classes"):
        APGD(loss="dlr")(model, x, y)
    with pytest.raises(DmmError, match="subspace"):
        APGD()(model, x, y, project=lambda v, index: v)
    with pytest.raises(DmmError, match=r"\[0, 1\]"):
        FMN()(model, x + 1, y)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: APGD(eps=-1.0), "eps"),
        (lambda: APGD(eps=math.inf), "eps"),
        (lambda: APGD(norm="l1"), "norm"),
        (lambda: APGD(loss="margin"), "loss"),
        (lambda: APGD(steps=0), "steps"),
        (lambda: APGD(restarts=True), "restarts"),
        (lambda: FMN(steps=0), "steps"),
        (lambda: FMN(step_size=0.0), "step_size"),
    ],
)
def test_bad_settings_are_refused_without_adv_lib(make, message: str) -> None:
    with pytest.raises(DmmError, match=message):
        make()


def test_missing_adv_lib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library_module, "available", lambda: False)
    model, x = mlp(), images(2)
    with pytest.raises(DmmError, match=r'pip install -e "\.\[attacks\]"'):
        APGD()(model, x, torch.zeros(2, dtype=torch.long))
    assert library_module.adv_lib_version() is None


def test_seeded_forks_the_global_generator() -> None:
    before = torch.random.get_rng_state()
    with seeded(5, torch.device("cpu")):
        a = torch.rand(3)
    with seeded(5, torch.device("cpu")):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), before)
