"""Property tests for dmm.attacks (the PGD object, its balls, box_exact) on tiny CPU models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dmm.attacks import PGD, L2Ball, LinfBall, box_exact
from dmm.errors import DmmError
from dmm.manifold import Subspace, random_basis, support_basis

SHAPE = (1, 6, 6)  # (C, H, W) of the toy images
D = 36
NORMS = {"l2": lambda v: v.flatten(1).norm(dim=1), "linf": lambda v: v.flatten(1).abs().amax(dim=1)}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 10))


def linear(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, classes))


def batch(b: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, *SHAPE, generator=g), torch.randint(0, 10, (b,), generator=g)


def saturated_batch(b: int = 8, seed: int = 1) -> torch.Tensor:
    """MNIST-like images: about 40 % of the pixels exactly 0, 20 % exactly 1, the rest strictly inside."""
    x = torch.rand(b, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return torch.where(x < 0.4, 0.0, torch.where(x > 0.8, 1.0, x))


def leak(delta: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """||(I - Q Q^T) delta|| / ||delta|| per sample, float64, with q (D, k) or per-sample (B, D, k)."""
    d = delta.double().flatten(1)[..., None]  # (B, D, 1)
    q = q.double()
    return (d - q @ (q.transpose(-1, -2) @ d)).norm(dim=(1, 2)) / d.norm(dim=(1, 2))


def identity(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return v


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


class DeadStart(nn.Module):
    """Two classes; class 1's logit is 10 (relu(w . (x - 1/2)) - 0.2) for a unit w.

    At x = 1/2 the relu is dead: the gradient is exactly 0 and an attack from x never moves. From a random
    start with w . delta > 0 (probability 1/2) it climbs along w and wins once w . delta > 0.2.
    """

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(D, generator=torch.Generator().manual_seed(5))
        self.w = w / w.norm()

    def forward(self, x):
        z = 10 * (torch.relu((x.flatten(1) - 0.5) @ self.w) - 0.2)
        return torch.stack([torch.zeros_like(z), z], dim=1)


# --- the ball, the budget, the box -------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("random_start", [False, True])
def test_stays_in_ball_and_box(norm, random_start):
    x, y = batch()
    eps = torch.linspace(0.0, 0.5, 8)  # per-sample radii, one of them zero
    x_adv = PGD(norm=norm, steps=10, random_start=random_start)(mlp(), x, y, eps=eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (NORMS[norm](x_adv - x) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv[0], x[0])


def test_per_sample_eps_equals_separate_calls():
    x, y = batch(4)
    eps = torch.tensor([0.2, 0.5, 1.0, 2.0])
    attack = PGD(steps=5)
    together = attack(mlp(), x, y, eps=eps)
    for i in range(4):
        alone = attack.replace(eps=eps[i].item())(mlp(), x[i : i + 1], y[i : i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_zero_eps_returns_x(norm):
    x, y = batch()
    for attack in (PGD(eps=0.0, norm=norm, steps=3), PGD(eps=0.0, norm=norm, steps=3, random_start=True)):
        assert torch.equal(attack(mlp(), x, y), x)
    assert torch.equal(PGD(eps=0.0, norm=norm, steps=1)(mlp(), x, y), x)  # FGM
    if norm == "l2":
        assert torch.equal(PGD(eps=0.0, steps=3, random_start=True)(mlp(), x, y, identity), x)


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("linf", 0.05)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_untargeted_raises_loss(norm, eps, loss):
    model, (x, y) = mlp(), batch()
    x_adv = PGD(eps=eps, norm=norm, steps=10, loss=loss)(model, x, y)
    with torch.no_grad():
        clean, adv = (F.cross_entropy(model(v), y, reduction="none") for v in (x, x_adv))
    assert (adv > clean).all()
    x_fast = PGD(eps=eps, norm=norm, steps=1)(model, x, y)
    assert (F.cross_entropy(model(x_fast), y, reduction="none") > clean).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fgm_is_one_full_step_along_the_closed_form_gradient(norm):
    """FGM = PGD(steps=1): the default step 2.5 eps projected onto the ball moves exactly eps, along the
    steepest-ascent direction of the cross-entropy, here in closed form: W^T (softmax(W x + b) - onehot(y))."""
    model, (x, y) = linear(), batch()
    x = 0.25 + 0.5 * x  # far from the box edges, so clamping never bites
    eps = 0.5 if norm == "l2" else 0.05
    delta = (PGD(eps=eps, norm=norm, steps=1)(model, x, y) - x).double().flatten(1)
    w, b = (p.detach().double() for p in model[1].parameters())
    grad = (torch.softmax(x.double().flatten(1) @ w.T + b, dim=1) - F.one_hot(y, 10).double()) @ w
    expected = eps * grad / grad.norm(dim=1, keepdim=True) if norm == "l2" else eps * grad.sign()
    assert torch.allclose(delta, expected, atol=1e-6)
    assert torch.allclose(NORMS[norm](delta), torch.full((8,), eps, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("l2", 3.0), ("linf", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_targeted_reaches_target_on_linear_model(norm, eps, loss):
    model = linear()
    x, y = batch(16)
    x = 0.25 + 0.5 * x  # room to move both ways inside the box
    target = (y + 1 + torch.arange(16) % 9) % 10  # every class but the true one
    x_adv = PGD(eps=eps, norm=norm, steps=50, targeted=True, loss=loss)(model, x, target)
    assert (model(x_adv).argmax(dim=1) == target).all()


# --- restricted (projected) attacks ------------------------------------------------------------------------


def _subspace(k: int = 5, seed: int = 3) -> torch.Tensor:
    """An orthonormal basis (D, k) of a random k-dimensional subspace of the pixels."""
    return torch.linalg.qr(torch.randn(D, k, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("random_start", [False, True])
def test_project_keeps_perturbation_in_subspace(random_start):
    x, y = batch()
    q = _subspace()
    x_adv = PGD(eps=1.0, steps=10, clamp=False, random_start=random_start)(mlp(), x, y, Subspace(q.expand(8, D, 5)))
    assert (leak(x_adv - x, q) < 1e-5).all()
    assert (NORMS["l2"](x_adv - x) <= 1.0 + 1e-6).all()
    assert (NORMS["l2"](x_adv - x) > 0.5).all()  # it did move


def test_project_refuses_linf():
    x, y = batch()
    with pytest.raises(DmmError, match="L2 only"):
        PGD(eps=0.1, norm="linf", steps=3)(mlp(), x, y, identity)


@pytest.mark.parametrize("early_stop", [False, True])
def test_identity_projector_reproduces_the_unprojected_attack(early_stop):
    """With clamp=False the projected loop is the plain loop with P g in place of g: for P = I they agree."""
    model, (x, _) = mlp(), batch(16)
    y = model(x).argmax(1)  # correctly classified: early stopping has something to stop
    attack = PGD(eps=0.8, steps=10, clamp=False, early_stop=early_stop)
    plain = attack(model, x, y)
    assert (plain - x).abs().max() > 0.1  # it moved
    if early_stop:
        assert 0 < int((model(plain).argmax(1) != y).sum()) < 16  # some rows stopped early, some ran on
    assert torch.equal(attack(model, x, y, identity), plain)
    # A full orthonormal basis: Q Q^T = I up to rounding, float64 throughout.
    x64, model64 = x.double(), mlp().double()
    q = torch.linalg.qr(torch.randn(16, D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    assert torch.allclose(attack(model64, x64, y, Subspace(q)), attack(model64, x64, y), atol=1e-10, rtol=0)


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

    x_adv = PGD(eps=3.0, steps=6, clamp=False, early_stop=True)(Threshold(), x, y, project)
    assert (leak(x_adv - x, bases) < 1e-5).all()
    assert seen[0].tolist() == list(range(8)) and seen[-1].tolist() == [4, 5, 6, 7]


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
    x_adv = PGD(eps=1.0, steps=20, step_size=0.1, clamp=False)(model, x, y, Subspace(basis.expand(4, n, 3)))
    assert torch.equal(x_adv, x)


def test_clamp_true_with_a_projector_leaks_out_of_the_subspace():
    """The known pitfall: clamp=True clamps x + delta after the projection, so on images with pixels at 0
    and 1 part of x_adv - x leaves the subspace; clamp=False and clamp="exact" keep it inside."""
    x, model = saturated_batch(), linear(classes=2)
    y = model(x).argmax(1)
    space = Subspace(random_basis(8, D, 5, generator=torch.Generator().manual_seed(0)))
    attack = PGD(eps=2.0, steps=10)
    clamped = attack(model, x, y, space) - x
    assert (leak(clamped, space.basis) > 0.05).all()
    assert (space.complement().fraction(clamped) > 0.05).all()
    free = attack.replace(clamp=False)(model, x, y, space)
    assert (leak(free - x, space.basis) < 1e-5).all()
    assert ((free < 0) | (free > 1)).flatten(1).any(dim=1).all()  # what clamp=False costs instead: the box


# --- box_exact: subspace AND box AND ball ------------------------------------------------------------------


def _interior_subspace(x: torch.Tensor, k: int, seed: int = 0) -> Subspace:
    """A random k-dim subspace of each image's strictly-interior pixels, exactly 0 on the others."""
    inside = ((x > 0) & (x < 1)).flatten(1)
    g = torch.Generator().manual_seed(seed)
    bases = torch.zeros(x.shape[0], D, k)
    for b in range(x.shape[0]):
        rows_ = inside[b].nonzero().squeeze(1)
        bases[b, rows_] = torch.linalg.qr(torch.randn(len(rows_), k, generator=g)).Q
    return Subspace(bases)


