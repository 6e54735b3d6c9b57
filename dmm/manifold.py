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
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from dmm.errors import DmmError

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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
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


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal bases (B, n, k1), (B, n, k2).

    Computed from sines (singular values of the part of q2 outside span(q1)), which stay accurate for
    tiny angles where arccos of cosines near 1 would round to 0. Requires k2 <= k1 for all k2 angles.
    """
    residual = q2 - q1 @ (q1.transpose(1, 2) @ q2)
    sines = torch.linalg.svdvals(residual).flip(-1)
    return torch.arcsin(sines.clamp(0.0, 1.0))


# --- Matrix-free tangent projection --------------------------------------------------------------------
#
# At ImageNet size (n = 150 528 pixels, k = 25 088 latents) J alone is 15 GB per image in float32, so the
# projection P d = J (J^T J)^+ J^T d is computed from products J v (forward mode) and J^T u (reverse mode)
# only, by CGLS on min_c ||J c - d||: CG on the normal equations J^T J c = J^T d, rearranged so that J^T J
# is never applied as one operator and the image-space residual r = d - J c is carried along, which keeps
# the recurrence as accurate as the products allow (Björck, "Numerical Methods for Least Squares Problems",
# 1996, sec. 7.4). LSQR has the same iterates in exact arithmetic and degrades more gracefully on badly
# conditioned J, at the price of a per-sample Givens recurrence; CGLS's two scalars per sample batch
# trivially, and we guard its late phase instead: the iterate with the lowest residual is the one returned.
#
# The iterate kept is u = J c itself, summed from the J p products: it lies in the column space of J up to
# rounding at every iteration, whatever the tolerance, so an on-manifold attack built from it never leaves
# the tangent space; only how orthogonal d - u is to that space depends on the tolerance.


ORTHOGONAL_EPS = 8
"""Machine epsilons of ||J^T r|| / (||J|| ||r||) below which r = d - J c counts as orthogonal to the tangent
space (float32: 1e-6; small float32 decoders reach 5e-9)."""


class ProjectionSolve(NamedTuple):
    """One batched CGLS solve.

    Attributes:
        on: the projections J c of the perturbations, shaped like them.
        iterations: (B,) int64 CGLS iterations each sample ran (one J v and one J^T u product each).
        residual: (B,) relative normal-equation residual ||J^T (d - J c)|| / ||J^T d|| of the returned
            iterate (0 where J^T d = 0); at or above ``tol`` for a sample that hit ``max_iter``, whose
            recurrence broke down (non-finite), or whose d - J c is orthogonal to the tangent space to
            working precision (see :func:`project_tangent`).
    """

    on: Tensor
    iterations: Tensor
    residual: Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product, (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(dim=1)


def _rows_like(t: Tensor, like: Tensor) -> Tensor:
    """View a per-sample (B,) tensor as (B, 1, ..., 1) so it broadcasts over ``like``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def project_tangent(
    decoder: nn.Module, z: Tensor, d: Tensor, *, tol: float = 1e-5, max_iter: int = 1000
) -> ProjectionSolve:
    """Project perturbations onto the decoder's tangent spaces without forming the Jacobian (CGLS).

    Per sample b this solves min_c ||J_b c - d_b|| and returns J_b c, the orthogonal projection of d_b onto
    the column space of J_b: the same as ``decompose(d, tangent_basis(decoder, z))[0]``, in memory
    O(n + k) per image (six image-sized and two latent-sized vectors) plus the decoder's activations.
    Each iteration costs one ``torch.func.jvp`` (J p) and one call of a ``torch.func.vjp`` function (J^T r)
    that is built once and rebuilt only when samples finish and leave the batch. A rank-deficient J is
    fine: the projection onto its column space is still unique (the dense QR basis is not, see
    :attr:`TangentSpace.condition`).

    Stopping: a sample stops once ||J^T r|| < tol * ||J^T d||, r = d - J c (the normal equations hold to
    tol), or once r is orthogonal to the tangent space to working precision, ||J^T r|| < ORTHOGONAL_EPS *
    eps * ||J|| ||r|| (LSQR's second test, Paige & Saunders 1982, with ||J|| estimated by the largest
    ||J p|| / ||p|| seen). The second test stops a d that is already orthogonal to the tangent space up to
    rounding, e.g. an off-manifold attack's: there ||J^T d|| is itself rounding noise and the first test
    out of reach (the error is then bounded relative to ||d|| instead of ||P d||).

    Accuracy and cost are set by the conditioning: the error of the projection is at most cond(J) * tol
    relative to ||P d|| (about sqrt(cond(J)) * tol on linear test decoders), and the iterations grow with
    cond(J): about 50 / 260 / 1000 for cond 10 / 100 / 1000 at tol 1e-5 (k = 128, float64). Past the
    floor that rounding sets CGLS wanders and may diverge, so each sample returns its lowest-residual
    iterate.

    Args:
        decoder: maps latents (B, ...) to images (B, C, H, W); linearised in eval mode, mode restored.
        z: latents (B, ...), e.g. (B, k).
        d: perturbations shaped like the decoder's output, in z's dtype and device.
        tol: stop a sample once ||J^T (d - J c)|| < tol * ||J^T d||.
        max_iter: stop every sample after this many iterations, converged or not.

    Returns:
        :class:`ProjectionSolve`: ``on`` shaped like d, per-sample iteration counts and final residuals.
    """
    # No autograd graph outside torch.func, which enables grad itself where it needs it: with the decoder's
    # weights requiring grad, a jvp under grad mode costs twice as much (CPU, SegNet at 224x224), and the
    # iterates would keep every iteration's graph alive (memory growing with the iterations).
    with _eval_with_grad(decoder), torch.no_grad():
        z, d = z.detach().clone(), d.detach().clone()  # normal tensors, even from an inference_mode caller
        batch, tiny = d.shape[0], torch.finfo(d.dtype).tiny
        orthogonal_tol = ORTHOGONAL_EPS * torch.finfo(d.dtype).eps
        on = torch.zeros_like(d)
        iterations = torch.zeros(batch, dtype=torch.long, device=d.device)
        residual = torch.zeros(batch, dtype=d.dtype, device=d.device)
        rows = torch.arange(batch, device=d.device)  # positions in the batch of the samples still running

        transpose = vjp(decoder, z)[1]  # u -> (J^T u,), reused across iterations
        s = transpose(d)[0]  # J^T r for r = d - J c, c = 0; latent-shaped
        p, gamma = s, _dot(s, s)
        start = gamma.sqrt()  # ||J^T d||
        u, r = torch.zeros_like(d), d  # u = J c
        norm_j = torch.zeros_like(start)  # running lower estimate of ||J||: max ||J p|| / ||p||
        # The iterate returned: the one with the lowest ||J^T r|| so far, with its ||J^T r|| and ||r||.
        best_u, best, best_r = u, start, r.flatten(1).norm(dim=1)
        current = start
        for step in range(max_iter + 1):
            relative = best / start.clamp_min(tiny)
            orthogonal = best < orthogonal_tol * norm_j * best_r
            done = (relative < tol) | orthogonal | ~torch.isfinite(current) | (step == max_iter)
            if bool(done.any()):  # the one host sync per iteration that per-sample stopping needs
                on[rows[done]], iterations[rows[done]], residual[rows[done]] = best_u[done], step, relative[done]
                keep = ~done
                if not bool(keep.any()):
                    break
                state = (rows, z, u, r, s, p, gamma, start, norm_j, best_u, best, best_r)
                rows, z, u, r, s, p, gamma, start, norm_j, best_u, best, best_r = (t[keep] for t in state)
                transpose = vjp(decoder, z)[1]  # re-linearise on the samples still running
            q = jvp(decoder, (z,), (p,))[1]  # J p, image-shaped
            q_squared = _dot(q, q)
            norm_j = torch.maximum(norm_j, (q_squared / _dot(p, p).clamp_min(tiny)).sqrt())
            alpha = gamma / q_squared.clamp_min(tiny)
            u = u + _rows_like(alpha, u) * q
            r = r - _rows_like(alpha, r) * q
            s = transpose(r)[0]
            gamma_next = _dot(s, s)
            current = gamma_next.sqrt()
            better = current < best  # CGLS minimises ||r||, not ||J^T r||: that need not fall monotonically
            best = torch.where(better, current, best)
            best_r = torch.where(better, r.flatten(1).norm(dim=1), best_r)
            best_u = torch.where(_rows_like(better, u), u, best_u)
            p = s + _rows_like(gamma_next / gamma.clamp_min(tiny), p) * p
            gamma = gamma_next
    return ProjectionSolve(on.detach(), iterations, residual)


