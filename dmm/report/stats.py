"""Bootstrap over images: masked statistics vectorised over resamples, percentile intervals.

Every statistic here reduces the last dim of its ``(..., N)`` arguments, so one call computes it for the
point estimate ``(N,)`` and for all resamples ``(B, N)`` at once. One ``(B, N)`` index tensor per run is
shared by every figure of that run, so paired quantities (on-fraction minus its random baseline, a ratio of
two arms' norms on the same image) are resampled together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LEVEL = 0.95


def resample_indices(n: int, resamples: int, seed: int) -> Tensor:
    """(resamples, n) int64 indices drawn with replacement: row b is bootstrap sample b of n images."""
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def rate(hits: Tensor, among: Tensor) -> Tensor:
    """hits.sum / among.sum over the last dim (NaN where ``among`` is empty); bool (..., N) -> (...)."""
    den = among.sum(-1).double()
    return torch.where(den > 0, hits.sum(-1).double() / den.clamp_min(1), math.nan)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` over the last dim; (..., N) -> (...), NaN where mask is empty."""
    count = mask.sum(-1)
    total = torch.where(mask, values.double(), 0.0).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


def _order_statistic(values: Tensor, mask: Tensor, upper: bool) -> Tensor:
    count = mask.sum(-1)
    ordered = torch.where(mask, values.double(), math.inf).sort(dim=-1).values  # masked-out values last
    middle = count // 2 if upper else torch.div(count - 1, 2, rounding_mode="floor").clamp_min(0)
    value = ordered.gather(-1, middle.clamp_max(values.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(count > 0, value, math.nan)


def masked_median(values: Tensor, mask: Tensor) -> Tensor:
    """Lower median (as ``torch.median``) where ``mask`` over the last dim; (..., N) -> (...), NaN if empty."""
    return _order_statistic(values, mask, upper=False)


def censored_median(needed: Tensor, mask: Tensor) -> Tensor:
    """Median norm needed where ``mask``, failures given as +inf; (..., N) -> (...), NaN if mask is empty.

    It is the smallest t by which *more than half* of the masked images were fooled (the order statistic
    of rank floor(m / 2) of m, the upper median), so it is finite exactly when more than half succeeded and
    +inf ("> eps") otherwise. Unlike a median over an attack's own successes it is comparable across
    attacks of different success rates: every attacked image counts.
    """
    return _order_statistic(needed, mask, upper=True)


def percentile_interval(replicates: Tensor, level: float = LEVEL) -> tuple[float, float]:
    """Lower/higher order statistics at (1 -+ level) / 2 of the defined (non-NaN) replicates; may be inf."""
    kept = replicates[~replicates.isnan()].sort().values
    if kept.numel() == 0:
        return math.nan, math.nan
    last = kept.numel() - 1
    low = kept[math.floor((1 - level) / 2 * last)]
    high = kept[math.ceil((1 + level) / 2 * last)]
    return float(low), float(high)


def bootstrap(statistic: Callable[..., Tensor], columns: list[Tensor], indices: Tensor, level: float = LEVEL) -> dict:
    """Point estimate and percentile CI of ``statistic(*columns)`` over resampled images.

    Args:
        statistic: reduces the last dim of its (..., N) arguments, e.g. :func:`masked_median`.
        columns: per-image tensors (N,), resampled together (paired).
        indices: (resamples, N) from :func:`resample_indices`.
        level: coverage of the interval; its ends are the lower/higher order statistics of the resamples
            where the statistic is defined (no interpolation).

    Returns:
        ``{"value": float, "ci": [low, high]}``; NaN where undefined (no image in the subset); +inf kept
        (a censored median above the budget).
    """
    point = statistic(*columns)
    replicates = statistic(*(c[indices] for c in columns))  # (resamples,)
    return {"value": float(point), "ci": list(percentile_interval(replicates, level))}


def censored_estimate(needed: Tensor, mask: Tensor, indices: Tensor, eps: float, level: float = LEVEL) -> dict:
    """:func:`censored_median` with its bootstrap CI; ``above_eps`` flags (value, low, high) that are "> eps".

    In ``report.json`` a "> eps" figure is ``null`` with its flag true; a NaN (no attacked image) is
    ``null`` with its flag false.
    """
    estimate = bootstrap(censored_median, [needed, mask], indices, level)
    figures = [estimate["value"], *estimate["ci"]]
    return {**estimate, "above_eps": [math.isinf(v) for v in figures], "eps": eps, "attacked": int(mask.sum())}


def random_subspace_expectation(k: int, n: int) -> float:
    """E ||P u|| for u uniform on the unit sphere of R^n and P a rank-k orthogonal projector (≈ sqrt(k/n))."""
    log_e = math.lgamma((k + 1) / 2) + math.lgamma(n / 2) - math.lgamma(k / 2) - math.lgamma((n + 1) / 2)
    return math.exp(log_e)
