"""Clinging then dimpling: exact answers on a linear model, the random control, and the callback through the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dmm.attacks import PGD
from dmm.callbacks import ManifoldDynamics
from dmm.cli import main
from dmm.errors import DmmError
from dmm.manifold import Subspace, random_basis, random_fraction_mean
from dmm.measures import Geometry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (1, 8, 8)
N = math.prod(SHAPE)
MARGIN = 0.49  # the points' L2 distance to the linear boundary: crossed by the 10th step of 0.05

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class Linear2(nn.Module):
    """Two-class linear classifier [0, w.x]: its CE and margin gradients both point along w."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.stack([torch.zeros_like(w), w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def search(eps: float, steps: int, step_size: float, clamp: bool = True) -> Geometry:
    """The boundary search: early-stopped L2 PGD in equal steps."""
    return Geometry(PGD(eps=eps, steps=steps, step_size=step_size, clamp=clamp, early_stop=True))


def linear_case(aligned: bool, points: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-0 points at distance MARGIN from the boundary w.x = 0; tangent bases containing w or orthogonal to it."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(N, generator=generator)
    w -= w.mean()  # w . (0.5, ..., 0.5) = 0, so the mid-grey image lies on the boundary
    u = w / w.norm()
    other = torch.linalg.qr(torch.randn(N, 3, generator=generator)).Q
    other = torch.linalg.qr(other - u[:, None] * (u @ other)[None, :]).Q  # orthonormal, orthogonal to w
    q = torch.cat([u[:, None], other[:, :2]], dim=1) if aligned else other
    x = (0.5 - MARGIN * u).view(1, *SHAPE).expand(points, *SHAPE).clone()
    assert 0 <= x.min() and x.max() <= 1
    return Linear2(w), x, torch.zeros(points, dtype=torch.long), q.expand(points, N, 3)


@pytest.mark.parametrize("aligned", [True, False])
def test_linear_case_is_exact(aligned: bool) -> None:
    """Gradient in the tangent space: on-fraction 1, the boundary as near on-manifold as free, never off it."""
    model, x, y, q = linear_case(aligned)
    random = Subspace(random_basis(8, N, 3, generator=torch.Generator().manual_seed(1)))
    out = search(eps=1.0, steps=30, step_size=0.05, clamp=False).measure_at(model, x, y, Subspace(q), random)
    for loss in ("ce", "margin"):
        assert out[f"grad_on/{loss}"] == pytest.approx(torch.full((8,), float(aligned)), abs=1e-5)
    full, on, off = (out[f"distance/{a}"] for a in ("full", "on", "off"))
    along, across = (on, off) if aligned else (off, on)
    assert full == pytest.approx(torch.full((8,), 0.5), abs=1e-5)
    assert along == pytest.approx(full, abs=1e-5) and torch.isinf(across).all()


def test_random_control_matches_the_expected_fraction() -> None:
    """A random k-subspace of R^n holds E||Q^T u|| = G((k+1)/2) G(n/2) / (G(k/2) G((n+1)/2)) ~ sqrt(k/n), G = Gamma."""
    model, x, y, q = linear_case(aligned=True, points=512)
    random = Subspace(random_basis(512, N, 3, generator=torch.Generator().manual_seed(2)))
    geometry = search(eps=0.1, steps=1, step_size=0.1)
    out = geometry.measure_at(model, x, y, Subspace(q), random)
    k = 3
    exact = math.exp(math.lgamma((k + 1) / 2) + math.lgamma(N / 2) - math.lgamma(k / 2) - math.lgamma((N + 1) / 2))
    assert random_fraction_mean(k, N) == pytest.approx(exact, rel=1e-12)
    summary = geometry.summarize(out)
    assert summary["grad_random/ce"] == pytest.approx(exact, rel=0.05)
    assert summary["grad_random/ce"] == pytest.approx(math.sqrt(k / N), rel=0.15)
    assert summary["grad_on/ce"] == pytest.approx(1.0, abs=1e-5)


def test_measurement_leaves_a_training_model_as_it_was() -> None:
    """Eval mode inside (BatchNorm statistics untouched), train flags and parameter gradients restored."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(N, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)
    )
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, x, y, q = linear_case(aligned=True)
    with torch.inference_mode():  # as in a Lightning validation hook
        out = search(eps=0.5, steps=5, step_size=0.1).measure_at(model, x, y, Subspace(q), Subspace(q))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(out["grad_on/ce"]).all()


def test_summary_quantiles_count_points_beyond_the_search_as_infinite() -> None:
    records = {
        "correct": torch.tensor([True, True, True, True, False]),
        **{
            f"grad_{kind}/{g}": torch.tensor([0.5, float("nan"), 0.5, 0.5, 0.5])
            for kind in ("on", "random")
            for g in ("ce", "margin")
        },
        "distance/full": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]),
        "distance/on": torch.tensor([0.1, float("inf"), float("inf"), float("inf"), 0.0]),
        "distance/off": torch.tensor([0.1, 0.2, float("inf"), float("inf"), 0.0]),
    }
    s = Geometry().summarize(records)
    assert s["accuracy"] == pytest.approx(0.8) and s["grad_on/ce"] == pytest.approx(0.5)  # the NaN is skipped
    # The misclassified point (distance 0) is left out; nearest-rank quartiles of 0.1, 0.2, 0.3, 0.4.
    assert s["distance/full/found"] == 1.0
    assert [s[f"distance/full/{q}"] for q in ("q25", "median", "q75")] == pytest.approx([0.2, 0.3, 0.3])
    assert s["distance/on/found"] == 0.25 and math.isinf(s["distance/on/q25"])
    assert s["distance/off/found"] == 0.5


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(DmmError, match="every_n_steps"):
        ManifoldDynamics(every_n_steps=0)
    with pytest.raises(DmmError, match="step_size"):
        ManifoldDynamics(attack=PGD(step_size=float("nan")))
    for attack in (PGD(norm="linf", early_stop=True), PGD(eps=1.0, steps=20, step_size=0.05)):
        with pytest.raises(DmmError, match="early-stopped L2"):  # the boundary search needs the first crossing
            ManifoldDynamics(attack=attack)
    with pytest.warns(UserWarning, match="never found"):  # 10 steps of 0.05 cannot reach 1.0
        ManifoldDynamics(attack=PGD(eps=1.0, steps=10, step_size=0.05, early_stop=True))


def run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))


def test_schedule_doubles_then_goes_every_n_steps() -> None:
    doubling = ManifoldDynamics(every_n_steps=100)
    assert [s for s in range(1, 301) if doubling.due(s)] == [1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
    plain = ManifoldDynamics(every_n_steps=100, doubling=False)
    assert [s for s in range(1, 301) if plain.due(s)] == [1, 100, 200, 300]


def test_callback_through_fit_and_resume(tmp_path: Path, train_synthetic_autoencoder) -> None:
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]
    autoencoder = train_synthetic_autoencoder()
    dynamics = [
        f"--trainer.callbacks.init_args.{key}={value}"
        for key, value in {"autoencoder": autoencoder, "num_points": 24, "every_n_steps": 2, "attack.eps": 1.0,
                           "attack.steps": 20}.items()
    ]  # fmt: skip
    common = [
        "--config",
        str(CONFIGS / "synthetic" / "dynamics.yaml"),
        *dynamics,
        "--trainer.limit_train_batches=3",
        "--trainer.log_every_n_steps=50",  # the callback logs its own steps, whatever this says
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        *quiet,
    ]
    first_run = ["--trainer.max_epochs=1", f"--trainer.logger.save_dir={tmp_path / 'csv'}"]
    run("fit", *common, *first_run, "--trainer.default_root_dir", str(tmp_path / "first"))
    (first,) = (tmp_path / "first").iterdir()
    # Measured after step 1, at step 2 (every_n_steps) and at the epoch's end (step 3).
    written = json.loads((first / "dynamics.json").read_text())
    assert [h["step"] for h in written["history"]] == [1, 2, 3]
    # The search as configured: the command line over the config's attack, the rest PGD's fields.
    assert written["search"] == PGD(eps=1.0, steps=20, step_size=0.05, early_stop=True).as_dict()
    assert (first / "dynamics.png").stat().st_size > 0
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    logged = [row for row in csv.DictReader(metrics.open()) if row.get("dynamics/grad_on/ce")]
    assert [int(row["step"]) for row in logged] == [1, 2, 3]  # every measurement reaches the loggers
    assert 0 <= float(logged[0]["dynamics/grad_on/ce"]) <= 1 and "dynamics/distance/off/median" in logged[0]

    checkpoint = first / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)["callbacks"]["ManifoldDynamics"]
    restored = ManifoldDynamics()
    restored.load_state_dict(state)
    assert restored.state_dict() == state and [h["step"] for h in state["history"]] == [1, 2, 3]

    resume = [
        "--trainer.max_epochs=2",
        f"--trainer.logger.save_dir={tmp_path / 'csv2'}",
        "--ckpt_path",
        str(checkpoint),
    ]
    run("fit", *common, *resume, "--trainer.default_root_dir", str(tmp_path / "resumed"))
    (resumed,) = (tmp_path / "resumed").iterdir()
    history = json.loads((resumed / "dynamics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 6]
    assert history[:3] == json.loads((first / "dynamics.json").read_text())["history"]