def _support_subspace(x: torch.Tensor, k: int, seed: int = 0) -> Subspace:
    """The library's support-matched null on each image's strictly-interior pixels."""
    inside = ((x > 0) & (x < 1)).flatten(1)
    return Subspace(support_basis(inside, k, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("subspace", [_interior_subspace, _support_subspace], ids=["exact_zeros", "support_basis"])
@pytest.mark.parametrize("random_start", [False, True])
def test_exact_clamp_is_in_subspace_box_and_ball_and_makes_progress(subspace, random_start):
    """clamp="exact" on MNIST-like images: the perturbation is in the subspace, every pixel in [0, 1] with
    no tolerance, within eps; and the attack still raises the loss. The subspace lies on the pixels strictly
    inside (0, 1), so moving along it is feasible: progress is guaranteed (a random subspace of all pixels
    would meet the cone of feasible directions only at 0 on so many saturated pixels)."""
    x, model = saturated_batch(), linear(classes=2)
    y = model(x).argmax(1)
    space = subspace(x, 4)
    torch.manual_seed(0)
    x_adv = PGD(eps=1.5, steps=10, clamp="exact", random_start=random_start)(model, x, y, space)
    d = x_adv - x
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (NORMS["l2"](d) <= 1.5 + 1e-6).all()
    assert (leak(d, space.basis) < 1e-5).all()
    with torch.no_grad():
        clean, adv = (F.cross_entropy(model(v), y, reduction="none") for v in (x, x_adv))
    # The loss is convex along any direction for a linear model and the step follows the projected gradient.
    assert (adv > clean + 1e-3).all()


def test_exact_clamp_fools_a_linear_classifier_given_room():
    """A linear classifier whose weight w lies on the free pixels and in every subspace: a step along w is
    feasible and crosses the boundary, so clamp="exact" must fool every image (12 pixels sit at 0 or 1)."""
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.04 * (torch.rand(16, D, generator=g) - 0.5)
    x[:, :8], x[:, 8:12] = 0.0, 1.0
    free = torch.arange(12, D)
    w = torch.zeros(D)
    w[free] = torch.randn(len(free), generator=g)
    w /= w.norm()
    # logit 1 - logit 0 = w . (x - 1/2): within 0.02 ||w||_1 < 0.1 of 0, while +-0.48 w is feasible.
    model = nn.Linear(D, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(D), w]))
        model.bias.copy_(torch.stack([torch.tensor(0.0), -0.5 * w.sum()]))
    y = model(x).argmax(1)
    assert 0 < int(y.sum()) < 16  # both classes, so the attack pushes both ways along w
    bases = torch.zeros(16, D, 6)
    for b in range(16):  # w plus 5 random directions of the free pixels, exactly 0 on the others
        bases[b, free] = torch.linalg.qr(torch.cat([w[free, None], torch.randn(len(free), 5, generator=g)], 1)).Q
    space = Subspace(bases)
    x_adv = PGD(eps=4.0, steps=40, clamp="exact")(model, x, y, space)
    assert (model(x_adv).argmax(1) != y).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (NORMS["l2"](x_adv - x) <= 4.0 + 1e-6).all() and (leak(x_adv - x, bases) < 1e-5).all()


