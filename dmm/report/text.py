"""Figures as Markdown text: numbers, estimates with intervals, censored medians ("> eps"), tables."""

from __future__ import annotations

import math


def number(v, percent: bool = False) -> str:
    """A figure as text: 3 decimals, or a percentage; n/a for NaN (or None, as report.json stores NaN)."""
    if v is None or math.isnan(v):
        return "n/a"
    return f"{100 * v:.1f} %" if percent else f"{v:.3f}"


def estimate(e: dict, percent: bool = False) -> str:
    """``0.493 [0.410, 0.550]``: estimate and CI; rates as percentages; n/a where undefined."""
    value = number(e["value"], percent)
    return value if value == "n/a" else f"{value} [{number(e['ci'][0], percent)}, {number(e['ci'][1], percent)}]"


def censored(e: dict) -> str:
    """A censored median and its CI, each part "> eps" where it lies above the budget: ``1.203 [1.16, > 4]``."""
    parts = [
        f"> {e['eps']:g}" if above else number(v)
        for v, above in zip([e["value"], *e["ci"]], e["above_eps"], strict=True)
    ]
    return parts[0] if parts[0] == "n/a" else f"{parts[0]} [{parts[1]}, {parts[2]}]"


def ratio_text(e: dict) -> str:
    return "n/a (no image fooled by both)" if not e["pairs"] else f"{estimate(e)} ({e['pairs']} pairs)"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]
