"""From run folders to a reproduction report: censored statistics with honest intervals, checks, plots.

``python -m dmm.report RUN_DIR [RUN_DIR ...] --out REPORT_DIR`` reads each run's latest
``decomposition/{stage}-epoch{N}.json`` and its per-image ``-samples.pt`` and writes ``report.md``,
``report.json`` (every figure of the Markdown) and PNG plots into REPORT_DIR.

An early-stopped attack that failed needed "more than eps", so every attack arm is summarised over all the
images it attacked: success rate with a Wilson interval, the censored median of the norm needed ("> eps"
when half or more were not fooled) with a bootstrap interval, and the survival curve P(norm needed > t).
Arms are compared image by image (paired ratios of norms needed where both succeeded), never by medians
over each arm's own successes. Runs of one experiment are pooled into seed-level intervals.

Modules: :mod:`~dmm.report.runs` reads run folders, :mod:`~dmm.report.provenance` finds their models,
:mod:`~dmm.report.stats` (bootstrap) and :mod:`~dmm.report.censored` (Wilson, censored medians, survival,
ratios) hold the statistics, :mod:`~dmm.report.seeds` pools runs, :mod:`~dmm.report.figures` computes a
run's figures, :mod:`~dmm.report.checks` its checks, :mod:`~dmm.report.markdown`,
:mod:`~dmm.report.run_section` and :mod:`~dmm.report.text` write report.md, :mod:`~dmm.report.plots` the
plots, and :mod:`~dmm.report.cli` ties them together.
"""

from dmm.report.censored import RATIO_PAIRS, norm_needed, paired_ratio, survival_curve, wilson_interval
from dmm.report.checks import run_checks
from dmm.report.cli import build_report, json_ready, main, write_report
from dmm.report.figures import run_figures
from dmm.report.markdown import markdown_table, render_markdown
from dmm.report.runs import ARM_LABELS, Run, arm_label, load_run
from dmm.report.seeds import seed_interval, student_t_quantile
from dmm.report.stats import (
    LEVEL,
    bootstrap,
    censored_estimate,
    censored_median,
    masked_mean,
    masked_median,
    random_subspace_expectation,
    rate,
    resample_indices,
)

__all__ = [
    "ARM_LABELS",
    "LEVEL",
    "RATIO_PAIRS",
    "Run",
    "arm_label",
    "bootstrap",
    "build_report",
    "censored_estimate",
    "censored_median",
    "json_ready",
    "load_run",
    "main",
    "markdown_table",
    "masked_mean",
    "masked_median",
    "norm_needed",
    "paired_ratio",
    "random_subspace_expectation",
    "rate",
    "render_markdown",
    "resample_indices",
    "run_checks",
    "run_figures",
    "seed_interval",
    "student_t_quantile",
    "survival_curve",
    "wilson_interval",
    "write_report",
]
