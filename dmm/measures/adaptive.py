"""Adaptive attacks on project-then-classify, f(D(E(x))): is the autoencoder a defence, or does it hide gradients?

A defence that projects inputs onto the manifold can look robust to white-box PGD only because the gradient
through E and D is uninformative (Athalye, Carlini & Wagner, ICML 2018). Each image is therefore attacked, per
budget ε (L2, fixed budget, with restarts), by four attacks, and its pipeline counted robust only if it
withstands all of them — and every smaller budget:

- ``whitebox``: PGD through the whole pipeline (the attack of :class:`~dmm.measures.Detection`);
- ``bpda``: PGD on :class:`BPDA`, the pipeline with the identity as the backward pass of D∘E;
- ``latent``: :class:`LatentPGD`, PGD on the latent code z with the decoder in the loop;
- ``transfer``: PGD on the undefended classifier, its adversarial examples evaluated on the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import jvp

from dmm.attacks import LOSSES, PGD
from dmm.attacks.library import seeded
from dmm.attacks.pgd import _check_inputs, _per_sample
from dmm.errors import DmmError
from dmm.measures.base import Batch, Measure, Models
from dmm.measures.detection import ProjectThenClassify
from dmm.measures.robustness import batch_seed
from dmm.measures.statistics import wilson
from dmm.tensors import autograd_on, eval_mode, norms, predict, rows

ATTACKS = ("whitebox", "bpda", "latent", "transfer")
BISECTION = 16
"""Bisection steps pulling a latent iterate back into the budget: its reach is within 2^-16 of the segment."""


class _StraightThrough(torch.autograd.Function):
    """Forward: the reconstruction r, exactly; backward: the gradient handed to x unchanged (dr/dx := I)."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor) -> Tensor:
        return r.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class BPDA(nn.Module):
    """Project-then-classify with Backward Pass Differentiable Approximation (Athalye et al. 2018) of D∘E.

    The forward pass is exactly ``classifier(autoencoder(x))``; the backward pass treats the autoencoder as the
    identity, so the input gradient is the classifier's gradient at the reconstruction D(E(x)).

    Args:
        classifier: images in [0, 1] (B, C, H, W) -> logits.
        autoencoder: images -> reconstructions in [0, 1], same shape (run without a graph).
    """

    def __init__(self, classifier: nn.Module, autoencoder: nn.Module) -> None:
        super().__init__()
        self.classifier, self.autoencoder = classifier, autoencoder

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            r = self.autoencoder(x)
        return self.classifier(_StraightThrough.apply(x, r))


def pull_back(decoder: nn.Module, z0: Tensor, d0: Tensor, z: Tensor, eps: Tensor) -> Tensor:
    """z (B, k) moved along the segment towards z0 until ‖D(z) − d0‖₂ <= eps, d0 = D(z0): rows inside stay, rows
    outside move to z0 + t (z − z0) with t the largest feasible point bisection finds (t = 0, z0, is feasible)."""
    over = (norms(decoder(z) - d0) > eps).nonzero().squeeze(1)
    if over.numel() == 0:
        return z
    start, step, target, radius = z0[over], z[over] - z0[over], d0[over], eps[over]
    low, high = torch.zeros_like(radius), torch.ones_like(radius)
    for _ in range(BISECTION):
        mid = (low + high) / 2
        ok = norms(decoder(start + rows(mid, step) * step) - target) <= radius
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    z = z.clone()
    z[over] = start + rows(low, step) * step
    return z


