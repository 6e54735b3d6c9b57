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
5. the distance of each image from the manifold model, ||x − D(E(x))||: the tangent is taken at D(E(x)), or,
   with ``latent_steps``, at D(z*) for z* refined from E(x) towards the manifold point nearest x
   (:func:`dmm.manifold.project_to_manifold`);
6. whether the parts alone fool f, and each part's share of the margin change, for the early-stopped d
   (its first iterate past the boundary, which removing any part tends to un-cross) and for a perturbation
   run to the full budget without early stopping (``full_budget_parts``), where the parts have room to act;
   with the random null, the same for d's parts in the random subspace and its complement: the shares the
   tangent's parts must beat;
7. on data whose manifold is known (``models.exact``), the instrument's error: the principal angles between
   the learned tangent space and the exact one at each image, and d's on-fraction in the exact tangent space.
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
    principal_angles,
    project_to_manifold,
    random_basis,
    random_subspace_fraction,
    support_basis,
    tangent_subspace,
)
from dmm.measures.base import Batch, Measure, Models
from dmm.measures.partners import PartnerPool
from dmm.measures.parts import record_parts, summarize_parts
from dmm.measures.statistics import censored_median, paired_ratio_median, wilson
from dmm.tensors import fools, fraction, norms

log = logging.getLogger(__name__)

ARMS = ("full", "on", "off", "random", "random_off", "support", "support_off", "other", "other_off")
"""Every arm: the subspace each attack is restricted to (``full``: none)."""
PAIRS = (("on", "full"), ("off", "full"), ("random", "full"), ("random_off", "full"), ("on", "random"),
         ("off", "random_off"), ("on", "support"), ("off", "support_off"), ("on", "other"),
         ("off", "other_off"))  # fmt: skip
"""Paired norm ratios numerator/denominator, over the images both arms fooled (when both arms ran)."""


