"""The parts of a perturbation: margin shares add up on a linear model; full-budget parts are recorded."""

from __future__ import annotations

import math

import pytest
import torch
from planes import K, LinearDecoder, LinearEncoder, N
from torch import nn

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.measures import Decomposition, Models, make_batch
from dmm.measures.parts import margin_shares, margins
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
    from dmm.measures.partners import partners

    y = torch.tensor([0, 1, 0, 2, 1, 0])
    partner, same = partners(y)
    assert partner.tolist() == [2, 4, 5, 4, 1, 0]  # next of the class, cyclically; class 2 is alone
    assert same.tolist() == [True, True, True, False, True, True]
    assert (partner != torch.arange(6)).all()


def test_other_image_null_runs_on_the_partners_tangent_spaces_whatever_the_batches() -> None:
    models = _tiny_models()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, *SHAPE, generator=g), torch.randint(0, 3, (24,), generator=g)
    index = torch.arange(100, 124)
    measure = Decomposition(PGD(eps=2.0, steps=10, step_size=0.2, early_stop=True, clamp=False), nulls=["other"])
    assert measure.arms == ("full", "on", "off", "other", "other_off") and measure.needs_subset
    with pytest.raises(DmmError, match="prepare"):
        measure.measure(models, make_batch(x, y, index, seed=0))
    measure.prepare(x, y, index)
    whole = measure.measure(models, make_batch(x, y, index, seed=0))
    assert whole["other_same_class"].all()
    assert whole["leak_other"].max() < 1e-4  # clamp off: the attack stays in the partner's tangent space
    # The partner is the next image of the class in the subset, not in the batch: batches of 5 see the same.
    pieces = [measure.measure(models, make_batch(x[i : i + 5], y[i : i + 5], index[i : i + 5], seed=0))
              for i in range(0, 24, 5)]  # fmt: skip
    for key in ("other_success", "other_off_success", "other_same_class"):
        assert torch.equal(torch.cat([p[key] for p in pieces]), whole[key]), key
    for key in ("other_l2", "other_off_l2"):  # batched matmuls round differently by batch size
        assert torch.allclose(torch.cat([p[key] for p in pieces]), whole[key], atol=1e-5), key
    # ... and the other arm is the on arm of the partner: attacking image i in image p's tangent space.
    partner = [int((y == y[i]).nonzero().squeeze(1).roll(-1)[((y == y[i]).nonzero().squeeze(1) == i).nonzero()])
               for i in range(24)]  # fmt: skip
    tangents = measure.subspaces(models, make_batch(x, y, index, seed=0))[0]
    assert torch.allclose(tangents["other"].basis, tangents["on"].basis[partner])
    summary = measure.summarize(whole)
    assert "ratio/on_over_other" in summary and "other/l2_needed_median" in summary
    outsider = make_batch(x[:2], y[:2], torch.tensor([7, 100]), seed=0)
    with pytest.raises(DmmError, match=r"images \[7\] were not in the subset"):
        measure.measure(models, outsider)


def test_the_random_subspace_parts_are_the_null_of_the_tangent_parts() -> None:
    """The random k-dim part of d and its complement are recorded like d_on and d_off; on a two-class linear
    model every pair of shares adds to 1, and a random part's share is its part of the gradient's alignment."""
    torch.manual_seed(0)
    shape, k = (1, 6, 6), 3
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    models = Models(classifier, MLPEncoder(shape, k, hidden=(16,)), MLPDecoder(k, shape, hidden=(16,)))
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(40, *shape, generator=g), torch.randint(0, 2, (40,), generator=g)
    measure = Decomposition(PGD(eps=3.0, steps=30, step_size=0.1, early_stop=True, clamp=False), nulls=["random"])
    records = measure.measure(models, make_batch(x, y, torch.arange(40), seed=0))
    hit = records["full_success"]
    assert hit.sum() > 10
    for prefix in ("", "budget_"):
        among = hit if not prefix else records["budget_fools"]
        for a, b in (("on", "off"), ("random", "random_off")):
            total = records[f"{prefix}{a}_margin_share"] + records[f"{prefix}{b}_margin_share"]
            assert torch.allclose(total[among], torch.ones(int(among.sum())), atol=1e-3), (prefix, a)
    # On a linear model every PGD step is the gradient w: d is parallel to w, so the random part's share of the
    # margin drop is ||P w||^2 / ||w||^2 -- the random subspace's squared alignment with w, about k / n.
    w = classifier[1].weight[1] - classifier[1].weight[0]
    basis = measure.subspaces(models, make_batch(x, y, torch.arange(40), seed=0))[0]["random"].basis
    aligned = (basis.mT @ w).norm(dim=1) ** 2 / w.norm() ** 2
    assert torch.allclose(records["random_margin_share"][hit], aligned[hit], atol=1e-3)
    summary = measure.summarize(records)
    for key in ("random_part_fools_rate", "random_off_margin_share_median", "budget/random_margin_share_median"):
        assert math.isfinite(summary[key]), key


