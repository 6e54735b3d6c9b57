"""On- and off-manifold robustness without an attack: how much random perturbations in and across the tangent
space move the classifier's output (pure torch).

Srinivas, Bordt & Lakkaraju (NeurIPS 2023, "Which models have perceptually-aligned gradients? An explanation
via off-manifold robustness") measure a subspace's robustness as E_u ||softmax(f(x + eps u)) − softmax(f(x))||_1
for u uniformly random on the unit sphere of the subspace: the tangent space of the manifold at x (*on*) and
its orthogonal complement (*off*). Here, as in :mod:`dmm.measures.decomposition`, the tangent space is the
decoder's at D(E(x)), the perturbations start at x, and the null models are a uniformly random k-dim subspace per
image and its complement (``random``, ``random_off``).

A uniform unit vector of a subspace with projector P is P g / ||P g|| for g ~ N(0, I_n) (rotation invariance:
P g = Q c with c = Q^T g ~ N(0, I_k)), and of its complement (g − P g) / ||g − P g||. P g and g − P g are
independent Gaussians, so one g per draw gives the arm and its complement independent directions; the
projection needs only ``split``, so the tangent arms run matrix-free too. A direction is used at every eps
(the curves are smooth in eps).

The null's ratio is 1: a unit vector uniform in a uniformly random subspace, or in its complement, is uniform on
the unit sphere of R^n, so ``random`` and ``random_off`` have the same expected change (over the subspace's draw
too) whatever k is. An ``off_over_on`` ratio above 1 says the classifier is more robust along the manifold than
across it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmm.errors import DmmError
from dmm.manifold import MatrixFreeTangent, Subspace, random_basis, tangent_subspace
from dmm.measures.base import Batch, Measure, Models
from dmm.tensors import eval_mode, norms, rows

ARMS = ("on", "off", "random", "random_off")
"""The subspaces the directions are drawn in: the tangent space, its complement and the null models."""
RATIOS = (("off", "on"), ("random_off", "random"))
"""Ratios numerator/denominator of the mean changes."""
RESAMPLES, BOOTSTRAP_SEED, LEVEL = 1000, 0, 0.95
"""Percentile bootstrap over images of the summary's intervals."""


def gaussians(like: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Standard Gaussians shaped like ``like`` (B, ...), one draw of each image's CPU generator, on its device."""
    return torch.stack([torch.randn(like[0].shape, generator=g, dtype=like.dtype) for g in generators]).to(like.device)


def unit_directions(space: Subspace | MatrixFreeTangent, g: Tensor) -> tuple[Tensor, Tensor]:
    """(u_in, u_out), each shaped like g (B, ...) with unit L2 norm per sample: the parts of g inside and outside
    ``space``, normalised. For g ~ N(0, I_n) they are independent and uniform on the unit spheres of the
    subspace and of its complement."""
    inside, outside = space.split(g)
    tiny = torch.finfo(g.dtype).tiny
    return inside / rows(norms(inside).clamp_min(tiny), g), outside / rows(norms(outside).clamp_min(tiny), g)


def percentile_interval(replicates: Tensor) -> tuple[float, float]:
    """The (1 ∓ LEVEL) / 2 quantiles of bootstrap replicates, NaN ones dropped (NaN when none is left)."""
    kept = replicates[~replicates.isnan()]
    if kept.numel() == 0:
        return math.nan, math.nan
    # Order statistics, not interpolation, so that an infinite ratio gives inf rather than inf - inf = NaN.
    low = torch.quantile(kept, (1 - LEVEL) / 2, interpolation="lower")
    high = torch.quantile(kept, (1 + LEVEL) / 2, interpolation="higher")
    return low.item(), high.item()


def ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator elementwise; 0 / 0 is NaN and a / 0 is +inf for a > 0."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny),
                       torch.where(numerator > 0, math.inf, math.nan))  # fmt: skip


