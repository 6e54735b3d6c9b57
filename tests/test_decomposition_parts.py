"""The parts of a perturbation: margin shares add up on a linear model; full-budget parts are recorded."""

from __future__ import annotations

import math

import torch
from torch import nn

from dmm.attacks import PGD
from dmm.measures import Decomposition, Models, make_batch
from dmm.measures.decomposition import margin_shares, margins
from dmm.nets import MLP, MLPDecoder, MLPEncoder

SHAPE = (1, 8, 8)


def _tiny_models() -> Models:
    torch.manual_seed(0)
    return Models(MLP(SHAPE, 3, hidden=(32,), dropout=0.0), MLPEncoder(SHAPE, 3, hidden=(16,)),
                  MLPDecoder(3, SHAPE, hidden=(16,)))  # fmt: skip


def test_margin_shares_add_to_one_on_a_two_class_linear_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 2, (16,))
    a, b = 0.3 * torch.randn(16, *SHAPE), 0.3 * torch.randn(16, *SHAPE)
    share_a, share_b = margin_shares(model, x, y, a, b)
    lowered = margins(model, x + a + b, y) < margins(model, x, y)
    assert lowered.any() and (~lowered).any()
    assert torch.allclose((share_a + share_b)[lowered], torch.ones(int(lowered.sum())), atol=1e-4)
    assert share_a[~lowered].isnan().all()  # no drop of the whole: no share to speak of


def test_margins_are_positive_exactly_when_correct() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    x, y = torch.rand(64, *SHAPE), torch.randint(0, 5, (64,))
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert torch.equal(margins(model, x, y) > 0, correct)


def test_full_budget_parts_are_recorded_and_summarised() -> None:
    models = _tiny_models()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, *SHAPE, generator=g), torch.randint(0, 3, (32,), generator=g)
    measure = Decomposition(PGD(eps=2.0, steps=20, step_size=0.2, early_stop=True), nulls=[])
    records = measure.measure(models, make_batch(x, y, torch.arange(32), seed=0))
    correct = records["correct"]
    # Without early stopping the attack keeps climbing the loss: it fools about as many images or more.
    assert (records["budget_fools"] <= correct).all()
    assert records["budget_fools"].sum() >= records["full_success"].sum() - 1
    summary = measure.summarize(records)
    assert 0 <= summary["budget/on_fraction_median"] <= 1
    assert not math.isnan(summary["budget/off_part_fools_rate"])
    off = Decomposition(PGD(eps=2.0, steps=20, step_size=0.2, early_stop=True), nulls=[], full_budget_parts=False)
    assert "budget_fools" not in off.measure(models, make_batch(x, y, torch.arange(32), seed=0))


def test_partners_are_other_images_of_the_same_class() -> None:
    from dmm.measures.decomposition import partners

    y = torch.tensor([0, 1, 0, 2, 1, 0])
    partner, same = partners(y)
    assert partner.tolist() == [2, 4, 5, 4, 1, 0]  # next of the class, cyclically; class 2 is alone
    assert same.tolist() == [True, True, True, False, True, True]
    assert (partner != torch.arange(6)).all()


def test_other_image_null_runs_on_the_partners_tangent_spaces() -> None:
    models = _tiny_models()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, *SHAPE, generator=g), torch.randint(0, 3, (24,), generator=g)
    measure = Decomposition(PGD(eps=2.0, steps=10, step_size=0.2, early_stop=True, clamp=False), nulls=["other"])
    assert measure.arms == ("full", "on", "off", "other", "other_off")
    records = measure.measure(models, make_batch(x, y, torch.arange(24), seed=0))
    assert records["other_same_class"].all()
    assert records["leak_other"].max() < 1e-4  # clamp off: the attack stays in the partner's tangent space
    summary = measure.summarize(records)
    assert "ratio/on_over_other" in summary and "other/l2_needed_median" in summary