@dataclass(frozen=True)
class LatentPGD:
    """PGD on the latent code with the decoder in the loop, against project-then-classify.

    The attacker moves the reconstruction along the manifold and carries the move to the input:
    x_adv = clamp(x + D(z) − D(z0), 0, 1) with z0 = E(x), under the enforced constraint ‖D(z) − D(z0)‖₂ <= eps
    (so ‖x_adv − x‖₂ <= eps: the clamp only shortens δ). x_adv = D(z) itself would leave the ε-ball around x
    whenever the reconstruction error exceeds ε. The objective is the classifier's loss at D(z), i.e. at the
    moved reconstruction, assuming E(D(z)) ≈ z; success is always judged on the real pipeline f(D(E(x_adv))).
    Each step moves z along the latent gradient g by ``2.5 eps / steps`` in image space to first order
    (Δz = α g / ‖J g‖, J the decoder's Jacobian), then pulls z back into the budget by bisection
    (:func:`pull_back`). An image stops at its first success; restarts after the first start at a random
    latent direction, on the images not fooled yet.

    Attributes:
        eps: L2 budget in [0, 1] pixel space.
        steps: gradient steps per run.
        restarts: runs per image.
        loss: "ce" or "margin" (as :class:`dmm.attacks.PGD`).
    """

    eps: float = 2.0
    steps: int = 40
    restarts: int = 1
    loss: Literal["ce", "margin"] = "ce"

    def __post_init__(self) -> None:
        PGD(eps=self.eps, steps=self.steps, restarts=self.restarts, loss=self.loss)  # the same rules, same errors

    def replace(self, **changes) -> LatentPGD:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, classifier: nn.Module, encoder: nn.Module, decoder: nn.Module, x: Tensor, y: Tensor,
                 *, eps=None) -> Tensor:  # fmt: skip
        """x_adv (same shape as x, detached) within ``eps`` (float or (B,)) of x, in [0, 1]."""
        _check_inputs(x, y)
        with autograd_on(), eval_mode(classifier, encoder, decoder):
            x, y = x.clone(), y.clone()
            radius = _per_sample(self.eps if eps is None else eps, "eps", x, allow_zero=True)
            with torch.no_grad():
                z0 = encoder(x)
                d0 = decoder(z0)
            best = self._run(classifier, encoder, decoder, x, y, z0, d0, radius, random_start=False)
            pipeline = ProjectThenClassify(classifier, nn.Sequential(encoder, decoder))
            for _ in range(self.restarts - 1):
                todo = (predict(pipeline, best) == y).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                best[todo] = self._run(classifier, encoder, decoder, x[todo], y[todo], z0[todo], d0[todo],
                                       radius[todo], random_start=True)  # fmt: skip
            return best.detach()

    def _run(self, classifier, encoder, decoder, x, y, z0, d0, eps, random_start: bool) -> Tensor:
        alpha, tiny = 2.5 * eps / self.steps, torch.finfo(x.dtype).tiny
        index, out = torch.arange(x.shape[0], device=x.device), x.clone()
        z = z0
        with torch.no_grad():
            if random_start:  # a random latent direction, first-order image length uniform in [0, eps]
                v = torch.randn_like(z0)
                length = norms(jvp(decoder, (z0,), (v,))[1]).clamp_min(tiny)
                z = pull_back(decoder, z0, d0, z0 + rows(eps * torch.rand_like(eps) / length, v) * v, eps)
            x_adv = (x + (decoder(z) - d0)).clamp(0, 1)
        for _ in range(self.steps):
            z = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(LOSSES[self.loss](classifier(decoder(z)), y), z)
            with torch.no_grad():  # forward mode needs no graph; a zero gradient stays a zero step
                length = norms(jvp(decoder, (z.detach(),), (g,))[1]).clamp_min(tiny)
                z = pull_back(decoder, z0, d0, z.detach() + rows(alpha / length, g) * g, eps)
                x_adv = (x + (decoder(z) - d0)).clamp(0, 1)
                hit = classifier(decoder(encoder(x_adv))).argmax(dim=1) != y
            if bool(hit.any()):
                out[index[hit]] = x_adv[hit]
                keep = ~hit
                state = (index, x, y, z0, d0, z, eps, alpha, x_adv)
                index, x, y, z0, d0, z, eps, alpha, x_adv = (t[keep] for t in state)
                if index.numel() == 0:
                    break
        out[index] = x_adv
        return out


