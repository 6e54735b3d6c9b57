"""A classifier's geometry near the data at one moment: gradient alignment and boundary distances (pure torch).

The Dimpled Manifold Model (Shamir et al., 2021) describes training in two phases: a fast *clinging* phase
in which the decision boundary moves close to the data manifold, then a slow *dimpling* phase that bends it
into shallow dimples around the training points. If so, the boundary's normal (the input gradient) soon
points away from the manifold, and the boundary is much nearer off the manifold than along it. One
measurement at fixed points tests both, each next to its null model:

1. the fraction ||P g|| / ||g|| of the input gradient g of the cross-entropy and of the CW margin in the
   tangent space, and in a random k-dim subspace (about sqrt(k / n));
2. the smallest L2 distance to the decision boundary that early-stopped PGD finds: unconstrained, along the
   tangent space and orthogonal to it, and along a random subspace of the same dimension (the null the
   tangent's distance must beat); ``inf`` when the attack does not cross within eps (and 0 for a point
   already misclassified).

:func:`recalibrated` is the BatchNorm fix a measurement during training needs: early in training the
running statistics lag the weights by many updates, so the eval-mode network is not the one being trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dmm.attacks import LOSSES, PGD
from dmm.errors import DmmError
from dmm.manifold import Subspace, random_basis, tangent_basis
from dmm.measures.base import Batch, Measure, Models
from dmm.tensors import autograd_on, eval_mode, predict

GRADIENTS = ("ce", "margin")
ARMS = ("full", "on", "off", "random")
QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}


def input_gradients(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Gradients (shaped like x, detached) of the summed cross-entropy and CW margin w.r.t. the input, in eval
    mode with autograd on even inside ``inference_mode``; parameter ``.grad`` is not touched."""
    with autograd_on(), eval_mode(model):
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        y = y.clone()  # inference tensors cannot be saved for backward
        grads = [torch.autograd.grad(LOSSES[name](logits, y), x, retain_graph=True)[0] for name in GRADIENTS]
    return dict(zip(GRADIENTS, grads, strict=True))


def boundary_distance(model: nn.Module, x: Tensor, y: Tensor, attack: PGD, project=None) -> Tensor:
    """(B,) L2 distance from x to the first iterate the model misclassifies; ``inf`` if none within eps."""
    x_adv = attack(model, x, y, project=project)
    crossed = predict(model, x_adv) != y
    distance = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where(crossed, distance, torch.full_like(distance, math.inf))


@contextmanager
def recalibrated(model: nn.Module, batches: list[Tensor]) -> Iterator[nn.Module]:
    """``model`` with its BatchNorm running statistics re-estimated on ``batches`` of inputs, for the ``with``.

    The statistics are reset and accumulated as plain averages over the batches (momentum None) in train mode
    under no_grad, in a forked RNG (dropout draws must not shift training); on exit every BatchNorm buffer,
    momentum and train flag is restored, so training goes on exactly as without the measurement.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [({k: v.clone() for k, v in m.state_dict().items()}, m.momentum) for m in norms]
    try:
        if norms and batches:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            cuda = [batches[0].device.index or 0] if batches[0].is_cuda else []
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), train_mode(model):
                for x in batches:
                    model(x)
        yield model
    finally:
        for m, (state, momentum) in zip(norms, saved, strict=True):
            m.load_state_dict(state)
            m.momentum = momentum


@contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """Train mode; afterwards every submodule gets its own flag back."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Geometry(Measure):
    """Input-gradient alignment with the tangent space and boundary distances along and across it.

    Args:
        attack: the boundary search, early-stopped L2 PGD in small equal steps; the step is the resolution of
            the distances and ``steps * step_size`` should reach ``eps``.
        random_arm: also search along the random subspace (the null model of the on-manifold distance).
    """

    name = "geometry"

    def __init__(
        self, attack: PGD = PGD(eps=4.0, steps=100, step_size=0.05, early_stop=True), random_arm: bool = True
    ) -> None:
        if attack.norm != "l2" or not attack.early_stop:
            raise DmmError("the boundary search must be an early-stopped L2 attack (norm: l2, early_stop: true)")
        self.attack, self.random_arm = attack, random_arm

    def settings(self) -> dict:
        return {**self.attack.as_dict(), "random_arm": self.random_arm}

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            z = models.encoder(batch.x)
        basis = tangent_basis(models.decoder, z)
        random = random_basis(*basis.shape, generator=batch.generators, device=basis.device, dtype=basis.dtype)
        return self.measure_at(models.classifier, batch.x, batch.y, Subspace(basis), Subspace(random))

    def measure_at(self, model: nn.Module, x: Tensor, y: Tensor, tangent: Subspace, random: Subspace) -> dict:
        """Per-point (B,): ``correct``; ``grad_on/{ce,margin}`` and ``grad_random/{ce,margin}`` (NaN where the
        gradient is exactly 0, e.g. a saturated cross-entropy); ``distance/{full,on,off}`` and, with
        ``random_arm``, ``distance/random``."""
        out: dict[str, Tensor] = {"correct": predict(model, x) == y}
        for name, g in input_gradients(model, x, y).items():
            zero = g.flatten(1).norm(dim=1) == 0
            nan = torch.full(zero.shape, math.nan, device=g.device, dtype=g.dtype)
            out[f"grad_on/{name}"] = torch.where(zero, nan, tangent.fraction(g))
            out[f"grad_random/{name}"] = torch.where(zero, nan, random.fraction(g))
        arms = {"full": None, "on": tangent, "off": tangent.complement(), "random": random}
        for name in ARMS if self.random_arm else ARMS[:3]:
            out[f"distance/{name}"] = boundary_distance(model, x, y, self.attack, arms[name])
        return out

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Gradient fractions averaged over points with a nonzero gradient. Distances over the points classified
        correctly now: ``found`` is the share whose boundary the search reached, and the quartiles use the
        ``nearest`` rule, so a quartile is ``inf`` (not a wrong finite number) when more points than its share
        were not reached within eps. NaN when no point is classified correctly. ``distance/{arm}/all_{q}`` are
        the same quartiles over the whole fixed population (a misclassified point at distance 0, a point not
        reached at inf): unlike the figures over the points correct *now*, they compare one set of points
        across training."""
        correct = records["correct"]
        s = {"accuracy": correct.float().mean().item()}
        for name in GRADIENTS:
            for kind in ("on", "random"):
                s[f"grad_{kind}/{name}"] = records[f"grad_{kind}/{name}"].nanmean().item()
        levels = torch.tensor(list(QUANTILES.values()))
        for name in (a for a in ARMS if f"distance/{a}" in records):
            d = records[f"distance/{name}"][correct].float().cpu()
            s[f"distance/{name}/found"] = torch.isfinite(d).float().mean().item() if d.numel() else math.nan
            q = torch.quantile(d, levels, interpolation="nearest") if d.numel() else torch.full((3,), math.nan)
            s.update({f"distance/{name}/{key}": v.item() for key, v in zip(QUANTILES, q, strict=True)})
            every = records[f"distance/{name}"].float().cpu()
            q = torch.quantile(every, levels, interpolation="nearest") if every.numel() else torch.full((3,), math.nan)
            s.update({f"distance/{name}/all_{key}": v.item() for key, v in zip(QUANTILES, q, strict=True)})
        return s
