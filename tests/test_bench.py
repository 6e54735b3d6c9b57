"""The benchmark suite: every benchmark runs at quick sizes, its outputs have the promised structure, a rerun
replaces only its own machine's section, and the references it times compute what ours computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dmm.bench import BENCHMARKS, GPU_SIZED, Options, Row, Speed, Target, default_benchmarks
from dmm.bench.cli import main
from dmm.bench.core import process_peak_rss_mb, repeat_times
from dmm.bench.inputs import images
from dmm.bench.pgd import gradient_floor
from dmm.bench.report import markdown_section, update_json, update_markdown
from dmm.bench.speed import Autocast, compiled, full_precision, prepare
from dmm.bench.tangent import jacfwd_basis, per_pixel_basis
from dmm.manifold import principal_angles, tangent_basis
from dmm.nets import MLP, ConvDecoder

STATUSES = {"PASS", "MISS", "—"}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_suite(out: Path, md: Path, printed: str, names: list[str]) -> dict:
    """The JSON entry of this machine, after checking every row of ``names`` in the JSON, table and Markdown."""
    (entry,) = json.loads(out.read_text())["machines"].values()
    machine = entry["machine"]
    assert machine["device"] == "cpu" and machine["threads"] == 1 and machine["torch"] == torch.__version__
    assert machine["cpu"] and machine["date"] and machine["lightning"]
    assert set(entry["benchmarks"]) == set(names)
    text = md.read_text()
    assert text.count("<!-- dmm-bench:") == 1 and "| benchmark | ours | reference |" in text
    for name, result in entry["benchmarks"].items():
        assert result["quick"] and result["rows"], name
        assert result["peak_rss_mb"] >= result["rss_before_mb"] > 0
        for row in result["rows"]:
            assert row["name"].startswith(f"{name}/") and row["name"] in printed and row["name"] in text
            assert math.isfinite(row["ours"]) and row["ours"] > 0, row
            assert row["ratio"] is None or (math.isfinite(row["ratio"]) and row["ratio"] > 0), row
            assert row["status"] in STATUSES and (row["status"] == "—") == (row["target"] is None), row
            assert row["peak_mb"] is None or row["peak_mb"] > 0
            for samples in row["samples"].values():
                assert all(math.isfinite(t) and t > 0 for t in samples), row
    return entry


def test_quick_suite_writes_table_json_and_markdown(tmp_path: Path, restore_threads, capsys) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--quick", "--in-process", "--threads", "1", "--device", "cpu", "--data-dir", str(tmp_path / "absent")]
    assert main([*args, "--out", str(out), "--markdown", str(md)]) == 0
    entry = _check_suite(out, md, capsys.readouterr().out, default_benchmarks("cpu"))
    # The rows with a reference and a target are the ones the brief asks for.
    targeted = {row["name"] for result in entry["benchmarks"].values() for row in result["rows"] if row["target"]}
    assert {"pgd/l2 vs floor", "pgd/linf vs floor", "callback/total", "lightning/training vs plain loop"} <= targeted
    assert sum(name.startswith("tangent/") for name in targeted) == 2


def test_gpu_command_falls_back_to_cpu_and_runs_the_cuda_settings(tmp_path: Path, restore_threads, capsys) -> None:
    # `python -m dmm.bench --device cuda`, the GPU's prepared command, on a machine without one: a clear warning,
    # then the GPU-sized benchmarks at quick sizes on the CPU with the settings a GPU run would use.
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--device", "cuda", "--precision", "bf16", "--channels-last", "--quick", "--in-process", "--threads", "1"]
    names = [*GPU_SIZED, "projector"]
    assert main([*args, "--only", *names, "--out", str(out), "--markdown", str(md)]) == 0
    captured = capsys.readouterr()
    assert not torch.cuda.is_available() and "no CUDA device: running on the CPU instead" in captured.err
    entry = _check_suite(out, md, captured.out, names)
    rows = {row["name"]: row for result in entry["benchmarks"].values() for row in result["rows"]}
    for benchmark in ("cifar_pgd", "cifar_train"):
        for net in ("VGG", "ResNet-18"):
            fast = rows[f"{benchmark}/{net} bf16 + channels_last vs fp32"]
            assert fast["reference"] == rows[f"{benchmark}/{net} fp32"]["ours"]
            assert fast["ratio"] == pytest.approx(fast["reference"] / fast["ours"])
    assert entry["benchmarks"]["cifar_pgd"]["speed"] == "bf16 + channels_last"
    assert "float32 always" in rows["cifar_tangent/k=128 vs vmap(jacfwd)+QR"]["note"]
    assert "1000" not in rows["cifar_decomposition/total"]["note"]  # quick sizes
    assert rows["projector/agreement float32"]["status"] == "PASS"


def test_default_set_is_gpu_sized_on_cuda_only() -> None:
    assert default_benchmarks("cuda") == list(BENCHMARKS)
    assert set(default_benchmarks("cpu")) == set(BENCHMARKS) - set(GPU_SIZED)
    assert (
        "projector" in default_benchmarks("cpu") and not (Path(__file__).parents[1] / "dmm/bench_projector.py").exists()
    )


def test_tangent_bases_never_run_in_bf16_or_channels_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmm.bench import cifar_tangent

    seen = []

    def record(module, inputs, output) -> None:
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d | torch.nn.Linear):
            seen.append((type(module).__name__, output.dtype, torch.is_autocast_enabled("cpu")))
            assert module.weight.is_contiguous(), type(module).__name__

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        # The caller asks for bf16 and channels_last and even has autocast on: the bases stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (row,) = cifar_tangent.run(Options(quick=True, speed=Speed("bf16", channels_last=True)))
    finally:
        handle.remove()
    assert seen and all(dtype == torch.float32 and not autocast for _, dtype, autocast in seen), seen[:3]
    assert "float32 always" in row.note
    with pytest.raises(ValueError, match="float32"):
        with full_precision(ConvDecoder(3, (1, 8, 8), channels=(4,)).to(torch.bfloat16)):
            pass
    with pytest.raises(ValueError, match="contiguous=False"):
        with full_precision(ConvDecoder(3, (3, 8, 8), channels=(4, 4)).to(memory_format=torch.channels_last)):
            pass


def test_speed_settings_run_the_classifier_in_bf16_and_return_float32_logits() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.rand(1, 3, 8, 8))
    inner = []
    net[0].register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    model, note = prepare(net, Speed("bf16", channels_last=True), warmup=lambda m: None)
    assert isinstance(model, Autocast) and note == ""
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    logits = model(torch.rand(2, 3, 8, 8))
    assert logits.dtype == torch.float32 and inner == [torch.bfloat16]
    plain, _ = prepare(net, Speed(), warmup=lambda m: None)
    assert plain is net


def test_compile_falls_back_to_the_eager_model(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    model = torch.nn.Linear(3, 2)

    def broken_at_first_call(module):
        def call(*args):
            raise RuntimeError("inductor: no C++ compiler")

        return call

    for fake in (broken_at_first_call, lambda module: (_ for _ in ()).throw(RuntimeError("dynamo unsupported"))):
        monkeypatch.setattr(torch, "compile", fake)
        fast, note = compiled(model, warmup=lambda m: m(torch.rand(1, 3)))
        assert fast is model and note == "compile failed (RuntimeError), eager"
    assert "torch.compile failed" in caplog.text
    monkeypatch.setattr(torch, "compile", lambda module: module)  # a compile that works
    assert compiled(model, warmup=lambda m: m(torch.rand(1, 3))) == (model, "compiled")


def test_peak_memory_is_measured_one_way() -> None:
    assert process_peak_rss_mb() > 0
    sources = {p.name: p.read_text() for p in (Path(__file__).parents[1] / "dmm" / "bench").glob("*.py")}
    for marker in ("ru_maxrss", "VmHWM", "max_memory_allocated", "reset_peak_memory_stats"):
        assert [name for name, text in sources.items() if marker in text] == ["core.py"], marker


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
    args = ["--quick", "--threads", "1", "--device", "cuda", "--data-dir", str(tmp_path), "--out", str(out)]
    assert main([*args, "--precision", "bf16", "--only", "callback", "lightning", "cifar_pgd"]) == 0
    (entry,) = json.loads(out.read_text())["machines"].values()
    assert set(entry["benchmarks"]) == {"callback", "lightning", "cifar_pgd"}
    for result in entry["benchmarks"].values():
        assert result["peak_rss_mb"] >= result["rss_before_mb"] > 0
        assert result["speed"] == "bf16"  # the settings reach the child process
