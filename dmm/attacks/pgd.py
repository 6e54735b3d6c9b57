"""Projected gradient descent as one frozen, validated configuration object that is also the attack.

``PGD(eps=2.0, steps=40)`` is what every YAML, system, callback and data pipeline takes; calling it,
``attack(model, x, y, project=None)``, runs the one loop below. Imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from dmm.attacks.balls import BALLS
from dmm.attacks.boundary import bisect_to_boundary
from dmm.errors import DmmError
from dmm.tensors import autograd_on, eval_mode, norms, rows


class Projector(Protocol):
    """A per-sample linear projection: ``project(v, index) -> v'``, v (b, ...) and ``index`` (b,) the rows of
    the attacked batch that v's rows belong to (the attack drops finished rows as it goes)."""

    def __call__(self, v: Tensor, index: Tensor) -> Tensor: ...


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """Summed CW margin max_{j≠y} z_j − z_y: positive exactly when the sample is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (others - z_y).sum()


# Summed, not averaged, so one sample's gradient does not depend on the batch size.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="sum"),
    "margin": _margin,
}

BOX_ITERATIONS = 50
"""Dykstra iterations of the exact subspace-and-box projection (``clamp="exact"``) per attack step."""


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent on the input, L2 or L∞ (Madry et al., ICLR 2018).

    Untargeted PGD maximises the loss of ``y``; targeted PGD (``targeted=True``, ``y`` the targets) minimises it.
    Every field is validated on construction (:class:`~dmm.errors.DmmError` with what to change).

    Attributes:
        eps: radius of the threat ball in [0, 1] pixel space; 0 returns x.
        norm: "l2" or "linf".
        steps: gradient steps, each one forward and backward.
        step_size: step length; ``None`` means 2.5 * eps / steps (so one step, FGM, moves exactly eps).
        random_start: start uniformly inside the ball, not at x.
        restarts: runs per image; runs after the first start at random, and an image fooled by one run is
            not attacked again (its first success is kept; an image never fooled keeps its last run).
        early_stop: each image stops at its first success (argmax != y, or == y when targeted) and returns
            that iterate, so its norm is the norm the attack needed; an image never fooled returns its last
            iterate.
        refine: bisection steps on the norm of each early-stopped success (needs ``early_stop``): the smallest
            scale s in (0, 1] found such that x + s (x_adv − x) still fools, to 2^-refine of its norm. The step
            size quantises an early-stopped norm (an image fooled after 4 steps of 0.05 needed "0.2", whatever
            it needs between 0.15 and 0.2); the refined point is still an adversarial example, in the same
            subspace and, by convexity, in the box, at most as far as the iterate. 0 keeps the iterate.
        loss: "ce" (cross-entropy) or "margin" (CW margin max_{j≠y} z_j − z_y).
        targeted: move towards the class ``y`` instead of away from it.
        clamp: the [0, 1] box. ``True``: x_adv is clamped to [0, 1] after every step; unrestricted, δ follows
            the clamp (the box is part of the threat model); under a ``project`` restriction δ stays in the
            subspace but the clamp moves part of x_adv − x out of it (the "leak", ~40 % of an MNIST
            on-manifold perturbation's norm). ``False``: no box, x_adv − x exactly in the subspace, pixels may
            leave [0, 1]. ``"exact"``: both exact — δ is projected onto {subspace} ∩ {ball} ∩ {x + δ ∈ [0, 1]}
            by Dykstra's alternating projections, then made exactly feasible (see :func:`box_exact`).

    Example:
        >>> attack = PGD(eps=2.0, steps=40)
        >>> x_adv = attack(model, x, y)  # x (B, C, H, W) in [0, 1], y (B,) int64
        >>> fooled = model(x_adv).argmax(1) != y
    """

    eps: float = 2.0
    norm: Literal["l2", "linf"] = "l2"
    steps: int = 40
    step_size: float | None = None
    random_start: bool = False
    restarts: int = 1
    early_stop: bool = False
    refine: int = 0
    loss: Literal["ce", "margin"] = "ce"
    targeted: bool = False
    clamp: bool | Literal["exact"] = True

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> DmmError:
            return DmmError(f"attack {field} must be {rule}; got {getattr(self, field)!r}")

        if not _real(self.eps) or not self.eps >= 0:
            raise bad("eps", "a finite number >= 0")
        if self.norm not in BALLS:
            raise bad("norm", f"one of {sorted(BALLS)}")
        for field in ("steps", "restarts"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(field, "an integer >= 1")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise bad("refine", "an integer >= 0")
        if self.refine and not self.early_stop:
            raise bad("refine", "0 without early_stop (it refines the norm at which each image was first fooled)")
        if self.step_size is not None and (not _real(self.step_size) or not self.step_size > 0):
            raise bad("step_size", "a finite number > 0, or null for 2.5 * eps / steps")
        if self.loss not in LOSSES:
            raise bad("loss", f"one of {sorted(LOSSES)}")
        for field in ("random_start", "early_stop", "targeted"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "true or false")
        if not (isinstance(self.clamp, bool) or self.clamp == "exact"):
            raise bad("clamp", 'true, false or "exact"')

    @property
    def reach(self) -> float:
        """The largest norm the attack can reach: steps × step size (each step moves at most one step)."""
        return self.steps * (2.5 * self.eps / self.steps if self.step_size is None else self.step_size)

    def replace(self, **changes) -> PGD:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, model, x: Tensor, y: Tensor, project: Projector | None = None, *, eps=None) -> Tensor:
        """Attack ``model`` at images x.

        Args:
            model: maps images in [0, 1] to logits; run in eval mode for the attack, its modes restored after.
            x: clean images in [0, 1], (B, ...), e.g. (B, C, H, W).
            y: labels (B,) int64 — true labels, or the targets when ``targeted``.
            project: restrict every step and the random start to a per-sample subspace (a :class:`Projector`,
                e.g. :class:`dmm.manifold.Subspace`); the raw gradient is projected, then normalised, and the
                ball constraint becomes a radial rescale, so δ stays in the subspace. L2 only: the steepest L∞
                step inside a subspace is a linear programme, and g/‖g‖∞ is ~3× weaker, so L∞ is refused.
            eps: a per-sample radius (B,) or float replacing ``self.eps`` for this call.

        Returns:
            x_adv: same shape, dtype and device as x, detached.
        """
        _check_inputs(x, y)
        if project is not None and self.norm != "l2":
            raise DmmError(
                "subspace-restricted attacks are L2 only: the steepest L∞ step inside a subspace is a linear "
                "programme, not sign(P g); use norm: l2"
            )
        # Lightning validates under inference_mode; the attack needs autograd, and inference tensors cannot
        # be saved for backward, so x, y and eps are cloned into normal tensors inside.
        with autograd_on(), eval_mode(model):
            x, y = x.clone(), y.clone()
            radius = _per_sample(self.eps if eps is None else eps, "eps", x, allow_zero=True)
            alpha = 2.5 * radius / self.steps if self.step_size is None else _per_sample(self.step_size, "step", x)
            best = self._run(model, x, y, radius, rows(alpha, x), project, self.random_start)
            for _ in range(self.restarts - 1):
                with torch.no_grad():
                    pred = model(best).argmax(dim=1)
                todo = (pred != y if self.targeted else pred == y).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                sub = None if project is None else _Rows(project, todo)
                again = self._run(model, x[todo], y[todo], radius[todo], rows(alpha[todo], x), sub, True)
                best[todo] = again
            if self.refine:
                best = bisect_to_boundary(model, x, y, best, self.refine, self.targeted)
            return best.detach()

    def _run(self, model, x: Tensor, y: Tensor, eps: Tensor, alpha: Tensor, project, random_start: bool) -> Tensor:
        """One run of the loop from x (or a random start): x_adv (B, ...)."""
        ball = BALLS[self.norm](eps)
        index = torch.arange(x.shape[0], device=x.device)
        exact = self.clamp == "exact"

        delta = ball.random(x.shape) if random_start else torch.zeros_like(x)
        if random_start and project is not None:
            delta = ball.rescale(project(delta, index))
            if exact:
                delta = box_exact(delta, x, project, index, ball)
        x_adv = (x + delta).clamp_(0, 1) if self.clamp else x + delta
        out = x_adv.clone() if self.early_stop else x_adv

        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            objective = LOSSES[self.loss](logits, y)
            (grad,) = torch.autograd.grad(-objective if self.targeted else objective, x_adv)
            x_adv = x_adv.detach()

            if self.early_stop:
                pred = logits.detach().argmax(dim=1)
                hit = pred == y if self.targeted else pred != y
                if bool(hit.any()):  # the one host sync per step that early stopping needs
                    out[index[hit]] = x_adv[hit]
                    keep = ~hit
                    index, x, y, x_adv, delta, grad, alpha = (t[keep] for t in (index, x, y, x_adv, delta, grad, alpha))
                    ball = ball[keep]
                    if index.numel() == 0:
                        break

            if project is None:
                delta = ball.project(delta + alpha * ball.step(grad))
            else:  # project first, then normalise: the step and δ stay in the subspace
                delta = ball.rescale(delta + alpha * ball.normalize(_projected(project, grad, index)))
                if exact:
                    delta = box_exact(delta, x, project, index, ball)
            x_adv = x + delta
            if exact and project is not None:
                x_adv.clamp_(0, 1)  # rounding-level only: box_exact made x + δ feasible
            if self.clamp is True:
                x_adv.clamp_(0, 1)
                if project is None:  # the box is part of the threat model: keep δ feasible
                    delta = x_adv - x
            elif exact and project is None:
                x_adv.clamp_(0, 1)
                delta = x_adv - x

        if self.early_stop:
            out[index] = x_adv
            return out
        return x_adv


