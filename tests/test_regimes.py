"""``python -m dmm.regimes``: a 2-point grid end to end at a tiny size (one table, one plot), resumed by its
``done`` files, and bad grids as one-line errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from dmm import cli, regimes
from dmm.cli import RUN_DIR_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "linear_subspace"
FIT = ("--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --trainer.logger false "
       "--trainer.enable_model_summary false")  # fmt: skip
TEST = ["--evaluation.num_images", "8", "--evaluation.measure.attack.steps", "20",
        "--evaluation.measure.attack.step_size", "0.2", "--evaluation.num_grid", "0",
        "--trainer.logger", "false"]  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:model check failed")


def grid(out: Path) -> None:
    regimes.main([
        "--out", str(out), "--init-scales", "0.1", "1", "--weight-decays", "0.01",
        "--classifier-config", str(CONFIGS / "classifier.yaml"), "--geometry-config", str(CONFIGS / "geometry.yaml"),
        "--fit-args", FIT, "--", *TEST,
    ])  # fmt: skip


def test_a_tiny_grid_writes_one_table_and_one_plot_and_a_rerun_redoes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "regimes"
    grid(out)
    table = json.loads((out / "regimes.json").read_text())
    points = table["points"]
    assert [(p["init_scale"], p["weight_decay"]) for p in points] == [(0.1, 0.01), (1.0, 0.01)]
    for p in points:
        assert p["num_images"] == 8
        for key in ("accuracy", "grad_on/ce", "grad_random/ce", "grad_off_squared/ce", "grad_off_squared_random/ce",
                    "grad_on/margin", "grad_off_squared/margin"):  # fmt: skip
            assert math.isfinite(p[key]) and 0 <= p[key] <= 1, key
        assert p["grad_off_squared/ce"] <= 1 - p["grad_on/ce"] ** 2 + 1e-6  # mean(1 - on²) <= 1 - mean(on)²
        for arm in ("full", "on", "off", "random"):
            assert 0 <= p[f"distance/{arm}/found"] <= 1
            assert p[f"distance/{arm}/median"] is None or 0 <= p[f"distance/{arm}/median"] <= 4 + 1e-4
        config = (out / p["fit"] / "config.yaml").read_text()
        assert f"init_scale: {p['init_scale']}" in config and "weight_decay: 0.01" in config
    assert (out / "regimes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_run(args):
        raise AssertionError(f"a finished step ran again: {args}")

    monkeypatch.setattr(cli, "main", no_run)
    grid(out)
    assert json.loads((out / "regimes.json").read_text()) == table


def test_an_unfinished_step_is_removed_and_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(args):  # a `dmm test` that writes what the table reads
        calls.append(args[0])
        folder = Path(os.environ[RUN_DIR_ENV])
        (folder / "geometry").mkdir(parents=True)
        summary = {"accuracy": 1.0, **{f"grad_{k}/{g}": 0.5 for k in ("on", "random") for g in ("ce", "margin")}}
        (folder / "geometry" / "test-epoch0.json").write_text(json.dumps({"summary": summary}))
        records = {f"grad_{k}/{g}": torch.full((2,), 0.5) for k in ("on", "random") for g in ("ce", "margin")}
        torch.save({"index": torch.arange(2), **records}, folder / "geometry" / "test-epoch0-samples.pt")

    monkeypatch.setattr(cli, "main", fake)
    out = tmp_path / "regimes"
    args = ["--out", str(out), "--init-scales", "1", "--weight-decays", "0"]
    regimes.main(args)
    assert calls == ["fit", "test"]
    assert json.loads((out / "test-s1-wd0-seed0" / "done").read_text())["command"].startswith("dmm test --config")
    (out / "test-s1-wd0-seed0" / "done").unlink()
    (out / "test-s1-wd0-seed0" / "stale").write_text("")
    regimes.main(args)
    assert calls == ["fit", "test", "test"] and not (out / "test-s1-wd0-seed0" / "stale").exists()
    (point,) = json.loads((out / "regimes.json").read_text())["points"]
    assert point["grad_off_squared/ce"] == pytest.approx(0.75)  # 1 - 0.5²


def test_seeds_repeat_every_point_and_the_grid_pools_them_with_a_t_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shares = {"0": 0.2, "1": 0.6}  # the gradient's on-fraction of each seed's run: off-share 1 - on² = 0.96, 0.64

    def fake(args):
        folder = Path(os.environ[RUN_DIR_ENV])
        if args[0] == "fit":
            folder.mkdir()
            (folder / "seed").write_text(args[args.index("--seed_everything") + 1])
            return
        on = shares[(Path(args[args.index("--ckpt_path") + 1]).parents[1] / "seed").read_text()]
        (folder / "geometry").mkdir(parents=True)
        summary = {"accuracy": 1.0, **{f"grad_{k}/{g}": on for k in ("on", "random") for g in ("ce", "margin")}}
        (folder / "geometry" / "test-epoch0.json").write_text(json.dumps({"summary": summary}))
        records = {f"grad_{k}/{g}": torch.full((2,), on) for k in ("on", "random") for g in ("ce", "margin")}
        torch.save({"index": torch.arange(2), **records}, folder / "geometry" / "test-epoch0-samples.pt")

    monkeypatch.setattr(cli, "main", fake)
    out = tmp_path / "regimes"
    regimes.main(["--out", str(out), "--init-scales", "1", "--weight-decays", "0", "--seeds", "0", "1"])
    table = json.loads((out / "regimes.json").read_text())
    assert [(p["seed"], p["fit"]) for p in table["points"]] == [(0, "fit-s1-wd0-seed0"), (1, "fit-s1-wd0-seed1")]
    (row,) = table["grid"]
    off = row["grad_off_squared/ce"]
    assert row["seeds"] == [0, 1] and off["per_run"] == pytest.approx([0.96, 0.64]) and off["df"] == 1
    assert off["value"] == pytest.approx(0.8)
    half = 12.7062047 * 0.16 / 1  # t(0.975, 1 df) * sd / sqrt(2); sd = 0.32 / sqrt(2)
    assert off["ci"] == pytest.approx([0.8 - half, 0.8 + half], rel=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-scales", "0"], "--init-scales must be > 0"),
        (["--weight-decays", "-1"], "--weight-decays >= 0"),
        (["--init-scales", "1", "1.0"], "distinct"),
        (["--seeds", "0", "0"], "distinct"),
    ],
)
def test_bad_grids_are_one_line_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        regimes.main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("dmm regimes: error:") and message in error and error.count("\n") == 1