class Decomposition(Measure):
    """Attack per arm, split the unconstrained perturbation into on/off-manifold parts, compare with the nulls.

    Args:
        attack: the budget and step rule every arm shares; early stopping makes each norm the norm needed.
            L2 only for the restricted arms (see :class:`dmm.attacks.PGD`).
        nulls: the null models whose arms run next to on/off: "random" (a random subspace and its complement)
            "support" (a random subspace of the image's active pixels and its complement) and "other" (the
            tangent space at another image of the same class in the subset, see :class:`PartnerPool`). L∞ attacks run
            the unconstrained arm alone: a restricted steepest L∞ step is a linear programme (see
            :class:`dmm.attacks.PGD`); the L∞ perturbation is still split.
        eps_curve: budgets at which robust accuracy is read off the early-stopped unconstrained run (an upper
            bound, not a fixed-budget attack).
        support_threshold: a pixel belongs to an image's support when it exceeds this (``support`` arms).
        support_dilation: the support grows by this many pixels around the strokes.
        full_budget_parts: also run the unconstrained attack to its full budget (no early stop) and record
            whether its on- and off-manifold parts alone fool f and their shares of its margin change.
        latent_steps: Levenberg–Marquardt steps refining E(x) towards the latent whose decoding is nearest x
            before the tangent space is taken (0: the tangent at D(E(x))).

    With the ``other`` null, call :meth:`prepare` with the whole image subset before measuring (the evaluation
    callback does): partners come from the subset, not the batch.
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
        latent_steps: int = 0,
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
        if isinstance(latent_steps, bool) or not isinstance(latent_steps, int) or latent_steps < 0:
            raise DmmError(f"decomposition latent_steps must be an integer >= 0, got {latent_steps!r}")
        self.attack = attack
        chosen = {"full"} | ({"on", "off"} if attack.norm == "l2" else set())
        chosen |= {arm for null in nulls for arm in (null, f"{null}_off")}
        self.arms = tuple(a for a in ARMS if a in chosen)  # canonical order
        self.eps_curve = sorted(float(e) for e in eps_curve)
        self.support_threshold, self.support_dilation = support_threshold, support_dilation
        self.full_budget_parts, self.latent_steps = full_budget_parts, latent_steps
        self._partners = PartnerPool()

    @property
    def needs_subset(self) -> bool:
        return "other" in self.arms

    def prepare(self, x: Tensor, y: Tensor, index: Tensor) -> None:
        """Pick each image's partner for the ``other`` null from the whole subset (see :class:`PartnerPool`)."""
        self._partners.prepare(x, y, index)

    def settings(self) -> dict:
        return {
            **self.attack.as_dict(),
            "arms": list(self.arms),
            "eps_curve": self.eps_curve,
            "support_threshold": self.support_threshold,
            "support_dilation": self.support_dilation,
            "full_budget_parts": self.full_budget_parts,
            **({"latent_steps": self.latent_steps} if self.latent_steps else {}),
            **({"other_pool": self._partners.digest} if self.needs_subset else {}),
        }

    def latents(self, models: Models, x: Tensor) -> Tensor:
        """The latents (B, k) at which tangents are taken: E(x), refined by ``latent_steps``."""
        with torch.no_grad():
            z = models.encoder(x)
        return project_to_manifold(models.decoder, x, z, self.latent_steps)[0] if self.latent_steps else z

    def subspaces(self, models: Models, batch: Batch) -> tuple[dict, Tensor, Tensor, Tensor | None]:
        """The projector of every arm, the tangent's condition numbers, the latents and a random basis."""
        x = batch.x
        z = self.latents(models, x)
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
                partner_z = self.latents(models, self._partners.images(batch))
                spaces["other"] = Subspace(tangent_subspace(models.decoder, partner_z, x[0].numel())[0].basis)
                spaces["other_off"] = spaces["other"].complement()
        return spaces, condition, z, random

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per-image records (B,): ``correct``; per arm a: ``{a}_success``, ``{a}_l2``, ``{a}_linf`` (norms of
        x_adv − x) and, restricted arms, ``leak_{a}``; ``on_fraction`` and ``random_fraction`` of the
        unconstrained d; ``on_part_fools`` / ``off_part_fools``; ``tangent_condition`` (NaN when matrix-free);
        ``recon_error`` ||x − D(z)|| at the tangent's latent (and ``recon_error_encoder`` at E(x) when
        ``latent_steps``); with the random null, ``random_part_fools`` / ``random_off_part_fools`` and their
        margin shares; ``_images`` (B, 5, C, H, W): x, x_adv, d, d_on, d_off."""
        f, x, y = models.classifier, batch.x, batch.y
        with torch.no_grad():
            correct = f(x).argmax(dim=1) == y
        spaces, condition, z, random = self.subspaces(models, batch)
        with torch.no_grad():
            recon_error = norms(x - models.decoder(z))
        out: dict[str, Tensor] = {"correct": correct, "tangent_condition": condition}
        if self.latent_steps:
            with torch.no_grad():
                out["recon_error_encoder"] = norms(x - models.decoder(models.encoder(x)))
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
        splits = {("on", "off"): tangent} | (
            {("random", "random_off"): spaces["random"]} if "random" in self.arms else {}
        )
        record_parts(out, "", f, x, y, d, correct, splits)
        if self.full_budget_parts:
            budget = self.attack.replace(early_stop=False, refine=0)(f, x, y) - x
            out["budget_fools"] = fools(f, x + budget, y) & correct
            out["budget_on_fraction"] = fraction(tangent.split(budget)[0], budget)
            record_parts(out, "budget_", f, x, y, budget, correct, splits)
        for arm in self.arms[1:]:
            out[f"leak_{arm}"] = fraction(spaces[arm].split(perturbations[arm])[1], perturbations[arm])
        out["recon_error"] = recon_error
        if "other" in self.arms:
            out["other_same_class"] = self._partners.same_class(batch)
        if models.exact is not None:
            out |= self._against_exact(models, x, tangent, d)
        out["_images"] = torch.stack([x, x + d, d, d_on, d_off], dim=1)
        return out

    @staticmethod
    def _against_exact(models: Models, x: Tensor, tangent, d: Tensor) -> dict[str, Tensor]:
        """The learned tangent space against the known manifold's at each image (B,): principal angles in
        degrees (mean and largest; dense tangents only) and d's on-fraction in the exact tangent space."""
        encoder, decoder = models.exact
        with torch.no_grad():
            z = encoder(x)
        exact, _ = tangent_subspace(decoder, z, x[0].numel())
        out = {"exact_on_fraction": fraction(exact.split(d)[0], d)}
        if isinstance(tangent, Subspace) and isinstance(exact, Subspace):
            wide, narrow = sorted((tangent.basis, exact.basis), key=lambda q: -q.shape[2])
            angles = torch.rad2deg(principal_angles(wide, narrow))  # (B, min(k, k_exact)), ascending
            out["exact_angle_mean"], out["exact_angle_max"] = angles.mean(dim=1), angles[:, -1]
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
        keys += [key for key in ("recon_error", "recon_error_encoder") if key in records]
        keys += [key for key in ("exact_angle_mean", "exact_angle_max") if key in records]
        subsets["exact_on_fraction"] = ok
        keys += ["exact_on_fraction"] if "exact_on_fraction" in records else []
        for key in keys:
            values = records[key][subsets.get(key, correct if key.startswith("leak") else torch.ones_like(ok))]
            s[f"{key}_mean"] = values.mean().item() if values.numel() else math.nan
            s[f"{key}_median"] = values.median().item() if values.numel() else math.nan
        parts = [p for p in ("on", "off", "random", "random_off") if f"{p}_part_fools" in records]
        summarize_parts(s, records, "", ok, parts)
        if "budget_fools" in records:  # over the images the full-budget attack fooled
            hit = records["budget_fools"]
            s["budget/success_rate"] = (hit.sum() / correct.sum().clamp_min(1)).item()
            s["budget/on_fraction_median"] = (
                records["budget_on_fraction"][hit].median().item() if hit.any() else math.nan
            )
            summarize_parts(s, records, "budget_", hit, parts)
        needed = records[f"full_{self.attack.norm}"]
        for eps in self.eps_curve:
            fooled = ok & (needed <= eps + 1e-6)
            s[f"robust_acc@{eps:g}"] = (correct & ~fooled).float().mean().item()
        return s