class AdaptivePTC(Measure):
    """Robust accuracy of project-then-classify under white-box, BPDA, latent and transfer attacks.

    Args:
        attack: steps, restarts and loss of every attack (L2, fixed budget: ``early_stop`` false; PGD's restarts
            after the first start at random). Its eps is only the model checks' budget.
        eps_curve: the budgets.
    """

    name = "adaptive"
    needs_manifold = True

    def __init__(
        self,
        attack: PGD = PGD(eps=2.0, steps=40, restarts=2),  # noqa: B008  (frozen: one shared default is safe)
        eps_curve: list[float] = [0.5, 1.0, 1.5, 2.0],  # noqa: B006  (read, never changed)
    ) -> None:
        if not eps_curve or any(not (math.isfinite(e) and e > 0) for e in eps_curve):
            raise DmmError(f"adaptive eps_curve must hold finite numbers > 0, got {list(eps_curve)}")
        if attack.norm != "l2" or attack.early_stop:
            raise DmmError(f"adaptive attack must be L2 and fixed-budget (norm: l2, early_stop: false); got {attack}")
        self.attack, self.eps_curve = attack, tuple(sorted({float(e) for e in eps_curve}))
        self.latent = LatentPGD(steps=attack.steps, restarts=attack.restarts, loss=attack.loss)

    def settings(self) -> dict:
        return {**self.attack.as_dict(), "eps_curve": list(self.eps_curve), "attacks": list(ATTACKS)}

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per image (B,): ``classifier/correct``, ``ptc/correct``; per e of ``eps_curve``
        ``classifier/robust@{e}`` (the transfer attack's source) and ``ptc/{attack}/robust@{e}`` for each of
        :data:`ATTACKS`: the pipeline is correct at x and at that attack's x_adv."""
        classifier, encoder, decoder = models
        x, y, seed = batch.x, batch.y, batch_seed(batch)
        autoencoder = nn.Sequential(encoder, decoder)
        ptc = ProjectThenClassify(classifier, autoencoder)
        models_of = {"whitebox": ptc, "bpda": BPDA(classifier, autoencoder), "transfer": classifier}
        out = {"classifier/correct": predict(classifier, x) == y, "ptc/correct": predict(ptc, x) == y}
        for eps in self.eps_curve:
            e = f"{eps:g}"
            for name in ATTACKS:
                with seeded(seed, x.device):
                    if name == "latent":
                        x_adv = self.latent(classifier, encoder, decoder, x, y, eps=eps)
                    else:
                        x_adv = self.attack.replace(eps=eps)(models_of[name], x, y)
                out[f"ptc/{name}/robust@{e}"] = out["ptc/correct"] & (predict(ptc, x_adv) == y)
                if name == "transfer":  # its source: the undefended classifier
                    out[f"classifier/robust@{e}"] = out["classifier/correct"] & (predict(classifier, x_adv) == y)
        return out

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Rates over all images with Wilson 95 % intervals: clean accuracies; per e ``classifier/robust_acc@e``,
        each attack's ``ptc/{attack}/robust_acc@e`` and ``ptc/{attack}/unique@e`` (images only it broke), and
        ``ptc/robust_acc@e``: robust to every attack at e and at every smaller budget — at most each attack's."""
        n = records["ptc/correct"].numel()
        s: dict[str, float] = {"num_images": float(n)}

        def rate(key: str, hits: Tensor) -> None:
            s[key] = int(hits.sum()) / n if n else math.nan
            s[f"{key}_ci_low"], s[f"{key}_ci_high"] = wilson(int(hits.sum()), n)

        rate("classifier/clean_acc", records["classifier/correct"])
        rate("ptc/clean_acc", records["ptc/correct"])
        correct, broken = records["ptc/correct"], torch.zeros_like(records["ptc/correct"])
        for eps in self.eps_curve:
            e = f"{eps:g}"
            rate(f"classifier/robust_acc@{e}", records[f"classifier/robust@{e}"])
            robust = torch.stack([records[f"ptc/{a}/robust@{e}"] for a in ATTACKS])  # (attacks, B)
            for i, a in enumerate(ATTACKS):
                rate(f"ptc/{a}/robust_acc@{e}", robust[i])
                others = torch.cat([robust[:i], robust[i + 1 :]]).all(0)
                s[f"ptc/{a}/unique@{e}"] = int((correct & ~robust[i] & others).sum()) / n if n else math.nan
            broken |= correct & ~robust.all(0)
            rate(f"ptc/robust_acc@{e}", correct & ~broken)
        return s