def _feasible(v, x, basis, eps):
    return (
        bool(((x + v >= 0) & (x + v <= 1)).all()),
        bool((NORMS["l2"](v) <= eps + 1e-6).all()),
        bool((leak(v, basis)[NORMS["l2"](v) > 0] < 1e-5).all()),
    )


def test_box_exact_output_is_feasible_for_random_inputs():
    g = torch.Generator().manual_seed(0)
    x = saturated_batch(16, seed=2)
    x[8:] = torch.rand(8, *SHAPE, generator=g)  # half MNIST-like, half no saturated pixels
    basis = random_basis(16, D, 6, generator=g)
    space, index = Subspace(basis), torch.arange(16)
    eps = torch.rand(16, generator=g) * 2
    delta = 3 * torch.randn(16, *SHAPE, generator=g)
    out = box_exact(delta, x, space, index, L2Ball(eps))
    assert _feasible(out, x, basis, eps) == (True, True, True)
    # The projection of any point is no farther from it than the feasible point 0 is.
    assert (NORMS["l2"](out - delta) <= NORMS["l2"](delta) + 1e-5).all()


def test_box_exact_leaves_a_feasible_point_unchanged():
    g = torch.Generator().manual_seed(1)
    x = 0.1 + 0.8 * torch.rand(8, *SHAPE, generator=g)
    basis = random_basis(8, D, 6, generator=g)
    space, index = Subspace(basis), torch.arange(8)
    inside = space(0.05 * torch.randn(8, *SHAPE, generator=g), index)  # small: deep inside box and ball
    out = box_exact(inside, x, space, index, L2Ball(torch.ones(8)))
    assert torch.allclose(out, inside, atol=1e-6)


