"""Null models of a tangent space: uniformly random k-dim subspaces, anywhere or on given pixels (pure torch).

The critics' control: a random k-dim subspace of R^n captures on average a fraction about sqrt(k/n) of a
vector's norm (exactly E = Γ((k+1)/2) Γ(n/2) / (Γ(k/2) Γ((n+1)/2)), :func:`random_fraction_mean`), and a first-order
argument (Fawzi et al., NeurIPS 2016) says an attack confined to it needs about sqrt(n/k) times the
unconstrained norm, whatever the subspace means. A tangent-space figure only says something next to these.
:func:`support_basis` is the stricter null: random directions confined to the pixels an image actually uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dmm.errors import DmmError

Generators = torch.Generator | Sequence[torch.Generator] | None


def random_basis(
    batch: int,
    n: int,
    k: int,
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Orthonormal bases (batch, n, k) of uniformly random k-dim subspaces of R^n (QR of a Gaussian).

    ``generator`` may be a list of ``batch`` CPU generators, one per basis, so that each image's baseline
    depends on the image alone, not on which process or batch it was drawn in (DDP gives the same figures).
    """
    if isinstance(generator, Sequence):
        gauss = torch.stack([torch.randn(n, k, generator=g, dtype=dtype) for g in generator]).to(device)
    else:
        gauss = torch.randn(batch, n, k, generator=generator, device=device, dtype=dtype)
    return torch.linalg.qr(gauss, mode="reduced").Q


def random_subspace_fraction(d: Tensor, k: int, *, generator: Generators = None) -> Tensor:
    """(B,) on-subspace fraction of each perturbation for an independent uniformly random k-dim subspace.

    Equal in distribution to ``on_fraction(d, random_basis(B, n, k))`` but without the (B, n, k) basis:
    by rotation invariance, the squared fraction of a fixed nonzero vector in a uniformly random k-dim
    subspace of R^n is that of a uniformly random unit vector in a fixed one, ||g_1..k||^2 / ||g||^2 for a
    standard Gaussian g, i.e. X / (X + Y) with X ~ chi2(k), Y ~ chi2(n - k) independent: exactly
    Beta(k/2, (n-k)/2), mean k/n (so the fraction is about sqrt(k/n)). Sampled on the CPU in float64.

    Args:
        d: perturbations (B, ...) with n elements per sample; only their count and which are 0 matter.
        k: the subspace dimension, 0 <= k <= n.
        generator: seeds the draw (on any device), or B generators, one per sample (a sample's fraction
            then does not depend on its batch); the global RNG is left untouched. ``None``: global RNG.

    Returns:
        (B,) fractions in [0, 1] in d's dtype and device, 0 where d = 0 (as :func:`on_fraction`).
    """
    batch, n = d.shape[0], d[0].numel()
    if not 0 <= k <= n:
        raise DmmError(f"k must be in [0, n = {n}]; got {k}.")
    if isinstance(generator, Sequence) and len(generator) != batch:
        raise DmmError(f"got {len(generator)} generators for {batch} perturbations; pass one per sample.")
    if k in (0, n):  # Beta's parameters must be positive; the fraction is then exactly 0 or 1
        squared = torch.full((batch,), float(k == n), dtype=torch.float64)
    elif generator is None:
        squared = _beta(k, n).sample((batch,))
    elif isinstance(generator, torch.Generator):
        squared = _seeded_beta(k, n, generator, batch)
    else:
        squared = torch.cat([_seeded_beta(k, n, g, 1) for g in generator])
    nonzero = d.reshape(batch, -1).ne(0).any(dim=1)
    return squared.sqrt().to(dtype=d.dtype, device=d.device) * nonzero


def _beta(k: int, n: int) -> torch.distributions.Beta:
    half = torch.tensor([k / 2, (n - k) / 2], dtype=torch.float64)
    return torch.distributions.Beta(half[0], half[1])


def _seeded_beta(k: int, n: int, generator: torch.Generator, count: int) -> Tensor:
    """``count`` Beta(k/2, (n-k)/2) draws seeded from ``generator`` (torch.distributions takes none)."""
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):  # a forked CPU RNG: the global state is restored afterwards
        torch.default_generator.manual_seed(seed)
        return _beta(k, n).sample((count,))


def random_fraction_mean(k: int, n: int) -> float:
    """E ||P u|| for u uniform on the unit sphere of R^n and P a rank-k orthogonal projector (about sqrt(k/n)).

    ||P u||^2 ~ Beta(k/2, (n-k)/2), whose square root has this mean.
    """
    log_e = math.lgamma((k + 1) / 2) + math.lgamma(n / 2) - math.lgamma(k / 2) - math.lgamma((n + 1) / 2)
    return math.exp(log_e)


def support_basis(mask: Tensor, k: int, *, generator: Generators = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal bases (B, n, k) of uniformly random k-dim subspaces of the coordinates where ``mask`` holds.

    The support-matched null: a tangent vector of a digit lives mostly on and around its strokes, so "the
    tangent space holds more of d than a random subspace" may only say "d lives on the strokes too". Each
    basis is the QR of a Gaussian (n, k) matrix whose rows outside the mask are zero: Haar-random within the
    coordinate subspace of the mask.

    Args:
        mask: (B, n) bool, at least k true entries per row (e.g. :func:`active_pixels`).
        k: the subspace dimension.
        generator: as :func:`random_basis`: one generator, B generators (one per image), or None.
    """
    mask = mask.reshape(mask.shape[0], -1)
    batch, n = mask.shape
    short = mask.sum(dim=1) < k
    if bool(short.any()):
        raise DmmError(f"{int(short.sum())} masks have fewer than k = {k} pixels: dilate them or lower the threshold")
    gauss = _gaussian(batch, n, k, generator, dtype).to(mask.device)
    basis = torch.zeros_like(gauss)
    for b in range(batch):  # QR of the mask's rows alone: exactly zero elsewhere, not rounding noise
        basis[b, mask[b]] = torch.linalg.qr(gauss[b, mask[b]], mode="reduced").Q
    return basis


def active_pixels(x: Tensor, threshold: float = 0.1, dilation: int = 1) -> Tensor:
    """(B, n) bool: pixels of x (B, C, H, W) where any channel exceeds ``threshold``, dilated by ``dilation``
    pixels (a square neighbourhood) so that the strokes' borders, where tangent vectors live too, count."""
    on = (x > threshold).any(dim=1, keepdim=True).to(x.dtype)
    if dilation > 0:
        on = torch.nn.functional.max_pool2d(on, 2 * dilation + 1, stride=1, padding=dilation)
    on = on.bool().expand(-1, x.shape[1], -1, -1)
    return on.reshape(x.shape[0], -1)


def _gaussian(batch: int, n: int, k: int, generator: Generators, dtype: torch.dtype) -> Tensor:
    if isinstance(generator, Sequence):
        return torch.stack([torch.randn(n, k, generator=g, dtype=dtype) for g in generator])
    return torch.randn(batch, n, k, generator=generator, dtype=dtype)
