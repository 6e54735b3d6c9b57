"""``python -m dmm.regimes``: Melamed et al.'s regimes on a linear data subspace, init scale x weight decay.

Melamed, Yehudai & Vardi (NeurIPS 2023) prove that a two-layer ReLU network trained on data in a low-dimensional
linear subspace has a large input gradient orthogonal to it, and that a smaller initialisation or L2
regularisation shrinks that part. This command measures it over a grid, one table and one plot:

    python -m dmm.regimes --out runs/regimes --init-scales 0.01 0.1 1 --weight-decays 0 0.01 0.1

For each point it runs ``dmm fit`` of ``--classifier-config`` with that ``init_scale`` and SGD weight decay, then
``dmm test`` of its last checkpoint with ``--geometry-config`` (the Geometry measure with the exact tangents,
``--evaluation.autoencoder data``). Everything after ``--`` goes to every ``dmm test``, ``--fit-args`` to every
``dmm fit``. Each step runs in this process in a fixed folder under ``--out`` (``fit-s<scale>-wd<decay>/``,
``test-s<scale>-wd<decay>/``) and leaves a ``done`` file when it finished, so a rerun with the same arguments
redoes only the unfinished steps (a half-written folder is removed and run again). Then it writes
``regimes.json`` (one row per point: accuracy, gradient shares, boundary distances) and ``regimes.png``.
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
from dmm.cli import main as dmm_main
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.measures.geometry import ARMS, GRADIENTS
from dmm.steps import resumable_step

log = logging.getLogger("dmm.regimes")

INIT_SCALE = "--model.init_args.network.init_args.init_scale"
WEIGHT_DECAY = "--model.init_args.optimizer.init_args.weight_decay"


def _in_process(args: list[str]) -> int:
    """``dmm <args>`` in this process (the exit status of a one-line ``dmm: error:``, 0 when it finished)."""
    try:
        dmm_main(args)
    except SystemExit as exit_info:  # a one-line `dmm: error:` (status 2), already on stderr
        return int(exit_info.code or 0)
    return 0


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


def plot(points: list[dict], path: Path) -> None:
    """``path``: the off-subspace squared share of the CE gradient vs init scale, one line per weight decay."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4), layout="constrained")
    axes = figure.add_subplot()
    for decay in sorted({p["weight_decay"] for p in points}):
        line = sorted((p["init_scale"], p["grad_off_squared/ce"]) for p in points if p["weight_decay"] == decay)
        axes.plot(*zip(*line, strict=True), marker="o", label=f"weight decay {decay:g}")
    null = sum(p["grad_off_squared_random/ce"] for p in points) / len(points)
    axes.axhline(null, color="gray", linestyle="--", label="random k-dim subspace")
    axes.set(xscale="log", xlabel="init scale", ylim=(0, 1.02), title="Two-layer ReLU net on a linear subspace")
    axes.set_ylabel(r"off-subspace share of $\|\nabla_x \mathrm{CE}\|^2$  (1 - on$^2$)")
    axes.legend()
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))


def _name(scale: float, decay: float) -> str:
    return f"s{scale:g}-wd{decay:g}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m dmm.regimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of every run, the table and the plot")
    parser.add_argument("--classifier-config", default="configs/linear_subspace/classifier.yaml")
    parser.add_argument("--geometry-config", default="configs/linear_subspace/geometry.yaml")
    parser.add_argument("--init-scales", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--fit-args", default="", help='more arguments of every `dmm fit`, one string: "--a 1 --b 2"')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out, quiet = Path(args.out), ["--trainer.enable_progress_bar", "false"]
    grid = [(scale, decay) for scale in args.init_scales for decay in args.weight_decays]
    try:
        if min(args.init_scales) <= 0 or min(args.weight_decays) < 0:
            raise DmmError("--init-scales must be > 0 and --weight-decays >= 0")
        if len({_name(*p) for p in grid}) < len(grid):
            raise DmmError("--init-scales and --weight-decays must be distinct values")
        points = []
        for scale, decay in grid:
            fit, test = out / f"fit-{_name(scale, decay)}", out / f"test-{_name(scale, decay)}"
            fit_args = ["fit", "--config", args.classifier_config, INIT_SCALE, str(scale), WEIGHT_DECAY, str(decay),
                        "--evaluation.during_fit", "false", *quiet, *shlex.split(args.fit_args)]  # fmt: skip
            resumable_step(fit, fit_args, run=_in_process)
            checkpoint = fit / "checkpoints" / "last.ckpt"  # the net at the end of training, whatever val/acc did
            test_args = ["test", "--config", args.geometry_config, "--ckpt_path", str(checkpoint), *quiet, *extra]
            resumable_step(test, test_args, run=_in_process)
            names = {"fit": fit.name, "test": test.name}
            points.append({"init_scale": scale, "weight_decay": decay, **names, **point(test)})
        table = {"classifier_config": args.classifier_config, "geometry_config": args.geometry_config,
                 "fit_args": args.fit_args, "test_args": extra, "points": points}  # fmt: skip
        text = json.dumps(finite_or_none(table), indent=2, allow_nan=False)
        atomic_write(out / "regimes.json", lambda p: p.write_text(text))
        plot(points, out / "regimes.png")
        log.info("wrote %s and %s", out / "regimes.json", out / "regimes.png")
    except DmmError as error:
        sys.stderr.write(f"dmm regimes: error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
