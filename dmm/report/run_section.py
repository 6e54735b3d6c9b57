"""One run's section of report.md: provenance, per-arm figures, fractions, ratios, robust accuracy, checks."""

from __future__ import annotations

from pathlib import Path

from dmm.report.runs import arm_label
from dmm.report.text import censored, estimate, ratio_text, table

KNOWN_SETTINGS = {"eps", "norm", "steps", "step_size", "clamp", "early_stop"}


def _training(adversary) -> str:
    if adversary is None:
        return "standard training"
    if isinstance(adversary, dict):
        return "adversarial training (" + ", ".join(f"{k}={v}" for k, v in adversary.items()) + ")"
    return "training n/a (checkpoint not found)"


def _provenance(e: dict) -> list[str]:
    fig, s, ae = e["figures"], e["settings"], e["autoencoder"]
    mse = "n/a" if ae["mse"] is None else f"{ae['mse']:.4g} ({ae['mse_source']})"
    extra = "".join(f", {k}={v}" for k, v in ae["extra"].items())
    other = ", ".join(f"{k}={v}" for k, v in s.items() if k not in KNOWN_SETTINGS)
    step = s["step_size"] if s["step_size"] is not None else "2.5 eps / steps"
    return [
        f"- Folder: `{e['folder']}`; results `{Path(e['results']).name}` (stage {e['stage']}, epoch {e['epoch']}, "
        f"step {e['global_step']}); seed {e['seed'] if e['seed'] is not None else 'n/a'}",
        f"- Dataset: {e['dataset']}; classifier: {e['classifier']['class']} ({e['classifier']['network']}), "
        f"{_training(e['classifier'].get('adversary', 'n/a'))}; checkpoint `{e['classifier']['checkpoint']}`",
        f"- Autoencoder: {ae['class']} ({ae['encoder']} / {ae['decoder']}, k = {ae['latent_dim']}{extra}), "
        f"reconstruction MSE {mse}; checkpoint `{ae['checkpoint']}`",
        f"- Attack: {'early-stopped ' if s.get('early_stop', True) else ''}PGD, {s['norm']} eps = {s['eps']:g}, "
        f"{s['steps']} steps, step size {step}, clamp to [0, 1] {s['clamp']}"
        + (f"; other settings: {other}" if other else ""),
        f"- Arms: {'; '.join(f'{a} = {arm_label(a)}' for a in e['arms'])}",
        f"- Images: {fig['num_images']} ({fig['num_correct']} correctly classified, the attacked ones); clean "
        f"accuracy {estimate(fig['clean_acc'], percent=True)}",
    ]


def _arms(e: dict) -> list[str]:
    fig = e["figures"]
    norm = fig["norm"]
    rows = [
        [
            f["label"],
            estimate(f["success_rate"], True),
            f"{f['successes']} / {f['attacked']}",
            censored(f["censored_median"]),
            estimate(f["own_successes"]["l2_median"]),
            estimate(f["own_successes"]["l2_mean"]),
        ]
        for f in fig["attacks"].values()
    ]
    head = ["attack", "success rate [Wilson]", "fooled", f"censored median {norm} [CI]"]
    head += ["median L2 over its own successes", "mean L2 over its own successes"]
    out = table(head, rows)
    out += [
        "",
        "The last two columns describe only the images each attack fooled; the subsets differ between attacks, so "
        "do not compare them across attacks (use the censored medians, the survival curves and the paired ratios).",
        "",
    ]
    if fig["ratios"]:
        out += table(
            ["paired ratio of norms needed", "median [CI] (pairs)"],
            [[name, ratio_text(r)] for name, r in fig["ratios"].items()],
        )
        out += [""]
    return out


def _fractions(e: dict) -> list[str]:
    fig = e["figures"]
    fr = fig["fractions"]
    out = table(
        ["on-manifold fraction of the unconstrained d", "mean", "median"],
        [
            ["classifier's perturbation", estimate(fr["on_fraction_mean"]), estimate(fr["on_fraction_median"])],
            [
                f"random {fig['k']}-dim subspace (baseline)",
                estimate(fr["random_fraction_mean"]),
                estimate(fr["random_fraction_median"]),
            ],
            ["difference (paired)", estimate(fr["on_minus_random_mean"]), ""],
            [
                f"theory: sqrt(k/n) = sqrt({fig['k']}/{fig['n']})",
                f"{fig['sqrt_k_over_n']:.3f}",
                f"(exact E = {fig['random_expectation']:.3f})",
            ],
        ],
    )
    out += [""]
    out += _parts(fig)
    if not e["settings"]["clamp"]:
        out += ["No clamping: the constrained attacks stay exactly in their subspaces (no leak).", ""]
    elif {"on_mean", "off_mean"} <= fig["leak"].keys():
        lk = fig["leak"]
        out += [
            f"Leak (clamping to [0, 1] moves part of a constrained perturbation out of its subspace): "
            f"on-manifold attack {estimate(lk['on_mean'])} of its norm off the tangent space (median "
            f"{estimate(lk['on_median'])}); off-manifold attack {estimate(lk['off_mean'])} on it (median "
            f"{estimate(lk['off_median'])}).",
            "",
        ]
    return out


