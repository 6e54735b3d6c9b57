"""Property tests for dmm.attacks on tiny CPU models."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dmm.attacks import L2Ball, LinfBall, fgsm, pgd
from dmm.errors import DmmError

SHAPE = (1, 6, 6)  # (C, H, W) of the toy images
D = 36
NORMS = {"l2": lambda v: v.flatten(1).norm(dim=1), "linf": lambda v: v.flatten(1).abs().amax(dim=1)}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 10))


def batch(b: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, *SHAPE, generator=g), torch.randint(0, 10, (b,), generator=g)


class RowCounter(nn.Module):
    """Wraps a model and counts the images it evaluates (sum of batch sizes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows, self.modes = model, 0, []

    def forward(self, x):
        self.rows += x.shape[0]
        self.modes.append(self.training)
        return self.model(x)


class Threshold(nn.Module):
    """Two classes; class 1 wins exactly when the mean pixel exceeds 0.5."""

    def forward(self, x):
        m = x.flatten(1).mean(dim=1)
        return torch.stack([torch.zeros_like(m), 100 * (m - 0.5)], dim=1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("random_start", [False, True])
def test_stays_in_ball_and_box(norm, random_start):
    x, y = batch()
    eps = torch.linspace(0.0, 0.5, 8)  # per-sample radii, one of them zero
    x_adv = pgd(mlp(), x, y, eps=eps, norm=norm, steps=10, random_start=random_start)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (NORMS[norm](x_adv - x) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv[0], x[0])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_zero_eps_returns_x(norm):
    x, y = batch()
    project = lambda v, idx: v  # noqa: E731
    for kwargs in ({}, {"random_start": True}, {"project": project, "random_start": True}):
        assert torch.equal(pgd(mlp(), x, y, eps=0.0, norm=norm, steps=3, **kwargs), x)
    assert torch.equal(fgsm(mlp(), x, y, eps=0.0, norm=norm), x)


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("linf", 0.05)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_untargeted_raises_loss(norm, eps, loss):
    model, (x, y) = mlp(), batch()
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=10, loss=loss)
    with torch.no_grad():
        clean, adv = (F.cross_entropy(model(v), y, reduction="none") for v in (x, x_adv))
    assert (adv > clean).all()
    x_fast = fgsm(model, x, y, eps=eps, norm=norm)
    assert (F.cross_entropy(model(x_fast), y, reduction="none") > clean).all()


def test_fgsm_moves_every_free_pixel_by_eps():
    model, (x, y) = mlp(), batch()
    x = 0.25 + 0.5 * x  # far from the box edges, so clamping never bites
    delta = fgsm(model, x, y, eps=0.1) - x
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.1))


@pytest.mark.parametrize("norm,eps", [("l2", 3.0), ("linf", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_targeted_reaches_target_on_linear_model(norm, eps, loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 10))
    x, y = batch(16)
    x = 0.25 + 0.5 * x  # room to move both ways inside the box
    target = (y + 1 + torch.arange(16) % 9) % 10  # every class but the true one
    x_adv = pgd(model, x, target, eps=eps, norm=norm, steps=50, targeted=True, loss=loss)
    assert (model(x_adv).argmax(dim=1) == target).all()


def _subspace(k: int = 5, seed: int = 3) -> torch.Tensor:
    """An orthonormal basis (D, k) of a random k-dimensional subspace of the pixels."""
    return torch.linalg.qr(torch.randn(D, k, generator=torch.Generator().manual_seed(seed)))[0]


def _off_subspace(delta: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """||delta - Q Q^T delta|| / ||delta|| per sample, with q (D, k) or per-sample (B, D, k)."""
    d = delta.flatten(1)[..., None]  # (B, D, 1)
    along = q @ (q.transpose(-1, -2) @ d)
    return (d - along).norm(dim=(1, 2)) / d.norm(dim=(1, 2))


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("linf", 0.1)])
@pytest.mark.parametrize("random_start", [False, True])
def test_project_keeps_perturbation_in_subspace(norm, eps, random_start):
    x, y = batch()
    q = _subspace()
    project = lambda v, idx: (v.flatten(1) @ q @ q.T).view_as(v)  # noqa: E731
    x_adv = pgd(mlp(), x, y, eps=eps, norm=norm, steps=10, project=project, clamp=False, random_start=random_start)
    assert (_off_subspace(x_adv - x, q) < 1e-5).all()
    assert (NORMS[norm](x_adv - x) <= eps + 1e-6).all()
    assert (NORMS[norm](x_adv - x) > 0.5 * eps).all()  # it did move


def test_project_receives_original_rows_under_early_stop():
    """Per-sample bases: the index lets a projector pick each row's own basis as rows drop out."""
    x, y = batch(8)
    x = torch.cat([0.45 + 0.01 * x[:4], 0.1 * x[4:]])  # first half succeeds after one step
    y = torch.zeros(8, dtype=torch.int64)
    bases = torch.stack([_subspace(seed=i) for i in range(8)])  # (B, D, k)
    seen = []

    def project(v, idx):
        seen.append(idx.clone())
        return (bases[idx] @ (bases[idx].transpose(1, 2) @ v.flatten(1)[..., None])).view_as(v)

    x_adv = pgd(Threshold(), x, y, eps=3.0, norm="l2", steps=6, project=project, clamp=False, early_stop=True)
    assert (_off_subspace(x_adv - x, bases) < 1e-5).all()
    assert seen[0].tolist() == list(range(8)) and seen[-1].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_early_stop_saves_forward_passes_and_returns_first_success(norm):
    # Samples 0-3 start at mean 0.45 and cross 0.5 after the first step; 4-7 can never reach it.
    x = torch.cat([torch.full((4, *SHAPE), 0.45), torch.full((4, *SHAPE), 0.1)])
    y = torch.zeros(8, dtype=torch.int64)
    # Both balls cap every pixel's move at 0.3; an L2 step of 0.6 moves each of the 36 pixels by 0.1.
    eps, step = (1.8, 0.6) if norm == "l2" else (0.3, 0.1)
    model = RowCounter(Threshold())
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=10, step_size=step, early_stop=True)
    assert model.rows == 8 + 8 + 8 * 4  # two full passes, then only the four that never succeed
    assert (Threshold()(x_adv[:4]).argmax(dim=1) == 1).all()
    assert torch.allclose(x_adv[:4], torch.full_like(x_adv[:4], 0.55))  # not pushed further
    assert torch.allclose(x_adv[4:], torch.full_like(x_adv[4:], 0.4))  # the last iterate

    full = RowCounter(Threshold())
    pgd(full, x, y, eps=eps, norm=norm, steps=10, step_size=step)
    assert full.rows == 10 * 8


