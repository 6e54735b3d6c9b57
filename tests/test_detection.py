"""Compression against adversarial examples: exact AUROCs on a linear manifold, white-box PTC, the callback."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dmm.attacks import pgd
from dmm.callbacks import AdversarialDetection
from dmm.cli import main
from dmm.detection import ProjectThenClassify, Threat, auroc, measure, scores, summarize
from dmm.errors import DmmError
from dmm.manifold import projector
from dmm.nets import MLP, MLPDecoder, MLPEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (1, 8, 8)
N, K = math.prod(SHAPE), 3

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class LinearEncoder(nn.Module):
    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - 0.5) @ self.a


class LinearDecoder(LinearEncoder):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 + z @ self.a.T).view(-1, *SHAPE)


def linear_manifold(points: int = 256):
    """The plane 0.5 + span(A) with orthonormal A (n, k), an exact autoencoder of it, points on it and a normal."""
    generator = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(N, K, generator=generator)).Q
    z = 0.5 * torch.rand(points, K, generator=generator) - 0.25
    x = (0.5 + z @ a.T).view(points, *SHAPE)
    normal = torch.randn(points, N, generator=generator)
    normal = normal - (normal @ a) @ a.T  # orthogonal to the plane
    return LinearEncoder(a), LinearDecoder(a), x, a, normal / normal.norm(dim=1, keepdim=True)


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


@pytest.fixture
def models() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    return (
        MLP(SHAPE, 3, hidden=(32,), dropout=0.0),
        MLPEncoder(SHAPE, K, hidden=(16,)),
        MLPDecoder(K, SHAPE, hidden=(16,)),
    )


def test_project_then_classify_is_the_composition_and_has_gradients(models) -> None:
    classifier, encoder, decoder = models
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    logits = ptc(x)
    assert torch.equal(logits, classifier(decoder(encoder(x))))
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.zeros(16, dtype=torch.long)), x)
    assert (grad.flatten(1).norm(dim=1) > 0).all()  # the autoencoder does not mask the gradient


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
    fooled = ptc(pgd(ptc, x, y, eps=0.5, steps=20, clamp=False)).argmax(dim=1) != y
    assert fooled.all()
    off = projector(a.expand(64, N, K), off=True)  # the plane's normal space
    assert torch.equal(ptc(pgd(ptc, x, y, eps=0.5, steps=20, clamp=False, project=off)).argmax(dim=1), y)


def test_measure_and_summary_are_consistent(models) -> None:
    generator = torch.Generator().manual_seed(2)
    x, y = torch.rand(32, *SHAPE, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    threat = Threat(eps=3.0, eps_curve=(0.0, 1.0, 3.0), steps=10)
    records = measure(*models, x, y, threat)
    assert all(value.shape == (32,) for value in records.values())
    s = summarize(records, threat)
    for model in ("classifier", "ptc"):
        curve = [s[f"{model}/clean_acc"]] + [s[f"{model}/robust_acc@{e:g}"] for e in threat.eps_curve]
        assert curve[0] == curve[1] and curve == sorted(curve, reverse=True)
    assert s["classifier/robust_acc@3"] == pytest.approx(s["classifier/clean_acc"] - s["detect/num_adversarial"] / 32)
    assert s["detect/num_adversarial"] > 0 and 0 <= s["detect/auroc_recon"] <= 1
    assert s["ptc/zero_grad_rate"] == 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(DmmError, match="eps"):
        AdversarialDetection(eps_curve=[1.0, -1.0])
    with pytest.raises(DmmError, match="num_images"):
        AdversarialDetection(num_images=0)


def run(*args: str) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(list(args))


def test_callback_through_validate_and_test(tmp_path: Path, train_synthetic_autoencoder) -> None:
    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1"]
    autoencoder = train_synthetic_autoencoder()
    detection = [
        f"--trainer.callbacks.init_args.{key}={value}"
        for key, value in dict(autoencoder=autoencoder, num_images=24, batch_size=16, steps=5).items()
    ]
    for subcommand in ("validate", "test"):  # an untrained classifier: the plumbing, not the numbers
        run(
            subcommand,
            "--config",
            str(CONFIGS / "synthetic" / "detection.yaml"),
            *detection,
            *quiet,
            "--trainer.limit_test_batches=1",
            "--trainer.default_root_dir",
            str(tmp_path / "clf"),
        )
    written = {p.name: json.loads(p.read_text()) for p in (tmp_path / "clf").glob("*/detection/*.json")}
    assert sorted(written) == ["test-epoch0.json", "val-epoch0.json"]
    summary = written["test-epoch0.json"]["summary"]
    assert summary["num_images"] == 24 and {"ptc/clean_acc", "ptc/robust_acc@1", "detect/auroc_recon"} <= set(summary)