def test_latent_steps_move_the_foot_point_nearer_the_image() -> None:
    models = _tiny_models()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(12, *SHAPE, generator=g), torch.randint(0, 3, (12,), generator=g)
    attack = PGD(eps=2.0, steps=5, step_size=0.2, early_stop=True)
    plain = Decomposition(attack, nulls=[]).measure(models, make_batch(x, y, torch.arange(12), seed=0))
    refined = Decomposition(attack, nulls=[], latent_steps=5)
    records = refined.measure(models, make_batch(x, y, torch.arange(12), seed=0))
    assert torch.equal(records["recon_error_encoder"], plain["recon_error"])
    assert (records["recon_error"] <= records["recon_error_encoder"]).all()
    assert (records["recon_error"] < 0.99 * records["recon_error_encoder"]).any()
    assert refined.settings()["latent_steps"] == 5 and "latent_steps" not in Decomposition(attack).settings()
    assert "recon_error_encoder_median" in refined.summarize(records)
    with pytest.raises(DmmError, match="latent_steps"):
        Decomposition(attack, latent_steps=-1)


def test_a_learned_plane_is_judged_against_the_known_one_by_its_principal_angles() -> None:
    """Two planes through 0.5 that share two directions and differ by a rotation of 30 degrees in the third:
    the principal angles are exactly (0, 0, 30) degrees, and d's on-fraction is measured in both."""
    basis = torch.eye(N, dtype=torch.float64)[:, : K + 1]
    theta = math.radians(30.0)
    learned = basis[:, :K].clone()
    exact = torch.stack([basis[:, 0], basis[:, 1], math.cos(theta) * basis[:, 2] + math.sin(theta) * basis[:, 3]], 1)
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(N, 3)).double()
    models = Models(classifier, LinearEncoder(learned), LinearDecoder(learned),
                    exact=(LinearEncoder(exact), LinearDecoder(exact)))  # fmt: skip
    g = torch.Generator().manual_seed(4)
    x = 0.5 + 0.2 * torch.rand(10, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = classifier(x).argmax(1)
    measure = Decomposition(PGD(eps=3.0, steps=30, step_size=0.1, early_stop=True, clamp=False), nulls=[])
    records = measure.measure(models, make_batch(x, y, torch.arange(10), seed=0))
    assert torch.allclose(records["exact_angle_max"], torch.full((10,), 30.0, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(records["exact_angle_mean"], torch.full((10,), 10.0, dtype=torch.float64), atol=1e-6)
    d = records["_images"][:, 2].flatten(1)
    on_exact = (d @ exact).norm(dim=1) / d.norm(dim=1)  # an orthonormal basis's coefficients carry the norm
    assert torch.allclose(records["exact_on_fraction"], on_exact, atol=1e-9)
    assert not torch.allclose(records["exact_on_fraction"], records["on_fraction"])
    summary = measure.summarize(records)
    assert summary["exact_angle_max_median"] == pytest.approx(30.0, abs=1e-6)
    same = Models(classifier, LinearEncoder(learned), LinearDecoder(learned),
                  exact=(LinearEncoder(learned), LinearDecoder(learned)))  # fmt: skip
    records = measure.measure(same, make_batch(x, y, torch.arange(10), seed=0))
    assert records["exact_angle_max"].max() < 1e-5 and torch.allclose(
        records["exact_on_fraction"], records["on_fraction"]
    )
