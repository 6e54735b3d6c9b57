"""Adaptive attacks on project-then-classify, checked against the exact answers of a linear manifold model."""

from __future__ import annotations

import pytest
import torch
from planes import SHAPE, K, LinearDecoder, LinearEncoder, N
from torch import nn
from torch.nn import functional as F

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.measures import Models, ProjectThenClassify, make_batch
from dmm.measures.adaptive import ATTACKS, AdaptivePTC
from dmm.measures.ptc_attacks import BISECTION, BPDA, EvasivePGD, LatentPGD, pull_back
from dmm.nets import MLP


def plane(points: int = 96, off: float = 0.1, seed: int = 0):
    """The plane 0.5 + span(A), A (n, k) orthonormal, its exact autoencoder, and points at distance ``off`` from
    it (so D(E(x)) != x), all pixels in [0.2, 0.8]; a two-class linear classifier with logits (0, w·(u − 0.5))
    whose w is not in the plane."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(N, K, generator=g)).Q
    z = 0.2 * torch.rand(points, K, generator=g) - 0.1
    normal = torch.randn(points, N, generator=g)
    normal -= (normal @ a) @ a.T
    x = (0.5 + z @ a.T + off * normal / normal.norm(dim=1, keepdim=True)).view(points, *SHAPE)
    w = torch.randn(N, generator=g)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(N, 2))
    with torch.no_grad():
        classifier[1].weight.copy_(torch.stack([torch.zeros(N), w]))
        classifier[1].bias.copy_(torch.tensor([0.0, -0.5 * w.sum().item()]))
    return classifier, LinearEncoder(a), LinearDecoder(a), x, a, w


def pipeline_margin(classifier, encoder, decoder, x) -> torch.Tensor:
    """|f(D(E(x)))|: the pipeline's logit difference."""
    with torch.no_grad():
        return classifier(decoder(encoder(x)))[:, 1].abs()


def test_bpda_is_the_pipeline_forward_and_the_classifiers_gradient_backward() -> None:
    torch.manual_seed(0)
    classifier = MLP(SHAPE, 3, hidden=(16,), dropout=0.0)
    autoencoder = nn.Sequential(nn.Flatten(), nn.Linear(N, N), nn.Sigmoid(), nn.Unflatten(1, SHAPE))
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    bpda, ptc = BPDA(classifier, autoencoder), ProjectThenClassify(classifier, autoencoder)
    xg = x.clone().requires_grad_(True)
    logits = bpda(xg)
    assert torch.equal(logits, ptc(x))
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg)
    u = autoencoder(x).detach().requires_grad_(True)
    (reference,) = torch.autograd.grad(F.cross_entropy(classifier(u), y, reduction="sum"), u)
    assert torch.equal(grad, reference)
    (through,) = torch.autograd.grad(F.cross_entropy(ptc(xg), y, reduction="sum"), xg)
    assert not torch.allclose(through, reference)  # the true gradient differs: BPDA really replaces it


def test_pull_back_is_feasible_and_tight_on_a_linear_decoder() -> None:
    _, encoder, decoder, x, a, _ = plane(16)
    z0 = encoder(x)
    d0 = decoder(z0)
    step = torch.randn(16, K, generator=torch.Generator().manual_seed(3))
    eps = torch.full((16,), 0.2)
    z = pull_back(decoder, z0, d0, z0 + step, eps)
    moved = (decoder(z) - d0).flatten(1).norm(dim=1)
    inside = step.norm(dim=1) <= 0.2
    assert torch.equal(z[inside], (z0 + step)[inside])  # rows already feasible are left alone
    # Bisection leaves t at most 2^-16 short of the boundary's t: a distance of 2^-16 of the step, less rounding.
    slack = step.norm(dim=1) * 2.0**-BISECTION + 1e-6
    assert (moved <= eps).all() and (moved >= 0.2 - slack)[~inside].all() and (~inside).sum() > 8