def _parts(fig: dict) -> list[str]:
    """Each part of d alone, early-stopped and full-budget, next to the random null's parts."""
    fools, shares = fig.get("part_fools", {}), fig.get("margin_share", {})
    rows = []
    for prefix, label in (("", "early-stopped d"), ("budget_", "full-budget d")):
        for part, name in (("on", "tangent part"), ("off", "its complement"), ("random", "random k-dim part"),
                           ("random_off", "its complement")):  # fmt: skip
            key = prefix + part
            if key in fools:
                share = estimate(shares[key]) if key in shares else ""
                rows.append([f"{label}: {name}", estimate(fools[key], True), share])
    out = []
    if rows:
        out += table(["part of d (alone, clamped)", "fools", "median share of the margin drop"], rows) + [""]
    exact = fig.get("exact", {})
    if exact:
        mean, most = estimate(exact["exact_angle_mean"]), estimate(exact["exact_angle_max"])
        learned, true = estimate(exact["on_fraction"]), estimate(exact["exact_on_fraction"])
        out += [f"Against the data's exact manifold (medians): principal angles between the learned and the exact "
                f"tangent space {mean} degrees on average, {most} at most; on-fraction of d {learned} in the "
                f"learned tangent space, {true} in the exact one.", ""]  # fmt: skip
    recon = fig.get("recon_error", {})
    if "recon_error_encoder" in recon:
        at_encoder, refined = estimate(recon["recon_error_encoder"]), estimate(recon["recon_error"])
        out += [f"Distance to the manifold model (median): {at_encoder} at D(E(x)), {refined} at the refined foot "
                "point where the tangents were taken.", ""]  # fmt: skip
    elif "recon_error" in recon:
        out += [f"Distance to the manifold model ||x - D(E(x))|| (median): {estimate(recon['recon_error'])}.", ""]
    return out


def _robust_accuracy(e: dict) -> list[str]:
    fig = e["figures"]
    out = [
        "Robust accuracy: upper bound from the early-stopped norm-needed run (not a fixed-budget attack at each "
        "eps); an image counts as robust when correct and not fooled within that eps.",
        "",
    ]
    rows = [[f"{p['eps']:g}", estimate(p, True)] for p in fig["robust_accuracy"]]
    out += table(["eps", "robust accuracy (upper bound) [Wilson]"], rows)
    if fig["curve_left_out"]:
        out += [
            "",
            f"Left out of the curve: eps {', '.join(f'{x:g}' for x in fig['curve_left_out'])}, above the "
            "largest norm the attack could reach (min(eps, steps x step size)); it never tried them.",
        ]
    return out + [""]


def _checks(e: dict) -> list[str]:
    out = ["### Checks a careful evaluation needs", ""]
    if e["model_checks"] is None:
        out += ["- Model checks (logits, gradients, one-step vs iterative): not recorded (an older run)."]
    else:
        out += [f"- **{c['status']}** (model, by the evaluation) {c['name']}: {c['detail']}" for c in e["model_checks"]]
    out += [f"- **{c['status']}** {c['name']}: {c['detail']}" for c in e["checks"]]
    if e["reported"]:
        out += ["", "Reported, not checked:", ""] + [f"- {line}" for line in e["reported"]]
    return out


def run_section(e: dict) -> list[str]:
    """The Markdown lines of one run (``e`` is one entry of ``report["runs"]``)."""
    out = [f"## {e['label']}", "", *_provenance(e), "", *_arms(e), *_fractions(e), *_robust_accuracy(e)]
    out += _checks(e)
    if e["grid"]:
        out += [
            "",
            f"![x, x_adv, d, d_on, d_off of {e['label']}]({e['grid']})",
            "",
            "Rows: x | x_adv | d | d_on | d_off (perturbations amplified around mid-grey).",
        ]
    return out + [""]
