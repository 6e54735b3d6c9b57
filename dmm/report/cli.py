"""``python -m dmm.report RUN_DIR [RUN_DIR ...] --out REPORT_DIR``: build the report dict, write its files.

:func:`build_report` turns run folders into one JSON-able dict; :func:`write_report` renders it into
REPORT_DIR as PNG plots, image grids, ``report.json`` and (last) ``report.md``; :func:`main` also prints the
headline table (:func:`~dmm.report.markdown.markdown_table`) on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.report.checks import recorded_model_checks, reported_not_checked, run_checks
from dmm.report.figures import run_figures
from dmm.report.markdown import markdown_table, render_markdown
from dmm.report.plots import PLOTS
from dmm.report.provenance import autoencoder_facts, class_name, classifier_facts
from dmm.report.runs import Run, load_run, unique_labels
from dmm.report.seeds import seed_groups
from dmm.report.stats import LEVEL

log = logging.getLogger("dmm.report")

PUBLIC_REPLICATION = {
    "label": "public replication, 20 images",
    "note": "figures of the literature, shown for reference only and never used to compute ours",
    "dataset": "MNIST",
    "l2": {"full": 0.28, "on": 0.85, "off": 0.31},
    "sqrt_k_over_n": {"k": 16, "n": 784, "value": 0.143},
}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def run_entry(run: Run, stage: str, resamples: int, seed: int) -> dict:
    """One run's part of the report: provenance, settings, figures, checks."""
    log.info("report: %s (%s)", run.folder, run.json_path.name)
    fig = run_figures(run, resamples, seed)
    grid = run.json_path.with_suffix(".png")
    return {
        "label": run.label,
        "folder": str(run.folder),
        "results": str(run.json_path),
        "stage": run.payload.get("stage", stage),
        "epoch": run.payload.get("epoch"),
        "global_step": run.payload.get("global_step"),
        "seed": run.seed,
        "arms": run.arms,
        "dataset": class_name(run.config.get("data")),
        "classifier": classifier_facts(run),
        "autoencoder": autoencoder_facts(run),
        "settings": run.settings,
        "figures": fig,
        "model_checks": recorded_model_checks(run),
        "checks": run_checks(run, fig),
        "reported": reported_not_checked(fig),
        "grid": f"grid-{_slug(run.label)}.png" if grid.is_file() else None,
        "_grid_source": str(grid),
    }


def build_report(folders: list[str | Path], *, stage: str = "test", resamples: int = 2000, seed: int = 0) -> dict:
    """The whole report as one dict (JSON-able after :func:`json_ready`); :func:`write_report` renders it."""
    if resamples < 1:
        raise DmmError(f"--bootstrap must be >= 1, got {resamples}")
    runs = [load_run(folder, stage) for folder in folders]
    unique_labels(runs)
    entries = [run_entry(run, stage, resamples, seed) for run in runs]
    return {
        "stage": stage,
        "level": LEVEL,
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "method": "percentile bootstrap over images, one index tensor per run (paired figures resampled together)",
        },
        "rates": "Wilson score interval",
        "seed_level": "mean over runs of one experiment; crossed classifier x autoencoder seeds: two-way "
        "random-effects interval, variance (MS_C + MS_A)/(CA) (conservative), Satterthwaite df; other groups: "
        "Student-t, m - 1 df",
        "reference": PUBLIC_REPLICATION,
        "runs": entries,
        "seed_groups": seed_groups(entries),
        "plots": {name: file for name, (file, _) in PLOTS.items()},
    }


def json_ready(value):
    """Strict JSON: NaN and infinities become null; private keys (leading underscore) are dropped."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out: str | Path) -> Path:
    """Write the plots, image grids, ``report.json`` and (last) ``report.md`` into ``out``; return report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (_, plot) in PLOTS.items():
        plot(report, out / report["plots"][name])
    for e in report["runs"]:
        if e["grid"]:
            atomic_write(out / e["grid"], lambda tmp, src=e["_grid_source"]: shutil.copyfile(src, tmp))
    text = json.dumps(json_ready(report), indent=2, allow_nan=False)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(text))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(render_markdown(report)))
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    """``python -m dmm.report``; ``argv`` replaces ``sys.argv[1:]`` (for tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m dmm.report",
        description="Run folders -> report.md, report.json and plots: censored statistics with Wilson and "
        "bootstrap intervals over images, seed-level intervals over runs of one experiment, evaluation checks.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders with decomposition/ results")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="folder for report.md/json and plots")
    parser.add_argument("--stage", choices=("test", "val"), default="test", help="which results (default test)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="B", help="bootstrap resamples (2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_report(args.runs, stage=args.stage, resamples=args.bootstrap, seed=args.seed)
        path = write_report(report, args.out)
    except DmmError as error:
        sys.stderr.write(f"dmm report: error: {error}\n")
        sys.exit(2)
    log.info("wrote %s", path)
    sys.stdout.write(markdown_table(report) + "\n")
