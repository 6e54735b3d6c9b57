"""`python -m dmm.report` on run folders written here in the saved format: figures equal a recomputation by
hand, censored figures read "> eps", checks can fail, runs of one experiment pool into seed-level intervals,
bad input fails with one clear line."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.report import load_run, main, markdown_table, seed_interval
from dmm.report.seeds import bounded

ARMS = ["full", "on", "off", "random", "random_off"]
SETTINGS = {"eps": 2.0, "norm": "l2", "steps": 40, "step_size": None, "clamp": True, "early_stop": True}
EPS_CURVE = [0.5, 1.0, 1.5, 2.0, 3.0]
SUCCESS = {"full": 1.0, "on": 0.3, "off": 0.95, "random": 0.2, "random_off": 0.9}
COST = {"full": 1.0, "on": 1.8, "off": 1.05, "random": 2.5, "random_off": 1.02}  # norm needed vs full's
K, SHAPE = 4, [1, 16, 16]


def fake_records(n: int, seed: int, arms=ARMS) -> dict[str, torch.Tensor]:
    """Per-image records as an evaluation saves them, with norms needed that restricted arms never beat."""
    g = torch.Generator().manual_seed(seed)
    correct = torch.rand(n, generator=g) < 0.9
    base = 0.2 + 0.8 * torch.rand(n, generator=g)  # the unconstrained norm needed
    records = {"index": torch.randperm(1000, generator=g)[:n], "correct": correct}
    for arm in arms:
        ok = correct & (torch.rand(n, generator=g) < SUCCESS[arm])
        l2 = torch.where(ok, (base * COST[arm]).clamp_max(SETTINGS["eps"]), SETTINGS["eps"])
        records |= {f"{arm}_success": ok, f"{arm}_l2": l2, f"{arm}_linf": l2 / 4}
    u = torch.randn(n, math.prod(SHAPE), generator=g)  # a random k-dim subspace's share has this law exactly
    records["random_fraction"] = u[:, :K].norm(dim=1) / u.norm(dim=1)
    records["on_fraction"] = 0.2 + 0.2 * torch.rand(n, generator=g)
    for key in ("on_part_fools", "off_part_fools"):
        records[key] = correct & (torch.rand(n, generator=g) < 0.1)
    records |= {"leak_on": 0.4 * torch.rand(n, generator=g), "leak_off": 0.1 * torch.rand(n, generator=g)}
    records["tangent_condition"] = 10 + torch.rand(n, generator=g)
    return records


def logged_summary(records: dict, arms=ARMS) -> dict:
    """What the evaluation logs, computed by hand (NaN written as null), plus a key the report does not know."""
    correct = records["correct"].tolist()
    summary = {"num_images": float(len(correct)), "clean_acc": sum(correct) / len(correct), "new/figure": 1.0}
    for arm in arms:
        ok = records[f"{arm}_success"].tolist()
        norms = [v for v, s in zip(records[f"{arm}_l2"].tolist(), ok, strict=True) if s]
        summary[f"{arm}/success_rate"] = sum(ok) / sum(correct)
        summary[f"{arm}/l2_median"] = statistics.median_low(norms) if norms else None
    full = zip(correct, records["full_success"].tolist(), records["full_l2"].tolist(), strict=True)
    full = list(full)
    for eps in EPS_CURVE:
        summary[f"robust_acc@{eps:g}"] = sum(c and not (s and v <= eps + 1e-6) for c, s, v in full) / len(full)
    return summary


def write_run(folder: Path, records: dict, *, arms=ARMS, summary=None, settings=SETTINGS, **payload) -> Path:
    """A run folder with ``decomposition/test-epoch0.json``, its ``-samples.pt`` and a grid, in the saved format."""
    (folder / "decomposition").mkdir(parents=True)
    content = {
        "stage": "test",
        "epoch": 0,
        "global_step": 0,
        "autoencoder": str(folder / "no-such-autoencoder.ckpt"),
        "settings": settings,
        "eps_curve": EPS_CURVE,
        "latent_dim": K,
        "input_shape": SHAPE,
        "summary": logged_summary(records, arms) if summary is None else summary,
        **({"arms": arms} if arms != ["full", "on", "off"] else {}),
        **payload,
    }
    (folder / "decomposition" / "test-epoch0.json").write_text(json.dumps(content))
    torch.save(records, folder / "decomposition" / "test-epoch0-samples.pt")
    Image.new("RGB", (8, 8)).save(folder / "decomposition" / "test-epoch0.png")
    return folder


MODEL_CHECKS = [{"name": "model outputs logits, not probabilities", "status": "PASS", "detail": "rows are not ..."}]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    records = fake_records(150, seed=0)
    return write_run(tmp_path / "run-a", records, seed=0, num_images=150, model_checks=MODEL_CHECKS)


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"report.json holds {constant}, which strict JSON parsers refuse")

    return json.loads(text, parse_constant=refuse)


def _report(*folders: Path, out: Path, capsys=None) -> tuple[dict, str, str]:
    main([*map(str, folders), "--out", str(out), "--bootstrap", "200", "--seed", "1"])
    printed = capsys.readouterr().out if capsys else ""
    return _strict_json((out / "report.json").read_text()), (out / "report.md").read_text(), printed


def test_report_figures_equal_a_recomputation_by_hand(run_dir: Path, tmp_path: Path, capsys) -> None:
    report, markdown, printed = _report(run_dir, out=tmp_path / "out", capsys=capsys)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.md", "report.json", "survival.png", "robust_accuracy.png", "on_fraction_hist.png"} <= names
    assert "grid-run-a.png" in names and not [n for n in names if n.startswith(".")]  # no temp files left
    (run,) = report["runs"]
    fig, records = run["figures"], torch.load(run_dir / "decomposition/test-epoch0-samples.pt")
    correct = records["correct"].tolist()
    assert run["arms"] == ARMS and run["seed"] == 0 and fig["num_correct"] == sum(correct)

    for arm in ARMS:
        f = fig["attacks"][arm]
        ok, l2 = records[f"{arm}_success"].tolist(), records[f"{arm}_l2"].tolist()
        needed = sorted(v if s else math.inf for v, s, c in zip(l2, ok, correct, strict=True) if c)
        assert f["success_rate"]["value"] == pytest.approx(sum(ok) / sum(correct))
        low, high = f["success_rate"]["ci"]
        assert 0 <= low < f["success_rate"]["value"] <= high <= 1  # Wilson, not collapsed at 100 %
        median = needed[len(needed) // 2]  # the norm by which more than half were fooled
        censored = f["censored_median"]
        if math.isinf(median):
            assert censored["value"] is None and censored["above_eps"][0] and censored["above_eps"][2]
        else:
            assert censored["value"] == pytest.approx(median) and censored["above_eps"] == [False, False, False]
        survival = f["survival"]
        assert survival["t"][0] == 0 and survival["survival"][0] == 1 and survival["t"][-1] == SETTINGS["eps"]
        assert survival["survival"][-1] == pytest.approx(needed.count(math.inf) / len(needed))
    # "> eps" where fewer than half were fooled: on (30 %) and random (20 %), in both tables.
    assert fig["attacks"]["on"]["censored_median"]["value"] is None
    assert "| > 2 [> 2, > 2] |" in markdown
    ratio, on, full = fig["ratios"]["on/full"], records["on_success"], records["full_success"]
    assert ratio["pairs"] == int((on & full).sum()) and ratio["value"] == pytest.approx(COST["on"], rel=0.15)
    assert set(fig["ratios"]) == {
        "on/full",
        "off/full",
        "random/full",
        "random_off/full",
        "on/random",
        "off/random_off",
    }

    checks = {c["name"]: c["status"] for c in run["checks"]}
    assert set(checks.values()) == {"PASS"}, run["checks"]
    assert "success rises with eps" not in checks and "robust accuracy at eps=0 equals clean accuracy" not in checks
    # num_images, clean_acc, 5 arms x (success_rate, l2_median), robust_acc@0.5..2 (3 was never attacked)
    assert "16 figures compared" in next(c["detail"] for c in run["checks"] if c["name"].startswith("figures"))
    assert run["model_checks"] == MODEL_CHECKS and "(model, by the evaluation) model outputs logits" in markdown
    assert run["reported"] and "off-manifold vs the random subspace's complement" in markdown
    assert [p["eps"] for p in fig["robust_accuracy"]] == [0, 0.5, 1, 1.5, 2] and fig["curve_left_out"] == [3]
    assert "upper bound from the early-stopped norm-needed run (not a fixed-budget attack" in markdown
    assert "over its own successes" in markdown and "1 run entered this report" in markdown
    # The headline table comes from report.json alone, and is what the command printed.
    assert markdown_table(report) in printed and markdown_table(report) in markdown


def test_older_run_without_arms_index_or_model_checks(tmp_path: Path) -> None:
    records = fake_records(40, seed=3, arms=["full", "on", "off"])
    for key in ("index", "on_part_fools", "off_part_fools", "leak_on", "leak_off", "tangent_condition"):
        del records[key]
    folder = write_run(tmp_path / "old", records, arms=["full", "on", "off"])
    report, markdown, _ = _report(folder, out=tmp_path / "out")
    (run,) = report["runs"]
    assert run["arms"] == ["full", "on", "off"] and set(run["figures"]["ratios"]) == {"on/full", "off/full"}
    assert run["model_checks"] is None and "not recorded" in markdown
    checks = {c["name"]: c["status"] for c in run["checks"]}
    assert checks["enough images for tight intervals"] == "WARN" and not run["reported"]


def test_runs_of_one_experiment_give_seed_level_intervals(tmp_path: Path) -> None:
    folders = [write_run(tmp_path / f"seed{s}", fake_records(60, seed=s), seed=s) for s in range(3)]
    other = write_run(tmp_path / "eps1", fake_records(60, seed=9), settings={**SETTINGS, "eps": 1.0}, seed=9)
    report, markdown, _ = _report(*folders, other, out=tmp_path / "out")
    (group,) = report["seed_groups"]  # the eps = 1 run is another experiment
    assert group["runs"] == ["seed0", "seed1", "seed2"] and group["seeds"] == [0, 1, 2] and group["independent"]
    assert group["design"] == "independent runs"  # no checkpoints recorded: nothing says the runs are crossed
    rates = [r["figures"]["attacks"]["full"]["success_rate"]["value"] for r in report["runs"][:3]]
    pooled = group["figures"]["full: success rate"]
    mean, half = statistics.fmean(rates), 4.302652729911275 * statistics.stdev(rates) / math.sqrt(3)  # t(0.975, 2)
    assert pooled["per_run"] == rates and pooled["value"] == pytest.approx(mean)
    assert pooled["ci"] == pytest.approx([max(mean - half, 0), min(mean + half, 1)]) and pooled["bounds"] == [0, 1]
    assert "bounds" not in group["figures"]["ratio on/full"]  # a ratio has no upper bound
    assert group["figures"]["on: censored median norm"]["undefined"] == 3  # "> eps" in every run: no mean
    assert "4 runs entered this report" in markdown and "**Group 1**: 3 runs" in markdown

    report, markdown, _ = _report(folders[0], folders[0], out=tmp_path / "twice")
    assert not report["seed_groups"][0]["independent"] and "says nothing about seed variation" in markdown


def test_crossed_classifiers_and_autoencoders_give_a_two_way_interval(tmp_path: Path) -> None:
    folders = []
    for c in range(2):
        for a in range(2):
            records = fake_records(60, seed=c)  # every figure but the on-fraction is the classifier's alone
            records["on_fraction"] = fake_records(60, seed=10 + 2 * c + a)["on_fraction"]
            folder = write_run(tmp_path / f"c{c}a{a}", records, seed=0, autoencoder=f"/ae{a}.ckpt")
            (folder / "config.yaml").write_text(f"ckpt_path: /classifier{c}.ckpt\n")
            folders.append(folder)
    report, markdown, _ = _report(*folders, out=tmp_path / "out")
    (group,) = report["seed_groups"]
    assert group["design"] == "crossed" and (group["classifiers"], group["autoencoders"]) == (2, 2)
    rates = [r["figures"]["attacks"]["random"]["success_rate"]["value"] for r in report["runs"]]
    assert rates[0] == rates[1] != rates[2] == rates[3]  # a random subspace does not see the autoencoder
    pooled, one_way = group["figures"]["random: success rate"], bounded(seed_interval(rates[::2]))  # classifiers
    assert pooled["value"] == pytest.approx(one_way["value"]) and pooled["ci"] == pytest.approx(one_way["ci"])
    assert pooled["df"] == pytest.approx(1) and pooled["per_run"] == rates
    assert 1 <= group["figures"]["on-fraction mean"]["df"] <= 2  # both factors vary: Satterthwaite df
    assert "2 classifiers x 2 autoencoders, crossed: two-way random-effects interval" in markdown
    assert "| figure | mean over runs [95 % t-interval] | df | per run |" in markdown


def test_a_standard_and_a_robust_classifier_are_not_seeds_of_one_experiment(tmp_path: Path) -> None:
    """The classifier checkpoints say how each was trained: standard and adversarial runs are never pooled."""
    folders = []
    for name, adversary in (
        ("standard", None),
        ("robust", {"eps": 2.0, "steps": 7}),
        ("robust2", {"eps": 2.0, "steps": 7}),
    ):
        checkpoint = tmp_path / f"{name}.ckpt"
        torch.save({"hyper_parameters": {"adversary": adversary}}, checkpoint)
        folder = write_run(tmp_path / name, fake_records(60, seed=len(folders)), seed=0)
        (folder / "config.yaml").write_text(f"ckpt_path: {checkpoint}\n")
        folders.append(folder)
    report, markdown, _ = _report(*folders, out=tmp_path / "out")
    robust = {"eps": 2.0, "steps": 7}
    assert [r["classifier"]["adversary"] for r in report["runs"]] == [None, robust, robust]
    (group,) = report["seed_groups"]  # the two robust runs only
    assert len(group["runs"]) == 2
    assert "standard training" in markdown and "adversarial training (eps=2.0, steps=7)" in markdown


def test_checks_can_fail(tmp_path: Path) -> None:
    records = fake_records(150, seed=0)
    summary = logged_summary(records) | {"clean_acc": 0.5}
    # A restricted arm that fools more images than the unconstrained attack.
    records["random_off_success"] = records["correct"].clone()
    records["full_success"] &= torch.arange(150) % 4 != 0
    folder = write_run(tmp_path / "bad", records, summary=summary, settings={**SETTINGS, "step_size": 0.01})
    report, _, _ = _report(folder, out=tmp_path / "out")
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert "clean_acc" in checks["figures recomputed from the samples equal the logged summary"]["detail"]
    assert (
        "random_off"
        in checks["the unconstrained attack fools at least as many images as every restricted arm"]["detail"]
    )
    for name in (
        "figures recomputed from the samples equal the logged summary",
        "the unconstrained attack fools at least as many images as every restricted arm",
        "the attack can reach its budget",
        "unconstrained attack fools ~all correctly classified images at the largest budget",
    ):
        assert checks[name]["status"] == "WARN", name


def test_folder_without_results_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run") in err and "dmm test --config" in err and "--decomposition.autoencoder" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report").exists()


def test_wrong_stage_truncated_or_malformed_results_are_clear_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DmmError, match="pass --stage test"):
        load_run(run_dir, "val")
    samples = run_dir / "decomposition" / "test-epoch0-samples.pt"
    records = torch.load(samples)
    samples.write_bytes(samples.read_bytes()[:100])
    with pytest.raises(DmmError, match="cannot read"):
        load_run(run_dir, "test")
    del records["random_off_l2"]  # an arm the JSON lists without its records
    torch.save(records, samples)
    with pytest.raises(DmmError, match="malformed.*random_off_l2"):
        load_run(run_dir, "test")


def test_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    target.write_text("old report")

    def crash(tmp: Path) -> None:
        tmp.write_text("half a rep")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old report" and list(tmp_path.iterdir()) == [target]
