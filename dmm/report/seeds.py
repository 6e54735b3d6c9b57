"""Seed-level intervals: runs of the same experiment pooled, each run's headline figure one observation.

Image-level intervals (bootstrap, Wilson) say how well one run pins down its figure on its images; they
say nothing about how the figure moves when the models are retrained or the image subset redrawn. When
several runs share every setting (attack, arms, data, classifier and autoencoder types), the report gives
the mean over runs of each headline figure with a Student-t interval over runs: m runs give m - 1 degrees
of freedom, so two or three runs give wide and honest intervals.
"""

from __future__ import annotations

import json
import math

from dmm.report.stats import LEVEL


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df`` >= 1 (closed forms, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df == 1:
        return 0.5 + theta / math.pi
    if df % 2:  # A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        term = total = 1.0
        for j in range(3, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term = total = 1.0
        for j in range(2, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        a = s * total
    return 0.5 + a / 2  # A(t) = P(|T| <= t), odd in t


def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on :func:`student_t_cdf` (p in (0.5, 1))."""
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def seed_interval(values: list[float], level: float = LEVEL) -> dict:
    """Mean over runs with its t-interval; ``{"value", "ci", "runs", "per_run", "undefined"}``.

    A run whose figure is undefined (NaN) or censored ("> eps", +inf) makes the mean undefined: it is then
    NaN and ``undefined`` counts those runs. One run has no interval (NaN).
    """
    m = len(values)
    bad = sum(not math.isfinite(v) for v in values)
    out = {"value": math.nan, "ci": [math.nan, math.nan], "runs": m, "per_run": list(values), "undefined": bad}
    if bad or m == 0:
        return out
    mean = sum(values) / m
    out["value"] = mean
    if m > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
        half = student_t_quantile((1 + level) / 2, m - 1) * sd / math.sqrt(m)
        out["ci"] = [mean - half, mean + half]
    return out


def headline_figures(entry: dict) -> dict[str, float]:
    """The figures of one run that are pooled over runs, by a readable name (same names for every run)."""
    fig = entry["figures"]
    out = {"clean accuracy": fig["clean_acc"]["value"]}
    for arm, f in fig["attacks"].items():
        out[f"{arm}: success rate"] = f["success_rate"]["value"]
        out[f"{arm}: censored median norm"] = f["censored_median"]["value"]
    out["on-fraction mean"] = fig["fractions"]["on_fraction_mean"]["value"]
    out["random-fraction mean"] = fig["fractions"]["random_fraction_mean"]["value"]
    for name, ratio in fig["ratios"].items():
        out[f"ratio {name}"] = ratio["value"]
    return {k: math.nan if v is None else v for k, v in out.items()}


def experiment_key(entry: dict) -> str:
    """What must agree for runs to count as repeats of one experiment (seed and checkpoints may differ)."""
    key = {
        "stage": entry["stage"],
        "settings": entry["settings"],
        "arms": sorted(entry["arms"]),
        "k": entry["figures"]["k"],
        "n": entry["figures"]["n"],
        "dataset": entry["dataset"],
        "classifier": [entry["classifier"][k] for k in ("class", "network")],
        "autoencoder": [entry["autoencoder"][k] for k in ("class", "encoder", "decoder", "latent_dim", "extra")],
    }
    return json.dumps(key, sort_keys=True, default=str)


def seed_groups(entries: list[dict], level: float = LEVEL) -> list[dict]:
    """Groups of two or more runs of one experiment, each with :func:`seed_interval` per headline figure."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(experiment_key(e), []).append(e)
    out = []
    for members in (g for g in groups.values() if len(g) > 1):
        per_run = [headline_figures(e) for e in members]
        names = [n for n in per_run[0] if all(n in figures for figures in per_run)]
        # Repeats of the same seed and checkpoints are not independent: they measure nothing of seed variation.
        origins = {(e["seed"], e["autoencoder"]["checkpoint"], e["classifier"]["checkpoint"]) for e in members}
        out.append(
            {
                "runs": [e["label"] for e in members],
                "seeds": [e["seed"] for e in members],
                "independent": len(origins) == len(members),
                "figures": {n: seed_interval([f[n] for f in per_run], level) for n in names},
            }
        )
    return out
