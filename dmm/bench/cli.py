"""``python -m dmm.bench``: run the benchmarks, each in a fresh process, print the table, record it."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmm.bench import BENCHMARKS, GPU_SIZED, default_benchmarks
from dmm.bench.core import Options, machine, process_peak_rss_mb
from dmm.bench.report import text_header, text_rows, update_json, update_markdown
from dmm.bench.speed import Speed
from dmm.errors import DmmError

log = logging.getLogger("dmm.bench")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dmm.bench",
        description="Benchmarks of dmm's attacks, tangent spaces, projections, decompositions and training. "
        "On a CPU the default set is sized for about 10 minutes on 2 idle cores; `--device cuda` adds the "
        "GPU-sized CIFAR benchmarks; --quick takes seconds.",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"of {', '.join(BENCHMARKS)} (default: all on cuda; on cpu all but {', '.join(GPU_SIZED)})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; figures not meaningful)")
    parser.add_argument(
        "--out", type=Path, default=Path("BENCHMARKS.json"), metavar="JSON", help="results, merged per machine"
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="MD", help="Markdown file whose section for this machine is rewritten"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("../shared/data"), metavar="DIR", help="folder with MNIST/raw"
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=default_device, help="cuda falls back to cpu when there is none"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="classifiers' forward pass in the training and attack benchmarks (cifar_pgd, cifar_train), timed "
        "against fp32; never for tangent bases or projections (default: bf16 on cuda, fp32 on cpu)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last memory format there too (default: on for cuda, off for cpu)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the classifiers there too (eager if it fails)"
    )
    parser.add_argument("--classifier", type=Path, metavar="CKPT", help="trained MNIST classifier checkpoint (dmm fit)")
    parser.add_argument(
        "--autoencoder", type=Path, metavar="CKPT", help="trained MNIST autoencoder checkpoint (dmm fit)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"torch CPU threads (default: torch's choice, {torch.get_num_threads()} here)",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="run all in this process (peak memory is then shared)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: write one result here
    return parser.parse_args(argv)


def run_benchmark(name: str, opts: Options) -> dict:
    """Run one benchmark in this process; its result as stored in the JSON."""
    torch.manual_seed(0)
    start, rss_before, load_before = time.perf_counter(), process_peak_rss_mb(), os.getloadavg()[0]
    rows = importlib.import_module(BENCHMARKS[name]).run(opts)
    return {
        "name": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": opts.quick,
        "seconds": time.perf_counter() - start,
        # The 1-minute load average before and after: figures from a busy machine say so.
        "load_average": [load_before, os.getloadavg()[0]],
        "speed": str(opts.speed),
        "rss_before_mb": rss_before,
        "peak_rss_mb": process_peak_rss_mb(),
        "rows": [row.as_dict() for row in rows],
    }


def _run_isolated(name: str, args: argparse.Namespace) -> dict:
    """Run one benchmark in a fresh interpreter, so its peak memory is its own."""
    forward = ["--data-dir", str(args.data_dir), "--device", args.device, "--precision", args.precision]
    forward += ["--channels-last" if args.channels_last else "--no-channels-last"]
    forward += ["--quick"] * args.quick + ["--compile"] * args.compile
    for flag in ("classifier", "autoencoder", "threads"):
        if getattr(args, flag) is not None:
            forward += [f"--{flag}", str(getattr(args, flag))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "dmm.bench", "--only", name, "--child", str(out), *forward]
        done = subprocess.run(command, stdout=sys.stderr)  # the child's chatter is status, not the table
        if done.returncode != 0 or not out.is_file():
            return {"name": name, "error": f"exit status {done.returncode}; see the log above"}
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` replaces ``sys.argv[1:]`` (for tests). Returns 1 when a benchmark failed."""
    if not log.handlers:  # our status lines only; Lightning configures its own logger
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda, but torch sees no CUDA device: running on the CPU instead (CPU figures)")
        args.device = "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise DmmError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = args.only or default_benchmarks(args.device)
    speed = Speed(args.precision, args.channels_last, args.compile)
    opts = Options(args.device, args.quick, args.data_dir, args.classifier, args.autoencoder, speed)
    if args.child is not None:  # a child runs exactly one benchmark and hands its result back in a file
        args.child.write_text(json.dumps(run_benchmark(names[0], opts)))
        return 0
    info = machine(args.device)
    sys.stdout.write(f"{info['key']}; torch {info['torch']}, lightning {info['lightning']}; {speed}\n")
    sys.stdout.write(text_header() + "\n")
    failed = False
    for name in names:
        log.info("running %s%s", name, " in this process" if args.in_process else " in a fresh process")
        result = run_benchmark(name, opts) if args.in_process else _run_isolated(name, args)
        sys.stdout.write(text_rows(result) + "\n")
        sys.stdout.flush()
        if "error" in result:  # keep the figures of the last run that worked
            failed = True
            continue
        entry = update_json(args.out, info, {name: result})
        if args.markdown is not None:
            update_markdown(args.markdown, entry)
    log.info("results in %s%s", args.out, f" and {args.markdown}" if args.markdown else "")
    return int(failed)
