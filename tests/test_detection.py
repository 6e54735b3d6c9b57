"""Compression against adversarial examples: exact AUROCs on a linear manifold, the noise control, white-box PTC."""

from __future__ import annotations

import math

import pytest
import torch
from planes import SHAPE, K, LinearDecoder, LinearEncoder, N
from torch import nn
from torch.nn import functional as F

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.manifold import Subspace
from dmm.measures import Detection, Models, ProjectThenClassify, make_batch
from dmm.measures.detection import equal_norm_noise, input_gradient_norm, scores
from dmm.measures.statistics import auroc
from dmm.nets import MLP, MLPDecoder, MLPEncoder


def linear_manifold(points: int = 256):
    """The plane 0.5 + span(A) with orthonormal A (n, k), an exact autoencoder of it, points on it and a normal."""
    generator = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(N, K, generator=generator)).Q
    z = 0.5 * torch.rand(points, K, generator=generator) - 0.25
    x = (0.5 + z @ a.T).view(points, *SHAPE)
    normal = torch.randn(points, N, generator=generator)
    normal = normal - (normal @ a) @ a.T  # orthogonal to the plane
    return LinearEncoder(a), LinearDecoder(a), x, a, normal / normal.norm(dim=1, keepdim=True)


@pytest.fixture
def models() -> Models:
    torch.manual_seed(0)
    return Models(MLP(SHAPE, 3, hidden=(32,), dropout=0.0), MLPEncoder(SHAPE, K, hidden=(16,)),
                  MLPDecoder(K, SHAPE, hidden=(16,)))  # fmt: skip


def brute_force_auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """P(positive > negative) + P(tie) / 2 over every pair: the definition, O(m n)."""
    difference = positives[None, :].double() - negatives[:, None].double()
    return ((difference > 0).double() + 0.5 * (difference == 0).double()).mean().item()


def test_auroc_is_the_pairwise_definition_at_any_score_scale() -> None:
    """Rank AUROC equals the pair count, ties included, and no rescaling of the scores changes it: a sigmoid
    applied to scores above 1 (torchmetrics' treatment of non-probabilities) would saturate them into ties."""
    generator = torch.Generator().manual_seed(0)
    negatives = 3 * torch.rand(200, generator=generator)
    positives = 3 * torch.rand(150, generator=generator) + 0.5
    positives[:20] = negatives[:20]  # ties across the groups
    expected = brute_force_auroc(negatives, positives)
    assert 0.6 < expected < 0.9
    assert auroc(negatives, positives) == pytest.approx(expected, abs=1e-12)
    assert auroc(40 * negatives, 40 * positives) == pytest.approx(expected, abs=1e-12)
    assert brute_force_auroc(torch.sigmoid(40 * negatives), torch.sigmoid(40 * positives)) != pytest.approx(expected)
    assert auroc(positives, negatives) == pytest.approx(1 - expected, abs=1e-12)
    assert math.isnan(auroc(negatives[:0], positives))


def test_scores_separate_off_manifold_inputs_perfectly() -> None:
    encoder, decoder, x, _, normal = linear_manifold()
    x_off = x + 0.1 * normal.view_as(x)
    clean, adversarial = scores(encoder, decoder, x), scores(encoder, decoder, x_off)
    for name in ("recon", "offmanifold"):
        assert clean[name].max() < 1e-5 and adversarial[name] == pytest.approx(torch.full((256,), 0.1), abs=1e-5)
        assert auroc(clean[name], adversarial[name]) == 1.0


def test_scores_cannot_tell_on_manifold_moves() -> None:
    encoder, decoder, _, a, _ = linear_manifold()
    generator = torch.Generator().manual_seed(1)
    z = 0.5 * torch.rand(1024, K, generator=generator) - 0.25
    shift = torch.randn(1024, K, generator=generator)
    # Both sets built the same way, so their residuals are the same rounding noise.
    clean, moved = (
        (0.5 + latent @ a.T).view(-1, *SHAPE) for latent in (z, z + 0.1 * shift / shift.norm(dim=1, keepdim=True))
    )
    clean, moved = scores(encoder, decoder, clean), scores(encoder, decoder, moved)
    for name in ("recon", "offmanifold"):
        assert moved[name].max() < 1e-5
        assert auroc(clean[name], moved[name]) == pytest.approx(0.5, abs=0.06)


def test_offmanifold_score_ignores_the_encoders_error_along_the_manifold() -> None:
    encoder, decoder, x, a, _ = linear_manifold()
    biased = nn.Sequential(encoder, nn.Linear(K, K))  # a wrong encoder: D(E(x)) moves along the plane
    with torch.no_grad():
        biased[1].weight.copy_(torch.eye(K))
        biased[1].bias.fill_(0.05)
    s = scores(biased, decoder, x)
    assert s["recon"].min() > 0.05 and s["offmanifold"].max() < 1e-5


