"""The DMM measurement on one batch: attack, linearise the manifold, split the perturbation (pure torch).

For images x with labels y, a classifier f and an autoencoder's encoder E and decoder D:

1. the tangent space of the learned manifold at D(E(x)): orthonormal Q (B, n, k), see :mod:`dmm.manifold`;
   above :data:`DENSE_LIMIT` (ImageNet: Q alone is 15 GB per image) a matrix-free projector instead,
   :class:`~dmm.manifold.MatrixFreeTangent`, which never forms Q;
2. three early-stopped PGD attacks with the same budget and step-size rule: unconstrained ("full"),
   restricted to the tangent space ("on") and to its orthogonal complement ("off");
3. the unconstrained perturbation d split as d_on + d_off, its on-manifold fraction ||d_on|| / ||d|| next to
   the same fraction for a random k-dim subspace (expected about sqrt(k / n)), and whether x + d_on or
   x + d_off alone fools f;
4. the leak of the constrained attacks: with ``clamp=True`` the [0, 1] box clamp moves part of an
   on-manifold perturbation off the tangent space (and vice versa); ``leak_on`` is the fraction of the
   on-attack's norm outside the tangent space, ``leak_off`` that of the off-attack's norm inside it.

:func:`measure` returns per-sample tensors (so shards can be gathered across processes before
:func:`summarize` turns them into the logged figures).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from dmm.attacks import pgd
from dmm.manifold import (
    MatrixFreeTangent,
    decompose,
    on_fraction,
    projector,
    random_basis,
    random_subspace_fraction,
    tangent_space,
)

ATTACKS = ("full", "on", "off")
DENSE_LIMIT = 5 * 10**7
"""n * k per image above which :func:`measure` goes matrix-free: a dense basis that size is 200 MB per
image in float32 (MNIST's 784 x 16 is 1.3e4; CIFAR-10's 3072 x 128 is 3.9e5; ImageNet's 150 528 x 25 088
is 3.8e9)."""
MATRIX_FREE_TOL = 1e-5
"""Relative residual at which :func:`measure`'s matrix-free projections stop (float32's floor is near 1e-6)."""
MATRIX_FREE_MAX_ITER = 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackSettings:
    """One budget and step-size rule shared by the three attacks (equal rules keep their norms comparable).

    Attributes:
        eps: radius of the threat ball; with ``early_stop`` it caps the norm an attack may need.
        norm: "l2" or "linf".
        steps: PGD iterations.
        step_size: step length; ``None`` means 2.5 * eps / steps.
        clamp: clamp iterates to [0, 1] (valid images; the constrained attacks then leak, see ``leak_*``).
        early_stop: stop each sample at its first success, so its norm is the norm needed.
    """

    eps: float = 4.0
    norm: Literal["l2", "linf"] = "l2"
    steps: int = 100
    step_size: float | None = 0.05
    clamp: bool = True
    early_stop: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def _fraction(part: Tensor, whole: Tensor) -> Tensor:
    """(B,) ||part|| / ||whole||, 0 where whole is 0 (an image the attack never had to move)."""
    whole_norm = whole.flatten(1).norm(dim=1)
    return part.flatten(1).norm(dim=1) / whole_norm.clamp_min(torch.finfo(whole.dtype).tiny)


def _fools(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1) != y


def measure(
    classifier: nn.Module,
    encoder: nn.Module,
    decoder: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: AttackSettings,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Run the three attacks on a batch and decompose the unconstrained perturbations.

    Args:
        classifier: images in [0, 1] (B, C, H, W) -> logits (B, classes).
        encoder: images -> latents (B, k).
        decoder: latents -> images in [0, 1]; its tangent space is taken at the encoded latents.
        x: images (B, C, H, W) in [0, 1].
        y: labels (B,).
        settings: the shared attack budget.
        generator: seeds the random-subspace baseline (on x's device).

    Returns:
        Per-sample (B,) tensors, on x's device: ``correct``; for each attack a in full/on/off ``{a}_success``,
        ``{a}_l2`` and ``{a}_linf`` (norms of x_adv - x); ``on_fraction`` and ``random_fraction`` of the
        unconstrained d; ``on_part_fools`` / ``off_part_fools``; ``leak_on`` / ``leak_off``;
        ``tangent_condition`` (condition number of the decoder's Jacobian; NaN above :data:`DENSE_LIMIT`).

    Above :data:`DENSE_LIMIT` every projection is a :class:`~dmm.manifold.MatrixFreeTangent` solve (to
    :data:`MATRIX_FREE_TOL`: the same records up to the solver's accuracy, at one solve per attack step)
    and ``random_fraction`` is drawn from its exact distribution
    (:func:`~dmm.manifold.random_subspace_fraction`) instead of from a random (B, n, k) basis.
    """
    with torch.no_grad():
        correct = classifier(x).argmax(dim=1) == y
        z = encoder(x)
    n, k = x[0].numel(), z[0].numel()
    matrix_free = n * k > DENSE_LIMIT
    if matrix_free:
        free = MatrixFreeTangent(decoder, z, tol=MATRIX_FREE_TOL, max_iter=MATRIX_FREE_MAX_ITER)
        split, on_hook, off_hook = free.decompose, free.projector(), free.projector(off=True)
        condition = torch.full((x.shape[0],), float("nan"), dtype=z.dtype, device=z.device)  # not computed
    else:
        tangent = tangent_space(decoder, z)
        q = tangent.basis
        split, on_hook, off_hook = partial(decompose, basis=q), projector(q), projector(q, off=True)
        condition = tangent.condition
    kwargs = dict(
        eps=settings.eps,
        norm=settings.norm,
        steps=settings.steps,
        step_size=settings.step_size,
        clamp=settings.clamp,
        early_stop=settings.early_stop,
    )
    out: dict[str, Tensor] = {"correct": correct, "tangent_condition": condition}
    perturbations = {}
    for name, project in (("full", None), ("on", on_hook), ("off", off_hook)):
        d = pgd(classifier, x, y, project=project, **kwargs) - x
        perturbations[name] = d
        flat = d.flatten(1)
        out[f"{name}_success"] = _fools(classifier, x + d, y) & correct
        out[f"{name}_l2"] = flat.norm(dim=1)
        out[f"{name}_linf"] = flat.abs().amax(dim=1)

    d = perturbations["full"]
    d_on, d_off = split(d)
    if matrix_free:
        stopped = int((free.last.residual >= MATRIX_FREE_TOL).sum())  # the attacks' solves go unchecked
        if stopped:
            log.warning(
                "matrix-free projection of %d of %d perturbations stopped at max_iter=%d above tol=%g; "
                "the decoder's Jacobian is badly conditioned there",
                stopped,
                len(d),
                MATRIX_FREE_MAX_ITER,
                MATRIX_FREE_TOL,
            )
        out["on_fraction"] = _fraction(d_on, d)
        # Exact in distribution, and no (B, n, k) basis: see random_subspace_fraction.
        out["random_fraction"] = random_subspace_fraction(d, k, generator=generator)
    else:
        out["on_fraction"] = on_fraction(d, q)
        baseline = random_basis(*q.shape, generator=generator, device=q.device, dtype=q.dtype)
        out["random_fraction"] = on_fraction(d, baseline)
    out["on_part_fools"] = _fools(classifier, (x + d_on).clamp(0, 1), y) & correct
    out["off_part_fools"] = _fools(classifier, (x + d_off).clamp(0, 1), y) & correct
    out["leak_on"] = _fraction(split(perturbations["on"])[1], perturbations["on"])
    out["leak_off"] = _fraction(split(perturbations["off"])[0], perturbations["off"])
    out["_images"] = torch.stack([x, x + d, d, d_on, d_off], dim=1)  # (B, 5, C, H, W) for image grids
    return out


