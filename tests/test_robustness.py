"""The robustness measure: which attacks, monotone curves, bounds in the right order, convergence and sanity flags."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmm.attacks import PGD
from dmm.attacks import library as library_module
from dmm.errors import DmmError
from dmm.measures import Models, make_batch
from dmm.measures import robustness as robustness_module
from dmm.measures.robustness import Robustness

SHAPE = (1, 6, 6)
D = 36
EPS = [0.15, 0.4, 0.8]
NORM_NEEDED = PGD(eps=1.0, steps=50, step_size=0.02, early_stop=True)


def linear(classes: int, seed: int = 0, scale: float = 4.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def batch(model: nn.Module, b: int = 24, seed: int = 1, wrong: int = 3):
    """Images in [0.25, 0.75], labelled by the model except the first ``wrong`` ones."""
    x = 0.25 + 0.5 * torch.rand(b, *SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % model[1].out_features
    return make_batch(x, y, torch.arange(b), seed=0)


def run(measure: Robustness, model: nn.Module, data=None) -> tuple[dict, dict]:
    records = measure.measure(Models(model), data if data is not None else batch(model))
    return records, measure.summarize(records)


def curve(summary: dict, key: str) -> list[float]:
    return [summary[f"{key}@{e:g}"] for e in EPS]


@pytest.mark.parametrize("library", ["dmm", "adv-lib"])
def test_curves_fall_with_eps_and_the_bounds_are_ordered(library: str) -> None:
    if library == "adv-lib":
        pytest.importorskip("adv_lib", reason='adv-lib absent: pip install -e ".[attacks]"')
    model = linear(3)
    measure = Robustness(EPS, attack=NORM_NEEDED, library=library, steps=10, fmn_steps=20)
    records, s = run(measure, model)
    assert all(value.shape == (24,) for value in records.values())
    assert s["clean_acc"] == pytest.approx(21 / 24)
    names = list(measure.attacks)
    assert names == (["apgd_ce", "apgd_dlr"] if library == "adv-lib" else ["pgd_ce", "pgd_margin"])
    assert measure.settings()["library"].startswith(library)
    for key in ("fixed_budget/robust_acc", "convergence/robust_acc", "robust_acc", "norm_needed/robust_acc_upper"):
        values = [s["clean_acc"], *curve(s, key)]
        assert values == sorted(values, reverse=True), key
    for e in EPS:
        e = f"{e:g}"
        fixed, best = s[f"fixed_budget/robust_acc@{e}"], s[f"robust_acc@{e}"]
        assert all(fixed <= s[f"{a}/robust_acc@{e}"] for a in names)  # the ensemble is per image
        assert best <= s[f"convergence/robust_acc@{e}"] <= fixed
        assert best <= s[f"norm_needed/robust_acc_upper@{e}"]
        assert s[f"convergence/change_points@{e}"] >= 0
        assert s[f"robust_acc@{e}_ci_low"] <= best <= s[f"robust_acc@{e}_ci_high"]
    assert 0 < s[f"robust_acc@{EPS[0]:g}"] and s[f"robust_acc@{EPS[-1]:g}"] < s["clean_acc"]
    assert s["sanity/robust_acc"] == 0 and s["sanity/passed"] == 1
    if library == "adv-lib":  # FMN, warm-started at PGD's successes, needs no more than PGD
        assert all(s[f"robust_acc@{e:g}"] <= s[f"fmn/robust_acc_upper@{e:g}"] for e in EPS)
        both = records["fmn/success"] & records["pgd/success"]
        assert both.any() and (records["fmn/norm"][both] <= records["pgd/norm"][both] + 1e-6).all()
        assert s["fmn/ratio_to_pgd_median"] <= 1
    else:
        assert "fmn/norm" not in records


def test_same_starts_give_raw_records_that_fall_with_eps() -> None:
    """Two classes, images far from the box, PGD from x: the CE gradient has one direction, so a larger budget
    goes further along it — each image's raw record (no folding over smaller budgets) is monotone."""
    model = linear(2, scale=1.0)
    measure = Robustness(EPS, attack=NORM_NEEDED, library="dmm", steps=10, convergence=False)
    records, s = run(measure, model, batch(model, b=32, wrong=0))
    raw = torch.stack([records[f"pgd_ce/robust@{e:g}"] for e in EPS]).int()
    assert (raw[1:] <= raw[:-1]).all() and raw[0].sum() > raw[-1].sum()
    assert all(s[f"nonmonotone@{e:g}"] == 0 for e in EPS)


