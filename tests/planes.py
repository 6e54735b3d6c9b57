"""A linear autoencoder of the plane 0.5 + span(A) in 8 x 8 images: exact answers for the manifold tests."""

from __future__ import annotations

import math

import torch
from torch import nn

SHAPE = (1, 8, 8)
N, K = math.prod(SHAPE), 3


class LinearEncoder(nn.Module):
    """z = A^T (x - 0.5) for orthonormal A (n, k)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - 0.5) @ self.a


class LinearDecoder(LinearEncoder):
    """x = 0.5 + A z: its tangent space everywhere is span(A)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 + z @ self.a.T).view(-1, *SHAPE)