def test_noise_control_has_the_perturbations_norm_and_the_images_own_draw() -> None:
    generator = torch.Generator().manual_seed(4)
    x = 0.25 + 0.5 * torch.rand(16, *SHAPE, generator=generator)  # far enough from the box for no clamping
    d = 0.2 * torch.randn(16, *SHAPE, generator=generator) / 8
    batch = make_batch(x, torch.zeros(16, dtype=torch.long), torch.arange(16), seed=0)
    noise = equal_norm_noise(x, d, batch.generators)
    assert torch.allclose((noise - x).flatten(1).norm(dim=1), d.flatten(1).norm(dim=1), atol=1e-6)
    again = equal_norm_noise(x, d, make_batch(x, batch.y, batch.index, seed=0).generators)
    assert torch.equal(noise, again)
    cosine = torch.nn.functional.cosine_similarity((noise - x).flatten(1), d.flatten(1))
    assert cosine.abs().max() < 0.6  # random directions in R^64, not d's


class Rounding(nn.Module):
    """An autoencoder that snaps pixels to {0, 1}: its gradient is zero almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)


def test_project_then_classify_is_the_composition_and_has_gradients(models: Models) -> None:
    classifier, encoder, decoder = models.classifier, models.encoder, models.decoder
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    logits = ptc(x)
    assert torch.equal(logits, classifier(decoder(encoder(x))))
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(16, dtype=torch.long)), x)
    assert (grad.flatten(1).norm(dim=1) > 0).all()  # the autoencoder does not mask the gradient
    y = torch.zeros(16, dtype=torch.long)
    assert (input_gradient_norm(ptc, x.detach(), y) > 0).all()
    assert (input_gradient_norm(ProjectThenClassify(classifier, Rounding()), x.detach(), y) == 0).all()


def test_white_box_pgd_goes_through_the_projection() -> None:
    """On a linear manifold with a classifier of the on-manifold coordinate z0: on-manifold PGD through the
    pipeline fools it as it fools the bare classifier, off-manifold PGD cannot move it at all."""
    encoder, decoder, x, a, _ = linear_manifold(64)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(N, 2))
    with torch.no_grad():  # logits (0, z0): class 1 where z0 > 0
        classifier[1].weight.copy_(torch.stack([torch.zeros(N), a[:, 0]]))
        classifier[1].bias.copy_(torch.tensor([0.0, -0.5 * a[:, 0].sum().item()]))
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    y = ptc(x).argmax(dim=1)
    assert torch.equal(y, classifier(x).argmax(dim=1))
    attack = PGD(eps=0.5, steps=20, clamp=False)
    assert (ptc(attack(ptc, x, y)).argmax(dim=1) != y).all()
    normal_space = Subspace(a.expand(64, N, K)).complement()  # the plane's normal space
    assert torch.equal(ptc(attack(ptc, x, y, project=normal_space)).argmax(dim=1), y)


def test_measure_and_summary_are_consistent(models: Models) -> None:
    generator = torch.Generator().manual_seed(2)
    x, y = torch.rand(32, *SHAPE, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    measure = Detection(PGD(eps=3.0, steps=10), eps_curve=[3.0, 0.0, 1.0])
    assert measure.eps_curve == (0.0, 1.0, 3.0)
    records = measure.measure(models, make_batch(x, y, torch.arange(32), seed=0))
    assert all(value.shape == (32,) for value in records.values())
    for kind in ("clean", "adversarial", "noise"):
        assert {f"{kind}/recon", f"{kind}/offmanifold"} <= records.keys()
    assert torch.equal(records["fooled"], records["classifier/correct"] & ~records["classifier/robust@3"])
    s = measure.summarize(records)
    for model in ("classifier", "ptc"):
        curve = [s[f"{model}/clean_acc"]] + [s[f"{model}/robust_acc@{e:g}"] for e in measure.eps_curve]
        assert curve[0] == curve[1] and curve == sorted(curve, reverse=True)
    assert s["classifier/robust_acc@3"] == pytest.approx(s["classifier/clean_acc"] - s["detect/num_adversarial"] / 32)
    assert s["detect/num_adversarial"] > 0
    for key in ("detect/auroc_recon", "detect/auroc_offmanifold", "detect/auroc_recon_noise",
                "detect/auroc_offmanifold_noise"):  # fmt: skip
        assert 0 <= s[key] <= 1, key
    fooled = records["fooled"]
    assert s["detect/auroc_recon"] == pytest.approx(
        brute_force_auroc(records["clean/recon"][fooled], records["adversarial/recon"][fooled]), abs=1e-12
    )
    assert s["ptc/zero_grad_rate"] == 0
    # Rescaled scores (another unit, or a detector's temperature) leave every AUROC where it was.
    scaled = {key: 40 * value if key.split("/")[0] in ("clean", "adversarial", "noise") else value
              for key, value in records.items()}  # fmt: skip
    rescaled = measure.summarize(scaled)
    for key in (k for k in s if "auroc" in k):
        assert rescaled[key] == s[key], key


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(DmmError, match="eps_curve"):
        Detection(eps_curve=[1.0, -1.0])
    with pytest.raises(DmmError, match="eps"):
        Detection(attack=PGD(eps=-1.0))
