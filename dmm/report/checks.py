"""Checks a careful evaluation needs, each one able to fail (Carlini et al. 2019; auto-attack's ``checks.py``).

They print PASS or WARN and never stop the report. Checks on the model itself (logits not probabilities,
non-zero input gradients, iterative beats one-step, determinism) are run by the evaluation before it
attacks and saved as ``model_checks`` in its JSON; the report only shows them (:func:`recorded_model_checks`).
"""

from __future__ import annotations

import math

from dmm.report.figures import reach
from dmm.report.runs import Run, arm_label

MIN_IMAGES = 100


def check(name: str, passed: bool, detail: str, advice: str = "") -> dict:
    """One PASS/WARN line; ``advice`` (what a WARN means or what to do) is shown only on WARN."""
    if not passed and advice:
        detail += f": {advice}"
    return {"name": name, "status": "PASS" if passed else "WARN", "detail": detail}


def recorded_model_checks(run: Run) -> list[dict] | None:
    """The ``model_checks`` the evaluation saved, as PASS/WARN lines; None for runs that saved none."""
    saved = run.payload.get("model_checks")
    if not isinstance(saved, list):
        return None
    return [
        {"name": str(c.get("name", "?")), "status": str(c.get("status", "?")), "detail": str(c.get("detail", ""))}
        for c in saved
        if isinstance(c, dict)
    ]


def _close(a: float, b) -> bool:
    b = math.nan if b is None else float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b))


def recomputed_summary(fig: dict) -> dict[str, float]:
    """Our figures under the names :func:`dmm.decomposition.summarize` logs them."""
    ours = {"num_images": float(fig["num_images"]), "clean_acc": fig["clean_acc"]["value"]}
    ours |= {f"robust_acc@{p['eps']:g}": p["value"] for p in fig["robust_accuracy"]}
    for a, f in fig["attacks"].items():
        ours[f"{a}/success_rate"] = f["success_rate"]["value"]
        ours[f"{a}/l2_median"] = f["own_successes"]["l2_median"]["value"]
        ours[f"{a}/l2_mean"] = f["own_successes"]["l2_mean"]["value"]
    ours |= {key: e["value"] for key, e in fig["fractions"].items() if key != "on_minus_random_mean"}
    ours |= {f"leak_{key}": e["value"] for key, e in fig["leak"].items()}
    ours |= {f"{p}_part_fools_rate": e["value"] for p, e in fig["part_fools"].items() if "budget" not in p}
    return ours


def _sign_test(more: int, fewer: int) -> float:
    """One-sided P(X >= more) for X ~ Binomial(more + fewer, 1/2): discordant images, no difference expected."""
    n = more + fewer
    return sum(math.comb(n, i) for i in range(more, n + 1)) / 2**n if n else 1.0


def strongest_is_unconstrained(run: Run) -> dict:
    """No restricted arm fools more images than the unconstrained attack (its subspace lies inside the space).

    Only success counts: norms needed are resolved to about one step size, and a projected step is shorter,
    so a restricted arm may stop a fraction of a step earlier without being a stronger attack.
    """
    r, correct = run.records, run.records["correct"].bool()
    full = r["full_success"].bool() & correct
    beaten = []
    for a in (a for a in run.arms if a != "full"):
        ok = r[f"{a}_success"].bool() & correct
        only_arm, only_full = int((ok & ~full).sum()), int((full & ~ok).sum())
        if _sign_test(only_arm, only_full) < 0.05:
            beaten.append(f"{a} fooled {only_arm} images the unconstrained attack did not (and it {only_full} others)")
    return check(
        "the unconstrained attack fools at least as many images as every restricted arm",
        not beaten,
        f"arms compared: {', '.join(a for a in run.arms if a != 'full') or 'none'}",
        f"{'; '.join(beaten)}, significantly more (sign test, p < 0.05): the unconstrained attack misses "
        "adversarial examples within eps; raise its steps or restarts",
    )


def run_checks(run: Run, fig: dict) -> list[dict]:
    """Checks that need only the saved results, in the order of report.md."""
    s, logged = run.settings, run.payload["summary"]
    full = fig["attacks"]["full"]["success_rate"]["value"]
    ours = recomputed_summary(fig)
    compared = [key for key in ours if key in logged]
    differ = [key for key in compared if not _close(ours[key], logged[key])]
    baseline, expected = fig["fractions"]["random_fraction_mean"], fig["random_expectation"]
    low, high = baseline["ci"]
    return [
        check(
            "unconstrained attack fools ~all correctly classified images at the largest budget",
            full >= 0.99,
            f"{100 * full:.1f} % at eps={s['eps']:g} ({s['norm']}, {s['steps']} steps)",
            "raise --decomposition.eps or --decomposition.steps; censored medians and ratios then say more",
        ),
        strongest_is_unconstrained(run),
        check(
            "the attack can reach its budget",
            reach(s) >= s["eps"] - 1e-9,
            f"steps x step size = {reach(s):g} vs eps = {s['eps']:g}",
            "the effective budget is the smaller one; raise --decomposition.steps or --decomposition.step_size",
        ),
        check(
            "figures recomputed from the samples equal the logged summary",
            not differ,
            f"{len(compared)} figures compared (those in both)",
            f"these differ: {differ}",
        ),
        check(
            "random-subspace baseline agrees with theory",
            low <= expected <= high,
            f"mean {baseline['value']:.3f} [{low:.3f}, {high:.3f}], theory E = {expected:.3f} "
            f"(sqrt(k/n) = {fig['sqrt_k_over_n']:.3f})",
            "the theoretical mean is outside the 95 % interval (expected in 1 run of 20 by chance)",
        ),
        check(
            "enough images for tight intervals",
            fig["num_correct"] >= MIN_IMAGES,
            f"{fig['num_correct']} correctly classified of {fig['num_images']}",
            f"fewer than {MIN_IMAGES} give wide intervals; raise --decomposition.num_images",
        ),
    ]


def reported_not_checked(fig: dict) -> list[str]:
    """Comparisons shown beside the checks that have no PASS/WARN rule."""
    ratio = fig["ratios"].get("off/random_off")
    if ratio is None:
        return []
    low, high = ratio["ci"]
    return [
        f"off-manifold vs the random subspace's complement (same dimension n - k): paired ratio of norms needed "
        f"{ratio['value']:.3f} [{low:.3f}, {high:.3f}] over {ratio['pairs']} images both fooled "
        f"({arm_label('off')} / {arm_label('random_off')})"
    ]
