"""Norm needed to fool, with failures censored at the budget: rates, survival curves, paired ratios.

An early-stopped attack records, for each image it fooled, the norm it needed; an image it did not fool
needed "more than eps". So a success rate gets a binomial interval that stays honest at 0 % and 100 %
(Wilson), a typical norm is the censored median over every attacked image (:func:`~dmm.report.stats.
censored_median`), the whole distribution is the survival curve P(norm needed > t) on [0, eps], and two
attacks are compared image by image only where both succeeded (:func:`paired_ratio`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dmm.measures.decomposition import PAIRS
from dmm.measures.statistics import wilson
from dmm.report.stats import LEVEL, bootstrap, masked_median

# (numerator, denominator) arms of the paired ratios, shown when both arms were run: the measure's own pairs.
RATIO_PAIRS = PAIRS


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> dict:
    """Success rate with its Wilson score interval (Wilson 1927).

    Unlike the normal (Wald) or bootstrap interval it does not collapse to a point at 0 or ``trials``
    successes: 0 of 20 gives [0, 0.161] at 95 %. ``{"value", "ci", "successes", "trials"}``; NaN when
    ``trials`` is 0.
    """
    low, high = wilson(successes, trials, level)
    value = successes / trials if trials else math.nan
    return {"value": value, "ci": [low, high], "successes": successes, "trials": trials}


def norm_needed(norms: Tensor, success: Tensor, eps: float) -> Tensor:
    """(N,) float64 norm each image needed: its recorded norm where fooled (at most eps), +inf where not.

    Successes are clipped at eps: a projected step lands on the ball's surface only up to rounding.
    """
    return torch.where(success.bool(), norms.double().clamp_max(eps), math.inf)


def survival_curve(needed: Tensor, eps: float) -> dict:
    """Step function S(t) = P(norm needed > t) for t in [0, eps] over the attacked images ``needed`` (N,).

    ``{"t": [...], "survival": [...]}`` with S constant on [t_i, t_{i+1}) (plot with ``where="post"``):
    it starts at t = 0 (1 when no image needed 0), drops at every distinct norm that fooled an image and
    ends at eps with the share of images not fooled within eps (censored there). Empty lists for N = 0.
    """
    n = needed.numel()
    if n == 0:
        return {"t": [], "survival": []}
    steps = torch.unique(needed[needed.isfinite()].clamp(0, eps)).tolist()
    t = sorted({0.0, *steps, float(eps)})
    survival = [float((needed > v).sum()) / n for v in t]
    return {"t": t, "survival": survival}


def paired_ratio(numerator: Tensor, denominator: Tensor, both: Tensor, indices: Tensor, level: float = LEVEL) -> dict:
    """Median of the per-image ratio numerator / denominator over images where ``both`` arms succeeded.

    The CI resamples images (pairs stay together), so it reflects the spread of the ratio and not of two
    independent medians. ``{"value", "ci", "pairs"}``; NaN without pairs.
    """
    ratio = numerator.double() / denominator.double().clamp_min(torch.finfo(torch.float64).tiny)
    estimate = bootstrap(masked_median, [ratio, both.bool()], indices, level)
    return {**estimate, "pairs": int(both.sum())}
