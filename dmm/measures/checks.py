"""Cheap, loud checks before an evaluation attacks anything (after auto-attack's ``checks.py`` and Carlini et
al., "On Evaluating Adversarial Robustness", 2019). Each returns a PASS/WARN line; none stops the run."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmm.attacks import PGD
from dmm.tensors import autograd_on, eval_mode, norms

TINY_GRADIENT = 1e-8
"""Input-gradient norms below this fraction of the loss count as vanishing (float32 rounding is ~1e-7)."""
NOISE_DRAWS = 10
"""Random perturbations per image of the black-box check."""


def random_noise_fools(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, draws: int = NOISE_DRAWS
) -> Tensor:
    """(B,) bool: whether any of ``draws`` random perturbations on the eps-sphere (L2: uniform direction; L∞: a
    random corner) fools the model, clamped to [0, 1]; seeded, so the check is deterministic."""
    generator = torch.Generator().manual_seed(0)
    fooled = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for _ in range(draws):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        if norm == "l2":
            noise = eps * noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        else:
            noise = eps * noise.sign()
        with torch.no_grad(), eval_mode(model):
            fooled |= model((x + noise).clamp(0, 1)).argmax(1) != y
    return fooled


def check(name: str, passed: bool, detail: str, advice: str = "") -> dict:
    """One line: ``{"name", "status": "PASS"|"WARN", "detail"}``; ``advice`` is appended on WARN."""
    detail += f": {advice}" if advice and not passed else ""
    return {"name": name, "status": "PASS" if passed else "WARN", "detail": detail}


def model_checks(model: nn.Module, x: Tensor, y: Tensor, attack: PGD) -> list[dict]:
    """Checks of a classifier on images x (B, C, H, W) in [0, 1] with labels y, before it is attacked.

    - it outputs logits, not probabilities (softmax outputs make attacks see vanishing gradients);
    - two forward passes agree (a randomised model needs expectation over transformation);
    - input gradients are neither zero nor tiny relative to the loss (saturated or masked gradients);
    - the iterative ``attack`` fools at least as many images as its one-step version (FGM) with the budget it can
      reach (``attack.reach``, when that is below eps);
    - random noise of the same budget (a black-box attack) fools no more images than the white-box ``attack``
      (Carlini et al.: a black-box attack beating the white-box one means masked gradients).
    """
    m = len(y)
    with torch.no_grad(), eval_mode(model):
        logits, again = model(x), model(x)
    probabilities = bool((logits >= 0).all()) and float((logits.sum(1) - 1).abs().max()) < 1e-3
    with autograd_on(), eval_mode(model):
        xg = x.detach().clone().requires_grad_(True)
        losses = F.cross_entropy(model(xg), y.clone(), reduction="none")
        (grad,) = torch.autograd.grad(losses.sum(), xg)
    tiny = norms(grad) <= TINY_GRADIENT * losses.detach().abs().clamp_min(torch.finfo(x.dtype).tiny)
    correct = logits.argmax(1) == y
    # FGM with the budget the iterative attack can actually use (steps x step size may fall short of eps).
    single = attack.replace(eps=min(attack.eps, attack.reach), steps=1, step_size=None, early_stop=False, refine=0,
                            restarts=1, random_start=False)  # fmt: skip
    rates = {}
    for name, a in (("fgm", single), ("pgd", attack)):
        with torch.no_grad(), eval_mode(model):
            fooled = (model(a(model, x, y)).argmax(1) != y) & correct
        rates[name] = float(fooled.sum()) / max(1, int(correct.sum()))
    noise_fooled = random_noise_fools(model, x, y, attack.eps, attack.norm) & correct
    rates["noise"] = float(noise_fooled.sum()) / max(1, int(correct.sum()))
    same = torch.equal(logits, again)
    return [
        check("model outputs logits, not probabilities", not probabilities,
              "rows are non-negative and sum to 1" if probabilities else "rows are not probability vectors",
              "attacks on softmax outputs see vanishing gradients; attack the logits"),
        check("model is deterministic", same, f"two forward passes {'agree' if same else 'differ'}",
              "a randomised model needs attacks with expectation over transformation"),
        check("input gradients are not vanishing", not bool(tiny.any()),
              f"{int(tiny.sum())} of {m} images have an input gradient below {TINY_GRADIENT:g} x their loss",
              "gradient-based attacks cannot move those images (saturated or masked gradients)"),
        check("iterative attack beats a one-step attack", rates["fgm"] <= rates["pgd"],
              f"PGD ({attack.steps} steps) fools {100 * rates['pgd']:.1f} % vs one-step FGM "
              f"{100 * rates['fgm']:.1f} % of {int(correct.sum())} correctly classified images at eps={attack.eps:g}",
              "a one-step attack doing better means the iterative one is misconfigured or gradients are masked"),
        check("white-box attack beats random noise", rates["noise"] <= rates["pgd"],
              f"PGD fools {100 * rates['pgd']:.1f} % vs the best of {NOISE_DRAWS} random perturbations of norm "
              f"{attack.eps:g} {100 * rates['noise']:.1f} %",
              "a black-box attack doing better means the gradients mislead the attack (masking)"),
    ]  # fmt: skip
