"""The point of the learned manifold nearest an image: a better foot point for the tangent space than D(E(x)).

The encoder is only an approximate inverse of the decoder, so D(E(x)) is not the manifold point nearest x,
and the tangent space there is not the one at the foot of x's perpendicular. :func:`project_to_manifold`
refines the latent by Levenberg–Marquardt on ||D(z) − x||² from z = E(x): each step solves
(JᵀJ + λ s I) δ = Jᵀ (x − D(z)) with J the decoder's Jacobian (B, n, k), s the mean of JᵀJ's diagonal, and
keeps a step only where it lowers the error (λ shrinks after a kept step, grows after a refused one). On a
linear decoder one undamped step is the exact orthogonal projection. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmm.manifold.tangent import decoder_jacobian
from dmm.tensors import eval_mode

SHRINK, GROW = 3.0, 4.0
"""Damping factors after a kept and after a refused step."""


def _errors(decoder: nn.Module, z: Tensor, target: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.linalg.vector_norm(target - decoder(z).flatten(1), dim=1)


def project_to_manifold(
    decoder: nn.Module, x: Tensor, z: Tensor, steps: int, *, damping: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Latents whose decodings are nearer x: (z (B, k), ||x − D(z)|| (B,)), never farther than at the start.

    Args:
        decoder: latents (B, k) -> images shaped like x; run in eval mode (a fixed function).
        x: images (B, C, H, W).
        z: starting latents (B, k), e.g. E(x).
        steps: Levenberg–Marquardt steps (0 returns z and its error).
        damping: the starting λ, relative to the mean diagonal of JᵀJ (0: Gauss–Newton's first step).
    """
    target = x.flatten(1)
    z = z.detach().clone()
    with eval_mode(decoder):
        error = _errors(decoder, z, target)
        lam = torch.full_like(error, damping)
        for _ in range(steps):
            jac = decoder_jacobian(decoder, z)  # (B, n, k)
            with torch.no_grad():
                residual = target - decoder(z).flatten(1)
                normal = jac.mT @ jac  # (B, k, k)
                scale = normal.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
                eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
                step = torch.linalg.solve(normal + (lam * scale)[:, None, None] * eye, jac.mT @ residual[..., None])
                candidate = z + step.squeeze(-1)
            new_error = _errors(decoder, candidate, target)
            better = new_error < error
            z = torch.where(better[:, None], candidate, z)
            error = torch.where(better, new_error, error)
            lam = torch.where(better, lam / SHRINK, torch.where(lam > 0, lam * GROW, torch.full_like(lam, 1e-3)))
    return z, error
