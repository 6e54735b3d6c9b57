"""`python -m dmm.report`: figures equal a recomputation from the samples; intervals behave; bad input fails clearly."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from dmm.cli import main as dmm
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.manifold import random_basis
from dmm.report import (
    bootstrap,
    load_run,
    main,
    markdown_table,
    masked_mean,
    masked_median,
    random_subspace_expectation,
    rate,
    resample_indices,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
STEPS = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def _new_run(root: Path, *args: str) -> Path:
    """Run the `dmm` command and return the run folder it made under ``root``."""
    before = set(root.glob("*"))
    os.environ.pop("DMM_RUN_DIR", None)
    dmm([*args, *QUIET, "--trainer.default_root_dir", str(root)])
    os.environ.pop("DMM_RUN_DIR", None)
    (folder,) = set(root.glob("*")) - before
    return folder


@pytest.fixture(scope="module")
def test_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `dmm test` run folder with decomposition results: synthetic autoencoder and classifier, 2 steps each."""
    root = tmp_path_factory.mktemp("runs")
    autoencoder = _new_run(root / "ae", "fit", "--config", str(CONFIGS / "autoencoder.yaml"), *STEPS)
    classifier = _new_run(root / "clf", "fit", "--config", str(CONFIGS / "classifier.yaml"), *STEPS)
    return _new_run(
        root / "test",
        "test",
        "--config",
        str(CONFIGS / "classifier.yaml"),
        "--ckpt_path",
        str(classifier / "checkpoints" / "last.ckpt"),
        "--decomposition.autoencoder",
        str(autoencoder / "checkpoints" / "last.ckpt"),
        "--decomposition.num_images",
        "32",
        "--decomposition.steps",
        "10",
        "--decomposition.eps",
        "2.0",
        "--decomposition.step_size",
        "null",  # 2.5 eps / steps: the attack can reach its budget
    )


def _estimates(tree) -> list[dict]:
    """Every {"value", "ci"} figure anywhere in the report."""
    if isinstance(tree, dict):
        found = [tree] if {"value", "ci"} <= tree.keys() else []
        return found + [e for v in tree.values() for e in _estimates(v)]
    if isinstance(tree, list):
        return [e for v in tree for e in _estimates(v)]
    return []


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"report.json holds {constant}, which strict JSON parsers refuse")

    return json.loads(text, parse_constant=refuse)


def test_report_of_a_real_run(test_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    main([str(test_run), "--out", str(out), "--bootstrap", "500", "--seed", "1"])
    printed = capsys.readouterr().out

    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "robust_accuracy.png", "on_fraction_hist.png", "median_norms.png"} <= names
    assert f"grid-{test_run.name}.png" in names and not [n for n in names if n.startswith(".")]  # no temp files
    report = _strict_json((out / "report.json").read_text())
    (run,) = report["runs"]
    fig = run["figures"]

    # Every headline figure equals an independent recomputation from the samples file.
    (samples,) = test_run.glob("decomposition/test-epoch*-samples.pt")
    records = torch.load(samples, weights_only=True)
    correct = records["correct"].tolist()
    assert fig["num_images"] == len(correct) == 32
    assert fig["clean_acc"]["value"] == pytest.approx(sum(correct) / len(correct))
    logged = json.loads(samples.with_name(samples.name.replace("-samples.pt", ".json")).read_text())["summary"]
    for attack in ("full", "on", "off"):
        fooled = records[f"{attack}_success"].tolist()
        norms = [v for v, ok in zip(records[f"{attack}_l2"].tolist(), fooled, strict=True) if ok]
        figures = fig["attacks"][attack]
        assert figures["success_rate"]["value"] == pytest.approx(sum(fooled) / sum(correct))
        assert figures["successes"] == sum(fooled)
        if norms:
            assert figures["l2_median"]["value"] == pytest.approx(statistics.median_low(norms), rel=1e-6)
            assert figures["l2_mean"]["value"] == pytest.approx(statistics.fmean(norms), rel=1e-6)
            assert figures["l2_median"]["value"] == pytest.approx(logged[f"{attack}/l2_median"], rel=1e-6)
        else:
            assert figures["l2_median"]["value"] is None
    assert fig["sqrt_k_over_n"] == pytest.approx(math.sqrt(4 / 256))
    assert run["autoencoder"]["class"] == "Autoencoder" and run["autoencoder"]["mse"] > 0  # from its checkpoint
    # The curve stops at the budget eps=2: the callback's default eps_curve point 3 was never attacked.
    assert [p["eps"] for p in fig["robust_accuracy"]] == [0.0, 0.5, 1.0, 1.5, 2.0] and fig["curve_left_out"] == [3.0]
    for point in fig["robust_accuracy"][1:]:
        assert point["value"] == pytest.approx(logged[f"robust_acc@{point['eps']:g}"])

    # Intervals are ordered and contain their point estimate.
    estimates = [e for e in _estimates(report) if e["value"] is not None]
    assert len(estimates) >= 25
    for e in estimates:
        low, high = e["ci"]
        assert low <= e["value"] <= high, e

    # Checks: the run-level ones always, the model ones because the test run's checkpoint and data exist.
    checks = {c["name"]: c["status"] for c in run["checks"]}
    assert checks["robust accuracy at eps=0 equals clean accuracy"] == "PASS"
    assert checks["success rises with eps"] == "PASS"
    assert checks["figures recomputed from the samples equal the logged summary"] == "PASS"
    assert checks["checkpoint and data reproduce the run's clean predictions"] == "PASS"
    assert checks["model outputs logits, not probabilities"] == "PASS"
    assert "iterative attack beats a one-step attack" in checks
    assert set(checks.values()) <= {"PASS", "WARN"}

    markdown = (out / "report.md").read_text()
    assert "### Checks a careful evaluation needs" in markdown and "public replication, 20 images" in markdown
    # The README table comes from report.json alone, and is what the command printed.
    assert markdown_table(report) in printed and markdown_table(report) in markdown


