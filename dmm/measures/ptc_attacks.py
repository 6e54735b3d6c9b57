"""The adaptive attacks on project-then-classify f(D(E(x))) and on its detector (pure torch).

BPDA (a straight-through gradient through D∘E), LatentPGD (an attack on the latent z with the decoder in the
loop) and EvasivePGD (fool the classifier while keeping the detector's score low); the measure that runs them
is :class:`dmm.measures.adaptive.AdaptivePTC`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import jvp

from dmm.attacks import LOSSES, PGD, L2Ball
from dmm.attacks.pgd import _check_inputs, _per_sample
from dmm.errors import DmmError
from dmm.measures.detection import ProjectThenClassify
from dmm.tensors import autograd_on, eval_mode, norms, predict, rows

BISECTION = 16
BISECTION = 16


class _StraightThrough(torch.autograd.Function):
    """Forward: the reconstruction r, exactly; backward: the gradient handed to x unchanged (dr/dx := I)."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor) -> Tensor:
        return r.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class BPDA(nn.Module):
    """Project-then-classify with Backward Pass Differentiable Approximation (Athalye et al. 2018) of D∘E.

    The forward pass is exactly ``classifier(autoencoder(x))``; the backward pass treats the autoencoder as the
    identity, so the input gradient is the classifier's gradient at the reconstruction D(E(x)).

    Args:
        classifier: images in [0, 1] (B, C, H, W) -> logits.
        autoencoder: images -> reconstructions in [0, 1], same shape (run without a graph).
    """

    def __init__(self, classifier: nn.Module, autoencoder: nn.Module) -> None:
        super().__init__()
        self.classifier, self.autoencoder = classifier, autoencoder

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            r = self.autoencoder(x)
        return self.classifier(_StraightThrough.apply(x, r))


def pull_back(decoder: nn.Module, z0: Tensor, d0: Tensor, z: Tensor, eps: Tensor) -> Tensor:
    """z (B, k) moved along the segment towards z0 until ‖D(z) − d0‖₂ <= eps, d0 = D(z0): rows inside stay, rows
    outside move to z0 + t (z − z0) with t the largest feasible point bisection finds (t = 0, z0, is feasible)."""
    over = (norms(decoder(z) - d0) > eps).nonzero().squeeze(1)
    if over.numel() == 0:
        return z
    start, step, target, radius = z0[over], z[over] - z0[over], d0[over], eps[over]
    low, high = torch.zeros_like(radius), torch.ones_like(radius)
    for _ in range(BISECTION):
        mid = (low + high) / 2
        ok = norms(decoder(start + rows(mid, step) * step) - target) <= radius
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    z = z.clone()
    z[over] = start + rows(low, step) * step
    return z


