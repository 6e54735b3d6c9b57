"""Threat-model geometry: one small class per norm, which knows how to sample, step and project.

The PGD loop (:mod:`dmm.attacks.pgd`) only calls these methods, so adding a norm touches one class here and
one entry in :data:`BALLS` (the MadryLab/robustness split of geometry from loop). Imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dmm.tensors import rows


class Ball:
    """The set {δ : ‖δ‖ ≤ eps} with a per-sample radius ``eps`` of shape (B,)."""

    def __init__(self, eps: Tensor) -> None:
        self.eps = eps

    def __getitem__(self, keep: Tensor) -> Ball:
        return type(self)(self.eps[keep])

    def norm(self, v: Tensor) -> Tensor:
        """Per-sample norm, (B, ...) -> (B,)."""
        raise NotImplementedError

    def random(self, shape: torch.Size) -> Tensor:
        """A uniform sample of the ball, (B, ...)."""
        raise NotImplementedError

    def step(self, grad: Tensor) -> Tensor:
        """The steepest ascent direction of unit norm for the gradient ``grad``."""
        raise NotImplementedError

    def project(self, delta: Tensor) -> Tensor:
        """The Euclidean projection of δ onto the ball."""
        raise NotImplementedError

    def normalize(self, v: Tensor) -> Tensor:
        """v / ‖v‖ per sample; a zero row stays zero instead of becoming NaN."""
        return v / rows(self.norm(v).clamp_min(torch.finfo(v.dtype).tiny), v)

    def rescale(self, delta: Tensor) -> Tensor:
        """Radial projection: shrink rows outside the ball onto its surface, never turning them."""
        scale = (self.eps / self.norm(delta).clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1)
        return delta * rows(scale, delta)


class L2Ball(Ball):
    """L2 ball: steps along grad / ‖grad‖₂, projects by radial rescaling (its Euclidean projection)."""

    def norm(self, v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(v.flatten(1), dim=1)

    def random(self, shape: torch.Size) -> Tensor:
        """Uniform in the ball: Gaussian direction, radius eps·U^(1/n) with n pixels per sample."""
        direction = self.normalize(torch.randn(shape, device=self.eps.device, dtype=self.eps.dtype))
        u = torch.rand(shape[0], device=self.eps.device, dtype=self.eps.dtype)
        return direction * rows(self.eps * u ** (1 / math.prod(shape[1:])), direction)

    def step(self, grad: Tensor) -> Tensor:
        return self.normalize(grad)

    def project(self, delta: Tensor) -> Tensor:
        return self.rescale(delta)


class LinfBall(Ball):
    """L∞ ball: steps along sign(grad), projects by clipping each pixel to [-eps, eps]."""

    def norm(self, v: Tensor) -> Tensor:
        return v.flatten(1).abs().amax(dim=1)

    def random(self, shape: torch.Size) -> Tensor:
        """Uniform in the cube [-eps, eps]^n."""
        u = torch.rand(shape, device=self.eps.device, dtype=self.eps.dtype)
        return (2 * u - 1) * rows(self.eps, u)

    def step(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def project(self, delta: Tensor) -> Tensor:
        r = rows(self.eps, delta)
        return delta.clamp(-r, r)


BALLS: dict[str, type[Ball]] = {"l2": L2Ball, "linf": LinfBall}
