"""Per-sample subspaces held by orthonormal bases: the split d = d_in + d_out and the attacks' projector.

A perturbation d (B, ...) with n elements per sample splits exactly into d_in = Q Q^T d and d_out = d − d_in
for an orthonormal basis Q (B, n, k) — the tangent space's (on/off manifold) or a null model's (a random or
support-matched subspace). :class:`Subspace` is that split as the :class:`dmm.attacks.Projector` that PGD
takes, so every arm of an experiment is the same attack with another subspace. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decompose(d: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """(d_in, d_out), each shaped like d: d_in = Q Q^T d, d_out = d − d_in (orthogonal up to rounding).

    Args:
        d: perturbations (B, ...) with n elements per sample.
        basis: Q (B, n, k), orthonormal columns.
    """
    flat = d.reshape(d.shape[0], -1)
    inside = torch.einsum("bnk,bk->bn", basis, torch.einsum("bnk,bn->bk", basis, flat))
    return inside.view_as(d), (flat - inside).view_as(d)


def on_fraction(d: Tensor, basis: Tensor) -> Tensor:
    """(B,) fraction of each perturbation's L2 norm in the subspace: ||Q Q^T d|| / ||d|| (0 where d = 0)."""
    flat = d.reshape(d.shape[0], -1)
    inside = torch.einsum("bnk,bn->bk", basis, flat).norm(dim=1)  # ||Q^T d|| = ||Q Q^T d|| for orthonormal Q
    return inside / flat.norm(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)


class Subspace:
    """The subspaces spanned by Q (B, n, k), or with ``complement=True`` their orthogonal complements.

    Called as ``subspace(v, index)`` it is a :class:`dmm.attacks.Projector`: v (b, ...) projected row by row
    onto the subspaces of the batch rows ``index`` (b,). ``split`` and ``fraction`` measure perturbations.

    Example:
        >>> tangent = Subspace(tangent_basis(decoder, encoder(x)))
        >>> x_on = PGD(eps=4.0)(model, x, y, project=tangent)
        >>> x_off = PGD(eps=4.0)(model, x, y, project=tangent.complement())
        >>> d_on, d_off = tangent.split(x_adv - x)
    """

    def __init__(self, basis: Tensor, *, complement: bool = False) -> None:
        if basis.dim() != 3 or basis.shape[2] > basis.shape[1]:
            raise ValueError(f"basis must be (B, n, k) with k <= n; got {tuple(basis.shape)}")
        self.basis, self.is_complement = basis, complement

    def complement(self) -> Subspace:
        """The orthogonal complement of each subspace (and the complement of that is this one again)."""
        return Subspace(self.basis, complement=not self.is_complement)

    def __call__(self, v: Tensor, index: Tensor) -> Tensor:
        inside, outside = decompose(v, self.basis[index])
        return outside if self.is_complement else inside

    def split(self, d: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(part in the subspace, the rest) for the rows ``index`` of the batch (all rows when None)."""
        inside, outside = decompose(d, self.basis if index is None else self.basis[index])
        return (outside, inside) if self.is_complement else (inside, outside)

    def fraction(self, d: Tensor, index: Tensor | None = None) -> Tensor:
        """(B,) ||part of d in the subspace|| / ||d||, 0 where d = 0."""
        if not self.is_complement:
            return on_fraction(d, self.basis if index is None else self.basis[index])
        inside = self.split(d, index)[0].reshape(d.shape[0], -1)
        return inside.norm(dim=1) / d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal bases (B, n, k1), (B, n, k2).

    Computed from sines (singular values of the part of q2 outside span(q1)), which stay accurate for
    tiny angles where arccos of cosines near 1 would round to 0. Requires k2 <= k1 for all k2 angles.
    """
    residual = q2 - q1 @ (q1.transpose(1, 2) @ q2)
    sines = torch.linalg.svdvals(residual).flip(-1)
    return torch.arcsin(sines.clamp(0.0, 1.0))