class ManifoldSmoothness(Measure):
    """The mean L1 change of the softmax under random perturbations in and across the tangent space.

    Args:
        eps_curve: the L2 sizes of the perturbations ([0, 1] pixels; Srinivas et al. use 1.44 to 8.86 on
            their data's scale).
        draws: random directions per image and arm, each used at every eps.
        nulls: also draw in a random k-dim subspace per image and in its complement (dense tangent bases only).
        clamp: clamp x + eps u to [0, 1]. Off by default: the clamp moves the perturbed point out of the
            direction's subspace, so the arms would no longer be on or off the manifold exactly.

    Example:
        >>> records = ManifoldSmoothness(eps_curve=[1.0]).measure(Models(f, encoder, decoder), batch)
        >>> records["off/change@1"].mean() / records["on/change@1"].mean()  # > 1: robust along the manifold
    """

    name = "smoothness"
    needs_manifold = True

    def __init__(
        self,
        eps_curve: list[float] = [0.5, 1.0, 2.0, 4.0],  # noqa: B006  (read, never changed)
        draws: int = 8,
        nulls: bool = True,
        clamp: bool = False,
    ) -> None:
        if not eps_curve or any(not (math.isfinite(e) and e > 0) for e in eps_curve):
            raise DmmError(f"smoothness eps_curve must hold finite numbers > 0, got {list(eps_curve)}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise DmmError(f"smoothness draws must be an integer >= 1, got {draws!r}")
        self.eps_curve = sorted({float(e) for e in eps_curve})
        self.draws, self.nulls, self.clamp = draws, nulls, clamp
        self.arms = ARMS if nulls else ARMS[:2]

    def settings(self) -> dict:
        return {"eps_curve": self.eps_curve, "draws": self.draws, "arms": list(self.arms), "clamp": self.clamp}

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per-image records (B,): ``correct``; per arm a and eps e, ``{a}/change@{e}``, the mean over draws of
        ||softmax(f(x + e u)) − softmax(f(x))||_1 (in [0, 2]), and ``{a}/flip@{e}``, the fraction of draws
        whose predicted class differs from the clean one.

        Each image's generator is drawn in this order, so its records do not depend on its batch: ``draws``
        Gaussians for the tangent arms, then (with ``nulls``) the random basis and ``draws`` Gaussians for the
        random arms.
        """
        f, x = models.classifier, batch.x
        with torch.no_grad(), eval_mode(f):
            logits = f(x)
        out: dict[str, Tensor] = {"correct": logits.argmax(dim=1) == batch.y}
        with torch.no_grad(), eval_mode(models.encoder):
            z = models.encoder(x)
        tangent, _ = tangent_subspace(models.decoder, z, x[0].numel())
        if self.nulls and not isinstance(tangent, Subspace):
            raise DmmError("the smoothness null arms need a dense tangent basis; above DENSE_LIMIT run nulls: false")
        out |= self.changes(f, x, logits, tangent, ("on", "off"), batch.generators)
        if self.nulls:
            basis = random_basis(*tangent.basis.shape, generator=batch.generators, device=x.device, dtype=x.dtype)
            random = Subspace(basis)
            out |= self.changes(f, x, logits, random, ("random", "random_off"), batch.generators)
        return out

    def changes(
        self,
        model: nn.Module,
        x: Tensor,
        logits: Tensor,
        space: Subspace | MatrixFreeTangent,
        arms: tuple[str, str],
        generators: list[torch.Generator],
    ) -> dict[str, Tensor]:
        """``{arm}/change@{e}`` and ``{arm}/flip@{e}`` (B,) for the two arms inside and outside ``space``, from
        ``draws`` Gaussians of each image's generator; ``logits`` (B, classes) are the model's at x."""
        clean, label = logits.softmax(dim=1), logits.argmax(dim=1)
        out = {f"{arm}/{kind}@{e:g}": torch.zeros(len(x), dtype=x.dtype, device=x.device)
               for arm in arms for kind in ("change", "flip") for e in self.eps_curve}  # fmt: skip
        with torch.no_grad(), eval_mode(model):
            for _ in range(self.draws):
                for arm, u in zip(arms, unit_directions(space, gaussians(x, generators)), strict=True):
                    for e in self.eps_curve:  # the same direction at every eps
                        perturbed = model((x + e * u).clamp(0, 1) if self.clamp else x + e * u)
                        out[f"{arm}/change@{e:g}"] += (perturbed.softmax(dim=1) - clean).abs().sum(dim=1) / self.draws
                        out[f"{arm}/flip@{e:g}"] += (perturbed.argmax(dim=1) != label).to(x.dtype) / self.draws
        return out

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Figures over all images (correct or not): per arm and eps the mean change with a 95 % percentile
        bootstrap interval over images (``/ci_low``, ``/ci_high``; 1000 resamples, fixed seed) and the flip rate;
        ``off_over_on@{e}`` and ``random_off_over_random@{e}``, ratios of mean changes, with intervals from
        the same resamples (paired); ``num_images`` and ``clean_acc``."""
        correct = records["correct"]
        m = correct.numel()
        s: dict[str, float] = {"num_images": float(m), "clean_acc": correct.double().mean().item()}
        generator = torch.Generator().manual_seed(BOOTSTRAP_SEED)
        indices = torch.randint(max(m, 1), (RESAMPLES, m), generator=generator)  # (resamples, images)
        arms = [a for a in ARMS if f"{a}/change@{self.eps_curve[0]:g}" in records]
        for e in self.eps_curve:
            means, replicates = {}, {}
            for a in arms:
                change = records[f"{a}/change@{e:g}"].double().cpu()
                means[a], replicates[a] = change.mean(), change[indices].mean(dim=1)
                s[f"{a}/change@{e:g}"] = means[a].item()
                s[f"{a}/change@{e:g}/ci_low"], s[f"{a}/change@{e:g}/ci_high"] = percentile_interval(replicates[a])
                s[f"{a}/flip@{e:g}"] = records[f"{a}/flip@{e:g}"].double().mean().item()
            for a, b in RATIOS:
                if a in arms and b in arms:
                    key = f"{a}_over_{b}@{e:g}"
                    s[key] = ratio(means[a], means[b]).item()
                    s[f"{key}/ci_low"], s[f"{key}/ci_high"] = percentile_interval(ratio(replicates[a], replicates[b]))
        return s