def test_latent_attack_fools_exactly_the_images_the_analytic_answer_says() -> None:
    """D∘E is the projection P onto the plane, so the pipeline's margin is w·P(x − 0.5); latent moves are the plane's
    directions, the best one P w, so the latent attack succeeds exactly when |margin| < eps ‖P w‖ — as white-box
    PGD through the exact pipeline does. BPDA steps along w itself and reaches only eps ‖P w‖² / ‖w‖."""
    classifier, encoder, decoder, x, a, w = plane()
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    y = ptc(x).argmax(1)
    margin = pipeline_margin(classifier, encoder, decoder, x)
    pw = (a.T @ w).norm()
    eps = 0.05
    reach = {"latent": eps * pw, "whitebox": eps * pw, "bpda": eps * pw**2 / w.norm()}
    found = {
        "latent": LatentPGD(eps=eps, steps=20)(classifier, encoder, decoder, x, y),
        "whitebox": PGD(eps=eps, steps=20, clamp=False)(ptc, x, y),
        "bpda": PGD(eps=eps, steps=20, clamp=False)(BPDA(classifier, nn.Sequential(encoder, decoder)), x, y),
    }
    for name, x_adv in found.items():
        assert ((x_adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all(), name
        fooled = ptc(x_adv).argmax(1) != y
        expected = margin < reach[name]
        clear = (margin / reach[name] - 1).abs() > 1e-3
        assert 10 < int(expected.sum()) < 86, name  # both outcomes occur
        assert torch.equal(fooled[clear], expected[clear]), name
    assert reach["bpda"] < reach["latent"]


def test_latent_attack_keeps_its_budget_far_off_the_manifold_and_in_the_box() -> None:
    """Reconstruction errors near 2 > eps, so x_adv = D(z) would be infeasible; x + D(z) − D(z0) is not. 40 % of the
    pixels sit on the box's faces (MNIST-like), where the clamp must act."""
    classifier, encoder, decoder, x, _, _ = plane(32, off=0.5)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    x = torch.where(u < 0.2, 0.0, torch.where(u > 0.8, 1.0, x))
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    y = ptc(x).argmax(1)
    assert ((x - decoder(encoder(x))).flatten(1).norm(dim=1) > 1).all()
    for eps in (0.05, torch.linspace(0.0, 0.3, 32)):
        x_adv = LatentPGD(eps=0.3, steps=10, restarts=2)(classifier, encoder, decoder, x, y, eps=eps)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert ((x_adv - x).flatten(1).norm(dim=1) <= torch.as_tensor(eps) + 1e-6).all()
        assert (ptc(x_adv).argmax(1) != y).sum() >= 2
    assert torch.equal(x_adv[0], x[0])  # eps 0 moves nothing


def test_measure_minimum_is_at_most_every_attack_and_falls_with_eps() -> None:
    classifier, encoder, decoder, x, _, _ = plane(24)
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    y = ptc(x).argmax(1)
    y[:2] = 1 - y[:2]
    eps_curve = [0.02, 0.05, 0.1]
    measure = AdaptivePTC(PGD(eps=0.1, steps=10, restarts=2), eps_curve=eps_curve)
    records = measure.measure(Models(classifier, encoder, decoder), make_batch(x, y, torch.arange(24), seed=0))
    assert all(value.shape == (24,) for value in records.values())
    s = measure.summarize(records)
    assert s["ptc/clean_acc"] == pytest.approx(22 / 24)
    previous = s["ptc/clean_acc"]
    for e in (f"{eps:g}" for eps in eps_curve):
        minimum = s[f"ptc/robust_acc@{e}"]
        assert all(minimum <= s[f"ptc/{a}/robust_acc@{e}"] for a in ATTACKS)
        assert minimum <= previous
        assert s[f"ptc/robust_acc@{e}_ci_low"] <= minimum <= s[f"ptc/robust_acc@{e}_ci_high"]
        previous = minimum
    assert s["ptc/robust_acc@0.02"] > s["ptc/robust_acc@0.1"]
    assert s["ptc/whitebox/robust_acc@0.1"] < s["ptc/bpda/robust_acc@0.1"]  # as the analytic reaches say


def test_an_adversary_who_knows_the_detector_evades_it() -> None:
    """Every clean image sits 0.1 off the plane, so the detector's threshold is 0.1. A detector-blind PGD steps
    along w, partly off the plane: every image it fools scores above 0.1. The evasive attack, once it has fooled
    the classifier, spends the rest of its budget on the score and ends below the clean images' own."""
    classifier, encoder, decoder, x, _, _ = plane()
    autoencoder = nn.Sequential(encoder, decoder)
    y = classifier(x).argmax(1)
    x_adv = EvasivePGD(eps=0.1, steps=20, penalty=1.0)(classifier, autoencoder, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and ((x_adv - x).flatten(1).norm(dim=1) <= 0.1 + 1e-6).all()
    measure = AdaptivePTC(PGD(eps=0.1, steps=20), eps_curve=[0.05], detector_penalty=1.0)
    records = measure.measure(Models(classifier, encoder, decoder), make_batch(x, y, torch.arange(96), seed=0))
    s = measure.summarize(records)
    assert s["detect/threshold"] == pytest.approx(0.1, abs=1e-6)
    assert s["detect/standard/success_rate"] > 0.5 and s["detect/evasive/success_rate"] > 0.5
    assert s["detect/standard/detection_rate"] == 1 and s["detect/standard/auroc"] == 1
    assert s["detect/evasive/detection_rate"] == 0 and s["detect/evasive/undetected_rate"] > 0.5
    both = records["detect/standard/fooled"] & records["detect/evasive/fooled"]
    assert (records["detect/evasive/score"][both] < records["detect/standard/score"][both]).all()
    off = AdaptivePTC(PGD(eps=0.1, steps=2), eps_curve=[0.05], detector_penalty=None)
    records = off.measure(Models(classifier, encoder, decoder), make_batch(x[:4], y[:4], torch.arange(4), seed=0))
    assert not any(key.startswith("detect") for key in records)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(DmmError, match="eps_curve"):
        AdaptivePTC(eps_curve=[0.5, -1.0])
    with pytest.raises(DmmError, match="fixed-budget"):
        AdaptivePTC(attack=PGD(early_stop=True))
    with pytest.raises(DmmError, match="L2"):
        AdaptivePTC(attack=PGD(norm="linf"))
    with pytest.raises(DmmError, match="steps"):
        LatentPGD(steps=0)
    with pytest.raises(DmmError, match="penalty"):
        AdaptivePTC(detector_penalty=-1.0)
