"""Tangent spaces of a decoder and the on/off-manifold decomposition (pure torch).

Notation: a decoder D maps latents z (B, k) to images (B, C, H, W); n = C*H*W. Its Jacobian at z is
J (B, n, k); the tangent space of the learned manifold at D(z) is the column space of J, held as an
orthonormal basis Q (B, n, k). A perturbation d (B, C, H, W) splits exactly into d_on = Q Q^T d and
d_off = d - d_on.

The critics' control: a random k-dim subspace of R^n captures on average a fraction sqrt(k/n) of a
vector's norm, so an on-manifold fraction only means something next to :func:`random_basis`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

Projector = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def _eval_with_grad(module: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses running statistics: the decoder is one fixed function) and autograd
    available even inside Lightning's ``inference_mode`` validation; both restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        module.train(was_training)


def decoder_jacobian(decoder: nn.Module, z: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Jacobian of the decoder at each latent, by forward mode over the k latent directions.

    One batched jvp per latent direction, vectorised with ``vmap`` (k forward-mode passes in all, each
    over the whole batch) -- never one backward pass per output pixel.

    Args:
        decoder: maps (B, k) latents to (B, C, H, W) images; run in eval mode.
        z: latents (B, k).
        chunk_size: latent directions per vectorised pass (``None``: all k at once); lower it to save memory.

    Returns:
        J of shape (B, n, k), n = C*H*W, with J[b, :, i] = dD(z_b)/dz_i, in z's dtype and device.
    """
    with _eval_with_grad(decoder):
        z = z.detach().clone()
        batch, k = z.shape
        # Direction i for every sample at once: shape (k, B, k), one-hot along the last axis.
        directions = torch.eye(k, dtype=z.dtype, device=z.device).unsqueeze(1).expand(k, batch, k)

        def column(v: Tensor) -> Tensor:
            return jvp(decoder, (z,), (v,))[1]

        columns = vmap(column, chunk_size=chunk_size)(directions)  # (k, B, C, H, W)
    return columns.flatten(2).permute(1, 2, 0).detach()


class TangentSpace(NamedTuple):
    """An orthonormal tangent basis and the singular values of the Jacobian it came from.

    Attributes:
        basis: Q (B, n, k) with orthonormal columns spanning the Jacobian's column space.
        singular_values: (B, k) singular values of J, descending; a near-zero one means the decoder is
            degenerate there and the basis has a direction the decoder does not really span.
    """

    basis: Tensor
    singular_values: Tensor

    @property
    def condition(self) -> Tensor:
        """(B,) condition number of J (the square root of that of the metric G = J^T J)."""
        s = self.singular_values
        return s[:, 0] / s[:, -1].clamp_min(torch.finfo(s.dtype).tiny)


def orthonormalize(jacobian: Tensor) -> TangentSpace:
    """Reduced QR of J (B, n, k): Q spans J's columns; J's singular values are those of the small R."""
    q, r = torch.linalg.qr(jacobian, mode="reduced")
    return TangentSpace(q, torch.linalg.svdvals(r))


def tangent_space(decoder: nn.Module, z: Tensor, *, chunk_size: int | None = None) -> TangentSpace:
    """Tangent space of the decoder's image at D(z): orthonormal basis (B, n, k) and conditioning."""
    return orthonormalize(decoder_jacobian(decoder, z, chunk_size=chunk_size))


def tangent_basis(decoder: nn.Module, z: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Orthonormal basis Q (B, n, k) of the decoder's tangent space at each latent z (B, k)."""
    return tangent_space(decoder, z, chunk_size=chunk_size).basis


def decompose(d: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Split perturbations into their parts in and orthogonal to a subspace.

    Args:
        d: perturbations (B, ...) with n elements per sample.
        basis: Q (B, n, k), orthonormal columns.

    Returns:
        (d_on, d_off), each shaped like d: d_on = Q Q^T d, d_off = d - d_on (so d_on + d_off = d, and
        d_on is orthogonal to d_off up to rounding).
    """
    flat = d.reshape(d.shape[0], -1)
    on = torch.einsum("bnk,bk->bn", basis, torch.einsum("bnk,bn->bk", basis, flat))
    return on.view_as(d), (flat - on).view_as(d)


def on_fraction(d: Tensor, basis: Tensor) -> Tensor:
    """(B,) fraction of each perturbation's L2 norm in the subspace: ||Q Q^T d|| / ||d|| (0 where d = 0)."""
    flat = d.reshape(d.shape[0], -1)
    on = torch.einsum("bnk,bn->bk", basis, flat).norm(dim=1)  # ||Q^T d|| = ||Q Q^T d|| for orthonormal Q
    return on / flat.norm(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)


def projector(basis: Tensor, *, off: bool = False) -> Projector:
    """The ``project(v, index)`` hook of :func:`dmm.attacks.pgd` for a per-sample subspace.

    Args:
        basis: Q (B, n, k) for the whole batch being attacked.
        off: project onto the orthogonal complement (off-manifold directions) instead.

    Returns:
        A callable mapping v (b, ...) and the rows' batch positions ``index`` (b,) to the projection of v.
    """

    def project(v: Tensor, index: Tensor) -> Tensor:
        on, rest = decompose(v, basis[index])
        return rest if off else on

    return project


def random_basis(
    batch: int,
    n: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Orthonormal bases (batch, n, k) of uniformly random k-dim subspaces of R^n (QR of a Gaussian)."""
    gauss = torch.randn(batch, n, k, generator=generator, device=device, dtype=dtype)
    return torch.linalg.qr(gauss, mode="reduced").Q


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal bases (B, n, k1), (B, n, k2).

    Computed from sines (singular values of the part of q2 outside span(q1)), which stay accurate for
    tiny angles where arccos of cosines near 1 would round to 0. Requires k2 <= k1 for all k2 angles.
    """
    residual = q2 - q1 @ (q1.transpose(1, 2) @ q2)
    sines = torch.linalg.svdvals(residual).flip(-1)
    return torch.arcsin(sines.clamp(0.0, 1.0))