def test_box_exact_keeps_the_feasible_part_at_pixels_with_no_slack():
    """The Euclidean projection of delta = (-0.2, -0.2, 0.3) onto span{(1, 1, 0)/sqrt2, (0, 0, 1)} and
    x + delta in [0, 1]^3 for x = (0, 1/2, 1/2) is (0, 0, 0.3): the first direction is blocked by the pixel
    at exactly 0, the second is free. float64 so that the answer does not hinge on rounding luck."""
    s = 1 / math.sqrt(2)
    basis = torch.tensor([[[s, 0.0], [s, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    delta = torch.tensor([[-0.2, -0.2, 0.3]], dtype=torch.float64)
    out = box_exact(delta, x, Subspace(basis), torch.tensor([0]), L2Ball(torch.ones(1, dtype=torch.float64)))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.3]], dtype=torch.float64), atol=1e-6)


# --- restarts and early stopping ---------------------------------------------------------------------------


def test_restarts_only_add_successes_and_keep_first_successes():
    x, y = torch.full((32, *SHAPE), 0.5), torch.zeros(32, dtype=torch.int64)
    attack = PGD(eps=1.0, steps=10, random_start=True)
    runs = {}
    for restarts in (1, 3):
        torch.manual_seed(0)
        runs[restarts] = attack.replace(restarts=restarts)(DeadStart(), x, y)
    once, thrice = ((DeadStart()(runs[r]).argmax(1) == 1) for r in (1, 3))
    assert 0 < int(once.sum()) < 32  # single runs sometimes fail
    assert not (once & ~thrice).any() and int(thrice.sum()) > int(once.sum())
    assert torch.equal(runs[3][once], runs[1][once])  # run 1's x_adv kept, not attacked again


