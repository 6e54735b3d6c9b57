"""dmm.measures.statistics against brute force: Wilson intervals, censored medians, paired ratios, rank AUROC."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from dmm.measures.statistics import auroc, censored, censored_median, paired_ratio_median, wilson

# --- Wilson intervals --------------------------------------------------------------------------------------


def _score_interval(successes: int, trials: int, z: float) -> tuple[float, float]:
    """Brute force: the rates p on a 1e-5 grid that the score test does not reject, (p̂ - p)² <= z² p(1-p)/n."""
    p = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    accepted = p[(successes / trials - p) ** 2 <= z * z * p * (1 - p) / trials]
    return accepted.min().item(), accepted.max().item()


@pytest.mark.parametrize(("successes", "trials"), [(0, 10), (10, 10), (5, 10), (1, 7), (37, 50), (0, 1), (999, 1000)])
@pytest.mark.parametrize("level", [0.95, 0.6827])
def test_wilson_is_the_score_test_inversion(successes: int, trials: int, level: float) -> None:
    z = NormalDist().inv_cdf((1 + level) / 2)
    low, high = wilson(successes, trials, level)
    reference = _score_interval(successes, trials, z)
    assert low == pytest.approx(reference[0], abs=2e-5) and high == pytest.approx(reference[1], abs=2e-5)
    assert 0 <= low <= successes / trials <= high + 1e-12 and high <= 1  # 10/10 gives 1 - 1e-16
    mirror = wilson(trials - successes, trials, level)  # failures' interval is the mirror image
    assert mirror == (pytest.approx(1 - high, abs=1e-12), pytest.approx(1 - low, abs=1e-12))


def test_wilson_known_values_and_edges() -> None:
    z95 = NormalDist().inv_cdf(0.975)
    low, high = wilson(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    # 0/n and n/n: not collapsed to a point; the far end is z²/(n + z²) from the edge (closed form).
    low, high = wilson(0, 10)
    assert low == 0 and high == pytest.approx(z95**2 / (10 + z95**2))
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0) and high <= 1 and low == pytest.approx(10 / (10 + z95**2))
    assert wilson(5, 10, 0.6827)[1] - wilson(5, 10, 0.6827)[0] < 0.7634 - 0.2366  # a lower level is narrower
    assert all(math.isnan(v) for v in wilson(0, 0))


# --- censored norms ----------------------------------------------------------------------------------------


def test_censored_puts_failures_at_infinity() -> None:
    out = censored(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]))
    assert out.dtype == torch.float64 and out.tolist() == [1.0, math.inf, 3.0]
    assert censored(torch.tensor([0.5, 0.25]), torch.tensor([1, 0])).tolist() == [0.5, math.inf]  # int flags


@pytest.mark.parametrize(
    ("norms", "success", "expected"),
    [
        ([1.0, 2.0, 3.0, 0.0, 0.0], [1, 1, 1, 0, 0], 3.0),  # failures' own (small) norms must not count
        ([1.0, 2.0, 3.0, 4.0, 5.0], [1, 1, 0, 0, 0], math.inf),  # 2 of 5 succeed
        ([1.0, 2.0, 3.0, 4.0], [1, 1, 0, 0], math.inf),  # exactly half: the upper median is a failure
        ([4.0, 1.0, 3.0, 7.0], [1, 1, 1, 0], 4.0),  # 3 of 4: the third smallest
        ([2.0], [1], 2.0),
        ([2.0], [0], math.inf),
    ],
)
def test_censored_median_constructed_cases(norms, success, expected) -> None:
    assert censored_median(torch.tensor(norms), torch.tensor(success, dtype=torch.bool)) == expected


def test_censored_median_against_brute_force() -> None:
    """The upper median: the smallest value v with more than floor(m/2) of the m needed norms <= v."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = int(torch.randint(1, 10, (), generator=g))
        norms = torch.randint(0, 4, (m,), generator=g).float()  # ties on purpose
        success = torch.rand(m, generator=g) < 0.6
        needed = [n if s else math.inf for n, s in zip(norms.tolist(), success.tolist(), strict=True)]
        reference = min(v for v in needed if sum(w <= v for w in needed) > m // 2)
        assert censored_median(norms, success) == reference
        assert math.isfinite(reference) == (2 * int(success.sum()) > m)
    assert math.isnan(censored_median(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))


# --- paired ratios -----------------------------------------------------------------------------------------


def test_paired_ratio_median_constructed() -> None:
    numerator = torch.tensor([2.0, 3.0, 10.0, 1.0, 8.0])
    denominator = torch.tensor([1.0, 1.0, 2.0, 0.0, 2.0])
    both = torch.tensor([True, True, False, True, True])  # the pair with denominator 0 is left out too
    assert paired_ratio_median(numerator, denominator, both) == (3.0, 3)
    assert paired_ratio_median(numerator[:2], denominator[:2], both[:2]) == (2.0, 2)  # lower median of 2, 3
    ratio, pairs = paired_ratio_median(numerator, denominator, torch.zeros(5, dtype=torch.bool))
    assert math.isnan(ratio) and pairs == 0


def test_paired_ratio_median_against_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        m = int(torch.randint(1, 12, (), generator=g))
        numerator, denominator = torch.rand(m, generator=g), torch.rand(m, generator=g)
        denominator[torch.rand(m, generator=g) < 0.1] = 0
        both = torch.rand(m, generator=g) < 0.7
        triples = zip(numerator.tolist(), denominator.tolist(), both.tolist(), strict=True)
        ratios = sorted(n / d for n, d, b in triples if b and d > 0)
        ratio, pairs = paired_ratio_median(numerator, denominator, both)
        assert pairs == len(ratios)
        if ratios:
            assert ratio == pytest.approx(ratios[(len(ratios) - 1) // 2], rel=1e-12)
        else:
            assert math.isnan(ratio)


# --- AUROC -------------------------------------------------------------------------------------------------


def _pair_count(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Brute force: P(positive > negative) + P(tie) / 2 over all pairs."""
    n, p = negatives.double()[:, None], positives.double()[None, :]
    return ((p > n).double() + 0.5 * (p == n).double()).mean().item()


def test_auroc_equals_the_pair_count_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    for m, n in [(30, 40), (1, 5), (7, 1), (50, 50)]:
        negatives = torch.randint(0, 5, (m,), generator=g).float()  # many ties within and across groups
        positives = torch.randint(1, 6, (n,), generator=g).float()
        assert auroc(negatives, positives) == pytest.approx(_pair_count(negatives, positives), abs=1e-12)
    negatives, positives = torch.randn(40, generator=g), torch.randn(60, generator=g) + 0.5
    assert auroc(negatives, positives) == pytest.approx(_pair_count(negatives, positives), abs=1e-12)


def test_auroc_edges() -> None:
    low, high = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert auroc(low, high) == 1.0 and auroc(high, low) == 0.0
    assert auroc(torch.ones(4), torch.ones(3)) == 0.5
    assert math.isnan(auroc(torch.zeros(0), high)) and math.isnan(auroc(low, torch.zeros(0)))
    ints = torch.tensor([0, 1, 2]), torch.tensor([2, 3])  # integer scores, one tie across the groups
    assert auroc(*ints) == pytest.approx(5.5 / 6)


def test_auroc_is_invariant_to_the_score_scale() -> None:
    """Scores are norms, not probabilities: x40 or +1000 must not change the ranks (torchmetrics squashes
    scores outside [0, 1] through a sigmoid, where norms of tens or thousands all become 1: AUROC 0.5).
    Multiples of 1/64 stay exact in float32 after both changes, so ties are neither made nor broken."""
    g = torch.Generator().manual_seed(2)
    negatives = torch.randint(0, 320, (80,), generator=g).float() / 64
    positives = torch.randint(64, 384, (60,), generator=g).float() / 64
    value = auroc(negatives, positives)
    assert value == pytest.approx(_pair_count(negatives, positives), abs=1e-12) and 0.6 < value < 1
    assert auroc(40 * negatives, 40 * positives) == value
    assert auroc(negatives + 1000, positives + 1000) == value
    assert auroc(torch.exp(negatives), torch.exp(positives)) == pytest.approx(value, abs=1e-12)  # any monotone map
