"""``python -m dmm.regimes``: Melamed et al.'s regimes, init scale x weight decay x seeds, on exact-tangent data.

Melamed, Yehudai & Vardi (NeurIPS 2023) prove that a two-layer ReLU network trained on data in a low-dimensional
linear subspace has a large input gradient orthogonal to it, and that a smaller initialisation or L2
regularisation shrinks that part. This command measures it over a grid, one table and one plot:

    python -m dmm.regimes --out runs/regimes --init-scales 0.01 0.1 1 --weight-decays 0 0.01 0.1

For each point it runs ``dmm fit`` of ``--classifier-config`` with that ``init_scale`` and SGD weight decay, then
``dmm test`` of its last checkpoint with ``--geometry-config`` (the Geometry measure with the exact tangents,
``--evaluation.autoencoder data``). Everything after ``--`` goes to every ``dmm test``, ``--fit-args`` to every
``dmm fit``. Each step runs in this process in a fixed folder under ``--out`` (``fit-s<scale>-wd<decay>/``,
``test-s<scale>-wd<decay>/``) and leaves a ``done`` file when it finished, so a rerun with the same arguments
redoes only the unfinished steps (a half-written folder is removed and run again). ``--seeds`` repeats every point
with each training seed (``--seed_everything``; folders ``...-seed<s>``). Then it writes ``regimes.json`` (one row
per run: accuracy, gradient shares, boundary distances; and per grid point the mean over seeds with its t-interval)
and ``regimes.png`` (the mean over seeds, with the seeds' t-interval as error bars when there are several).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path

import torch

from dmm.callbacks.evaluation import finite_or_none
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.measures.geometry import ARMS, GRADIENTS
from dmm.report.seeds import seed_interval
from dmm.steps import in_process, resumable_step, split_at_dashes

log = logging.getLogger("dmm.regimes")

INIT_SCALE = "--model.init_args.network.init_args.init_scale"
WEIGHT_DECAY = "--model.init_args.optimizer.init_args.weight_decay"


def point(test_folder: Path) -> dict[str, float]:
    """The row of one ``dmm test`` folder: its Geometry summary's accuracy, gradient on-fractions (``grad_on``,
    random-subspace null ``grad_random``), the off-subspace squared share ``grad_off_squared`` = mean of 1 - on^2
    over the images (and its null), and each arm's median boundary distance (inf, null in the JSON, when fewer than
    half the correct images were reached within eps) and found rate."""
    found = sorted((test_folder / "geometry").glob("test-epoch*.json"))
    if len(found) != 1:
        raise DmmError(f"{test_folder} holds {len(found)} geometry test summaries, not 1: delete it to rerun")
    summary = json.loads(found[0].read_text())["summary"]
    records = torch.load(found[0].with_name(f"{found[0].stem}-samples.pt"), weights_only=True)
    row = {"accuracy": summary["accuracy"], "num_images": int(records["index"].numel())}
    for name in GRADIENTS:
        for kind in ("on", "random"):
            fraction = records[f"grad_{kind}/{name}"].double()
            row[f"grad_{kind}/{name}"] = summary[f"grad_{kind}/{name}"]
            suffix = "" if kind == "on" else "_random"
            row[f"grad_off_squared{suffix}/{name}"] = (1 - fraction**2).nanmean().item()
    for arm in ARMS:
        for key in ("median", "found"):
            if f"distance/{arm}/{key}" in summary:
                value = summary[f"distance/{arm}/{key}"]
                row[f"distance/{arm}/{key}"] = math.inf if value is None else value  # JSON's null was inf
    return row


POOLED = (
    "accuracy",
    "grad_on/ce",
    "grad_off_squared/ce",
    "grad_off_squared_random/ce",
    "grad_off_squared/margin",
    *(f"distance/{arm}/median" for arm in ARMS),
)
"""The figures of a grid point pooled over its seeds (mean and t-interval) in ``regimes.json``'s ``grid``."""


def pooled(points: list[dict]) -> list[dict]:
    """One row per (init scale, weight decay): each :data:`POOLED` figure's mean over the seeds with its t-interval
    (:func:`dmm.report.seeds.seed_interval`; undefined, NaN, when a seed's median is censored)."""
    grid = list(dict.fromkeys((p["init_scale"], p["weight_decay"]) for p in points))
    rows = []
    for scale, decay in grid:
        runs = [p for p in points if (p["init_scale"], p["weight_decay"]) == (scale, decay)]
        figures = {key: seed_interval([r[key] for r in runs]) for key in POOLED if all(key in r for r in runs)}
        rows.append({"init_scale": scale, "weight_decay": decay, "seeds": [r["seed"] for r in runs], **figures})
    return rows


