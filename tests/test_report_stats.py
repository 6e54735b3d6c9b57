"""The report's statistics on constructed inputs with hand-computable answers, properties and independent references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from dmm.report import (
    bootstrap,
    censored_estimate,
    censored_median,
    masked_mean,
    masked_median,
    norm_needed,
    paired_ratio,
    random_subspace_expectation,
    rate,
    resample_indices,
    seed_interval,
    student_t_quantile,
    survival_curve,
    wilson_interval,
)

INF = math.inf


# ------------------------------------------------------------------------------------------ Wilson
def test_wilson_interval_known_cases() -> None:
    # 0 of 20: the upper end is z^2/n / (1 + z^2/n) = 0.1611, not 0 (a Wald or bootstrap interval collapses).
    assert wilson_interval(0, 20)["ci"] == pytest.approx([0.0, 0.16113], abs=1e-5)
    assert wilson_interval(20, 20)["ci"] == pytest.approx([0.83887, 1.0], abs=1e-5)
    assert wilson_interval(5, 10)["ci"] == pytest.approx([0.23659, 0.76341], abs=1e-5)  # Newcombe (1998) table
    assert math.isnan(wilson_interval(0, 0)["value"])
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_wilson_interval_properties() -> None:
    for n in (1, 2, 7, 50, 493):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            e = wilson_interval(k, n)
            low, high = e["ci"]
            assert 0 <= low <= e["value"] == k / n <= high <= 1
            assert high - low > 0  # non-degenerate, at 0 % and 100 % too
            mirrored = wilson_interval(n - k, n)["ci"]
            assert [1 - mirrored[1], 1 - mirrored[0]] == pytest.approx([low, high])
    widths = [(lambda c: c[1] - c[0])(wilson_interval(n // 2, n)["ci"]) for n in (25, 100, 400)]
    assert widths[0] > widths[1] > widths[2]


def test_wilson_interval_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 13), (3, 13), (141, 493), (493, 493)):
        reference = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n)["ci"] == pytest.approx([reference.low, reference.high], abs=1e-9)


# ------------------------------------------------------------------------------------------ censored median
def test_censored_median_constructed_cases() -> None:
    everyone = torch.ones(5, dtype=torch.bool)
    assert censored_median(torch.tensor([1.0, 2, 3, INF, INF]), everyone).item() == 3  # 3 of 5 fooled
    assert censored_median(torch.tensor([1.0, 2, INF, INF, INF]), everyone).item() == INF  # 2 of 5: "> eps"
    # Exactly half fooled is not more than half: "> eps"; one more success makes it finite.
    assert censored_median(torch.tensor([1.0, 2, INF, INF]), everyone[:4]).item() == INF
    assert censored_median(torch.tensor([1.0, 2, 3, INF]), everyone[:4]).item() == 3
    # Masked-out images do not count, whatever their value; an empty mask is undefined.
    mask = torch.tensor([True, True, True, False, False])
    assert censored_median(torch.tensor([1.0, 2, 3, INF, INF]), mask).item() == 2
    assert math.isnan(censored_median(torch.tensor([1.0]), torch.tensor([False])).item())


def test_norm_needed_censors_failures_at_eps() -> None:
    needed = norm_needed(torch.tensor([0.5, 4.0000005, 3.9, 1.0]), torch.tensor([True, True, False, True]), eps=4.0)
    assert needed.tolist() == [0.5, 4.0, INF, 1.0]


def test_censored_estimate_flags_what_lies_above_eps() -> None:
    idx = resample_indices(5, 400, seed=0)
    everyone = torch.ones(5, dtype=torch.bool)
    e = censored_estimate(torch.tensor([1.0, 2, 3, INF, INF]), everyone, idx, eps=4.0)
    # 3 of 5 fooled: the point is finite, but many resamples have 3 failures, so the upper end is "> eps".
    assert e["value"] == 3 and e["above_eps"] == [False, False, True] and e["ci"][0] <= 3 and e["attacked"] == 5
    e = censored_estimate(torch.full((5,), INF), everyone, idx, eps=4.0)
    assert e["above_eps"] == [True, True, True]


def test_censored_median_vectorised_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.where(torch.rand(31, generator=gen) < 0.35, INF, torch.rand(31, generator=gen).double())
    mask = torch.rand(31, generator=gen) < 0.8
    indices = resample_indices(31, 200, seed=2)
    for row, median in zip(indices.tolist(), censored_median(values[indices], mask[indices]), strict=True):
        kept = sorted(values[i].item() for i in row if mask[i])
        assert median.item() == (kept[len(kept) // 2] if kept else pytest.approx(math.nan, nan_ok=True))


# ------------------------------------------------------------------------------------------ survival
def test_survival_curve_properties() -> None:
    gen = torch.Generator().manual_seed(1)
    for n, fooled_share in ((1, 1.0), (40, 0.3), (200, 0.97), (50, 0.0)):
        norms = 4 * torch.rand(n, generator=gen) + 1e-3
        ok = torch.rand(n, generator=gen) < fooled_share
        curve = survival_curve(norm_needed(norms, ok, 4.0), 4.0)
        t, s = curve["t"], curve["survival"]
        assert t[0] == 0 and t[-1] == 4.0 and t == sorted(t) and len(t) == len(s)
        assert s[0] == 1  # no image needed 0
        assert all(a >= b for a, b in zip(s, s[1:], strict=False))  # non-increasing
        assert s[-1] == pytest.approx(1 - ok.float().mean().item())  # the failure share, censored at eps
    curve = survival_curve(torch.tensor([1.0, 2.0, 2.0, INF]), 4.0)
    assert curve == {"t": [0.0, 1.0, 2.0, 4.0], "survival": [1.0, 0.75, 0.25, 0.25]}
    assert survival_curve(torch.tensor([]), 4.0) == {"t": [], "survival": []}


# ------------------------------------------------------------------------------------------ paired ratios
def test_paired_ratio_constructed_and_properties() -> None:
    idx = resample_indices(6, 300, seed=0)
    num, den = torch.tensor([2.0, 4, 6, 8, 1, 1]), torch.tensor([1.0, 2, 3, 4, 1, 1])
    both = torch.tensor([True, True, True, True, False, False])
    e = paired_ratio(num, den, both, idx)
    assert e == {"value": 2.0, "ci": [2.0, 2.0], "pairs": 4}  # every pair has ratio 2
    assert math.isnan(paired_ratio(num, den, torch.zeros(6, dtype=torch.bool), idx)["value"])
    gen = torch.Generator().manual_seed(3)
    for n in (5, 30, 300):
        num, den = torch.rand(n, generator=gen) + 0.1, torch.rand(n, generator=gen) + 0.1
        both = torch.rand(n, generator=gen) < 0.7
        e = paired_ratio(num, den, both, resample_indices(n, 500, seed=n))
        assert e["ci"][0] <= e["value"] <= e["ci"][1] and e["pairs"] == int(both.sum())
        kept = [a / b for a, b, k in zip(num.tolist(), den.tolist(), both.tolist(), strict=True) if k]
        assert e["value"] == pytest.approx(statistics.median_low(kept))


# ------------------------------------------------------------------------------------------ seed level
def test_student_t_quantiles_match_tables() -> None:
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423}
    for df, t in table.items():
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert student_t_quantile(0.95, 200) == pytest.approx(1.6525, abs=1e-3)


def test_seed_interval() -> None:
    e = seed_interval([0.2, 0.4, 0.6])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)
    assert e["value"] == pytest.approx(0.4) and e["ci"] == pytest.approx([0.4 - half, 0.4 + half])
    assert math.isnan(seed_interval([0.3])["ci"][0]) and seed_interval([0.3])["value"] == 0.3
    assert seed_interval([1.0, INF])["undefined"] == 1 and math.isnan(seed_interval([1.0, INF])["value"])


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_of_a_constant_sample_is_degenerate() -> None:
    values, mask = torch.full((40,), 0.7), torch.ones(40, dtype=torch.bool)
    indices = resample_indices(40, 300, seed=0)
    for statistic in (masked_mean, masked_median):
        estimate = bootstrap(statistic, [values, mask], indices)
        assert estimate["value"] == pytest.approx(0.7) and estimate["ci"] == pytest.approx([0.7, 0.7])


def test_bootstrap_interval_narrows_with_more_images() -> None:
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (50, 2000):
        values, everyone = torch.randn(n, generator=gen), torch.ones(n, dtype=torch.bool)
        low, high = bootstrap(masked_mean, [values, everyone], resample_indices(n, 500, seed=1))["ci"]
        widths.append(high - low)
    # The width of a mean's interval goes as 1/sqrt(n): about 6x narrower for 40x the images.
    assert widths[1] < widths[0] / 3
    assert widths[1] == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.2)


def test_vectorised_statistics_match_a_loop_over_resamples() -> None:
    gen = torch.Generator().manual_seed(0)
    values, mask = torch.rand(31, generator=gen), torch.rand(31, generator=gen) < 0.4
    indices = resample_indices(31, 200, seed=2)
    medians, means = masked_median(values[indices], mask[indices]), masked_mean(values[indices], mask[indices])
    rates = rate(mask[indices], torch.ones(31, dtype=torch.bool)[indices])
    for row, median, mean, fraction in zip(indices.tolist(), medians, means, rates, strict=True):
        kept = [values[i].item() for i in row if mask[i]]
        assert fraction.item() == pytest.approx(len(kept) / 31)
        if kept:
            assert median.item() == pytest.approx(statistics.median_low(kept))
            assert mean.item() == pytest.approx(statistics.fmean(kept))
        else:
            assert math.isnan(median.item()) and math.isnan(mean.item())
    assert masked_median(values, mask).item() == values[mask].median().item()  # torch's own (lower) median


def test_random_subspace_expectation_matches_monte_carlo() -> None:
    n, k = 64, 4
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(4000, n, generator=gen)
    basis = torch.linalg.qr(torch.randn(4000, n, k, generator=gen)).Q  # orthonormal (4000, n, k)
    fractions = torch.einsum("bnk,bn->bk", basis, d).norm(dim=1) / d.norm(dim=1)
    assert fractions.mean().item() == pytest.approx(random_subspace_expectation(k, n), rel=0.02)
    assert random_subspace_expectation(16, 784) == pytest.approx(math.sqrt(16 / 784), rel=0.03)
