"""Clinging then dimpling: a classifier's geometry near the data at one moment of training (pure torch).

The Dimpled Manifold Model (Shamir et al., 2021) describes training in two phases: a fast *clinging* phase
in which the decision boundary moves close to the data manifold and roughly contains it, then a slow
*dimpling* phase that bends it into shallow dimples around the training points. If so, the boundary's normal
(the input gradient) soon points away from the manifold, and the boundary is much nearer off the manifold
than along it. One measurement, on fixed points x (B, C, H, W) in [0, 1] with labels y (B,) and their
tangent bases Q (B, n, k), tests both:

1. the on-manifold fraction ||Q Q^T g|| / ||g|| of the input gradient g of the cross-entropy and of the CW
   margin, next to the same fraction for a fixed random k-dim subspace (about sqrt(k / n));
2. the smallest L2 distance to the decision boundary that early-stopped PGD finds: unconstrained, along the
   tangent space and orthogonal to it; ``inf`` when the attack does not cross the boundary within ``eps``
   (and 0 for a point already misclassified, which :func:`summarize` leaves out).

:func:`measure` returns per-point tensors; :func:`summarize` turns them into the logged figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dmm.attacks import LOSSES, _eval_mode, pgd
from dmm.manifold import on_fraction, projector

GRADIENTS = ("ce", "margin")
ATTACKS = ("full", "on", "off")
QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}


@dataclass(frozen=True)
class BoundarySearch:
    """Early-stopped L2 PGD that walks towards the decision boundary in small equal steps.

    Attributes:
        eps: the largest distance searched; ``steps * step_size`` should reach it.
        steps: PGD iterations.
        step_size: L2 length of one step: the resolution of the distances found.
        clamp: keep the iterates in [0, 1] (valid images).
        loss: the attacked objective, "ce" or "margin".
    """

    eps: float = 4.0
    steps: int = 100
    step_size: float = 0.05
    clamp: bool = True
    loss: str = "ce"

    def as_dict(self) -> dict:
        return asdict(self)


def input_gradients(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Gradients of the summed cross-entropy and CW margin of ``model`` w.r.t. its input.

    The model runs in eval mode (BatchNorm statistics untouched) with autograd on, even inside
    ``inference_mode``; every submodule gets its own train flag back afterwards. Parameter ``.grad`` is
    not touched.

    Returns:
        {"ce": g, "margin": g}, each shaped like x (B, C, H, W), detached.
    """
    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model):
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        y = y.clone()  # inference tensors cannot be saved for backward
        grads = [torch.autograd.grad(LOSSES[name](logits, y), x, retain_graph=True)[0] for name in GRADIENTS]
    return dict(zip(GRADIENTS, grads, strict=True))


def boundary_distance(model: nn.Module, x: Tensor, y: Tensor, search: BoundarySearch, project=None) -> Tensor:
    """(B,) L2 distance from x to the first iterate the model misclassifies; ``inf`` if none within eps.

    Args:
        model: images in [0, 1] -> logits.
        x: images (B, C, H, W) in [0, 1]; y: labels (B,) int64.
        search: the PGD settings.
        project: :func:`dmm.manifold.projector` hook restricting the steps to a subspace (``None``: free).
    """
    x_adv = pgd(
        model,
        x,
        y,
        eps=search.eps,
        norm="l2",
        steps=search.steps,
        step_size=search.step_size,
        early_stop=True,
        project=project,
        clamp=search.clamp,
        loss=search.loss,
    )
    with torch.no_grad(), _eval_mode(model):
        crossed = model(x_adv).argmax(dim=1) != y
    distance = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where(crossed, distance, torch.full_like(distance, float("inf")))


def measure(
    model: nn.Module, x: Tensor, y: Tensor, basis: Tensor, random: Tensor, search: BoundarySearch
) -> dict[str, Tensor]:
    """One measurement of the model's geometry at fixed points.

    Args:
        model: images in [0, 1] -> logits; evaluated in eval mode, its train flags restored afterwards.
        x: images (B, C, H, W) in [0, 1]; y: labels (B,) int64.
        basis: Q (B, n, k), orthonormal tangent bases at the points.
        random: (B, n, k) orthonormal bases of fixed random subspaces of the same dimension (the control).
        search: settings of the boundary search.

    Returns:
        Per-point (B,) tensors: ``correct``; ``grad_on/{ce,margin}`` and ``grad_random/{ce,margin}``
        (NaN where the gradient is exactly 0, e.g. a saturated cross-entropy); ``distance/{full,on,off}``.
    """
    with torch.no_grad(), _eval_mode(model):
        out: dict[str, Tensor] = {"correct": model(x).argmax(dim=1) == y}
    for name, g in input_gradients(model, x, y).items():
        zero = g.flatten(1).norm(dim=1) == 0
        nan = torch.full(zero.shape, float("nan"), device=g.device, dtype=g.dtype)
        out[f"grad_on/{name}"] = torch.where(zero, nan, on_fraction(g, basis))
        out[f"grad_random/{name}"] = torch.where(zero, nan, on_fraction(g, random))
    for name, project in (("full", None), ("on", projector(basis)), ("off", projector(basis, off=True))):
        out[f"distance/{name}"] = boundary_distance(model, x, y, search, project)
    return out


def summarize(records: dict[str, Tensor]) -> dict[str, float]:
    """The logged figures of one measurement (per-point records of all points concatenated).

    Gradient fractions are averaged over the points with a nonzero gradient. Distances are those of the
    points the model classifies correctly at this moment (the others are already across the boundary):
    ``found`` is the share of them whose boundary the search reached, and the quartiles use the ``nearest``
    rule, so a quartile is ``inf`` (not a wrong finite number) when more points than its share were not
    reached within ``eps``. NaN when no point is classified correctly.
    """
    correct = records["correct"]
    s = {"accuracy": correct.float().mean().item()}
    for name in GRADIENTS:
        for kind in ("on", "random"):
            s[f"grad_{kind}/{name}"] = records[f"grad_{kind}/{name}"].nanmean().item()
    levels = torch.tensor(list(QUANTILES.values()))
    for name in ATTACKS:
        d = records[f"distance/{name}"][correct].float().cpu()
        s[f"distance/{name}/found"] = torch.isfinite(d).float().mean().item() if d.numel() else float("nan")
        q = torch.quantile(d, levels, interpolation="nearest") if d.numel() else torch.full((3,), float("nan"))
        s.update({f"distance/{name}/{key}": v.item() for key, v in zip(QUANTILES, q, strict=True)})
    return s
