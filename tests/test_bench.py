"""The benchmark suite: every benchmark runs at quick sizes, its outputs have the promised structure, a rerun
replaces only its own machine's section, and the references it times compute what ours computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dmm.bench import BENCHMARKS, Options, Row, Target
from dmm.bench.cli import main
from dmm.bench.core import repeat_times
from dmm.bench.inputs import images
from dmm.bench.pgd import gradient_floor
from dmm.bench.report import markdown_section, update_json, update_markdown
from dmm.bench.tangent import jacfwd_basis, per_pixel_basis
from dmm.manifold import principal_angles, tangent_basis
from dmm.nets import MLP, ConvDecoder

STATUSES = {"PASS", "MISS", "—"}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_suite_writes_table_json_and_markdown(tmp_path: Path, restore_threads, capsys) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--quick", "--in-process", "--threads", "1", "--device", "cpu", "--data-dir", str(tmp_path / "absent")]
    assert main([*args, "--out", str(out), "--markdown", str(md)]) == 0

    (entry,) = json.loads(out.read_text())["machines"].values()
    machine = entry["machine"]
    assert machine["device"] == "cpu" and machine["threads"] == 1 and machine["torch"] == torch.__version__
    assert machine["cpu"] and machine["date"] and machine["lightning"]
    assert set(entry["benchmarks"]) == set(BENCHMARKS)
    printed, text = capsys.readouterr().out, md.read_text()
    assert text.count("<!-- dmm-bench:") == 1 and "| benchmark | ours | reference |" in text
    for name, result in entry["benchmarks"].items():
        assert result["quick"] and result["rows"], name
        assert result["peak_rss_mb"] >= result["rss_before_mb"] > 0
        for row in result["rows"]:
            assert row["name"].startswith(f"{name}/") and row["name"] in printed and row["name"] in text
            assert math.isfinite(row["ours"]) and row["ours"] > 0, row
            assert row["ratio"] is None or (math.isfinite(row["ratio"]) and row["ratio"] > 0), row
            assert row["status"] in STATUSES and (row["status"] == "—") == (row["target"] is None), row
            assert row["peak_mb"] > 0
            for samples in row["samples"].values():
                assert all(math.isfinite(t) and t > 0 for t in samples), row
    # The rows with a reference and a target are the ones the brief asks for.
    targeted = {row["name"] for result in entry["benchmarks"].values() for row in result["rows"] if row["target"]}
    assert {"pgd/l2 vs floor", "pgd/linf vs floor", "callback/total", "lightning/training vs plain loop"} <= targeted
    assert sum(name.startswith("tangent/") for name in targeted) == 2


def _entry(key: str, benchmark: str, ours: float) -> tuple[dict, dict]:
    machine = {"key": key, "device": key, "cpu": "cpu", "threads": 2, "torch": "t", "lightning": "l", "python": "p"}
    machine["date"] = "2026-01-01T00:00:00"
    row = Row(f"{benchmark}/x vs y", ours, reference=2.0, ratio=ours / 2.0, target=Target(1.05)).as_dict()
    result = {"name": benchmark, "date": "d", "quick": False, "seconds": 1.0, "load_average": [0.1, 0.2]}
    return machine, {benchmark: {**result, "rss_before_mb": 100.0, "peak_rss_mb": 200.0, "rows": [row]}}


def test_rerun_replaces_only_its_own_machine_and_benchmarks(tmp_path: Path) -> None:
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    md.write_text("# Notes kept by hand\n\nSome prose.\n")
    for key, benchmark, ours in [
        ("gpu", "pgd", 1.0),
        ("cpu", "pgd", 3.0),
        ("cpu", "tangent", 1.0),
        ("cpu", "pgd", 2.0),
    ]:
        update_markdown(md, update_json(out, *_entry(key, benchmark, ours)))

    machines = json.loads(out.read_text())["machines"]
    assert set(machines) == {"gpu", "cpu"} and set(machines["cpu"]["benchmarks"]) == {"pgd", "tangent"}
    assert machines["cpu"]["benchmarks"]["pgd"]["rows"][0]["ours"] == 2.0  # the last run of pgd wins
    text = md.read_text()
    assert text.startswith("# Notes kept by hand\n\nSome prose.\n")
    assert text.count("<!-- dmm-bench: cpu -->") == 1 and text.count("<!-- dmm-bench: gpu -->") == 1
    assert markdown_section(machines["cpu"]) in text and markdown_section(machines["gpu"]) in text
    assert "| pgd/x vs y | 2 s | 2 s | 1× | ≤ 1.05× | PASS |" in text
    assert "| pgd/x vs y | 1 s | 2 s | 0.5× | ≤ 1.05× | PASS |" in text  # the GPU section is untouched


def test_status_compares_the_right_figure_with_the_target() -> None:
    assert Row("a/b", 1.0, ratio=1.2, target=Target(1.05)).status == "MISS"
    assert Row("a/b", 1.0, ratio=1.0, target=Target(1.05)).status == "PASS"
    assert Row("a/b", 30.0, target=Target(60.0, of="ours")).status == "PASS"
    assert Row("a/b", 90.0, target=Target(60.0, of="ours")).status == "MISS"
    assert Row("a/b", 1.0, ratio=math.nan, target=Target(1.05)).status == "MISS"
    assert Row("a/b", 1.0).status == "—"


def test_repeat_times_warms_up_then_alternates() -> None:
    calls = []
    samples = repeat_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, device="cpu", warmup=1
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert [len(s) for s in samples.values()] == [3, 3]


def test_tangent_references_compute_the_same_basis() -> None:
    torch.manual_seed(0)
    decoder = ConvDecoder(3, (1, 8, 8), channels=(8, 4)).double().eval()
    z = torch.randn(2, 3, dtype=torch.float64)
    ours = tangent_basis(decoder, z)
    loop = torch.stack([per_pixel_basis(decoder, v) for v in z])
    for reference in (loop, jacfwd_basis(decoder, z)):
        assert reference.shape == ours.shape == (2, 64, 3)
        assert principal_angles(ours, reference).max() < 1e-6


def test_gradient_floor_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=(8,)).eval()
    x, y = torch.rand(5, 1, 4, 4), torch.randint(0, 3, (5,))
    gradient_floor(model, x, y, steps=2)
    assert all(p.grad is None for p in model.parameters())


def test_images_are_random_without_mnist(tmp_path: Path) -> None:
    x, y, source = images(Options(data_dir=tmp_path), 4)
    assert source == "random images" and x.shape == (4, 1, 28, 28) and y.dtype == torch.int64


def test_images_read_mnist(mnist_dir: Path) -> None:
    x, y, source = images(Options(data_dir=mnist_dir), 4)
    assert source == "MNIST val" and x.shape == (4, 1, 28, 28) and 0 <= x.min() and x.max() <= 1


@pytest.mark.slow
def test_each_benchmark_runs_in_its_own_process(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    args = ["--quick", "--threads", "1", "--device", "cpu", "--data-dir", str(tmp_path), "--out", str(out)]
    assert main([*args, "--only", "callback", "lightning"]) == 0
    (entry,) = json.loads(out.read_text())["machines"].values()
    assert set(entry["benchmarks"]) == {"callback", "lightning"}
    for result in entry["benchmarks"].values():
        assert result["peak_rss_mb"] >= result["rss_before_mb"] > 0
