"""``python -m dmm.known``: the known-manifold benchmark end to end, over seeds, into one table.

On :class:`~dmm.data.KnownManifoldDataModule` the tangent space at every image is known exactly, so the instrument
(a learned autoencoder's tangents) can be judged against the truth, and the literature's manifold-alignment figures
measured without the autoencoder's error. This command trains N standard classifiers, M adversarially trained ones
and K autoencoders, then measures

* every standard classifier with the DMM decomposition twice, with the exact tangents and with each learned
  autoencoder's: the instrument's error bar is the paired difference (learned - exact) of each figure, with a
  crossed classifier x autoencoder interval, next to the principal angles between learned and exact tangents;
* every classifier, standard and robust, with Bordt et al.'s gradient share (:class:`~dmm.measures.Geometry`),
  Srinivas et al.'s attack-free on/off-manifold robustness (:class:`~dmm.measures.ManifoldSmoothness`) and the
  exact-tangent decomposition: each figure as the mean over training seeds with its t-interval.

    python -m dmm.known --out runs/known --classifier-seeds 0 1 2 3 4 --robust-seeds 0 1 2 \\
        --autoencoder-seeds 0 1 -- --evaluation.num_images 500

Everything after ``--`` goes to every ``dmm test``, ``--attack-args`` to those that attack (not Srinivas's
attack-free measure; e.g. ``"--evaluation.measure.attack.refine 10"``), ``--fit-args`` to every ``dmm fit``.
Each step runs in this process in a fixed folder under ``--out`` (``classifier-seed<s>/``, ``robust-seed<s>/``,
``autoencoder-seed<s>/``, ``exact-c<s>/``, ``learned-c<s>-a<t>/``, ``geometry-r<s>/``, ...) and leaves a ``done``
file with its wall time, so a rerun redoes only the unfinished steps. Then it writes ``known.json`` and
``known.md``: the tables, every run's figure, and the wall time of every step and in all.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path

from dmm.callbacks.evaluation import finite_or_none
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.models.loading import best_checkpoint
from dmm.report.seeds import bounded, crossed_interval, seed_interval
from dmm.report.text import estimate, table
from dmm.steps import in_process, resumable_step, split_at_dashes, step_seconds

log = logging.getLogger("dmm.known")

CONFIGS = "configs/known_manifold"
INSTRUMENT = {
    "on_fraction_mean": "on-fraction of d (its tangent part's norm share)",
    "on/success_rate": "on-manifold attack success within eps",
    "on/l2_needed_median": "on-manifold norm needed (censored median)",
    "off/l2_needed_median": "off-manifold norm needed (censored median)",
    "ratio/on_over_random": "paired ratio on / random subspace",
    "ratio/off_over_random_off": "paired ratio off / random complement",
    "budget/on_part_fools_rate": "full-budget d: its tangent part alone fools",
    "budget/on_margin_share_median": "full-budget d: tangent part's margin share",
}
"""Decomposition figures measured with exact and with learned tangents; the instrument's error is their difference."""
LEARNED_ONLY = {
    "exact_angle_mean_median": "principal angles learned vs exact, mean (deg, median over images)",
    "exact_angle_max_median": "principal angles learned vs exact, largest (deg, median over images)",
    "exact_on_fraction_mean": "on-fraction of the same d in the exact tangent space",
    "recon_error_median": "autoencoder's reconstruction distance (median)",
}
"""Figures only a learned autoencoder has: how far its tangents and images are from the true ones."""
DECOMPOSITION = ["clean_acc", "full/l2_needed_median", *INSTRUMENT, "random_fraction_mean"]
NAMES = INSTRUMENT | {
    "clean_acc": "test accuracy (the measured images)",
    "full/l2_needed_median": "unconstrained norm needed (censored median)",
    "random_fraction_mean": "on-fraction of d in a random k-dim subspace (the null)",
}
GEOMETRY = ["accuracy", "grad_on/ce", "grad_random/ce", "grad_on/margin", "grad_random/margin"]
PERCENT = {"on/success_rate", "budget/on_part_fools_rate", "clean_acc", "accuracy"}
BOUNDED = PERCENT | {"on_fraction_mean", "exact_on_fraction_mean", "random_fraction_mean", *GEOMETRY[1:]}
"""Figures in [0, 1] (rates, fractions, shares): their seed intervals are clipped to it (:func:`bounded`)."""


def _clip(key: str, interval: dict) -> dict:
    return bounded(interval) if key in BOUNDED else interval


def summary(folder: Path, measure: str) -> dict[str, float]:
    """The test summary a ``dmm test`` wrote in ``folder/<measure>/``; JSON's null (non-finite) read as NaN."""
    found = sorted((folder / measure).glob("test-epoch*.json"))
    if len(found) != 1:
        raise DmmError(f"{folder} holds {len(found)} {measure} test summaries, not 1: delete the folder to rerun it")
    data = json.loads(found[0].read_text())
    return {k: math.nan if v is None else float(v) for k, v in data["summary"].items()} | {
        "_eps_curve": data.get("eps_curve") or []
    }


