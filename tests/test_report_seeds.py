"""Seed-level intervals of a crossed classifier x autoencoder design: Student's t at real df, the two-way
random-effects interval against least-squares mean squares, its one-way limits and its coverage."""

from __future__ import annotations

import math

import pytest
import torch

from dmm.report.seeds import (
    bounded,
    crossed_interval,
    crossed_shape,
    regularized_beta,
    seed_interval,
    student_t_cdf,
    student_t_quantile,
)

T_975 = {1.5: 6.016663, 2.5: 3.574655, 3.7: 2.867521, 7.3: 2.345067}  # scipy.stats.t.ppf(0.975, df)


def _table(y: list[list[float]]) -> dict[tuple[str, str], float]:
    return {(f"c{i}", f"a{j}"): v for i, row in enumerate(y) for j, v in enumerate(row)}


def _sample(generator: torch.Generator, shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    return sigma * torch.randn(shape, generator=generator, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ t at real df
def test_regularized_beta_closed_forms() -> None:
    for x in (0.01, 0.2, 0.5, 0.77, 0.99):
        assert regularized_beta(x, 1, 1) == pytest.approx(x, rel=1e-13)
        assert regularized_beta(x, 3.5, 1) == pytest.approx(x**3.5, rel=1e-12)
        assert regularized_beta(x, 1, 2.5) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
        assert regularized_beta(x, 0.7, 4.2) == pytest.approx(1 - regularized_beta(1 - x, 4.2, 0.7), abs=1e-14)
    assert regularized_beta(0.0, 2, 3) == 0 and regularized_beta(1.0, 2, 3) == 1


def test_student_t_at_real_df_matches_integer_closed_forms_and_tables() -> None:
    for df in (1, 2, 3, 4, 5, 10, 30):
        for t in (-6.0, -1.3, 0.0, 0.4, 2.0, 12.7):
            closed = student_t_cdf(t, df)
            assert student_t_cdf(t, df + 1e-9) == pytest.approx(closed, abs=1e-8)  # incomplete-beta path
            assert student_t_cdf(t, df - 1e-9) == pytest.approx(closed, abs=1e-8)
    for df, t in T_975.items():
        assert student_t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
        assert student_t_cdf(student_t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-14)
    quantiles = [student_t_quantile(0.975, df) for df in (1, 1.2, 1.5, 2, 2.5, 3, 3.7)]
    assert quantiles == sorted(quantiles, reverse=True)  # fewer df, wider interval


def test_student_t_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (0.6, 1.02, 1.5, 2.5, 4.9, 17.3):
        for t in (-3.0, -0.2, 0.7, 5.0):
            assert student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-13)
        assert student_t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


# ------------------------------------------------------------------------------------------ crossed interval
def _least_squares_mean_squares(y: torch.Tensor) -> tuple[float, float, float]:
    """MS_C, MS_A, MS_E of a C x A table from residual sums of squares of nested additive fits."""
    n_c, n_a = y.shape
    rows = torch.eye(n_c, dtype=y.dtype).repeat_interleave(n_a, 0)  # [C*A, C] row dummies
    cols = torch.eye(n_a, dtype=y.dtype).repeat(n_c, 1)  # [C*A, A] column dummies
    target = y.reshape(-1, 1)

    def rss(design: torch.Tensor) -> float:
        fit = design @ torch.linalg.lstsq(design, target, driver="gelsd").solution
        return float(((target - fit) ** 2).sum())

    full = rss(torch.cat([rows, cols], 1))
    ss_c, ss_a = rss(cols) - full, rss(rows) - full
    return ss_c / (n_c - 1), ss_a / (n_a - 1), full / ((n_c - 1) * (n_a - 1))


def test_crossed_interval_matches_least_squares_mean_squares() -> None:
    g = torch.Generator().manual_seed(0)
    for n_c, n_a in ((2, 2), (3, 2), (2, 5), (4, 3)):
        y = 0.5 + _sample(g, (n_c, 1), 0.3) + _sample(g, (1, n_a), 0.2) + _sample(g, (n_c, n_a), 0.1)
        e = crossed_interval(_table(y.tolist()))
        ms_c, ms_a, ms_e = _least_squares_mean_squares(y)
        df = (ms_c + ms_a) ** 2 / (ms_c**2 / (n_c - 1) + ms_a**2 / (n_a - 1))
        half = student_t_quantile(0.975, df) * math.sqrt((ms_c + ms_a) / (n_c * n_a))
        assert e["value"] == pytest.approx(float(y.mean()), rel=1e-12) and e["df"] == pytest.approx(df, rel=1e-9)
        assert e["ci"] == pytest.approx([e["value"] - half, e["value"] + half], rel=1e-9)
        assert min(n_c, n_a) - 1 <= e["df"] <= n_c + n_a - 2  # Satterthwaite lies between the two factors' df
        assert ms_c + ms_a - ms_e <= ms_c + ms_a  # the variance used bounds the unbiased one from above
        assert e["design"] == f"crossed {n_c} x {n_a}" and e["runs"] == n_c * n_a and e["undefined"] == 0


def test_crossed_interval_properties() -> None:
    g = torch.Generator().manual_seed(1)
    y = _sample(g, (3, 4), 1.0)
    e = crossed_interval(_table(y.tolist()))
    transposed = crossed_interval(_table(y.T.tolist()))  # the two factors play symmetric roles
    assert transposed["value"] == pytest.approx(e["value"]) and transposed["ci"] == pytest.approx(e["ci"])
    affine = crossed_interval(_table((2 - 3 * y).tolist()))  # location-scale equivariant, df invariant
    assert affine["ci"] == pytest.approx([2 - 3 * e["ci"][1], 2 - 3 * e["ci"][0]])
    assert affine["df"] == pytest.approx(e["df"])
    shuffled = dict(reversed(list(_table(y.tolist()).items())))  # the order of the runs does not matter
    assert crossed_interval(shuffled)["ci"] == pytest.approx(e["ci"])


def test_autoencoder_independent_figure_gets_the_one_way_interval_over_classifiers() -> None:
    g = torch.Generator().manual_seed(2)
    for n_c in (2, 3, 5):
        z = _sample(g, (n_c,), 1.0).tolist()
        for n_a in (2, 3, 4):
            e, one_way = crossed_interval(_table([[v] * n_a for v in z])), seed_interval(z)
            assert e["value"] == pytest.approx(one_way["value"], rel=1e-12, abs=1e-15)
            assert e["ci"] == pytest.approx(one_way["ci"], rel=1e-12) and e["df"] == pytest.approx(n_c - 1, rel=1e-12)
            naive = seed_interval([v for v in z for _ in range(n_a)])  # too narrow: n_a copies counted as runs
            assert naive["ci"][1] - naive["ci"][0] < e["ci"][1] - e["ci"][0]


def test_a_factor_with_one_level_is_the_one_way_interval() -> None:
    values = [0.31, 0.52, 0.47, 0.40]
    for table in ({(f"c{i}", "a"): v for i, v in enumerate(values)}, {("c", f"a{j}"): v for j, v in enumerate(values)}):
        e, reference = crossed_interval(table), seed_interval(values)
        assert {k: e[k] for k in reference} == reference and e["df"] == 3
    assert math.isnan(crossed_interval({("c", "a"): 0.4})["ci"][0])


def test_degenerate_undefined_and_incomplete_tables() -> None:
    e = crossed_interval(_table([[0.7, 0.7], [0.7, 0.7]]))
    assert e["value"] == pytest.approx(0.7) and e["ci"] == pytest.approx([0.7, 0.7])  # all equal: the point
    for bad in (math.nan, math.inf):
        e = crossed_interval(_table([[0.1, 0.2], [bad, 0.4]]))
        assert e["undefined"] == 1 and math.isnan(e["value"]) and math.isnan(e["ci"][0]) and math.isnan(e["df"])
    with pytest.raises(ValueError, match="2 x 2"):
        crossed_interval({("c0", "a0"): 0.1, ("c0", "a1"): 0.2, ("c1", "a0"): 0.3})


def test_crossed_shape() -> None:
    assert crossed_shape([(c, a) for c in "xyz" for a in "uv"]) == (3, 2)
    assert crossed_shape([("x", "u"), ("x", "v"), ("y", "u")]) is None  # a pair missing
    assert crossed_shape([("x", "u"), ("x", "v"), ("y", "u"), ("y", "v"), ("y", "v")]) is None  # a pair twice
    assert crossed_shape([("x", "u"), ("y", "u"), ("z", "u")]) is None  # one autoencoder: independent runs
    assert crossed_shape([(None, "u"), (None, "v"), ("y", "u"), ("y", "v")]) is None  # checkpoint unknown


# ------------------------------------------------------------------------------------------ coverage
def _coverage(sigma_c: float, sigma_a: float, sigma_e: float, sims: int = 2000) -> tuple[float, float]:
    """Coverage of mu = 0 by the crossed and by the naive 6-run interval over 3 x 2 random-effects tables."""
    g = torch.Generator().manual_seed(0)
    y = _sample(g, (sims, 3, 1), sigma_c) + _sample(g, (sims, 1, 2), sigma_a) + _sample(g, (sims, 3, 2), sigma_e)
    crossed = naive = 0
    for table in y.tolist():
        low, high = crossed_interval(_table(table))["ci"]
        crossed += low <= 0 <= high
        low, high = seed_interval([v for row in table for v in row])["ci"]
        naive += low <= 0 <= high
    return crossed / sims, naive / sims


def test_crossed_interval_covers_where_the_naive_one_does_not() -> None:
    crossed, naive = _coverage(1.0, 1.0, 1.0)  # two variance components and an interaction
    assert crossed >= 0.93 and naive < 0.9
    crossed, naive = _coverage(1.0, 0.0, 0.0)  # figures that do not depend on the autoencoder
    assert crossed >= 0.94 and naive < 0.93


def test_a_rate_near_100_percent_keeps_its_interval_inside_0_1() -> None:
    runs = seed_interval([0.99, 1.0, 1.0])
    assert runs["ci"][1] > 1  # the symmetric t-interval passes 100 %
    clipped = bounded(runs)
    assert clipped["ci"] == [pytest.approx(runs["ci"][0]), 1.0] and clipped["value"] == runs["value"]
    assert bounded(seed_interval([0.0, 0.01, 0.0]))["ci"][0] == 0.0
    assert math.isnan(bounded(seed_interval([0.5]))["ci"][0])  # one run: no interval, still none
