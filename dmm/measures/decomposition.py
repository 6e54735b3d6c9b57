"""The DMM measurement: attacks restricted to the tangent space, its complement and their null models.

For images x with labels y, a classifier f and an autoencoder's encoder E and decoder D:

1. the tangent space of the learned manifold at D(E(x)) (:func:`dmm.manifold.tangent_subspace`: a dense
   orthonormal basis, or matrix-free above :data:`dmm.manifold.DENSE_LIMIT`);
2. one early-stopped PGD attack per *arm*, all with the same budget and step rule, so the norms they need
   are comparable: unconstrained (``full``), restricted to the tangent space (``on``) or to its complement
   (``off``), and the null models the tangent space must beat — a uniformly random k-dim subspace per image
   (``random``) and its complement (``random_off``), and a random k-dim subspace of the image's own active
   pixels (``support``, ``support_off``), which shares the tangent space's pixel support, and the tangent
   space of *another* image of the same class (``other``, ``other_off``): a digit's shape, not this image's;
3. the unconstrained perturbation d split as d_on + d_off, its on-manifold fraction ||d_on|| / ||d|| next to
   the random subspace's (about sqrt(k / n)), and whether x + d_on or x + d_off alone fools f;
4. each restricted arm's leak: the fraction of its perturbation's norm outside its subspace (with
   ``clamp=True`` the [0, 1] clamp moves part of it out; ``clamp="exact"`` keeps it at rounding level);
5. the distance of each image from the manifold model, ||x − D(E(x))||: the tangent is taken at D(E(x));
6. whether the parts alone fool f, and each part's share of the margin change, for the early-stopped d
   (its first iterate past the boundary, which removing any part tends to un-cross) and for a perturbation
   run to the full budget without early stopping (``full_budget_parts``), where the parts have room to act.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.manifold import (
    MatrixFreeTangent,
    Subspace,
    active_pixels,
    random_basis,
    random_subspace_fraction,
    support_basis,
    tangent_subspace,
)
from dmm.measures.base import Batch, Measure, Models
from dmm.measures.statistics import censored_median, paired_ratio_median, wilson
from dmm.tensors import eval_mode, fools, fraction, norms

log = logging.getLogger(__name__)

ARMS = ("full", "on", "off", "random", "random_off", "support", "support_off", "other", "other_off")
"""Every arm: the subspace each attack is restricted to (``full``: none)."""
PAIRS = (("on", "full"), ("off", "full"), ("random", "full"), ("random_off", "full"), ("on", "random"),
         ("off", "random_off"), ("on", "support"), ("off", "support_off"), ("on", "other"),
         ("off", "other_off"))  # fmt: skip
"""Paired norm ratios numerator/denominator, over the images both arms fooled (when both arms ran)."""


def partners(y: Tensor) -> tuple[Tensor, Tensor]:
    """For each image of a batch, another image of the same class: the next one in batch order, cyclically.

    Returns (partner (B,) int64, same_class (B,) bool); an image alone in its class in the batch gets the next
    image of any class (``same_class`` False; with batches of hundreds of images it does not happen). The
    choice depends on the batch, so the ``other`` arm's records, unlike the others', depend on batch size and
    process count.
    """
    batch = len(y)
    partner = (torch.arange(batch, device=y.device) + 1) % max(batch, 1)
    same = torch.zeros(batch, dtype=torch.bool, device=y.device)
    for i in range(batch):
        mates = ((y == y[i]).nonzero().squeeze(1)).tolist()
        mates = [j for j in mates if j != i]
        if mates:
            later = [j for j in mates if j > i]
            partner[i], same[i] = (later or mates)[0], True
    return partner, same


def margins(model, x: Tensor, y: Tensor) -> Tensor:
    """(B,) classification margin z_y − max_{j≠y} z_j of ``model`` at x: positive exactly when correct."""
    with torch.no_grad(), eval_mode(model):
        logits = model(x)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], -math.inf).amax(dim=1)


def margin_shares(model, x: Tensor, y: Tensor, part_a: Tensor, part_b: Tensor) -> tuple[Tensor, Tensor]:
    """Each part's share of the margin drop of the whole: (m(x) − m(x + part)) / (m(x) − m(x + a + b)), (B,)
    each (NaN where the whole perturbation does not lower the margin). The parts are not clamped, so that
    they add up to the whole; the shares then add to 1 for a model linear in between (two classes), and their
    sum's distance from 1 measures the interaction."""
    base = margins(model, x, y)
    drop = base - margins(model, x + part_a + part_b, y)
    drop = torch.where(drop > 0, drop, torch.full_like(drop, math.nan))
    return (base - margins(model, x + part_a, y)) / drop, (base - margins(model, x + part_b, y)) / drop