def test_restarts_start_at_random_and_skip_fooled_images():
    x, y = torch.full((32, *SHAPE), 0.5), torch.zeros(32, dtype=torch.int64)
    torch.manual_seed(0)
    stuck = PGD(eps=1.0, steps=10)(DeadStart(), x, y)
    assert torch.equal(stuck, x)  # zero gradient at x: a run from x never moves
    torch.manual_seed(0)
    first = PGD(eps=1.0, steps=10, random_start=True)(DeadStart(), x, y)
    failed = int((DeadStart()(first).argmax(1) == 0).sum())
    model = RowCounter(DeadStart())
    torch.manual_seed(0)
    again = PGD(eps=1.0, steps=10, random_start=True, restarts=2)(model, x, y)
    assert model.rows == 10 * 32 + 32 + 10 * failed  # run 1, one check of all, run 2 on the failures only
    torch.manual_seed(0)
    later = PGD(eps=1.0, steps=10, restarts=3)(DeadStart(), x, y)  # run 1 from x, runs 2 and 3 at random
    assert int((DeadStart()(later).argmax(1) == 1).sum()) > 0
    assert int((DeadStart()(again).argmax(1) == 1).sum()) > 32 - failed


def test_restarts_with_per_sample_projector_use_each_rows_own_subspace():
    """Later runs attack a sub-batch: the projector must still see the rows' indices in the whole batch."""
    x, y = torch.full((16, *SHAPE), 0.5), torch.zeros(16, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    model = DeadStart()
    bases = random_basis(16, D, 4, generator=g)
    bases[:, :, 0] = model.w  # every subspace holds the climbing direction ...
    bases = torch.linalg.qr(bases).Q  # ... and 3 random others, its own per image
    torch.manual_seed(0)
    x_adv = PGD(eps=1.0, steps=10, restarts=4, early_stop=True, clamp=False)(model, x, y, Subspace(bases))
    moved = NORMS["l2"](x_adv - x) > 0
    assert int(moved.sum()) > 8
    assert (leak((x_adv - x)[moved], bases[moved]) < 1e-5).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_early_stop_saves_forward_passes_and_returns_first_success(norm):
    # Samples 0-3 start at mean 0.45 and cross 0.5 after the first step; 4-7 can never reach it.
    x = torch.cat([torch.full((4, *SHAPE), 0.45), torch.full((4, *SHAPE), 0.1)])
    y = torch.zeros(8, dtype=torch.int64)
    # Both balls cap every pixel's move at 0.3; an L2 step of 0.6 moves each of the 36 pixels by 0.1.
    eps, step = (1.8, 0.6) if norm == "l2" else (0.3, 0.1)
    model = RowCounter(Threshold())
    x_adv = PGD(eps=eps, norm=norm, steps=10, step_size=step, early_stop=True)(model, x, y)
    assert model.rows == 8 + 8 + 8 * 4  # two full passes, then only the four that never succeed
    assert (Threshold()(x_adv[:4]).argmax(dim=1) == 1).all()
    assert torch.allclose(x_adv[:4], torch.full_like(x_adv[:4], 0.55))  # not pushed further
    assert torch.allclose(x_adv[4:], torch.full_like(x_adv[4:], 0.4))  # the last iterate

    full = RowCounter(Threshold())
    PGD(eps=eps, norm=norm, steps=10, step_size=step)(full, x, y)
    assert full.rows == 10 * 8


def test_refine_finds_the_boundary_between_steps_on_a_linear_boundary():
    # Threshold: class 1 exactly when mean(x) > 0.5. From mean m an L2 perturbation needs norm 6 (0.5 - m) (36
    # pixels, along the all-ones direction), which PGD's L2 steps follow exactly; steps of 0.6 overshoot it.
    x = torch.stack([torch.full(SHAPE, m) for m in (0.45, 0.33, 0.21, 0.1)])
    y = torch.zeros(4, dtype=torch.int64)
    needed = 6 * (0.5 - torch.tensor([0.45, 0.33, 0.21, 0.1]))  # 0.3, 1.02, 1.74, 2.4
    coarse = PGD(eps=1.8, steps=10, step_size=0.6, early_stop=True)(Threshold(), x, y)
    fine = PGD(eps=1.8, steps=10, step_size=0.6, early_stop=True, refine=20)(Threshold(), x, y)
    fooled = Threshold()(coarse).argmax(1) == 1
    assert fooled.tolist() == [True, True, True, False]  # the last needs 2.4 > eps
    torch.testing.assert_close(NORMS["l2"](coarse - x)[:3], torch.tensor([0.6, 1.2, 1.8]))  # multiples of a step
    torch.testing.assert_close(NORMS["l2"](fine - x)[:3], needed[:3], atol=2e-5, rtol=0)  # the boundary itself
    assert (Threshold()(fine[:3]).argmax(1) == 1).all()  # still adversarial: the fooling end of the bisection
    torch.testing.assert_close(fine[3], coarse[3])  # never fooled: the last iterate, unchanged


@pytest.mark.parametrize("clamp", [True, False])
def test_refine_keeps_the_subspace_the_box_and_never_lengthens(clamp):
    model = mlp()
    x, _ = batch(32)
    y = model(x).argmax(1)  # every image correct: each refined point lies between x and a fooling iterate
    bases = random_basis(32, D, 12, generator=torch.Generator().manual_seed(3))  # (32, D, 12), its own per image
    attack = PGD(eps=4.0, steps=60, step_size=0.1, early_stop=True, clamp=clamp)
    coarse = attack(model, x, y, Subspace(bases))
    fine = attack.replace(refine=12)(model, x, y, Subspace(bases))
    fooled = model(coarse).argmax(1) != y
    assert int(fooled.sum()) >= 16
    assert (model(fine[fooled]).argmax(1) != y[fooled]).all()  # still adversarial
    short, long = NORMS["l2"](fine - x), NORMS["l2"](coarse - x)
    assert (short <= long + 1e-6).all() and (short[fooled] < long[fooled] - 1e-3).float().mean() > 0.5
    # On the segment from x to the coarse iterate: the same direction, so the same subspace and, by convexity,
    # the box (the coarse iterate is in it when clamped; without clamp the subspace is exact).
    cos = F.cosine_similarity((fine - x)[fooled].flatten(1), (coarse - x)[fooled].flatten(1))
    assert (cos > 1 - 1e-5).all()
    if clamp:
        assert fine.min() >= 0 and fine.max() <= 1
    else:
        assert (leak((fine - x)[fooled], bases[fooled]) < 1e-5).all()
    torch.testing.assert_close(fine[~fooled], coarse[~fooled])


def test_refine_needs_early_stop_and_the_full_budget_run_drops_it():
    with pytest.raises(DmmError, match="refine must be 0 without early_stop"):
        PGD(refine=5)
    attack = PGD(early_stop=True, refine=5)
    assert attack.replace(early_stop=False, refine=0).refine == 0


def test_early_stop_targeted_returns_target_class():
    model = linear()
    x, y = batch(16)
    x = 0.25 + 0.5 * x
    x_adv = PGD(eps=0.5, norm="linf", steps=50, targeted=True, early_stop=True)(model, x, (y + 1) % 10)
    assert (model(x_adv).argmax(dim=1) == (y + 1) % 10).all()


# --- modes, autograd, determinism --------------------------------------------------------------------------


def test_mode_restored_and_no_parameter_grads():
    model = RowCounter(
        nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 10))
    )
    model.model[2].eval()  # a frozen norm layer inside a training model must stay frozen
    model.model[4].weight.grad = torch.ones_like(model.model[4].weight)
    x, y = batch()
    PGD(eps=0.5, steps=3)(model, x, y)
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
        PGD(eps=0.5, steps=3)(model, *batch())
    assert model.training


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_without_autograd(context):
    model = mlp()
    with context():
        x, y = batch()
        eps = torch.full((8,), 1.0)
        x_adv = PGD(steps=5, random_start=True)(model, x, y, eps=eps)
        clean, adv = (F.cross_entropy(model(v), y, reduction="none") for v in (x, x_adv))
    assert (adv > clean).all()


