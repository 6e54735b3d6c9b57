"""Summary statistics that respect what an attack can and cannot tell (pure torch).

A failed early-stopped attack says the image needed *more than* eps, not nothing: norms are right-censored
at eps. :func:`censored_median` therefore takes the median over all attacked images with failures at +inf,
and paired ratios compare two attacks only on the images both fooled. Rates get Wilson intervals, which
stay inside [0, 1] and do not collapse to a point at 0 % or 100 %.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor


def wilson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a binomial rate; (nan, nan) for no trials.

    Unlike the normal (Wald) or a bootstrap interval it does not collapse to a point at 0 or ``trials``
    successes: 0 of 20 gives [0, 0.161] at 95 %.
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2n = successes / trials, z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials))
    # At 0 (all) successes the lower (upper) end is exactly 0 (1); the formula gets it only up to rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def censored(norms: Tensor, success: Tensor) -> Tensor:
    """The norm each image needed: its norm where the attack succeeded, +inf where it failed (float64)."""
    return torch.where(success.bool(), norms.double(), torch.full_like(norms, math.inf, dtype=torch.float64))


def censored_median(norms: Tensor, success: Tensor) -> float:
    """Median of the norms needed over all m images, failures at +inf: the value of rank floor(m / 2) (the
    upper median), so it is finite exactly when more than half succeeded and +inf ("> eps") otherwise; NaN
    for no images. :mod:`dmm.report` bootstraps the same statistic."""
    if norms.numel() == 0:
        return math.nan
    return censored(norms, success).sort().values[norms.numel() // 2].item()


def paired_ratio_median(numerator: Tensor, denominator: Tensor, both: Tensor) -> tuple[float, int]:
    """Lower median of numerator / denominator over the images where ``both`` attacks succeeded, and their count."""
    both = both.bool() & (denominator > 0)
    ratios = numerator[both].double() / denominator[both].double()
    return (ratios.median().item() if ratios.numel() else math.nan), int(both.sum())


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of a score meant to be higher for ``positives``, by ranks (Mann–Whitney U):
    exact at any score scale, ties counted as one half. NaN when either group is empty."""
    m, n = negatives.numel(), positives.numel()
    if m == 0 or n == 0:
        return math.nan
    scores = torch.cat([negatives, positives]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, m + n + 1, dtype=torch.float64)
    # Average the ranks of ties.
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    sums = torch.zeros_like(values).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    u = ranks[m:].sum().item() - n * (n + 1) / 2
    return u / (m * n)