class Decomposition(Measure):
    """Attack per arm, split the unconstrained perturbation into on/off-manifold parts, compare with the nulls.

    Args:
        attack: the budget and step rule every arm shares; early stopping makes each norm the norm needed.
            L2 only for the restricted arms (see :class:`dmm.attacks.PGD`).
        nulls: the null models whose arms run next to on/off: "random" (a random subspace and its complement)
            "support" (a random subspace of the image's active pixels and its complement) and "other" (the
            tangent space at another image of the same class in the batch, see :func:`partners`). L∞ attacks run
            the unconstrained arm alone: a restricted steepest L∞ step is a linear programme (see
            :class:`dmm.attacks.PGD`); the L∞ perturbation is still split.
        eps_curve: budgets at which robust accuracy is read off the early-stopped unconstrained run (an upper
            bound, not a fixed-budget attack).
        support_threshold: a pixel belongs to an image's support when it exceeds this (``support`` arms).
        support_dilation: the support grows by this many pixels around the strokes.
        full_budget_parts: also run the unconstrained attack to its full budget (no early stop) and record
            whether its on- and off-manifold parts alone fool f and their shares of its margin change.
    """

    name = "decomposition"
    image_columns = ("x", "x_adv", "d", "d_on", "d_off")

    def __init__(
        self,
        attack: PGD = PGD(eps=4.0, steps=100, step_size=0.05, early_stop=True),
        nulls: list[Literal["random", "support", "other"]] = ["random"],  # noqa: B006  (read, never changed)
        eps_curve: list[float] = [0.5, 1.0, 1.5, 2.0, 3.0],  # noqa: B006
        support_threshold: float = 0.1,
        support_dilation: int = 1,
        full_budget_parts: bool = True,
    ) -> None:
        unknown = sorted(set(nulls) - {"random", "support", "other"})
        if unknown:
            raise DmmError(f"decomposition nulls must be among ['random', 'support', 'other']; unknown {unknown}")
        if attack.norm != "l2" and nulls:
            raise DmmError("the null arms are L2 only (see dmm.attacks.PGD): use norm l2, or nulls: []")
        if any(not (math.isfinite(e) and e >= 0) for e in eps_curve):
            raise DmmError(f"decomposition eps_curve must hold finite numbers >= 0, got {list(eps_curve)}")
        if support_dilation < 0:
            raise DmmError(f"decomposition support_dilation must be >= 0, got {support_dilation}")
        self.attack = attack
        chosen = {"full"} | ({"on", "off"} if attack.norm == "l2" else set())
        chosen |= {arm for null in nulls for arm in (null, f"{null}_off")}
        self.arms = tuple(a for a in ARMS if a in chosen)  # canonical order
        self.eps_curve = sorted(float(e) for e in eps_curve)
        self.support_threshold, self.support_dilation = support_threshold, support_dilation
        self.full_budget_parts = full_budget_parts

    def settings(self) -> dict:
        return {
            **self.attack.as_dict(),
            "arms": list(self.arms),
            "eps_curve": self.eps_curve,
            "support_threshold": self.support_threshold,
            "support_dilation": self.support_dilation,
            "full_budget_parts": self.full_budget_parts,
        }

    def subspaces(self, models: Models, batch: Batch) -> tuple[dict, Tensor, Tensor, Tensor | None]:
        """The projector of every arm, the tangent's condition numbers, the latents and a random basis."""
        x = batch.x
        with torch.no_grad():
            z = models.encoder(x)
        tangent, condition = tangent_subspace(models.decoder, z, x[0].numel())
        spaces: dict = {"full": None, "on": tangent, "off": tangent.complement()}
        random = None
        dense = isinstance(tangent, Subspace)
        if not dense and set(self.arms) - {"full", "on", "off"}:
            raise DmmError("the null arms need a dense basis; above DENSE_LIMIT run nulls: []")
        if dense:
            # The first draw of each image's generator: the same basis as the on-fraction's baseline.
            random = random_basis(*tangent.basis.shape, generator=batch.generators, device=x.device, dtype=x.dtype)
            spaces["random"] = Subspace(random)
            spaces["random_off"] = spaces["random"].complement()
            if {"support", "support_off"} & set(self.arms):
                mask = active_pixels(x, self.support_threshold, self.support_dilation)
                k = tangent.basis.shape[2]
                spaces["support"] = Subspace(support_basis(mask, k, generator=batch.generators, dtype=x.dtype))
                spaces["support_off"] = spaces["support"].complement()
            if {"other", "other_off"} & set(self.arms):
                partner, _ = partners(batch.y)
                spaces["other"] = Subspace(tangent.basis[partner])
                spaces["other_off"] = spaces["other"].complement()
        return spaces, condition, z, random

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per-image records (B,): ``correct``; per arm a: ``{a}_success``, ``{a}_l2``, ``{a}_linf`` (norms of
        x_adv − x) and, restricted arms, ``leak_{a}``; ``on_fraction`` and ``random_fraction`` of the
        unconstrained d; ``on_part_fools`` / ``off_part_fools``; ``tangent_condition`` (NaN when matrix-free);
        ``recon_error`` ||x − D(E(x))||; ``_images`` (B, 5, C, H, W): x, x_adv, d, d_on, d_off."""
        f, x, y = models.classifier, batch.x, batch.y
        with torch.no_grad():
            correct = f(x).argmax(dim=1) == y
        spaces, condition, z, random = self.subspaces(models, batch)
        with torch.no_grad():
            recon_error = norms(x - models.decoder(z))
        out: dict[str, Tensor] = {"correct": correct, "tangent_condition": condition}
        perturbations = {}
        for arm in self.arms:
            d = self.attack(f, x, y, project=spaces[arm]) - x
            perturbations[arm] = d
            out[f"{arm}_success"] = fools(f, x + d, y) & correct
            out[f"{arm}_l2"] = norms(d)
            out[f"{arm}_linf"] = d.flatten(1).abs().amax(dim=1)

        tangent, d = spaces["on"], perturbations["full"]
        d_on, d_off = tangent.split(d)
        if isinstance(tangent, MatrixFreeTangent):
            out["on_fraction"] = fraction(d_on, d)
            self._warn_unconverged(tangent, len(d))
            # Exact in distribution, and no (B, n, k) basis: see random_subspace_fraction.
            out["random_fraction"] = random_subspace_fraction(d, z[0].numel(), generator=batch.generators)
        else:
            out["on_fraction"] = tangent.fraction(d)
            out["random_fraction"] = spaces["random"].fraction(d)
        out["on_part_fools"] = fools(f, (x + d_on).clamp(0, 1), y) & correct
        out["off_part_fools"] = fools(f, (x + d_off).clamp(0, 1), y) & correct
        out["on_margin_share"], out["off_margin_share"] = margin_shares(f, x, y, d_on, d_off)
        if self.full_budget_parts:
            budget = self.attack.replace(early_stop=False)(f, x, y) - x
            b_on, b_off = tangent.split(budget)
            out["budget_fools"] = fools(f, x + budget, y) & correct
            out["budget_on_fraction"] = fraction(b_on, budget)
            out["budget_on_part_fools"] = fools(f, (x + b_on).clamp(0, 1), y) & correct
            out["budget_off_part_fools"] = fools(f, (x + b_off).clamp(0, 1), y) & correct
            out["budget_on_margin_share"], out["budget_off_margin_share"] = margin_shares(f, x, y, b_on, b_off)
        for arm in self.arms[1:]:
            out[f"leak_{arm}"] = fraction(spaces[arm].split(perturbations[arm])[1], perturbations[arm])
        out["recon_error"] = recon_error
        if "other" in self.arms:
            out["other_same_class"] = partners(y)[1]
        out["_images"] = torch.stack([x, x + d, d, d_on, d_off], dim=1)
        return out

    @staticmethod
    def _warn_unconverged(tangent: MatrixFreeTangent, count: int) -> None:
        stopped = int((tangent.last.residual >= tangent.tol).sum())
        if stopped:
            log.warning(
                "matrix-free projection of %d of %d perturbations stopped at max_iter=%d above tol=%g; "
                "the decoder's Jacobian is badly conditioned there", stopped, count, tangent.max_iter, tangent.tol,
            )  # fmt: skip

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Figures over all images.

        Rates are among correctly classified images, with Wilson 95 % intervals. ``{a}/l2_needed_median`` is
        the censored median (failures need more than eps: +inf when at least half fail); ``{a}/l2_median`` and
        ``{a}/l2_mean`` are over that arm's own successes only, which differ between arms — compare arms by
        the censored medians or by ``ratio/{a}_over_{b}``, the median per-image norm ratio over the images
        both fooled. Fractions are over the unconstrained attack's successes. ``robust_acc@eps`` counts an
        image as robust when it is correct and the early-stopped attack needed more than eps (or failed).
        """
        correct = records["correct"]
        n_correct = int(correct.sum())
        s: dict[str, float] = {"num_images": float(correct.numel()), "clean_acc": correct.float().mean().item()}
        arms = [a for a in ARMS if f"{a}_success" in records]
        for a in arms:
            ok = records[f"{a}_success"]
            s[f"{a}/success_rate"] = (ok.sum() / correct.sum().clamp_min(1)).item()
            s[f"{a}/success_ci_low"], s[f"{a}/success_ci_high"] = wilson(int(ok.sum()), n_correct)
            own = records[f"{a}_l2"][ok]
            s[f"{a}/l2_median"] = own.median().item() if own.numel() else math.nan
            s[f"{a}/l2_mean"] = own.mean().item() if own.numel() else math.nan
            s[f"{a}/l2_needed_median"] = censored_median(records[f"{a}_l2"][correct], ok[correct])
        for a, b in PAIRS:
            if a in arms and b in arms:
                both = records[f"{a}_success"] & records[f"{b}_success"]
                ratio, pairs = paired_ratio_median(records[f"{a}_l2"], records[f"{b}_l2"], both)
                s[f"ratio/{a}_over_{b}"], s[f"ratio/{a}_over_{b}/pairs"] = ratio, float(pairs)
        ok = records["full_success"]
        # Fractions of the unconstrained d over its successes; leaks over the images that were attacked.
        subsets = {"on_fraction": ok, "random_fraction": ok}
        keys = ["on_fraction", "random_fraction", *(f"leak_{a}" for a in arms[1:]), "tangent_condition"]
        keys += ["recon_error"] if "recon_error" in records else []
        for key in keys:
            values = records[key][subsets.get(key, correct if key.startswith("leak") else torch.ones_like(ok))]
            s[f"{key}_mean"] = values.mean().item() if values.numel() else math.nan
            s[f"{key}_median"] = values.median().item() if values.numel() else math.nan
        for key in ("on_part_fools", "off_part_fools"):
            s[f"{key}_rate"] = records[key][ok].float().mean().item() if ok.any() else math.nan
        for key in ("on_margin_share", "off_margin_share"):
            if key in records:
                s[f"{key}_median"] = records[key][ok].median().item() if ok.any() else math.nan
        if "budget_fools" in records:  # over the images the full-budget attack fooled
            hit = records["budget_fools"]
            s["budget/success_rate"] = (hit.sum() / correct.sum().clamp_min(1)).item()
            for key in ("on_part_fools", "off_part_fools"):
                s[f"budget/{key}_rate"] = records[f"budget_{key}"][hit].float().mean().item() if hit.any() else math.nan
            for key in ("on_fraction", "on_margin_share", "off_margin_share"):
                s[f"budget/{key}_median"] = records[f"budget_{key}"][hit].median().item() if hit.any() else math.nan
        needed = records[f"full_{self.attack.norm}"]
        for eps in self.eps_curve:
            fooled = ok & (needed <= eps + 1e-6)
            s[f"robust_acc@{eps:g}"] = (correct & ~fooled).float().mean().item()
        return s