def test_deterministic_given_seed():
    x, y = batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(PGD(eps=0.1, norm="linf", steps=3, random_start=True)(mlp(), x, y))
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


def test_l2_random_start_is_uniform_in_the_ball():
    """Uniform in the n-ball: P(||delta|| <= r eps) = r^n, so ||delta||^n / eps^n is uniform on [0, 1]."""
    torch.manual_seed(0)
    n = 4
    radii = L2Ball(torch.full((4000,), 2.0, dtype=torch.float64)).random(torch.Size([4000, n])).norm(dim=1)
    u = (radii / 2.0) ** n
    assert u.max() <= 1 and abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 4000)
    assert abs((u < 0.25).double().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"eps": -0.1},
        {"eps": float("nan")},
        {"eps": float("inf")},
        {"eps": "1"},
        {"steps": 0},
        {"steps": 2.0},
        {"steps": True},
        {"restarts": 0},
        {"norm": "l3"},
        {"step_size": 0.0},
        {"step_size": -1.0},
        {"step_size": float("nan")},
        {"loss": "hinge"},
        {"random_start": 1},
        {"early_stop": "yes"},
        {"targeted": None},
        {"clamp": "box"},
        {"clamp": 1.0},
        {"refine": -1, "early_stop": True},
        {"refine": True, "early_stop": True},
        {"refine": 1.5, "early_stop": True},
    ],
)
def test_bad_fields_raise_on_construction(fields):
    with pytest.raises(DmmError):
        PGD(**fields)
    with pytest.raises(DmmError):
        PGD().replace(**fields)


