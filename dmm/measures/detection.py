"""Compression against adversarial examples: spot them by their size off the manifold, or project them away.

With an autoencoder's encoder E and decoder D modelling the data manifold:

1. *Detection*: an input's off-manifold size is its reconstruction error ||x − D(E(x))||, or the part of that
   residual orthogonal to the tangent space at E(x) (the residual along the manifold is the encoder's error,
   not distance from it). The AUROC of clean vs adversarial images says how well the score separates them —
   next to the AUROC of clean vs the clean image plus random noise of the same norm as the adversarial
   perturbation, the control: any perturbation of that size stands off a k-dim manifold. The attacker here
   does not know about the detector.
2. *Project, then classify*: :class:`ProjectThenClassify` classifies D(E(x)) instead of x, attacked white-box
   through the whole pipeline; the share of images whose input gradient is exactly zero is recorded, so
   gradient masking would not go unnoticed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.manifold import tangent_subspace
from dmm.measures.base import Batch, Measure, Models
from dmm.measures.statistics import auroc
from dmm.tensors import autograd_on, eval_mode, norms, predict, rows

SCORES = ("recon", "offmanifold")


class ProjectThenClassify(nn.Module):
    """Classify the reconstruction: ``classifier(autoencoder(x))``, i.e. f(D(E(x))).

    Args:
        classifier: images in [0, 1] (B, C, H, W) -> logits (B, classes).
        autoencoder: images -> reconstructions D(E(x)) in [0, 1], same shape.

    Example:
        >>> robust = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
        >>> x_adv = PGD(eps=2.0)(robust, x, y)  # white-box: the gradient flows through the autoencoder
    """

    def __init__(self, classifier: nn.Module, autoencoder: nn.Module) -> None:
        super().__init__()
        self.classifier, self.autoencoder = classifier, autoencoder

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.autoencoder(x))


def scores(encoder: nn.Module, decoder: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Off-manifold size of each input (B,), in eval mode: {"recon": ||r||, "offmanifold": ||(I − Q Q^T) r||}
    with r = x − D(E(x)) and Q Q^T the projection onto the tangent space of D at E(x) (matrix-free above
    :data:`dmm.manifold.DENSE_LIMIT`, so ImageNet-sized decoders fit)."""
    with torch.no_grad(), eval_mode(encoder, decoder):
        z = encoder(x)
        residual = x - decoder(z)
    off = tangent_subspace(decoder, z, x[0].numel())[0].split(residual)[1]
    return {"recon": norms(residual), "offmanifold": norms(off)}


def input_gradient_norm(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B,) L2 norm of the cross-entropy's input gradient, in eval mode (0 signals gradient masking)."""
    with autograd_on(), eval_mode(model):
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y.clone(), reduction="sum"), x)
    return norms(grad)


def equal_norm_noise(x: Tensor, d: Tensor, generators: list[torch.Generator]) -> Tensor:
    """clamp(x + u ||d||, 0, 1) with u a uniformly random unit direction per image (one draw of its generator)."""
    u = torch.stack([torch.randn(x[0].shape, generator=g, dtype=x.dtype) for g in generators]).to(x.device)
    u = u / rows(norms(u), u)
    return (x + u * rows(norms(d), u)).clamp(0, 1)


class Detection(Measure):
    """Detection scores and project-then-classify robustness.

    Args:
        attack: the fixed-budget attack (no early stop by default) whose adversarial examples the detector must
            spot, at ``attack.eps``; also used, at each budget of ``eps_curve``, for robust accuracies.
        eps_curve: budgets of the robust-accuracy curves (one attack per budget and model).
    """

    name = "detection"
    needs_manifold = True

    def __init__(self, attack: PGD = PGD(eps=2.0, steps=40), eps_curve: list[float] = [1.0, 2.0]) -> None:  # noqa: B006
        if any(not (math.isfinite(e) and e >= 0) for e in eps_curve):
            raise DmmError(f"detection eps_curve must hold finite numbers >= 0, got {list(eps_curve)}")
        self.attack, self.eps_curve = attack, tuple(sorted(float(e) for e in eps_curve))

    def settings(self) -> dict:
        return {**self.attack.as_dict(), "eps_curve": list(self.eps_curve)}

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per-image (B,): ``classifier/correct``, ``classifier/robust@{e}`` and ``ptc/robust@{e}`` for e in
        ``eps_curve``; ``fooled`` (correct, and the attack at ``attack.eps`` changed the prediction);
        ``clean/{score}``, ``adversarial/{score}`` and ``noise/{score}`` for the scores of :func:`scores`;
        ``ptc/correct``; ``ptc/grad_norm``."""
        classifier, encoder, decoder = models.classifier, models.encoder, models.decoder
        x, y = batch.x, batch.y
        ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
        out = {"classifier/correct": predict(classifier, x) == y, "ptc/correct": predict(ptc, x) == y}
        out["ptc/grad_norm"] = input_gradient_norm(ptc, x, y)
        correct = out["classifier/correct"]
        for eps in sorted({self.attack.eps, *self.eps_curve}):
            x_adv = self.attack.replace(eps=eps)(classifier, x, y)
            robust = correct & (predict(classifier, x_adv) == y)
            if eps in self.eps_curve:
                out[f"classifier/robust@{eps:g}"] = robust
            if eps == self.attack.eps:
                out["fooled"], adversarial = correct & ~robust, x_adv
        for eps in self.eps_curve:
            x_adv = self.attack.replace(eps=eps)(ptc, x, y)
            out[f"ptc/robust@{eps:g}"] = out["ptc/correct"] & (predict(ptc, x_adv) == y)
        noise = equal_norm_noise(x, adversarial - x, batch.generators)
        for kind, images in (("clean", x), ("adversarial", adversarial), ("noise", noise)):
            out.update({f"{kind}/{name}": value for name, value in scores(encoder, decoder, images).items()})
        return out

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Accuracies over all images; AUROCs (by ranks, any score scale) over the images the attack fooled,
        clean vs adversarial and, the control, clean vs equal-norm random noise."""
        s: dict[str, float] = {"num_images": float(records["fooled"].numel())}
        for model in ("classifier", "ptc"):
            s[f"{model}/clean_acc"] = records[f"{model}/correct"].float().mean().item()
            for eps in self.eps_curve:
                s[f"{model}/robust_acc@{eps:g}"] = records[f"{model}/robust@{eps:g}"].float().mean().item()
        s["ptc/zero_grad_rate"] = (records["ptc/grad_norm"] == 0).float().mean().item()
        fooled = records["fooled"]
        s["detect/num_adversarial"] = float(fooled.sum().item())
        for name in SCORES:
            clean, adversarial = records[f"clean/{name}"][fooled], records[f"adversarial/{name}"][fooled]
            s[f"detect/auroc_{name}"] = auroc(clean, adversarial)
            s[f"detect/{name}_clean_median"] = clean.median().item() if fooled.any() else math.nan
            s[f"detect/{name}_adversarial_median"] = adversarial.median().item() if fooled.any() else math.nan
            if f"noise/{name}" in records:
                s[f"detect/auroc_{name}_noise"] = auroc(clean, records[f"noise/{name}"][fooled])
        return s