def summarize(records: dict[str, Tensor], eps_curve: list[float], norm: str = "l2") -> dict[str, float]:
    """Figures from per-sample records (all samples, any number of processes' shards concatenated).

    Norm statistics are over samples that were classified correctly and then fooled by that attack; the
    on-manifold fraction over the unconstrained attack's successes. ``robust_acc@eps`` counts a sample as
    robust when it is correct and the early-stopped attack needed more than eps (or failed): one attack
    run gives the whole curve, an upper bound on the true robust accuracy like every attack-based figure.
    """
    correct = records["correct"]
    n = correct.numel()
    s: dict[str, float] = {"num_images": float(n), "clean_acc": correct.float().mean().item()}
    for name in ATTACKS:
        ok = records[f"{name}_success"]
        s[f"{name}/success_rate"] = (ok.sum() / correct.sum().clamp_min(1)).item()
        norms = records[f"{name}_l2"][ok]
        s[f"{name}/l2_median"] = norms.median().item() if norms.numel() else float("nan")
        s[f"{name}/l2_mean"] = norms.mean().item() if norms.numel() else float("nan")
    ok = records["full_success"]
    # Fractions of the unconstrained d over its successes; leaks over the images that were attacked.
    subsets = {"on_fraction": ok, "random_fraction": ok, "leak_on": correct, "leak_off": correct}
    for key in ("on_fraction", "random_fraction", "leak_on", "leak_off", "tangent_condition"):
        values = records[key][subsets[key]] if key in subsets else records[key]
        s[f"{key}_mean"] = values.mean().item() if values.numel() else float("nan")
        s[f"{key}_median"] = values.median().item() if values.numel() else float("nan")
    for key in ("on_part_fools", "off_part_fools"):
        s[f"{key}_rate"] = (records[key][ok].float().mean().item()) if ok.any() else float("nan")
    needed = records[f"full_{norm}"]
    for eps in eps_curve:
        fooled = ok & (needed <= eps + 1e-6)
        s[f"robust_acc@{eps:g}"] = (correct & ~fooled).float().mean().item()
    return s
