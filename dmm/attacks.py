"""Projected gradient descent (PGD) with the threat-model geometry in small ball classes.

The balls know how to sample, step and project for one norm; `pgd` is the one loop that uses them,
so adding a norm touches one class (the MadryLab/robustness split). Imports only torch.
"""

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn import functional as F

from dmm.errors import DmmError

Projector = Callable[[Tensor, Tensor], Tensor]
"""`project(v, index) -> v'`: v is (b, ...), index the (b,) rows of the original batch being attacked."""


def _rows(t: Tensor, like: Tensor) -> Tensor:
    """View a per-sample (b,) tensor as (b, 1, ..., 1) so it broadcasts over `like` (b, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


class _Ball:
    """The set {δ : ‖δ‖ ≤ eps} with a per-sample radius `eps` of shape (B,)."""

    def __init__(self, eps: Tensor):
        self.eps = eps

    def __getitem__(self, rows: Tensor) -> "_Ball":
        return type(self)(self.eps[rows])

    def norm(self, v: Tensor) -> Tensor:
        """Per-sample norm, (B, ...) -> (B,)."""
        raise NotImplementedError

    def normalize(self, v: Tensor) -> Tensor:
        """v / ‖v‖ per sample; a zero row stays zero instead of becoming NaN."""
        return v / _rows(self.norm(v).clamp_min(torch.finfo(v.dtype).tiny), v)

    def rescale(self, delta: Tensor) -> Tensor:
        """Radial projection: shrink rows outside the ball onto its surface, never turning them."""
        scale = (self.eps / self.norm(delta).clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1)
        return delta * _rows(scale, delta)


class L2Ball(_Ball):
    """L2 ball: steps along grad / ‖grad‖₂, projects by radial rescaling."""

    def norm(self, v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(v.flatten(1), dim=1)

    def random(self, shape: torch.Size) -> Tensor:
        """Uniform in the ball: Gaussian direction, radius eps·U^(1/n) with n pixels per sample."""
        direction = self.normalize(torch.randn(shape, device=self.eps.device, dtype=self.eps.dtype))
        u = torch.rand(shape[0], device=self.eps.device, dtype=self.eps.dtype)
        return direction * _rows(self.eps * u ** (1 / math.prod(shape[1:])), direction)

    def step(self, grad: Tensor) -> Tensor:
        return self.normalize(grad)

    def project(self, delta: Tensor) -> Tensor:
        return self.rescale(delta)


class LinfBall(_Ball):
    """L∞ ball: steps along sign(grad), projects by clipping each pixel to [-eps, eps]."""

    def norm(self, v: Tensor) -> Tensor:
        return v.flatten(1).abs().amax(dim=1)

    def random(self, shape: torch.Size) -> Tensor:
        """Uniform in the cube [-eps, eps]^n."""
        u = torch.rand(shape, device=self.eps.device, dtype=self.eps.dtype)
        return (2 * u - 1) * _rows(self.eps, u)

    def step(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def project(self, delta: Tensor) -> Tensor:
        r = _rows(self.eps, delta)
        return delta.clamp(-r, r)


BALLS: dict[str, type[_Ball]] = {"l2": L2Ball, "linf": LinfBall}


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """Summed CW margin max_{j≠y} z_j − z_y: positive exactly when the sample is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (others - z_y).sum()


# Summed, not averaged, so one sample's gradient does not depend on the batch size.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="sum"),
    "margin": _margin,
}


@contextmanager
def _eval_mode(model):
    """Eval mode for the attack; afterwards every submodule gets back its own flag, even on error."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    modes = [m.training for m in modules]
    try:
        if modules:
            model.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def _projected(project: Projector, grad: Tensor, index: Tensor) -> Tensor:
    """project(grad), with rows that are only rounding noise set to exactly zero.

    When the gradient lies (almost) wholly in the removed subspace, what survives the projection is float
    rounding (~1e-7 of the gradient in float32); normalising it would turn noise into a full step.
    """
    p = project(grad, index)
    p_norm, g_norm = (torch.linalg.vector_norm(t.flatten(1), dim=1) for t in (p, grad))
    noise = p_norm <= 64 * torch.finfo(grad.dtype).eps * g_norm
    return p * _rows(~noise, p)


def _per_sample(value, name: str, x: Tensor, allow_zero: bool) -> Tensor:
    """Check a float or (B,) tensor and return it as a fresh (B,) tensor on x's device and dtype."""
    t = torch.as_tensor(value).detach().to(device=x.device, dtype=x.dtype).flatten()
    if t.numel() not in (1, x.shape[0]):
        raise DmmError(f"{name} must be a float or a tensor of shape ({x.shape[0]},); got {tuple(t.shape)}.")
    bad = ~torch.isfinite(t) | (t < 0 if allow_zero else t <= 0)
    if bool(bad.any()):
        bound = "finite and >= 0" if allow_zero else "finite and > 0"
        raise DmmError(f"{name} must be {bound}; got {value!r}.")
    return t.expand(x.shape[0]).clone()


