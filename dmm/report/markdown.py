"""report.md from the report dict: headline tables, seed-level intervals, then one section per run.

Every function here reads only what ``report.json`` holds (in memory a "> eps" figure is +inf, in the JSON
it is null with its ``above_eps`` flag), so the tables can be rebuilt from the JSON alone.
"""

from __future__ import annotations

import math

from dmm.report.run_section import run_section
from dmm.report.runs import arm_label
from dmm.report.text import censored, estimate, number, ratio_text, table


def markdown_table(report: dict) -> str:
    """The headline: per run and arm, success rate and censored median; per run, fractions and ratios."""
    level = f"{100 * report['level']:.0f} %"
    arm_rows = [
        [
            e["label"],
            arm_label(a),
            f["attacked"],
            estimate(f["success_rate"], percent=True),
            censored(f["censored_median"]),
        ]
        for e in report["runs"]
        for a, f in e["figures"]["attacks"].items()
    ]
    pairs = list(dict.fromkeys(name for e in report["runs"] for name in e["figures"]["ratios"]))
    run_rows = []
    for e in report["runs"]:
        fig = e["figures"]
        fr = fig["fractions"]
        run_rows.append(
            [
                e["label"],
                f"{fig['k']} / {fig['n']}",
                estimate(fig["clean_acc"], percent=True),
                f"{estimate(fr['on_fraction_mean'])} ({number(fr['random_fraction_mean']['value'])}; "
                f"{fig['sqrt_k_over_n']:.3f})",
                *(ratio_text(fig["ratios"][p]) if p in fig["ratios"] else "—" for p in pairs),
            ]
        )
    norms = {e["figures"]["norm"] for e in report["runs"]}
    norm = norms.pop() if len(norms) == 1 else "each run's"
    ref = report["reference"]
    replication = " / ".join(f"{ref['l2'][a]:.2f}" for a in ("full", "on", "off"))
    lines = table(
        ["run", "attack", "attacked", f"success rate [Wilson {level}]", f"censored median {norm} norm [{level}]"],
        arm_rows,
    )
    lines += [""]
    lines += table(
        ["run", "k / n", "clean acc", "on-fraction (random subspace; sqrt(k/n))", *(f"ratio {p}" for p in pairs)],
        run_rows,
    )
    note = (
        f"Success rate: share of the correctly classified (attacked) images that the attack fooled within eps. "
        f"Censored median: the norm ({norm}, [0, 1] pixel space) by which more than half of the attacked images "
        f'were fooled, a failure counting as needing more than eps; "> eps" when half or more were not fooled. '
        f"Its interval is a {report['bootstrap']['resamples']}-resample bootstrap over images. On-fraction: mean "
        f"||d_on|| / ||d|| of the unconstrained perturbation over its successes, next to a random k-dim subspace's. "
        f"Ratio a/b: median over images both arms fooled of the per-image ratio of norms needed (paired bootstrap). "
        f"Reference only, not like for like: the {ref['label']} reports medians over each attack's own successes of "
        f"{replication} "
        f"(unconstrained / on / off, L2) and sqrt(k/n) = {ref['sqrt_k_over_n']['value']:.3f}; {ref['note']}."
    )
    return "\n".join(lines) + "\n\n" + note


def seed_table(report: dict) -> list[str]:
    """Seed-level intervals of each group of runs of one experiment (empty when no two runs match)."""
    level = f"{100 * report['level']:.0f} %"
    if not report["seed_groups"]:
        return [
            "No two runs share every setting (attack, arms, data, classifier and autoencoder types), so there "
            "are no seed-level intervals: each interval above is over images of one run only.",
            "",
        ]
    out = []
    for i, g in enumerate(report["seed_groups"], 1):
        seeds = ", ".join("n/a" if s is None else str(s) for s in g["seeds"])
        if g.get("design") == "crossed":
            design = (
                f"{g['classifiers']} classifiers x {g['autoencoders']} autoencoders, crossed: two-way "
                "random-effects interval, conservative variance (MS_C + MS_A)/(CA), Satterthwaite df"
            )
        else:
            design = "independent runs: Student-t interval over runs, m - 1 df"
        out += [
            f"**Group {i}**: {len(g['runs'])} runs ({', '.join(g['runs'])}; image-subset seeds {seeds}); {design}.",
            "",
        ]
        if not g["independent"]:
            out += [
                "*These runs repeat the same seed and checkpoints: their spread says nothing about seed variation.*",
                "",
            ]
        rows = []
        for name, f in g["figures"].items():
            per_run = ", ".join(number(v) for v in f["per_run"])
            if f["undefined"]:
                mean = f"n/a ({f['undefined']} of {f['runs']} runs undefined or > eps)"
            else:
                mean = estimate(f)
            df = f.get("df")
            rows.append([name, mean, "n/a" if df is None or math.isnan(df) else f"{df:.1f}", per_run])
        out += table(["figure", f"mean over runs [{level} t-interval]", "df", "per run"], rows) + [""]
    return out


def render_markdown(report: dict) -> str:
    b, plots = report["bootstrap"], report["plots"]
    runs = len(report["runs"])
    lines = [
        "# DMM reproduction report",
        "",
        f"Stage `{report['stage']}`; {runs} run{'s' if runs != 1 else ''} entered this report. "
        f"{report['level']:.0%} intervals: Wilson score intervals for rates; {b['method']}, {b['resamples']} "
        f"resamples, seed {b['seed']}, for medians, means and ratios; a Student-t interval over runs for "
        "seed-level figures (two-way random effects where classifiers and autoencoders are crossed).",
        "",
        markdown_table(report),
        "",
        f"![survival: P(norm needed > t)]({plots['survival']})",
        f"![robust accuracy vs eps]({plots['robust_accuracy']})",
        f"![on-manifold fraction]({plots['on_fraction']})",
        "",
        "## Seed-level intervals",
        "",
        *seed_table(report),
    ]
    for e in report["runs"]:
        lines += run_section(e)
    return "\n".join(lines)