def test_early_stop_targeted_returns_target_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 10))
    x, y = batch(16)
    x = 0.25 + 0.5 * x
    x_adv = pgd(model, x, (y + 1) % 10, eps=0.5, norm="linf", steps=50, targeted=True, early_stop=True)
    assert (model(x_adv).argmax(dim=1) == (y + 1) % 10).all()


def test_mode_restored_and_no_parameter_grads():
    model = RowCounter(
        nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 10))
    )
    model.model[2].eval()  # a frozen norm layer inside a training model must stay frozen
    model.model[4].weight.grad = torch.ones_like(model.model[4].weight)
    x, y = batch()
    pgd(model, x, y, eps=0.5, steps=3)
    assert model.modes == [False] * 3
    assert model.training and model.model[1].training and not model.model[2].training
    assert model.model[1].weight.grad is None
    assert torch.equal(model.model[4].weight.grad, torch.ones_like(model.model[4].weight))


def test_mode_restored_on_error():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, *batch(), eps=0.5, steps=3)
    assert model.training


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_without_autograd(context):
    model = mlp()
    with context():
        x, y = batch()
        eps = torch.full((8,), 1.0)
        x_adv = pgd(model, x, y, eps=eps, steps=5, random_start=True)
        clean, adv = (F.cross_entropy(model(v), y, reduction="none") for v in (x, x_adv))
    assert (adv > clean).all()


def test_deterministic_given_seed():
    x, y = batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(pgd(mlp(), x, y, eps=0.1, norm="linf", steps=3, random_start=True))
    assert torch.equal(*runs)


@pytest.mark.parametrize("ball,norm", [(L2Ball, "l2"), (LinfBall, "linf")])
def test_ball_geometry(ball, norm):
    torch.manual_seed(0)
    eps = torch.tensor([0.0, 0.5, 2.0])
    b = ball(eps)
    assert (NORMS[norm](b.random(torch.Size([3, *SHAPE]))) <= eps + 1e-6).all()
    big = 10 * torch.randn(3, *SHAPE)
    assert torch.allclose(NORMS[norm](b.project(big)), eps)
    zero = b.step(torch.zeros(3, *SHAPE))
    assert torch.equal(zero, torch.zeros_like(zero))  # no NaN from a zero gradient
    assert torch.allclose(NORMS[norm](b.normalize(big)), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": -0.1},
        {"eps": float("nan")},
        {"eps": float("inf")},
        {"eps": torch.tensor([0.1, -1.0] * 4)},
        {"eps": torch.ones(3)},
        {"eps": 0.1, "steps": 0},
        {"eps": 0.1, "norm": "l3"},
        {"eps": 0.1, "step_size": 0.0},
        {"eps": 0.1, "step_size": -1.0},
        {"eps": 0.1, "loss": "hinge"},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(DmmError):
        pgd(mlp(), *batch(), **kwargs)


@pytest.mark.parametrize(
    "x,y",
    [
        (torch.rand(8, *SHAPE) + 1.0, torch.zeros(8, dtype=torch.int64)),
        (torch.full((8, *SHAPE), float("nan")), torch.zeros(8, dtype=torch.int64)),
        (torch.rand(D), torch.zeros(1, dtype=torch.int64)),
        (torch.rand(8, *SHAPE), torch.zeros(8)),
    ],
)
def test_bad_inputs_raise(x, y):
    with pytest.raises(DmmError):
        pgd(mlp(), x, y, eps=0.1)


def test_projection_that_removes_the_whole_gradient_does_not_move() -> None:
    """A gradient wholly outside the subspace leaves only rounding noise; that must not become a step."""
    torch.manual_seed(0)
    n = 16
    w = torch.randn(n)
    model = torch.nn.Linear(n, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(n), w]))
    basis = torch.linalg.qr(torch.randn(n, 3)).Q
    basis = torch.linalg.qr(basis - torch.outer(w, w @ basis) / w.dot(w)).Q  # orthogonal to w
    x = torch.full((4, n), 0.5)
    y = model(x).argmax(1)

    def project(v, index):
        return (v @ basis) @ basis.T

    x_adv = pgd(model, x, y, eps=1.0, steps=20, step_size=0.1, project=project, clamp=False)
    assert torch.equal(x_adv, x)