def test_several_runs_without_model_checks(test_run: Path, tmp_path: Path) -> None:
    main([str(test_run), str(test_run), "--out", str(tmp_path), "--bootstrap", "50", "--no-model-checks"])
    report = _strict_json((tmp_path / "report.json").read_text())
    labels = [run["label"] for run in report["runs"]]
    assert labels == [f"{test_run.name}-1", f"{test_run.name}-2"] and all(
        run["model_checks"] is None for run in report["runs"]
    )
    assert report["runs"][0]["figures"] == report["runs"][1]["figures"]  # same samples, same seed


def test_bootstrap_of_a_constant_sample_is_degenerate() -> None:
    values, mask = torch.full((40,), 0.7), torch.ones(40, dtype=torch.bool)
    indices = resample_indices(40, 300, seed=0)
    for statistic in (masked_mean, masked_median):
        estimate = bootstrap(statistic, [values, mask], indices)
        assert estimate["value"] == pytest.approx(0.7) and estimate["ci"] == pytest.approx([0.7, 0.7])


def test_bootstrap_interval_narrows_with_more_images() -> None:
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (50, 2000):
        values, everyone = torch.randn(n, generator=gen), torch.ones(n, dtype=torch.bool)
        low, high = bootstrap(masked_mean, [values, everyone], resample_indices(n, 500, seed=1))["ci"]
        widths.append(high - low)
    # The width of a mean's interval goes as 1/sqrt(n): about 6x narrower for 40x the images.
    assert widths[1] < widths[0] / 3
    assert widths[1] == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.2)


def test_vectorised_statistics_match_a_loop_over_resamples() -> None:
    gen = torch.Generator().manual_seed(0)
    values, mask = torch.rand(31, generator=gen), torch.rand(31, generator=gen) < 0.4
    indices = resample_indices(31, 200, seed=2)
    medians, means = masked_median(values[indices], mask[indices]), masked_mean(values[indices], mask[indices])
    rates = rate(mask[indices], torch.ones(31, dtype=torch.bool)[indices])
    for row, median, mean, fraction in zip(indices.tolist(), medians, means, rates, strict=True):
        kept = [values[i].item() for i in row if mask[i]]
        assert fraction.item() == pytest.approx(len(kept) / 31)
        if kept:
            assert median.item() == pytest.approx(statistics.median_low(kept))
            assert mean.item() == pytest.approx(statistics.fmean(kept))
        else:
            assert math.isnan(median.item()) and math.isnan(mean.item())
    assert masked_median(values, mask).item() == values[mask].median().item()  # torch's own (lower) median


def test_random_subspace_expectation_matches_monte_carlo() -> None:
    n, k = 64, 4
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(4000, n, generator=gen)
    basis = random_basis(4000, n, k, generator=gen)
    fractions = torch.einsum("bnk,bn->bk", basis, d).norm(dim=1) / d.norm(dim=1)
    assert fractions.mean().item() == pytest.approx(random_subspace_expectation(k, n), rel=0.02)
    assert random_subspace_expectation(16, 784) == pytest.approx(math.sqrt(16 / 784), rel=0.03)


def test_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old report")

    def crash(tmp: Path) -> None:
        tmp.write_text("half a rep")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old report" and list(tmp_path.iterdir()) == [target]


def test_folder_without_results_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run") in err and "dmm test --config" in err and "--decomposition.autoencoder" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report").exists()


def test_wrong_stage_and_truncated_samples_are_clear_errors(test_run: Path, tmp_path: Path) -> None:
    with pytest.raises(DmmError, match="pass --stage test"):
        load_run(test_run, "val")
    broken = tmp_path / "broken"
    shutil.copytree(test_run, broken)
    (samples,) = broken.glob("decomposition/*-samples.pt")
    samples.write_bytes(samples.read_bytes()[:100])
    with pytest.raises(DmmError, match="cannot read"):
        load_run(broken, "test")