def test_sanity_check_fails_for_a_model_no_budget_can_fool() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))  # x enters the graph, with zero gradient

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0.0, 1.0, 0.0]) + self.scale * x.flatten(1)[:, :3]

    model = Constant()
    data = make_batch(torch.rand(6, *SHAPE), torch.ones(6, dtype=torch.long), torch.arange(6), seed=0)
    measure = Robustness(EPS, attack=NORM_NEEDED, library="dmm", steps=3, convergence=False)
    _, s = run(measure, model, data)
    assert s["sanity/robust_acc"] == 1 and s["sanity/passed"] == 0
    assert curve(s, "robust_acc") == [1.0, 1.0, 1.0]


def test_convergence_flags_and_monotone_folding_from_records() -> None:
    """Hand-made records of 200 correct images: the 2x runs break one more image at 0.4 (0.5 points: flagged)
    and none at 0.15; an image robust at 0.8 but broken at 0.4 counts as broken at 0.8 and as non-monotone."""
    measure = Robustness(EPS, attack=NORM_NEEDED, library="dmm", fmn_steps=0)
    n = 200
    true, false = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    records = {"correct": true, "sanity/robust": false, "pgd/norm": torch.full((n,), 5.0), "pgd/success": true}
    for a in ("pgd_ce", "pgd_margin", "pgd_ce_2x", "pgd_margin_2x"):
        for e in EPS:
            records[f"{a}/robust@{e:g}"] = true.clone()
    records["pgd_ce_2x/robust@0.4"][0] = False
    records["pgd_margin/robust@0.4"][1] = False
    s = measure.summarize(records)
    assert s["convergence/change_points@0.15"] == 0 and s["convergence/flag@0.15"] == 0
    assert s["convergence/change_points@0.4"] == pytest.approx(0.5) and s["convergence/flag@0.4"] == 1
    assert s["convergence/flagged"] == 1
    assert s["fixed_budget/robust_acc@0.4"] == s["fixed_budget/robust_acc@0.8"] == pytest.approx(199 / 200)
    assert s["robust_acc@0.8"] == pytest.approx(198 / 200)
    assert s["nonmonotone@0.8"] == pytest.approx(1 / 200)
    assert s["norm_needed/robust_acc_upper@0.8"] == 1  # PGD needed 5 > 0.8 everywhere: an upper bound only
    assert s["sanity/passed"] == 1


def test_auto_falls_back_to_dmm_pgd_without_adv_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(robustness_module, "available", lambda: False)
    monkeypatch.setattr(library_module, "available", lambda: False)
    measure = Robustness(EPS, attack=NORM_NEEDED)
    assert measure.library == "dmm" and measure.fmn is None and measure.settings()["library"] == "dmm"
    assert all(a.restarts == 1 and a.steps == 100 for a in measure.attacks.values())
    with pytest.raises(DmmError, match=r"pip install"):
        Robustness(EPS, attack=NORM_NEEDED, library="adv-lib")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_curve": []}, "eps_curve"),
        ({"eps_curve": [0.5, math.nan]}, "eps_curve"),
        ({"attack": NORM_NEEDED.replace(early_stop=False)}, "stop early"),
        ({"attack": NORM_NEEDED.replace(eps=0.5)}, "largest budget 0.8"),
        ({"attack": NORM_NEEDED.replace(step_size=0.001)}, "reach"),
        ({"library": "foolbox"}, "library"),
        ({"steps": 0}, "steps"),
        ({"fmn_steps": -1}, "fmn_steps"),
        ({"sanity_eps": 0.0}, "sanity_eps"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(DmmError, match=message):
        Robustness(**{"eps_curve": EPS, "attack": NORM_NEEDED, **kwargs})
