"""Tangent spaces of a decoder (pure torch).

Notation: a decoder D maps latents z (B, k) to images (B, C, H, W); n = C*H*W. Its Jacobian at z is
J (B, n, k); the tangent space of the learned manifold at D(z) is the column space of J, held as an
orthonormal basis Q (B, n, k) (:func:`tangent_basis`), which :class:`~dmm.manifold.subspace.Subspace` turns
into the projector an attack or a decomposition uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from dmm.manifold.matrix_free import MatrixFreeTangent
from dmm.manifold.subspace import Subspace
from dmm.tensors import autograd_on, eval_mode


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
    with eval_mode(decoder), autograd_on():  # a fixed function (BatchNorm running stats), grad on
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


DENSE_LIMIT = 5 * 10**7
"""n * k per image above which :func:`tangent_subspace` goes matrix-free: a dense basis that size is 200 MB per
image in float32 (MNIST's 784 x 16 is 1.3e4; CIFAR-10's 3072 x 128 is 3.9e5; ImageNet's 150 528 x 25 088
is 3.8e9)."""
MATRIX_FREE_TOL = 1e-5
"""Relative residual at which matrix-free projections stop (float32's floor is near 1e-6)."""
MATRIX_FREE_MAX_ITER = 1000


def tangent_subspace(
    decoder: nn.Module, z: Tensor, n: int, *, dense_limit: int = DENSE_LIMIT
) -> tuple[Subspace | MatrixFreeTangent, Tensor]:
    """The tangent spaces at latents z (B, k) of a decoder with n outputs per image as a projector, and the
    Jacobians' condition numbers (B,).

    A dense :class:`Subspace` up to ``dense_limit`` = n * k per image, above it a :class:`MatrixFreeTangent`
    (solves to :data:`MATRIX_FREE_TOL`: the same projections up to the solver's accuracy, at one solve per
    use), whose condition numbers are not computed (NaN).
    """
    if n * z[0].numel() > dense_limit:
        free = MatrixFreeTangent(decoder, z, tol=MATRIX_FREE_TOL, max_iter=MATRIX_FREE_MAX_ITER)
        return free, torch.full((z.shape[0],), float("nan"), dtype=z.dtype, device=z.device)
    space = tangent_space(decoder, z)
    return Subspace(space.basis), space.condition