def test_valid_fields_round_trip():
    attack = PGD(eps=0.5, norm="linf", steps=7, step_size=0.1, restarts=2, clamp="exact", loss="margin")
    assert PGD(**attack.as_dict()) == attack
    assert attack.reach == pytest.approx(0.7) and PGD(eps=2.0, steps=40).reach == pytest.approx(5.0)
    with pytest.raises(AttributeError):  # frozen
        attack.eps = 1.0


@pytest.mark.parametrize("eps", [torch.tensor([0.1, -1.0] * 4), torch.ones(3), torch.tensor([float("nan")] * 8)])
def test_bad_per_sample_eps_raises(eps):
    with pytest.raises(DmmError):
        PGD(steps=2)(mlp(), *batch(), eps=eps)


@pytest.mark.parametrize(
    "x,y",
    [
        (torch.rand(8, *SHAPE) + 1.0, torch.zeros(8, dtype=torch.int64)),
        (torch.full((8, *SHAPE), float("nan")), torch.zeros(8, dtype=torch.int64)),
        (torch.rand(D), torch.zeros(1, dtype=torch.int64)),
        (torch.rand(8, *SHAPE), torch.zeros(8)),
        (torch.rand(8, *SHAPE), torch.zeros(7, dtype=torch.int64)),
    ],
)
def test_bad_inputs_raise(x, y):
    with pytest.raises(DmmError):
        PGD(eps=0.1)(mlp(), x, y)