def pgd(
    model,
    x: Tensor,
    y: Tensor,
    *,
    eps,
    norm: str = "l2",
    steps: int = 40,
    step_size=None,
    random_start: bool = False,
    targeted: bool = False,
    early_stop: bool = False,
    project: Projector | None = None,
    clamp: bool = True,
    loss: str = "ce",
) -> Tensor:
    """Projected gradient descent on the input.

    Reference: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", 2018.
    Norm: "l2" or "linf". Untargeted PGD maximises the loss of `y`; targeted PGD minimises it.

    Args:
        model: maps images in [0, 1] to logits; put in eval mode for the attack, then restored.
        x: clean images in [0, 1], shape (B, ...), e.g. (B, C, H, W).
        y: labels (B,) int64 — true labels, or the targets when `targeted=True`.
        eps: radius, float or per-sample tensor (B,); 0 returns x.
        norm: "l2" or "linf" (default "l2").
        steps: gradient steps, each one forward and backward (default 40).
        step_size: float or (B,); default None means 2.5 * eps / steps.
        random_start: start uniformly inside the ball, not at x (default False).
        targeted: move towards the class `y` instead of away from it (default False).
        early_stop: each sample stops at its first success (argmax != y, or == y when targeted); that
            iterate is returned and the sample costs no further forward passes; a sample that never
            succeeds returns its last iterate, unchecked (default False).
        project: `project(v, index) -> v'` applied to every step direction and to the random start;
            v is (b, ...) and index (b,) holds those rows' positions in x. The raw gradient is projected
            and then normalised by the norm (so an L∞ step moves no pixel more than step_size), and
            the ball constraint becomes a radial rescale for both norms, so δ stays in the subspace
            (default None).
        clamp: return clamp(x + δ, 0, 1), valid images (default True). With `project`, δ itself stays
            in the subspace but clamping moves part of x_adv − x out of it (about 29 % of the norm
            for on-manifold MNIST perturbations); clamp=False keeps x_adv − x exactly in the subspace
            and may leave [0, 1].
        loss: "ce" (cross-entropy) or "margin" (CW margin max_{j≠y} z_j − z_y) (default "ce").

    Returns:
        x_adv: same shape, dtype and device as x, detached.

    Example:
        >>> x_adv = pgd(model, x, y, eps=2.0, norm="l2", steps=40)
        >>> fooled = model(x_adv).argmax(1) != y
    """
    if norm not in BALLS:
        raise DmmError(f"norm must be one of {sorted(BALLS)}; got {norm!r}.")
    if loss not in LOSSES:
        raise DmmError(f"loss must be one of {sorted(LOSSES)}; got {loss!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DmmError(f"steps must be an integer >= 1; got {steps!r}.")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise DmmError("x must be a floating tensor of shape (B, ...) with a batch dimension.")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise DmmError(f"y must be an int64 tensor of shape ({x.shape[0]},) with one label per image.")
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise DmmError("x must hold pixels in [0, 1]; rescale the images before attacking them.")

    # Lightning validates under inference_mode; the attack needs autograd, and inference tensors
    # cannot be saved for backward, so x, y and eps are cloned into normal tensors inside.
    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model):
        x, y = x.clone(), y.clone()
        eps = _per_sample(eps, "eps", x, allow_zero=True)
        ball = BALLS[norm](eps)
        alpha = 2.5 * eps / steps if step_size is None else _per_sample(step_size, "step_size", x, False)
        alpha = _rows(alpha, x)
        index = torch.arange(x.shape[0], device=x.device)

        delta = ball.random(x.shape) if random_start else torch.zeros_like(x)
        if random_start and project is not None:
            delta = ball.rescale(project(delta, index))
        x_adv = (x + delta).clamp_(0, 1) if clamp else x + delta
        out = x_adv.clone() if early_stop else x_adv

        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            objective = LOSSES[loss](logits, y)
            (grad,) = torch.autograd.grad(-objective if targeted else objective, x_adv)
            x_adv = x_adv.detach()

            if early_stop:
                pred = logits.detach().argmax(dim=1)
                hit = pred == y if targeted else pred != y
                if bool(hit.any()):  # the one host sync per step that early stopping needs
                    out[index[hit]] = x_adv[hit]
                    keep = ~hit
                    index, x, y, x_adv, delta, grad, alpha = (t[keep] for t in (index, x, y, x_adv, delta, grad, alpha))
                    ball = ball[keep]
                    if index.numel() == 0:
                        break

            if project is None:
                delta = ball.project(delta + alpha * ball.step(grad))
            else:  # project first, then normalise: the step and δ stay in the subspace
                delta = ball.rescale(delta + alpha * ball.normalize(_projected(project, grad, index)))
            x_adv = x + delta
            if clamp:
                x_adv.clamp_(0, 1)
                if project is None:  # the box is part of the threat model: keep δ feasible
                    delta = x_adv - x

        if early_stop:
            out[index] = x_adv
            return out
        return x_adv


def fgsm(
    model,
    x: Tensor,
    y: Tensor,
    *,
    eps,
    norm: str = "linf",
    targeted: bool = False,
    project: Projector | None = None,
    clamp: bool = True,
    loss: str = "ce",
) -> Tensor:
    """Fast gradient (sign) method: one step of size eps from x.

    Reference: Goodfellow et al., "Explaining and Harnessing Adversarial Examples", 2015.
    Norm: "linf" (default, the classic FGSM) or "l2" (fast gradient method).

    Args: as `pgd`: eps (float or (B,)), norm "linf", targeted False, project None, clamp True,
        loss "ce". Shapes: x (B, ...) in [0, 1], y (B,) int64 -> x_adv like x.

    Example:
        >>> x_adv = fgsm(model, x, y, eps=8 / 255)
        >>> fooled = model(x_adv).argmax(1) != y
    """
    # The default step 2.5·eps projected back onto the ball is exactly a step of eps, and unlike
    # step_size=eps it keeps eps=0 valid.
    return pgd(model, x, y, eps=eps, norm=norm, steps=1, targeted=targeted, project=project, clamp=clamp, loss=loss)
