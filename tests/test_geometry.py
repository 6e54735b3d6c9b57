"""Geometry's honesty fixes: BatchNorm recalibrated then restored, distances over the fixed population."""

from __future__ import annotations

import math

import torch
from torch import nn

from dmm.measures.geometry import Geometry, recalibrated


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_recalibrated_statistics_are_the_batches_and_everything_is_restored_after() -> None:
    model = _bn_model().train()
    bn = model[2]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    batches = [torch.randn(32, 1, 4, 4) + 3.0 for _ in range(4)]
    rng = torch.get_rng_state()
    with recalibrated(model, batches) as m:
        with torch.no_grad():
            features = torch.cat([model[1](model[0](x)) for x in batches])
        # Plain averages over the batches (momentum None): the mean of the batch means, the mean of unbiased vars.
        assert torch.allclose(bn.running_mean, features.mean(0), atol=1e-5)
        expected_var = torch.stack([model[1](model[0](x)).var(0) for x in batches]).mean(0).detach()
        assert torch.allclose(bn.running_var, expected_var, rtol=1e-4)
        assert m.training  # the modes are the caller's: the measure sets eval itself
    assert torch.equal(torch.get_rng_state(), rng)  # dropout in train mode drew nothing from the global RNG
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert bn.momentum == 0.1 and model.training


def test_recalibration_changes_what_a_lagging_eval_network_predicts() -> None:
    model = _bn_model().eval()  # running stats at their init (mean 0, var 1): far from inputs shifted by 3
    x = torch.randn(64, 1, 4, 4) + 3.0
    with torch.no_grad():
        stale = model(x)
    with recalibrated(model, [x]), torch.no_grad():
        model.eval()
        fresh = model(x)
    assert not torch.allclose(stale, fresh, atol=1e-3)


def test_population_quartiles_count_misclassified_points_at_zero_and_misses_at_infinity() -> None:
    correct = torch.tensor([True, True, True, False, False])
    distance = torch.tensor([1.0, 2.0, math.inf, 0.0, 0.0])
    records = {
        "correct": correct,
        **{f"grad_{k}/{g}": torch.zeros(5) for k in ("on", "random") for g in ("ce", "margin")},
    }
    records |= {f"distance/{a}": distance for a in ("full", "on", "off", "random")}
    s = Geometry().summarize(records)
    assert s["distance/on/median"] == 2.0  # over the three correct points
    assert s["distance/on/all_median"] == 1.0  # over all five: 0, 0, 1, 2, inf
    assert s["distance/on/all_q75"] == 2.0 and s["distance/on/q75"] == math.inf
