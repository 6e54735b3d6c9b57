"""The decision boundary along a found perturbation: bisection on its scale, a finer norm than a PGD step gives."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def bisect_to_boundary(model, x: Tensor, y: Tensor, x_adv: Tensor, steps: int, targeted: bool = False) -> Tensor:
    """Each fooled image moved back along its perturbation to the smallest fooling scale bisection finds.

    For every image that ``x_adv`` fools, the scale s in (0, 1] of x + s (x_adv − x) is bisected ``steps`` times
    between x (assumed not fooled) and x_adv (fooled), keeping the fooling end: the result still fools, lies on
    the segment (so in the same subspace and, by convexity, the same box) and is at most as far as x_adv, its
    norm found to 2^-steps of ‖x_adv − x‖. Images not fooled are returned unchanged. One forward pass per step,
    over the fooled images only.

    Args:
        model: images -> logits, in the mode the caller wants (PGD calls it in eval mode).
        x: clean images (B, ...); y: labels (B,), or the targets when ``targeted``.
        x_adv: the attack's points (B, ...).
        steps: bisection steps.
        targeted: fooled means argmax == y instead of != y.

    Returns:
        (B, ...) the refined points.
    """

    def fools(points: Tensor, labels: Tensor) -> Tensor:
        pred = model(points).argmax(dim=1)
        return pred == labels if targeted else pred != labels

    hit = fools(x_adv, y).nonzero().squeeze(1)
    if hit.numel() == 0:
        return x_adv
    origin, delta, labels = x[hit], x_adv[hit] - x[hit], y[hit]
    shape = (-1,) + (1,) * (x.dim() - 1)
    low = torch.zeros(hit.numel(), dtype=x.dtype, device=x.device)  # x itself: assumed not fooled
    high = torch.ones_like(low)  # x_adv: fooled
    for _ in range(steps):
        middle = (low + high) / 2
        fooled = fools(origin + middle.view(shape) * delta, labels)
        high, low = torch.where(fooled, middle, high), torch.where(fooled, low, middle)
    out = x_adv.clone()
    out[hit] = origin + high.view(shape) * delta
    return out
