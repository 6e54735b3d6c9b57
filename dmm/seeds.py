"""``python -m dmm.seeds``: the decomposition over several seeds of classifier x autoencoder, then one report.

A figure from one classifier and one autoencoder says how those two networks behave; the DMM's claims are
about training. This command trains (or takes) N classifiers and M autoencoders, evaluates every pair with
``dmm test`` and the same evaluation settings, and writes one report whose seed-level intervals come from
the pairs (:mod:`dmm.report.seeds`):

    python -m dmm.seeds --out runs/seeds --classifier-seeds 0 1 2 --autoencoder-seeds 0 1 \\
        --data-dir ../shared/data -- --evaluation.num_images 500

Everything after ``--`` goes to every ``dmm test``. Each step runs as its own ``dmm`` process in a fixed folder
under ``--out`` (``classifier-seed<s>/``, ``autoencoder-seed<s>/``, ``test-c<s>-a<t>/``) and leaves a ``done``
file when it finished, so a killed command rerun with the same arguments redoes only the unfinished steps
(a half-written folder is removed and run again). ``--classifiers`` / ``--autoencoders`` take existing
checkpoints instead of training them.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from dmm.errors import DmmError
from dmm.models.loading import best_checkpoint
from dmm.steps import resumable_step, split_at_dashes

log = logging.getLogger("dmm.seeds")


def _trained(out: Path, kind: str, config: str, seeds: list[int], common: list[str]) -> list[tuple[str, Path]]:
    """Train one model per seed (or find it trained) and return (seed, checkpoint) pairs."""
    runs = []
    for seed in seeds:
        folder = out / f"{kind}-seed{seed}"
        resumable_step(folder, ["fit", "--config", config, "--seed_everything", str(seed), *common])
        runs.append((str(seed), best_checkpoint(folder)))
    return runs


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = split_at_dashes(argv)
    parser = argparse.ArgumentParser(prog="python -m dmm.seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of every run and of the report")
    parser.add_argument("--classifier-config", default="configs/mnist/classifier.yaml")
    parser.add_argument("--autoencoder-config", default="configs/mnist/autoencoder.yaml")
    parser.add_argument("--classifier-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--autoencoder-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--classifiers", nargs="*", help="existing classifier checkpoints (instead of training)")
    parser.add_argument("--autoencoders", nargs="*", help="existing autoencoder checkpoints (instead of training)")
    parser.add_argument("--data-dir", help="--data.data_dir of every run")
    parser.add_argument("--fit-args", default="", help='more arguments of every `dmm fit`, one string: "--a 1 --b 2"')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    data = ["--data.data_dir", args.data_dir] if args.data_dir else []
    common = [*data, "--trainer.enable_progress_bar", "false"]
    fit = shlex.split(args.fit_args)
    try:
        for path in [*(args.classifiers or []), *(args.autoencoders or [])]:
            if not Path(path).is_file():
                raise DmmError(f"checkpoint {path} not found: pass files written by `dmm fit`")
        classifiers = (
            [(f"x{i}", Path(p)) for i, p in enumerate(args.classifiers)]
            if args.classifiers
            else _trained(out, "classifier", args.classifier_config, args.classifier_seeds, common + fit)
        )
        autoencoders = (
            [(f"x{i}", Path(p)) for i, p in enumerate(args.autoencoders)]
            if args.autoencoders
            else _trained(out, "autoencoder", args.autoencoder_config, args.autoencoder_seeds, common + fit)
        )
        tests = []
        for c, classifier in classifiers:
            for a, autoencoder in autoencoders:
                folder = out / f"test-c{c}-a{a}"
                test = ["test", "--config", args.classifier_config, "--ckpt_path", str(classifier)]
                test += ["--evaluation.autoencoder", str(autoencoder), *common, *extra]
                resumable_step(folder, test)
                tests.append(str(folder))
        from dmm.report import main as report

        report([*tests, "--out", str(out / "report")])
    except DmmError as error:
        sys.stderr.write(f"dmm seeds: error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