def box_exact(delta: Tensor, x: Tensor, project: Projector, index: Tensor, ball) -> Tensor:
    """δ moved into {P δ = δ} ∩ {‖δ‖ ≤ eps} ∩ {0 ≤ x + δ ≤ 1}, exactly.

    Dykstra's alternating projections (Boyle & Dykstra 1986) onto the three convex sets approach the
    Euclidean projection of δ onto their intersection; what they leave is then made exactly feasible: projected
    onto the subspace once more (which cannot grow ‖δ‖), then shrunk towards 0 — feasible, as x is in the box —
    by the largest factor t in [0, 1] that keeps every pixel of x + t δ in [0, 1]. The result lies in the
    subspace and the box to rounding (the attack clamps x + δ once more, moving it by rounding only), whatever
    the number of iterations.
    """
    low, high = -x, 1 - x
    v = delta
    p = q = r = torch.zeros_like(delta)  # Dykstra's corrections of the three sets
    for _ in range(BOX_ITERATIONS):
        s = project(v + p, index)
        p, v = v + p - s, s
        b = torch.minimum(torch.maximum(v + q, low), high)
        q, v = v + q - b, b
        c = ball.rescale(v + r)
        r, v = v + r - c, c
    v = project(v, index)
    # Largest t in [0, 1] with low <= t v <= high per pixel (low <= 0 <= high), per sample. Violations at
    # rounding level (Dykstra approaches the box from outside: -2e-16 at a pixel at exactly 0) are left to the
    # caller's final clamp, which moves x + t v by at most that much; counted, they would force t = 0.
    slack = 16 * torch.finfo(v.dtype).eps * rows(v.flatten(1).abs().amax(dim=1), v)
    tiny = torch.finfo(v.dtype).tiny
    upper = torch.where(v > high + slack, high / v.clamp_min(tiny), torch.ones_like(v))
    lower = torch.where(v < low - slack, low / v.clamp_max(-tiny), torch.ones_like(v))
    t = torch.minimum(upper, lower).flatten(1).amin(dim=1).clamp(0, 1)
    return v * rows(t, v)


