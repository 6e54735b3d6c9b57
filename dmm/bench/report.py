"""The suite's outputs: a text table, a JSON file and a Markdown section per machine and device.

Both files hold one entry per machine + device (``machine()["key"]``); a run replaces the benchmarks it
ran inside its own entry and leaves every other machine's figures alone, so a GPU section can be added
later next to a CPU one. Everything is rendered from the stored dicts, so a section can be rebuilt from
the JSON alone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from dmm.errors import DmmError
from dmm.io import atomic_write

WIDTHS = (44, 17, 17, 8, 8, 6, 11)  # text-table widths of all columns but the last (notes)
COLUMNS = ("benchmark", "ours", "reference", "ratio", "target", "status", "peak memory", "notes")
TITLE = "# dmm benchmarks\n\nWritten by `python -m dmm.bench --markdown`; one section per machine and device.\n"


def _quantity(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if unit.endswith("/s"):  # a throughput: img/s, img·steps/s
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if unit == "":  # a plain number: an error, a count
        return f"{value:.3g}"
    per = "/img" if unit == "s/img" else ""
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs{per}"
    if value < 1:
        return f"{value * 1e3:.3g} ms{per}"
    return f"{value:.3g} s{per}"


def cells(row: dict) -> list[str]:
    """The row (as stored in the JSON) as table cells, in ``COLUMNS`` order."""
    ratio = row["ratio"]
    target = row["target"]
    if target is None:
        target_text = ""
    else:
        limit = f"{target['at_most']:g}×" if target["of"] == "ratio" else _quantity(target["at_most"], row["unit"])
        target_text = f"≤ {limit}"
    return [
        row["name"],
        _quantity(row["ours"], row["unit"]),
        _quantity(row["reference"], row["unit"]),
        "—" if ratio is None else f"{ratio:.3g}×",
        target_text,
        row["status"],
        "—" if row["peak_mb"] is None or not math.isfinite(row["peak_mb"]) else f"{row['peak_mb']:,.0f} MiB",
        row["note"],
    ]


def text_header() -> str:
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, WIDTHS, strict=False)) + "  " + COLUMNS[-1]
    return line + "\n" + "-" * len(line)


def text_rows(result: dict) -> str:
    """One benchmark's rows as fixed-width text lines (printed as each benchmark finishes)."""
    if "error" in result:
        return f"{result['name']:<{WIDTHS[0]}}  FAILED: {result['error']}"
    lines = []
    for row in result["rows"]:
        values = cells(row)
        lines.append("  ".join(v.ljust(w) for v, w in zip(values, WIDTHS, strict=False)) + "  " + values[-1])
    return "\n".join(lines)


def update_json(path: Path, machine: dict, results: dict[str, dict]) -> dict:
    """Merge ``results`` into this machine's entry of the JSON file at ``path``; return that entry."""
    data = {"machines": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
            raise DmmError(f"{path} is not a dmm.bench results file; move it away or pass another --out")
    entry = data["machines"].setdefault(machine["key"], {"machine": machine, "benchmarks": {}})
    entry["machine"] = machine
    entry["benchmarks"].update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n"))
    return entry


def _markers(key: str) -> tuple[str, str]:
    key = key.replace("--", "- -")  # "--" would end the HTML comment
    return f"<!-- dmm-bench: {key} -->", f"<!-- /dmm-bench: {key} -->"


def markdown_section(entry: dict) -> str:
    """A Markdown section for one machine + device entry, between markers that locate it on rewrite."""
    m = entry["machine"]
    begin, end = _markers(m["key"])
    lines = [
        begin,
        f"## {m['device']} — {m['cpu']}, {m['threads']} torch thread{'s' * (m['threads'] != 1)}",
        "",
        f"torch {m['torch']}, lightning {m['lightning']}, Python {m['python']}; last run {m['date']}.",
        "Ratio = our cost ÷ the reference's (time, or inverse throughput): below 1 is faster; targets are upper "
        "bounds. Peak memory: on CPU the peak RSS of the benchmark's process (imports included), on CUDA the "
        "peak allocated by ours.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    runs = []
    for name, result in entry["benchmarks"].items():
        for row in result["rows"]:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(row)) + " |")
        size = "QUICK sizes, figures not meaningful" if result.get("quick") else "full sizes"
        load = "–".join(f"{v:.1f}" for v in result["load_average"])
        speed = f", {result['speed']}" if name.startswith("cifar_") and result.get("speed") else ""
        runs.append(
            f"{name} {result['date']} ({size}{speed}, {result['seconds']:.0f} s, load average {load}, "
            f"process RSS {result['rss_before_mb']:,.0f} MiB before it)"
        )
    lines += ["", "Runs: " + "; ".join(runs) + ".", end]
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, entry: dict) -> None:
    """Replace this machine's section of the Markdown file at ``path`` (or append it), keeping the rest."""
    section = markdown_section(entry)
    text = path.read_text() if path.is_file() else TITLE
    begin, end = _markers(entry["machine"]["key"])
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))
