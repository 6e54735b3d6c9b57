"""What every benchmark shares: its options, the row it reports, timing, peak memory, the machine."""

from __future__ import annotations

import datetime
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from dmm.bench.speed import FP32, Speed
from dmm.errors import DmmError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def model_args(config: str, dataset: str = "mnist") -> dict:
    """``model.init_args`` of ``configs/<dataset>/<config>.yaml``, so the benchmarks time the configured sizes."""
    path = CONFIGS / dataset / f"{config}.yaml"
    if not path.is_file():
        raise DmmError(f"{path} not found: run the benchmarks from a checkout of the dmm repository")
    return yaml.safe_load(path.read_text())["model"]["init_args"]


@dataclass(frozen=True)
class Options:
    """Settings of one suite run, the same for every benchmark.

    Attributes:
        device: "cpu" or "cuda".
        quick: tiny sizes and few repeats (for tests; the figures then mean nothing).
        data_dir: folder with ``MNIST/raw`` (torchvision layout); random images in [0, 1] when absent.
        classifier: trained MNIST classifier checkpoint; ``None`` means random weights (or, where a
            benchmark needs a model that can be fooled gradually, a briefly trained MLP).
        autoencoder: trained MNIST autoencoder checkpoint; ``None`` means random weights.
        speed: how classifiers run for the training and attack benchmarks that take it (``cifar_*``),
            timed against plain float32.
    """

    device: str = "cpu"
    quick: bool = False
    data_dir: Path = Path("../shared/data")
    classifier: Path | None = None
    autoencoder: Path | None = None
    speed: Speed = FP32


@dataclass(frozen=True)
class Target:
    """An upper bound a row should meet: on its ``ratio`` (cost ratio) or on ``ours`` itself."""

    at_most: float
    of: str = "ratio"

    def __str__(self) -> str:
        return f"≤ {self.at_most:g}×" if self.of == "ratio" else f"≤ {self.at_most:g}"


@dataclass
class Row:
    """One line of the table.

    ``ratio`` is always a cost ratio, ours ÷ reference in time (or reference ÷ ours in throughput), so
    below 1 means ours is faster and every target is an upper bound.

    Attributes:
        name: "benchmark/what vs what".
        ours: our figure, in ``unit``.
        unit: a time ("s", "s/img"), a throughput ("img/s", "img·steps/s"), "MiB", or "" for a plain number.
        reference: the reference's figure in the same unit, if there is one.
        ratio: cost ratio (see above).
        target: the bound this row should meet, if any.
        peak_mb: peak memory in MiB (CUDA: allocated during ours; CPU: the process's peak RSS so far).
        note: what the figure means, or why something is missing.
        samples: the raw repeat timings, seconds, by what was timed.
    """

    name: str
    ours: float
    unit: str = "s"
    reference: float | None = None
    ratio: float | None = None
    target: Target | None = None
    peak_mb: float | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.target is None:
            return "—"
        value = self.ratio if self.target.of == "ratio" else self.ours
        if value is None or not math.isfinite(value):
            return "MISS"
        return "PASS" if value <= self.target.at_most else "MISS"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["target"] = None if self.target is None else {"at_most": self.target.at_most, "of": self.target.of}
        out["status"] = self.status
        return out


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels, so a host clock measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device) -> float:
    """Seconds one call of ``fn`` takes, by ``time.perf_counter`` around device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def repeat_times(
    fns: dict[str, Callable[[], object]], *, repeats: int, device: str | torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` rounds.

    The functions alternate within each round, so a change of load on a shared machine hits all of them
    alike instead of whichever happened to run last.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def process_peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB.

    Linux's ``VmHWM`` belongs to the process image alone; ``ru_maxrss`` (the fallback elsewhere) survives
    ``exec``, so a fresh benchmark process would report its parent's peak if that were higher.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class PeakMemory:
    """Context manager; ``mb`` afterwards is the peak memory of the block, MiB: the one way the suite measures it.

    CUDA: the peak allocated inside the block. CPU: the process's peak RSS so far, since an RSS
    high-water mark cannot be reset (each benchmark runs in a fresh process unless ``--in-process``).
    """

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.mb = device, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = process_peak_rss_mb()


def peak_memory_mb(fn: Callable[[], object], device: str | torch.device) -> float:
    """Peak memory of one more call of ``fn`` (CUDA), or the process's peak RSS so far (CPU: no call)."""
    with PeakMemory(device) as peak:
        if peak.cuda:
            fn()
    return peak.mb


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, str | int]:
    """The facts a figure depends on, and ``key``: the machine + device a Markdown section belongs to."""
    import lightning

    cpu, threads = _cpu_model(), torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return {
        "key": f"{name} | {cpu} | threads={threads}",
        "device": name,
        "cpu": cpu,
        "threads": threads,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