class _Rows:
    """A projector restricted to some rows of its batch: row i of the sub-batch is row ``rows_[i]`` of the batch."""

    def __init__(self, project: Projector, rows_: Tensor) -> None:
        self.project, self.rows = project, rows_

    def __call__(self, v: Tensor, index: Tensor) -> Tensor:
        return self.project(v, self.rows[index])


def _projected(project: Projector, grad: Tensor, index: Tensor) -> Tensor:
    """project(grad), with rows that are only rounding noise set to exactly zero.

    When the gradient lies (almost) wholly in the removed subspace, what survives the projection is float
    rounding (~1e-7 of the gradient in float32); normalising it would turn noise into a full step.
    """
    p = project(grad, index)
    noise = norms(p) <= 64 * torch.finfo(grad.dtype).eps * norms(grad)
    return p * rows(~noise, p)


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise DmmError("x must be a floating tensor of shape (B, ...) with a batch dimension.")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise DmmError(f"y must be an int64 tensor of shape ({x.shape[0]},) with one label per image.")
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise DmmError("x must hold pixels in [0, 1]; rescale the images before attacking them.")


def _per_sample(value, name: str, x: Tensor, allow_zero: bool = False) -> Tensor:
    """Check a float or (B,) tensor and return it as a fresh (B,) tensor on x's device and dtype."""
    t = torch.as_tensor(value).detach().to(device=x.device, dtype=x.dtype).flatten()
    if t.numel() not in (1, x.shape[0]):
        raise DmmError(f"{name} must be a float or a tensor of shape ({x.shape[0]},); got {tuple(t.shape)}.")
    bad = ~torch.isfinite(t) | (t < 0 if allow_zero else t <= 0)
    if bool(bad.any()):
        raise DmmError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}; got {value!r}.")
    return t.expand(x.shape[0]).clone()
