"""Every figure of one run, recomputed from its per-image records.

Binomial rates (clean accuracy, success rates, robust accuracy) carry Wilson intervals; everything else a
percentile bootstrap over images with one index tensor per run. Norms are in the attack's own norm
(``settings["norm"]``, the one its budget eps bounds), in [0, 1] pixel space.
"""

from __future__ import annotations

import math

import torch

from dmm.report.censored import RATIO_PAIRS, norm_needed, paired_ratio, survival_curve, wilson_interval
from dmm.report.runs import Run, arm_label
from dmm.report.stats import (
    bootstrap,
    censored_estimate,
    masked_mean,
    masked_median,
    random_subspace_expectation,
    resample_indices,
)

TOLERANCE = 1e-6  # a success at eps + rounding counts within eps (the rule of dmm.decomposition.summarize)


def reach(settings: dict) -> float:
    """The largest norm the attack can reach: steps x step size (each PGD step moves at most one step size)."""
    step = settings["step_size"] if settings["step_size"] is not None else 2.5 * settings["eps"] / settings["steps"]
    return settings["steps"] * step


def _wilson(hits, among) -> dict:
    return wilson_interval(int((hits & among).sum()), int(among.sum()))


def arm_figures(run: Run, arm: str, idx) -> dict:
    """Success rate [Wilson], censored median norm [bootstrap], survival curve; own-success medians apart."""
    r, s = run.records, run.settings
    correct, eps = r["correct"].bool(), float(s["eps"])
    ok = r[f"{arm}_success"].bool() & correct  # by contract a success is a correctly classified image fooled
    needed = norm_needed(r[f"{arm}_{s['norm']}"], ok, eps)
    return {
        "label": arm_label(arm),
        "attacked": int(correct.sum()),
        "successes": int(ok.sum()),
        "success_rate": _wilson(ok, correct),
        "censored_median": censored_estimate(needed, correct, idx, eps),
        "survival": survival_curve(needed[correct], eps),
        # Over each arm's own successes only: subsets differ between arms, so never compare these across arms.
        "own_successes": {
            "l2_median": bootstrap(masked_median, [r[f"{arm}_l2"], ok], idx),
            "l2_mean": bootstrap(masked_mean, [r[f"{arm}_l2"], ok], idx),
            "linf_median": bootstrap(masked_median, [r[f"{arm}_linf"], ok], idx),
        },
    }


def ratios(run: Run, idx) -> dict:
    """Paired ratios of norms needed, ``"on/full"`` etc., over images both arms fooled (pairs in RATIO_PAIRS)."""
    r, norm, correct = run.records, run.settings["norm"], run.records["correct"].bool()
    out = {}
    for num, den in RATIO_PAIRS:
        if num in run.arms and den in run.arms:
            both = r[f"{num}_success"].bool() & r[f"{den}_success"].bool() & correct
            out[f"{num}/{den}"] = paired_ratio(r[f"{num}_{norm}"], r[f"{den}_{norm}"], both, idx)
    return out


def robust_accuracy(run: Run) -> tuple[list[dict], list[float]]:
    """Upper bound on robust accuracy at each budget from the early-stopped run, and the budgets left out.

    An image counts as robust at eps when it is correct and the unconstrained attack did not fool it with
    a norm <= eps. This is not a fixed-budget attack at each eps (that could only find more), and budgets
    above the largest norm the attack could reach were never tried.
    """
    r, s = run.records, run.settings
    correct, full_ok = r["correct"].bool(), r["full_success"].bool()
    needed, everyone = r[f"full_{s['norm']}"], torch.ones_like(correct)
    top = min(float(s["eps"]), reach(s))
    curve_eps = [float(e) for e in run.payload["eps_curve"]]
    budgets = sorted({0.0, top, *(e for e in curve_eps if e <= top + 1e-9)})
    curve = [{"eps": eps, **_wilson(correct & ~(full_ok & (needed <= eps + TOLERANCE)), everyone)} for eps in budgets]
    return curve, sorted(e for e in curve_eps if e > top + 1e-9)


