"""``python -m dmm.known``: the benchmark's steps, its paired instrument error bar and seed intervals on fake runs
whose figures are set by hand, resumption, bad seeds as one-line errors, and (slow) the real thing at a tiny size."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from dmm import cli, known
from dmm.cli import RUN_DIR_ENV
from dmm.report.seeds import bounded, seed_interval

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "known_manifold"
EXACT_ON = {"0": 0.1, "1": 0.3, "2": 0.5}  # the exact on-fraction of each standard classifier: a large seed effect
SHIFT = {"0": 0.02, "1": 0.04}  # what each autoencoder adds to it (its tangents' error)
SHARE = {"c0": 0.3, "c1": 0.26, "c2": 0.28, "r0": 0.75, "r1": 0.7}  # Bordt's share of each classifier


def fake_dmm(calls: list[list[str]]):
    """A ``dmm`` that writes, per step, what the benchmark reads: a best checkpoint naming the model, or a summary."""

    def run(args: list[str]) -> None:
        calls.append(args)
        folder = Path(os.environ[RUN_DIR_ENV])
        folder.mkdir(parents=True)
        if args[0] == "fit":
            kind = "r" if "classifier_adv" in args[2] else "a" if "autoencoder" in args[2] else "c"
            (folder / "checkpoints").mkdir()
            (folder / "checkpoints" / f"best-{kind}{args[args.index('--seed_everything') + 1]}.ckpt").write_text("")
            return
        model = Path(args[args.index("--ckpt_path") + 1]).stem.removeprefix("best-")
        config = Path(args[2]).stem
        if config == "geometry":
            measure, values = "geometry", {"accuracy": 0.9, "grad_on/ce": SHARE[model], "grad_random/ce": 0.11}
        elif config == "smoothness":
            measure, values = "smoothness", {"off_over_on@0.5": 0.5 if model[0] == "c" else 0.1}
        else:
            autoencoder = (
                Path(args[args.index("--evaluation.autoencoder") + 1]).stem
                if "--evaluation.autoencoder" in args
                else None
            )
            on = (EXACT_ON[model[1:]] if model[0] == "c" else 0.6) + (
                SHIFT[autoencoder.removeprefix("best-a")] if autoencoder else 0
            )
            values = {key: 0.5 for key in known.DECOMPOSITION} | {"on_fraction_mean": on, "off/l2_needed_median": None}
            if autoencoder:
                values |= {key: 20.0 for key in known.LEARNED_ONLY}
            measure = "decomposition"
        (folder / measure).mkdir()
        eps_curve = [0.5] if measure == "smoothness" else []
        (folder / measure / "test-epoch0.json").write_text(json.dumps({"summary": values, "eps_curve": eps_curve}))

    return run


def benchmark(out: Path) -> None:
    known.main(["--out", str(out), "--classifier-seeds", "0", "1", "2", "--robust-seeds", "0", "1",
                "--autoencoder-seeds", "0", "1", "--attack-args", "--evaluation.measure.attack.refine 3",
                "--", "--evaluation.num_images", "8"])  # fmt: skip


def test_the_instrument_error_is_paired_and_every_figure_pools_its_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "main", fake_dmm(calls))
    out = tmp_path / "known"
    benchmark(out)
    fits = [c for c in calls if c[0] == "fit"]
    assert len(fits) == 3 + 2 + 2 and len(calls) - len(fits) == 5 * 3 + 3 * 2  # 3 measures a model, 6 learned pairs
    assert all(c[-2:] == ["--evaluation.num_images", "8"] for c in calls if c[0] == "test")
    refined = {Path(c[2]).stem: "--evaluation.measure.attack.refine" in c for c in calls if c[0] == "test"}
    assert refined == {"decomposition_exact": True, "geometry": True, "classifier": True, "smoothness": False}
    report = json.loads((out / "known.json").read_text())

    on = report["instrument"]["on_fraction_mean"]
    assert on["exact"]["value"] == pytest.approx(0.3) and on["exact"]["runs"] == 3
    assert on["learned"]["value"] == pytest.approx(0.33) and on["learned"]["design"] == "crossed 3 x 2"
    # Paired: the classifiers' large spread cancels; the interval is that of the autoencoders' shifts alone.
    difference = on["difference"]
    assert difference["value"] == pytest.approx(0.03)
    assert difference["ci"] == pytest.approx(seed_interval(list(SHIFT.values()))["ci"])
    assert difference["ci"][1] - difference["ci"][0] < on["learned"]["ci"][1] - on["learned"]["ci"][0]
    assert report["instrument"]["off/l2_needed_median"]["difference"]["value"] is None  # censored: undefined
    assert report["instrument"]["exact_angle_mean_median"]["learned"]["value"] == 20.0

    share = report["geometry"]
    expected, pooled = bounded(seed_interval([0.3, 0.26, 0.28])), share["standard"]["grad_on/ce"]
    assert pooled["value"] == pytest.approx(expected["value"]) and pooled["ci"] == pytest.approx(expected["ci"])
    assert (pooled["runs"], pooled["df"], pooled["bounds"]) == (3, 2, [0, 1])
    assert share["robust"]["grad_on/ce"]["value"] == pytest.approx(0.725) and share["robust"]["grad_on/ce"]["df"] == 1
    assert report["smoothness"]["robust"]["off_over_on@0.5"]["value"] == pytest.approx(0.1)
    assert report["exact"]["robust"]["on_fraction_mean"]["value"] == pytest.approx(0.6)
    assert report["runs"]["learned"]["c2-a1"]["on_fraction_mean"] == pytest.approx(0.54)

    seconds = report["seconds"]
    assert len(seconds["steps"]) == len(calls) and all(v >= 0 for v in seconds["steps"].values())
    assert seconds["total"] == pytest.approx(seconds["fit"] + seconds["test"])
    text = (out / "known.md").read_text()
    assert "learned − exact (paired)" in text and "0.030 [" in text and "off / on" in text

    def no_run(args):
        raise AssertionError(f"a finished step ran again: {args}")

    monkeypatch.setattr(cli, "main", no_run)
    (out / "known.json").unlink()
    benchmark(out)
    assert json.loads((out / "known.json").read_text())["instrument"] == report["instrument"]


def test_repeated_seeds_and_missing_summaries_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        known.main(["--out", str(tmp_path), "--classifier-seeds", "1", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("dmm known: error: --classifier-seeds must be distinct") and error.count("\n") == 1

    monkeypatch.setattr(cli, "main", lambda args: Path(os.environ[RUN_DIR_ENV]).mkdir(parents=True) or None)
    with pytest.raises(SystemExit):  # the fit wrote no checkpoint
        known.main(["--out", str(tmp_path / "k"), "--classifier-seeds", "0", "--robust-seeds", "--autoencoder-seeds"])
    error = capsys.readouterr().err
    assert error.startswith("dmm known: error:") and "best checkpoint" in error and error.count("\n") == 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:model check failed")
def test_the_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    tiny = "--data.num_train 64 --data.num_val 16 --data.num_test 16 --data.batch_size 16"
    fit = f"{tiny} --trainer.max_epochs 1 --trainer.limit_val_batches 1 --trainer.logger false"
    test = [*tiny.split(), "--evaluation.num_images", "4", "--evaluation.cache_dir", "null"]
    test += ["--trainer.logger", "false"]
    names = ("classifier", "robust", "autoencoder", "decomposition", "geometry", "smoothness")
    files = ("classifier", "classifier_adv", "autoencoder", "decomposition_exact", "geometry", "smoothness")
    configs = [arg for n, f in zip(names, files, strict=True) for arg in (f"--{n}-config", str(CONFIGS / f"{f}.yaml"))]
    known.main(["--out", str(tmp_path), "--classifier-seeds", "0", "--robust-seeds", "0", "--autoencoder-seeds", "0",
                *configs, "--fit-args", f"{fit} --evaluation.during_fit false", "--", *test])  # fmt: skip
    report = json.loads((tmp_path / "known.json").read_text())
    angle = report["instrument"]["exact_angle_max_median"]["learned"]["value"]
    assert 0 <= angle <= 90
    assert 0 <= report["geometry"]["robust"]["grad_on/ce"]["value"] <= 1
    assert report["seconds"]["total"] > 0 and not math.isnan(report["seconds"]["total"])
