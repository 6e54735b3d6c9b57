"""PNG plots of a report: survival curves of the norm needed, robust accuracy vs eps, on-fraction histograms.

Each draws on a bare matplotlib ``Figure`` (Agg, no pyplot state), so importers keep their own backend.
"""

from __future__ import annotations

from pathlib import Path

from dmm.io import atomic_write
from dmm.report.runs import arm_label


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def _norm_name(report: dict) -> str:
    norms = {e["figures"]["norm"] for e in report["runs"]}
    return {"l2": "L2", "linf": "Linf"}.get(norms.pop(), "?") if len(norms) == 1 else "each run's"


def plot_survival(report: dict, path: Path) -> None:
    """One panel per run, every arm's P(norm needed > t) on [0, eps] as a step curve, censored at eps."""
    runs = report["runs"]
    fig = _figure(4.8 * len(runs), 3.8)
    for i, e in enumerate(runs):
        ax, eps = fig.add_subplot(1, len(runs), i + 1), e["figures"]["eps"]
        for arm, f in e["figures"]["attacks"].items():
            curve = f["survival"]
            if curve["t"]:
                line = ax.step(curve["t"], curve["survival"], where="post", label=arm_label(arm))[0]
                # The curve stops at eps: what is left there needed more than eps (censored).
                ax.plot([eps], [curve["survival"][-1]], marker=">", color=line.get_color())
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(
            xlabel=f"t: {_norm_name(report)} norm in [0,1] pixel space",
            ylabel="P(norm needed > t)",
            xlim=(0, eps * 1.02),
            ylim=(-0.02, 1.02),
            title=f"{e['label']} (censored at eps = {eps:g})",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Survival of the attacked images; each curve crosses the dotted 1/2 at its censored median")
    _save(fig, path)


def plot_robust_accuracy(report: dict, path: Path) -> None:
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    for e in report["runs"]:
        curve = e["figures"]["robust_accuracy"]
        eps = [p["eps"] for p in curve]
        line = ax.plot(eps, [100 * p["value"] for p in curve], marker="o", label=e["label"])[0]
        low, high = ([100 * p["ci"][j] for p in curve] for j in (0, 1))
        ax.fill_between(eps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(
        xlabel=f"eps: {_norm_name(report)} norm in [0,1] pixel space",
        ylabel="robust accuracy, upper bound (%)",
        ylim=(-2, 102),
        title="Upper bound from the early-stopped norm-needed run\n(not a fixed-budget attack; shaded: Wilson "
        f"{report['level']:.0%})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_on_fraction(report: dict, path: Path) -> None:
    runs = report["runs"]
    fig = _figure(4.5 * len(runs), 3.6)
    for i, e in enumerate(runs):
        ax, h, fg = fig.add_subplot(1, len(runs), i + 1), e["figures"]["histogram"], e["figures"]
        ax.stairs(h["on_fraction"], h["edges"], label="classifier's perturbation", linewidth=1.5)
        ax.stairs(
            h["random_fraction"], h["edges"], label=f"random {fg['k']}-dim subspace", linewidth=1.5, linestyle="--"
        )
        ax.axvline(fg["sqrt_k_over_n"], color="black", linestyle=":", label=f"sqrt(k/n) = {fg['sqrt_k_over_n']:.3f}")
        ax.set(
            xlabel="||d_on|| / ||d|| (fraction of the L2 norm)", ylabel="fooled images", xlim=(0, 1), title=e["label"]
        )
        ax.legend(fontsize="small")
    _save(fig, path)


PLOTS = {
    "survival": ("survival.png", plot_survival),
    "robust_accuracy": ("robust_accuracy.png", plot_robust_accuracy),
    "on_fraction": ("on_fraction_hist.png", plot_on_fraction),
}
