"""Compression against adversarial examples: spot them by their size off the manifold, or project them away.

Pure torch (plus torchmetrics' functional AUROC). With an autoencoder's encoder E and decoder D, both
modelling the data manifold:

1. *Detection*: an input's off-manifold size is its reconstruction error ||x - D(E(x))||, or the part of that
   residual orthogonal to the tangent space at E(x) (the residual along the manifold is the encoder's error,
   not distance from it). If adversarial perturbations leave the manifold, these scores separate clean
   images from adversarial ones: :func:`auroc`. The attacker here does not know about the detector.
2. *Project, then classify*: :class:`ProjectThenClassify` classifies D(E(x)) instead of x. Its robustness is
   measured by a white-box PGD through the whole pipeline; :func:`measure` reports the share of points whose
   input gradient is exactly zero, so gradient masking would not go unnoticed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

from dmm.attacks import _eval_mode, pgd
from dmm.manifold import decompose, tangent_basis

SCORES = ("recon", "offmanifold")


class ProjectThenClassify(nn.Module):
    """Classify the reconstruction: ``classifier(autoencoder(x))``, i.e. f(D(E(x))).

    Args:
        classifier: images in [0, 1] (B, C, H, W) -> logits (B, classes).
        autoencoder: images -> reconstructions D(E(x)) in [0, 1], same shape (e.g. :class:`dmm.models.Autoencoder`).

    Example:
        >>> robust = ProjectThenClassify(classifier, autoencoder)
        >>> x_adv = pgd(robust, x, y, eps=2.0)  # white-box: the gradient flows through the autoencoder
    """

    def __init__(self, classifier: nn.Module, autoencoder: nn.Module) -> None:
        super().__init__()
        self.classifier, self.autoencoder = classifier, autoencoder

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.autoencoder(x))


def scores(encoder: nn.Module, decoder: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Off-manifold size of each input, run in eval mode.

    Args:
        encoder: images -> latents (B, k); decoder: latents -> images.
        x: images (B, C, H, W) in [0, 1].

    Returns:
        {"recon": ||r||, "offmanifold": ||(I - Q Q^T) r||}, each (B,), with r = x - D(E(x)) and Q the tangent
        basis of D at E(x).
    """
    with torch.no_grad(), _eval_mode(encoder), _eval_mode(decoder):
        z = encoder(x)
        residual = x - decoder(z)
    off = decompose(residual, tangent_basis(decoder, z))[1]
    return {"recon": residual.flatten(1).norm(dim=1), "offmanifold": off.flatten(1).norm(dim=1)}


def auroc(clean: Tensor, adversarial: Tensor) -> float:
    """Area under the ROC curve of a score that should be higher for adversarial inputs (0.5: chance)."""
    preds = torch.cat([clean, adversarial]).float()
    target = torch.cat([torch.zeros_like(clean), torch.ones_like(adversarial)]).long()
    return binary_auroc(preds, target).item()


def input_gradient_norm(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B,) L2 norm of the cross-entropy's input gradient, in eval mode (0 signals gradient masking)."""
    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model):
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y.clone(), reduction="sum"), x)
    return grad.flatten(1).norm(dim=1)


@dataclass(frozen=True)
class Threat:
    """The PGD used for detection and robust accuracy: fixed budget, full iterations, no early stop.

    Attributes:
        eps: budget of the adversarial examples the detector must spot.
        eps_curve: budgets of the robust-accuracy curves (one attack per budget and model).
        norm: "l2" or "linf".
        steps: PGD iterations.
        step_size: ``None`` means 2.5 * eps / steps.
        loss: "ce" or "margin".
    """

    eps: float = 2.0
    eps_curve: tuple[float, ...] = (1.0, 2.0)
    norm: str = "l2"
    steps: int = 40
    step_size: float | None = None
    loss: str = "ce"

    def as_dict(self) -> dict:
        return asdict(self)

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        return pgd(model, x, y, eps=eps, norm=self.norm, steps=self.steps, step_size=self.step_size, loss=self.loss)


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad(), _eval_mode(model):
        return model(x).argmax(dim=1)


def measure(
    classifier: nn.Module, encoder: nn.Module, decoder: nn.Module, x: Tensor, y: Tensor, threat: Threat
) -> dict[str, Tensor]:
    """Detection scores and project-then-classify robustness on one batch.

    Args:
        classifier: images in [0, 1] -> logits.
        encoder, decoder: the autoencoder's halves (the manifold model).
        x: images (B, C, H, W) in [0, 1]; y: labels (B,) int64.
        threat: the attack settings.

    Returns:
        Per-sample (B,) tensors: ``classifier/correct``; ``classifier/robust@{e}`` and ``ptc/robust@{e}`` for e
        in ``threat.eps_curve``; ``fooled`` (correct, and PGD at ``threat.eps`` changed the prediction);
        ``clean/{score}`` and ``adversarial/{score}`` for the scores of :func:`scores`; ``ptc/correct``;
        ``ptc/grad_norm``.
    """
    ptc = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
    out = {"classifier/correct": _predict(classifier, x) == y, "ptc/correct": _predict(ptc, x) == y}
    out["ptc/grad_norm"] = input_gradient_norm(ptc, x, y)
    correct = out["classifier/correct"]
    for eps in sorted({threat.eps, *threat.eps_curve}):
        x_adv = threat.attack(classifier, x, y, eps)
        robust = correct & (_predict(classifier, x_adv) == y)
        if eps in threat.eps_curve:
            out[f"classifier/robust@{eps:g}"] = robust
        if eps == threat.eps:
            out["fooled"], adversarial = correct & ~robust, x_adv
    for eps in threat.eps_curve:
        out[f"ptc/robust@{eps:g}"] = out["ptc/correct"] & (_predict(ptc, threat.attack(ptc, x, y, eps)) == y)
    for kind, images in (("clean", x), ("adversarial", adversarial)):
        out.update({f"{kind}/{name}": value for name, value in scores(encoder, decoder, images).items()})
    return out


def summarize(records: dict[str, Tensor], threat: Threat) -> dict[str, float]:
    """Accuracies over all samples; AUROCs over the pairs (clean, adversarial) where the attack succeeded."""
    s: dict[str, float] = {"num_images": float(records["fooled"].numel())}
    for model in ("classifier", "ptc"):
        s[f"{model}/clean_acc"] = records[f"{model}/correct"].float().mean().item()
        for eps in threat.eps_curve:
            s[f"{model}/robust_acc@{eps:g}"] = records[f"{model}/robust@{eps:g}"].float().mean().item()
    s["ptc/zero_grad_rate"] = (records["ptc/grad_norm"] == 0).float().mean().item()
    fooled = records["fooled"]
    s["detect/num_adversarial"] = float(fooled.sum().item())
    for name in SCORES:
        clean, adversarial = records[f"clean/{name}"][fooled], records[f"adversarial/{name}"][fooled]
        s[f"detect/auroc_{name}"] = auroc(clean, adversarial) if fooled.any() else float("nan")
        s[f"detect/{name}_clean_median"] = clean.median().item() if fooled.any() else float("nan")
        s[f"detect/{name}_adversarial_median"] = adversarial.median().item() if fooled.any() else float("nan")
    return s