PARTS = ("on", "off", "random", "random_off")
"""The parts of d whose effect alone is recorded: in the tangent space, its complement, and the random null's."""


def parts(r: dict, correct, full_ok, idx) -> dict:
    """Whether each part of d alone fools (Wilson) and its median share of the margin drop (bootstrap), for the
    early-stopped d (over its successes) and, ``budget_`` prefixed, the full-budget one (over its successes);
    the distances to the manifold model at the tangent's foot point (and at D(E(x)) when it was refined)."""
    out: dict = {"part_fools": {}, "margin_share": {}, "recon_error": {}}
    budget_ok = r["budget_fools"].bool() & correct if "budget_fools" in r else None
    for prefix, among in (("", full_ok), ("budget_", budget_ok)):
        for p in PARTS:
            if among is not None and f"{prefix}{p}_part_fools" in r:
                out["part_fools"][prefix + p] = _wilson(r[f"{prefix}{p}_part_fools"].bool(), among)
            if among is not None and f"{prefix}{p}_margin_share" in r:
                out["margin_share"][prefix + p] = bootstrap(masked_median, [r[f"{prefix}{p}_margin_share"], among], idx)
    for key in ("recon_error", "recon_error_encoder"):
        if key in r:
            out["recon_error"][key] = bootstrap(masked_median, [r[key], correct], idx)
    # On data with a known manifold: the learned tangent against the exact one (the instrument's error).
    out["exact"] = {key: bootstrap(masked_median, [r[key], among], idx)
                    for key, among in (("exact_angle_mean", correct), ("exact_angle_max", correct),
                                       ("exact_on_fraction", full_ok), ("on_fraction", full_ok))
                    if "exact_angle_mean" in r and key in r}  # fmt: skip
    return out


def run_figures(run: Run, resamples: int, seed: int) -> dict:
    """Every figure of one run; estimates are ``{"value", "ci", ...}`` dicts (see the module docstring)."""
    r = run.records
    correct = r["correct"].bool()
    n_images = correct.numel()
    idx = resample_indices(n_images, resamples, seed)
    full_ok = r["full_success"].bool() & correct
    k, n = int(run.payload["latent_dim"]), math.prod(run.payload["input_shape"])
    fractions = {
        f"{key}_{stat}": bootstrap(fn, [r[key], full_ok], idx)
        for key in ("on_fraction", "random_fraction")
        for stat, fn in (("mean", masked_mean), ("median", masked_median))
    }
    fractions["on_minus_random_mean"] = bootstrap(masked_mean, [r["on_fraction"] - r["random_fraction"], full_ok], idx)
    curve, left_out = robust_accuracy(run)
    bins = torch.linspace(0, 1, 21)
    return {
        "num_images": n_images,
        "num_correct": int(correct.sum()),
        "norm": run.settings["norm"],
        "eps": float(run.settings["eps"]),
        "clean_acc": _wilson(correct, torch.ones_like(correct)),
        "attacks": {a: arm_figures(run, a, idx) for a in run.arms},
        "ratios": ratios(run, idx),
        "fractions": fractions,
        "k": k,
        "n": n,
        "sqrt_k_over_n": math.sqrt(k / n),
        "random_expectation": random_subspace_expectation(k, n),
        # Optional records: shown when the run saved them.
        **parts(r, correct, full_ok, idx),
        "leak": {
            f"{p}_{stat}": bootstrap(fn, [r[f"leak_{p}"], correct], idx)
            for p in ("on", "off")
            if f"leak_{p}" in r
            for stat, fn in (("mean", masked_mean), ("median", masked_median))
        },
        "robust_accuracy": curve,
        "curve_left_out": left_out,
        "histogram": {
            "edges": bins.tolist(),
            "on_fraction": torch.histogram(r["on_fraction"][full_ok].float(), bins).hist.long().tolist(),
            "random_fraction": torch.histogram(r["random_fraction"][full_ok].float(), bins).hist.long().tolist(),
        },
    }