def instrument(exact: dict[str, dict], learned: dict[tuple[str, str], dict]) -> dict:
    """The instrument's error bar from the exact-tangent summaries (by classifier seed) and the learned ones (by
    classifier, autoencoder seed): per figure, the exact value over classifiers, the learned value and the paired
    difference learned - exact over the crossed table."""
    out = {}
    for key in INSTRUMENT:
        out[key] = {
            "exact": _clip(key, seed_interval([exact[c][key] for c in exact])),
            "learned": _clip(key, crossed_interval({pair: s[key] for pair, s in learned.items()})),
            "difference": crossed_interval({(c, a): s[key] - exact[c][key] for (c, a), s in learned.items()}),
        }
    for key in LEARNED_ONLY:
        out[key] = {"learned": _clip(key, crossed_interval({pair: s[key] for pair, s in learned.items()}))}
    return out


def per_seed(summaries: dict[str, dict], keys: list[str]) -> dict:
    """Each key's mean over the seeds' summaries with its t-interval (clipped to [0, 1] for rates and shares)."""
    runs = list(summaries.values())
    return {key: _clip(key, seed_interval([s[key] for s in runs])) for key in keys if all(key in s for s in runs)}


def smoothness_keys(summaries: dict[str, dict]) -> list[str]:
    curve = next(iter(summaries.values()))["_eps_curve"]
    return [f"{part}@{eps:g}" for eps in curve for part in ("off_over_on", "on/change", "off/change", "random/change")]


def _cell(section: dict, key: str, percent: bool) -> str:
    """One seed-pooled figure as text, with its number of runs; n/a when the runs did not measure it."""
    figure = section.get(key)
    if figure is None:
        return "n/a"
    if figure["undefined"]:
        return f"n/a ({figure['undefined']} of {figure['runs']} runs > eps or undefined)"
    return f"{estimate(figure, percent)} ({figure['runs']} runs)" if figure["runs"] > 1 else estimate(figure, percent)