@dataclass(frozen=True)
class LatentPGD:
    """PGD on the latent code with the decoder in the loop, against project-then-classify.

    The attacker moves the reconstruction along the manifold and carries the move to the input:
    x_adv = clamp(x + D(z) − D(z0), 0, 1) with z0 = E(x), under the enforced constraint ‖D(z) − D(z0)‖₂ <= eps
    (so ‖x_adv − x‖₂ <= eps: the clamp only shortens δ). x_adv = D(z) itself would leave the ε-ball around x
    whenever the reconstruction error exceeds ε. The objective is the classifier's loss at D(z), i.e. at the
    moved reconstruction, assuming E(D(z)) ≈ z; success is always judged on the real pipeline f(D(E(x_adv))).
    Each step moves z along the latent gradient g by ``2.5 eps / steps`` in image space to first order
    (Δz = α g / ‖J g‖, J the decoder's Jacobian), then pulls z back into the budget by bisection
    (:func:`pull_back`). An image stops at its first success; restarts after the first start at a random
    latent direction, on the images not fooled yet.

    Attributes:
        eps: L2 budget in [0, 1] pixel space.
        steps: gradient steps per run.
        restarts: runs per image.
        loss: "ce" or "margin" (as :class:`dmm.attacks.PGD`).
    """

    eps: float = 2.0
    steps: int = 40
    restarts: int = 1
    loss: Literal["ce", "margin"] = "ce"

    def __post_init__(self) -> None:
        PGD(eps=self.eps, steps=self.steps, restarts=self.restarts, loss=self.loss)  # the same rules, same errors

    def replace(self, **changes) -> LatentPGD:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, classifier: nn.Module, encoder: nn.Module, decoder: nn.Module, x: Tensor, y: Tensor,
                 *, eps=None) -> Tensor:  # fmt: skip
        """x_adv (same shape as x, detached) within ``eps`` (float or (B,)) of x, in [0, 1]."""
        _check_inputs(x, y)
        with autograd_on(), eval_mode(classifier, encoder, decoder):
            x, y = x.clone(), y.clone()
            radius = _per_sample(self.eps if eps is None else eps, "eps", x, allow_zero=True)
            with torch.no_grad():
                z0 = encoder(x)
                d0 = decoder(z0)
            best = self._run(classifier, encoder, decoder, x, y, z0, d0, radius, random_start=False)
            pipeline = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
            for _ in range(self.restarts - 1):
                todo = (predict(pipeline, best) == y).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                best[todo] = self._run(classifier, encoder, decoder, x[todo], y[todo], z0[todo], d0[todo],
                                       radius[todo], random_start=True)  # fmt: skip
            return best.detach()

    def _run(self, classifier, encoder, decoder, x, y, z0, d0, eps, random_start: bool) -> Tensor:
        alpha, tiny = 2.5 * eps / self.steps, torch.finfo(x.dtype).tiny
        index, out = torch.arange(x.shape[0], device=x.device), x.clone()
        z = z0
        with torch.no_grad():
            if random_start:  # a random latent direction, first-order image length uniform in [0, eps]
                v = torch.randn_like(z0)
                length = norms(jvp(decoder, (z0,), (v,))[1]).clamp_min(tiny)
                z = pull_back(decoder, z0, d0, z0 + rows(eps * torch.rand_like(eps) / length, v) * v, eps)
            x_adv = (x + (decoder(z) - d0)).clamp(0, 1)
        for _ in range(self.steps):
            z = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(LOSSES[self.loss](classifier(decoder(z)), y), z)
            with torch.no_grad():  # forward mode needs no graph; a zero gradient stays a zero step
                length = norms(jvp(decoder, (z.detach(),), (g,))[1]).clamp_min(tiny)
                z = pull_back(decoder, z0, d0, z.detach() + rows(alpha / length, g) * g, eps)
                x_adv = (x + (decoder(z) - d0)).clamp(0, 1)
                hit = classifier(decoder(encoder(x_adv))).argmax(dim=1) != y
            if bool(hit.any()):
                out[index[hit]] = x_adv[hit]
                keep = ~hit
                state = (index, x, y, z0, d0, z, eps, alpha, x_adv)
                index, x, y, z0, d0, z, eps, alpha, x_adv = (t[keep] for t in state)
                if index.numel() == 0:
                    break
        out[index] = x_adv
        return out


@dataclass(frozen=True)
class EvasivePGD:
    """L2 PGD against a classifier guarded by the reconstruction-error detector s(x) = ‖x − D(E(x))‖₂.

    It ascends min(m, 0) − penalty · s(x_adv), m = max_{j≠y} z_j − z_y the CW margin (positive once fooled): the
    margin pulls towards misclassification only until it is reached, the penalty towards the manifold all along.
    Per image it returns the fooling iterate with the lowest score (the last iterate if none fooled).

    Attributes:
        eps: L2 budget in [0, 1] pixel space; steps of 2.5 eps / steps, projected onto the ball and the box.
        steps: gradient steps.
        penalty: weight of the detector's score (0: a margin PGD that stops pushing once fooled).
    """

    eps: float = 2.0
    steps: int = 40
    penalty: float = 1.0

    def __post_init__(self) -> None:
        PGD(eps=self.eps, steps=self.steps)  # the same rules, same errors
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, int | float) or not self.penalty >= 0:
            raise DmmError(f"evasive attack penalty must be a number >= 0; got {self.penalty!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, classifier: nn.Module, autoencoder: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """x_adv (same shape as x, detached) within eps of x, in [0, 1]."""
        _check_inputs(x, y)
        with autograd_on(), eval_mode(classifier, autoencoder):
            x, y = x.clone(), y.clone()
            ball = L2Ball(_per_sample(self.eps, "eps", x, allow_zero=True))
            alpha = rows(2.5 * ball.eps / self.steps, x)
            delta, best, lowest = torch.zeros_like(x), x.clone(), torch.full_like(ball.eps, math.inf)
            for step in range(self.steps + 1):
                x_adv = (x + delta).clamp(0, 1).requires_grad_(True)
                logits, score = classifier(x_adv), norms(x_adv - autoencoder(x_adv))
                margin = logits.scatter(1, y[:, None], -math.inf).amax(dim=1) - logits.gather(1, y[:, None]).squeeze(1)
                better = (margin.detach() > 0) & (score.detach() < lowest)
                best[better], lowest[better] = x_adv.detach()[better], score.detach()[better]
                if step == self.steps:
                    break
                (g,) = torch.autograd.grad((margin.clamp(max=0) - self.penalty * score).sum(), x_adv)
                delta = ball.project(x_adv.detach() - x + alpha * ball.step(g))
            never = torch.isinf(lowest)
            best[never] = x_adv.detach()[never]
            return best
