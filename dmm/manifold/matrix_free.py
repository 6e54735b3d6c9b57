"""The tangent projection without the Jacobian, for decoders where the basis (B, n, k) does not fit (pure torch).

At ImageNet size (n = 150 528 pixels, k = 25 088 latents) J alone is 15 GB per image in float32, so the
projection P d = J (J^T J)^+ J^T d is computed from products J v (forward mode) and J^T u (reverse mode)
only, by CGLS on min_c ||J c - d||: CG on the normal equations J^T J c = J^T d, rearranged so that J^T J
is never applied as one operator and the image-space residual r = d - J c is carried along, which keeps
the recurrence as accurate as the products allow (Björck, "Numerical Methods for Least Squares Problems",
1996, sec. 7.4). LSQR has the same iterates in exact arithmetic and degrades more gracefully on badly
conditioned J, at the price of a per-sample Givens recurrence; CGLS's two scalars per sample batch
trivially, and we guard its late phase instead: the iterate with the lowest residual is the one returned.

The iterate kept is u = J c itself, summed from the J p products: it lies in the column space of J up to
rounding at every iteration, whatever the tolerance, so an on-manifold attack built from it never leaves
the tangent space; only how orthogonal d - u is to that space depends on the tolerance.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from dmm.errors import DmmError
from dmm.tensors import autograd_on, eval_mode, rows

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
    with eval_mode(decoder), autograd_on(), torch.no_grad():
        z, d = z.detach().clone(), d.detach().clone()  # normal tensors, even from an inference_mode caller
        batch, tiny = d.shape[0], torch.finfo(d.dtype).tiny
        orthogonal_tol = ORTHOGONAL_EPS * torch.finfo(d.dtype).eps
        on = torch.zeros_like(d)
        iterations = torch.zeros(batch, dtype=torch.long, device=d.device)
        residual = torch.zeros(batch, dtype=d.dtype, device=d.device)
        running = torch.arange(batch, device=d.device)  # positions in the batch of the samples still running

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
                finished = running[done]
                on[finished], iterations[finished], residual[finished] = best_u[done], step, relative[done]
                keep = ~done
                if not bool(keep.any()):
                    break
                state = (running, z, u, r, s, p, gamma, start, norm_j, best_u, best, best_r)
                running, z, u, r, s, p, gamma, start, norm_j, best_u, best, best_r = (t[keep] for t in state)
                transpose = vjp(decoder, z)[1]  # re-linearise on the samples still running
            q = jvp(decoder, (z,), (p,))[1]  # J p, image-shaped
            q_squared = _dot(q, q)
            norm_j = torch.maximum(norm_j, (q_squared / _dot(p, p).clamp_min(tiny)).sqrt())
            alpha = gamma / q_squared.clamp_min(tiny)
            u = u + rows(alpha, u) * q
            r = r - rows(alpha, r) * q
            s = transpose(r)[0]
            gamma_next = _dot(s, s)
            current = gamma_next.sqrt()
            better = current < best  # CGLS minimises ||r||, not ||J^T r||: that need not fall monotonically
            best = torch.where(better, current, best)
            best_r = torch.where(better, r.flatten(1).norm(dim=1), best_r)
            best_u = torch.where(rows(better, u), u, best_u)
            p = s + rows(gamma_next / gamma.clamp_min(tiny), p) * p
            gamma = gamma_next
    return ProjectionSolve(on.detach(), iterations, residual)


class MatrixFreeTangent:
    """The tangent spaces of a decoder at latents z, used through Jacobian-vector products only.

    The matrix-free counterpart of :class:`~dmm.manifold.subspace.Subspace` over :func:`tangent_basis`, for
    sizes where the basis (B, n, k) does not fit: the same ``split``, ``fraction``, ``complement`` and
    :class:`dmm.attacks.Projector` call, each one batched solve (see :func:`project_tangent` for the solver,
    its cost and its accuracy). ``last`` keeps the latest :class:`ProjectionSolve` (iterations, residuals).

    Args:
        decoder: maps latents (B, ...) to images (B, C, H, W).
        z: latents (B, ...) of the whole batch; ``index`` arguments select running of it.
        tol: relative residual at which a sample's solve stops (see :func:`project_tangent`).
        max_iter: iterations after which every solve stops.
        complement: stand for the orthogonal complements of the tangent spaces instead.

    Example:
        >>> tangent = MatrixFreeTangent(decoder, encoder(x))
        >>> d_on, d_off = tangent.split(x_adv - x)
        >>> x_on = PGD(eps=2.0)(model, x, y, project=tangent)
    """

    def __init__(
        self, decoder: nn.Module, z: Tensor, *, tol: float = 1e-5, max_iter: int = 1000, complement: bool = False
    ) -> None:
        if not tol > 0 or max_iter < 1:
            raise DmmError(f"tol must be > 0 and max_iter >= 1; got tol={tol!r}, max_iter={max_iter!r}.")
        self.decoder, self.z, self.tol, self.max_iter = decoder, z.detach(), tol, max_iter
        self.is_complement = complement
        self.last: ProjectionSolve | None = None

    def complement(self) -> MatrixFreeTangent:
        """The orthogonal complements (sharing the decoder and latents; ``last`` is its own)."""
        other = copy.copy(self)
        other.is_complement, other.last = not self.is_complement, None
        return other

    def solve(self, d: Tensor, index: Tensor | None = None) -> ProjectionSolve:
        """Project d (b, C, H, W) onto the tangent spaces at ``z[index]`` (all of z when ``index`` is None)."""
        z = self.z if index is None else self.z[index]
        self.last = project_tangent(self.decoder, z, d, tol=self.tol, max_iter=self.max_iter)
        return self.last

    def split(self, d: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(part in the space, the rest), each shaped like d, as :meth:`Subspace.split`."""
        on = self.solve(d, index).on
        return (d - on, on) if self.is_complement else (on, d - on)

    def __call__(self, v: Tensor, index: Tensor) -> Tensor:
        return self.split(v, index)[0]

    def fraction(self, d: Tensor, index: Tensor | None = None) -> Tensor:
        """(B,) ||part of d in the space|| / ||d|| (0 where d = 0), as :meth:`Subspace.fraction`."""
        inside = self.split(d, index)[0].reshape(d.shape[0], -1)
        return inside.norm(dim=1) / d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)