def markdown(report: dict) -> str:
    """``known.md``: the instrument's error bar, Bordt's shares, Srinivas's ratios, the exact decompositions, times."""
    lines = ["# Known-manifold benchmark", "", f"`{report['command']}`", ""]
    inst = report["instrument"]
    if inst:
        lines += ["## The instrument's error bar (standard classifiers; learned vs exact tangent spaces)", "",
                  "Exact: mean over classifier seeds (t-interval). Learned and difference: crossed classifier x "
                  "autoencoder table (two-way random-effects interval, Satterthwaite df).", ""]  # fmt: skip
        rows = []
        for key, name in INSTRUMENT.items():
            f, pct = inst[key], key in PERCENT
            rows.append([name, estimate(f["exact"], pct), estimate(f["learned"], pct), estimate(f["difference"], pct)])
        for key, name in LEARNED_ONLY.items():
            rows.append([name, "—", estimate(inst[key]["learned"]), "—"])
        lines += table(["figure", "exact tangents", "learned tangents", "learned − exact (paired)"], rows) + [""]
    kinds = [k for k in ("standard", "robust") if report["geometry"].get(k)]
    lines += ["## Gradient share in the exact tangent space (Bordt et al.), mean over seeds [95 % t]", ""]
    rows = [[name, *(_cell(report["geometry"][k], key, key in PERCENT) for k in kinds)]
            for key, name in (("accuracy", "test accuracy"), ("grad_on/ce", "share of the CE gradient"),
                              ("grad_random/ce", "random k-dim subspace's share"),
                              ("grad_on/margin", "share of the margin gradient"))]  # fmt: skip
    lines += table(["figure", *kinds], rows) + [""]
    for kind in kinds:
        share = report["geometry"][kind]["grad_on/ce"]["per_run"]
        lines.append(f"Per seed, {kind}: " + ", ".join(f"{v:.3f}" for v in share) + ".")
    lines += ["", "## Attack-free robustness (Srinivas et al.): off/on softmax change, mean over seeds [95 % t]", ""]
    keys = [k for k in report["smoothness"][kinds[0]] if k.startswith("off_over_on@")]
    rows = [[f"eps = {k.split('@')[1]}", *(_cell(report["smoothness"][kind], k, False) for kind in kinds)]
            for k in keys]  # fmt: skip
    lines += table(["off / on", *kinds], rows) + [""]
    lines += ["## Decomposition with the exact tangents, mean over seeds [95 % t]", ""]
    rows = [[NAMES[key], *(_cell(report["exact"][k], key, key in PERCENT) for k in kinds)]
            for key in DECOMPOSITION]  # fmt: skip
    lines += table(["figure", *kinds], rows) + [""]
    times = report["seconds"]
    total = f"{times['total']:.0f} s in all ({len(times['steps'])} steps; fits {times['fit']:.0f} s, "
    lines += ["## Wall time", "", total + f"measurements {times['test']:.0f} s). Per step: see known.json.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "dmm.known", *argv])
    argv, extra = split_at_dashes(argv)
    parser = argparse.ArgumentParser(prog="python -m dmm.known", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of every run and of the tables")
    parser.add_argument("--classifier-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--robust-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--autoencoder-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--classifier-config", default=f"{CONFIGS}/classifier.yaml")
    parser.add_argument("--robust-config", default=f"{CONFIGS}/classifier_adv.yaml")
    parser.add_argument("--autoencoder-config", default=f"{CONFIGS}/autoencoder.yaml")
    parser.add_argument("--decomposition-config", default=f"{CONFIGS}/decomposition_exact.yaml")
    parser.add_argument("--geometry-config", default=f"{CONFIGS}/geometry.yaml")
    parser.add_argument("--smoothness-config", default=f"{CONFIGS}/smoothness.yaml")
    parser.add_argument("--fit-args", default="", help='more arguments of every `dmm fit`, one string: "--a 1 --b 2"')
    parser.add_argument("--attack-args", default="", help="more arguments of the tests that attack (decomposition, "
                        'geometry; not smoothness), one string: "--evaluation.measure.attack.refine 10"')  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out, quiet = Path(args.out), ["--trainer.enable_progress_bar", "false"]
    seeds = {"classifier": args.classifier_seeds, "robust": args.robust_seeds, "autoencoder": args.autoencoder_seeds}
    fit_config = {"classifier": args.classifier_config, "robust": args.robust_config,
                  "autoencoder": args.autoencoder_config}  # fmt: skip
    steps: list[Path] = []

    def step(folder: Path, command: list[str]) -> Path:
        resumable_step(folder, command, run=in_process)
        steps.append(folder)
        return folder

    try:
        for kind, values in seeds.items():
            if len(set(values)) < len(values):
                raise DmmError(f"--{kind}-seeds must be distinct, got {values}")
        checkpoints: dict[str, dict[str, Path]] = {}
        for kind, values in seeds.items():
            checkpoints[kind] = {}
            for s in values:
                folder = step(out / f"{kind}-seed{s}", ["fit", "--config", fit_config[kind], "--seed_everything",
                                                         str(s), *quiet, *shlex.split(args.fit_args)])  # fmt: skip
                checkpoints[kind][str(s)] = best_checkpoint(folder)
        attack = shlex.split(args.attack_args)
        measures = {  # name: config, measure folder, its own arguments
            "exact": (args.decomposition_config, "decomposition", attack),
            "geometry": (args.geometry_config, "geometry", attack),
            "smoothness": (args.smoothness_config, "smoothness", []),
        }
        results: dict[str, dict[str, dict]] = {name: {"standard": {}, "robust": {}} for name in measures}
        for kind, letter, label in (("classifier", "c", "standard"), ("robust", "r", "robust")):
            for s, checkpoint in checkpoints[kind].items():
                for name, (config, measure, own) in measures.items():
                    test = ["test", "--config", config, "--ckpt_path", str(checkpoint), *quiet, *own, *extra]
                    folder = step(out / f"{name}-{letter}{s}", test)
                    results[name][label][s] = summary(folder, measure)
        learned = {}
        for c, classifier in checkpoints["classifier"].items():
            for a, autoencoder in checkpoints["autoencoder"].items():
                test = ["test", "--config", args.classifier_config, "--ckpt_path", str(classifier)]
                test += ["--evaluation.autoencoder", str(autoencoder), *quiet, *attack, *extra]
                folder = step(out / f"learned-c{c}-a{a}", test)
                learned[c, a] = summary(folder, "decomposition")
        seconds = {str(f.relative_to(out)): step_seconds(f) for f in steps}
        fits = sum(v for k, v in seconds.items() if "-seed" in k)
        report = {
            "command": command,
            "args": vars(args), "test_args": extra,
            "instrument": instrument(results["exact"]["standard"], learned) if learned else {},
            "geometry": {k: per_seed(v, GEOMETRY) for k, v in results["geometry"].items() if v},
            "smoothness": {k: per_seed(v, smoothness_keys(v)) for k, v in results["smoothness"].items() if v},
            "exact": {k: per_seed(v, DECOMPOSITION) for k, v in results["exact"].items() if v},
            "runs": {name: {k: {s: {f: v for f, v in r.items() if not f.startswith("_")} for s, r in runs.items()}
                            for k, runs in by_kind.items()} for name, by_kind in results.items()}
            | {"learned": {f"c{c}-a{a}": {f: v for f, v in r.items() if not f.startswith("_")}
                           for (c, a), r in learned.items()}},
            "seconds": {"steps": seconds, "total": sum(seconds.values()), "fit": fits,
                        "test": sum(seconds.values()) - fits},
        }  # fmt: skip
        text = json.dumps(finite_or_none(report), indent=1, allow_nan=False)
        atomic_write(out / "known.json", lambda p: p.write_text(text))
        atomic_write(out / "known.md", lambda p: p.write_text(markdown(report)))
        log.info("wrote %s and %s", out / "known.json", out / "known.md")
    except DmmError as error:
        sys.stderr.write(f"dmm known: error: {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