class MatrixFreeTangent:
    """The tangent spaces of a decoder at latents z, used through Jacobian-vector products only.

    The matrix-free counterpart of :func:`tangent_basis` with :func:`decompose`, :func:`on_fraction` and
    :func:`projector`, for sizes where the basis (B, n, k) does not fit; see :func:`project_tangent` for
    the solver, its cost and its accuracy. Every call runs one batched solve; ``last`` keeps the latest
    :class:`ProjectionSolve` (iterations, residuals) for logging.

    Args:
        decoder: maps latents (B, ...) to images (B, C, H, W).
        z: latents (B, ...) of the whole batch; ``index`` arguments select rows of it.
        tol: relative residual at which a sample's solve stops (see :func:`project_tangent`).
        max_iter: iterations after which every solve stops.

    Example:
        >>> tangent = MatrixFreeTangent(decoder, encoder(x))
        >>> d_on, d_off = tangent.decompose(x_adv - x)
        >>> x_on = pgd(model, x, y, eps=2.0, project=tangent.projector())
    """

    def __init__(self, decoder: nn.Module, z: Tensor, *, tol: float = 1e-5, max_iter: int = 1000) -> None:
        if not tol > 0 or max_iter < 1:
            raise DmmError(f"tol must be > 0 and max_iter >= 1; got tol={tol!r}, max_iter={max_iter!r}.")
        self.decoder, self.z, self.tol, self.max_iter = decoder, z.detach(), tol, max_iter
        self.last: ProjectionSolve | None = None

    def solve(self, d: Tensor, index: Tensor | None = None) -> ProjectionSolve:
        """Project d (b, C, H, W) at the latents ``z[index]`` (all of z when ``index`` is None)."""
        z = self.z if index is None else self.z[index]
        self.last = project_tangent(self.decoder, z, d, tol=self.tol, max_iter=self.max_iter)
        return self.last

    def project(self, d: Tensor, index: Tensor | None = None) -> Tensor:
        """d_on, the orthogonal projection of d onto the tangent space (``decompose(d, Q)[0]``)."""
        return self.solve(d, index).on

    def decompose(self, d: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(d_on, d_off) with d_off = d - d_on, each shaped like d, as :func:`decompose`."""
        on = self.project(d, index)
        return on, d - on

    def on_fraction(self, d: Tensor, index: Tensor | None = None) -> Tensor:
        """(B,) ||d_on|| / ||d|| (0 where d = 0), as :func:`on_fraction`."""
        flat = d.reshape(d.shape[0], -1)
        on = self.project(d, index).reshape(d.shape[0], -1)
        return on.norm(dim=1) / flat.norm(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)

    def projector(self, *, off: bool = False) -> Projector:
        """The ``project(v, index)`` hook of :func:`dmm.attacks.pgd`, as :func:`projector` returns.

        v (b, ...) is projected at the latents ``z[index]``; with ``off`` onto the orthogonal complement.
        """

        def project(v: Tensor, index: Tensor) -> Tensor:
            on, rest = self.decompose(v, index)
            return rest if off else on

        return project


def random_subspace_fraction(
    d: Tensor, k: int, *, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> Tensor:
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