def plot(grid: list[dict], path: Path) -> None:
    """``path``: the off-subspace squared share of the CE gradient vs init scale, one line per weight decay (mean over
    seeds; error bars: the seeds' t-interval, when there are several)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4), layout="constrained")
    axes = figure.add_subplot()
    for decay in sorted({g["weight_decay"] for g in grid}):
        line = sorted((g["init_scale"], g["grad_off_squared/ce"]) for g in grid if g["weight_decay"] == decay)
        scales, figures = [s for s, _ in line], [f for _, f in line]
        means = [f["value"] for f in figures]
        errors = [[m - f["ci"][0] for m, f in zip(means, figures, strict=True)],
                  [f["ci"][1] - m for m, f in zip(means, figures, strict=True)]]  # fmt: skip
        has_ci = all(math.isfinite(e) for side in errors for e in side)
        axes.errorbar(scales, means, yerr=errors if has_ci else None, marker="o", capsize=3,
                      label=f"weight decay {decay:g}")  # fmt: skip
    null = sum(g["grad_off_squared_random/ce"]["value"] for g in grid) / len(grid)
    axes.axhline(null, color="gray", linestyle="--", label="random k-dim subspace")
    seeds = max(len(g["seeds"]) for g in grid)
    axes.set(xscale="log", xlabel="init scale", ylim=(0, 1.02), title=f"Two-layer ReLU net ({seeds} seed(s) a point)")
    axes.set_ylabel(r"off-subspace share of $\|\nabla_x \mathrm{CE}\|^2$  (1 - on$^2$)")
    axes.legend()
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))


def _name(scale: float, decay: float, seed: int) -> str:
    return f"s{scale:g}-wd{decay:g}-seed{seed}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = split_at_dashes(argv)
    parser = argparse.ArgumentParser(prog="python -m dmm.regimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of every run, the table and the plot")
    parser.add_argument("--classifier-config", default="configs/linear_subspace/classifier.yaml")
    parser.add_argument("--geometry-config", default="configs/linear_subspace/geometry.yaml")
    parser.add_argument("--init-scales", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of every grid point")
    parser.add_argument("--fit-args", default="", help='more arguments of every `dmm fit`, one string: "--a 1 --b 2"')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out, quiet = Path(args.out), ["--trainer.enable_progress_bar", "false"]
    grid = [(sc, wd, seed) for sc in args.init_scales for wd in args.weight_decays for seed in args.seeds]
    try:
        if min(args.init_scales) <= 0 or min(args.weight_decays) < 0:
            raise DmmError("--init-scales must be > 0 and --weight-decays >= 0")
        if len({_name(*p) for p in grid}) < len(grid):
            raise DmmError("--init-scales, --weight-decays and --seeds must be distinct values")
        points = []
        for scale, decay, seed in grid:
            fit, test = out / f"fit-{_name(scale, decay, seed)}", out / f"test-{_name(scale, decay, seed)}"
            fit_args = ["fit", "--config", args.classifier_config, INIT_SCALE, str(scale), WEIGHT_DECAY, str(decay),
                        "--seed_everything", str(seed),
                        "--evaluation.during_fit", "false", *quiet, *shlex.split(args.fit_args)]  # fmt: skip
            resumable_step(fit, fit_args, run=in_process)
            checkpoint = fit / "checkpoints" / "last.ckpt"  # the net at the end of training, whatever val/acc did
            test_args = ["test", "--config", args.geometry_config, "--ckpt_path", str(checkpoint), *quiet, *extra]
            resumable_step(test, test_args, run=in_process)
            names = {"fit": fit.name, "test": test.name}
            points.append({"init_scale": scale, "weight_decay": decay, "seed": seed, **names, **point(test)})
        table = {"classifier_config": args.classifier_config, "geometry_config": args.geometry_config,
                 "fit_args": args.fit_args, "test_args": extra, "points": points, "grid": pooled(points)}  # fmt: skip
        text = json.dumps(finite_or_none(table), indent=2, allow_nan=False)
        atomic_write(out / "regimes.json", lambda p: p.write_text(text))
        plot(table["grid"], out / "regimes.png")
        log.info("wrote %s and %s", out / "regimes.json", out / "regimes.png")
    except DmmError as error:
        sys.stderr.write(f"dmm regimes: error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
