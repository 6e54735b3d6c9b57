"""Robust accuracy at fixed budgets, checked: strong attacks with restarts, a convergence check, a sanity check.

Per budget ε of ``eps_curve`` every image is attacked by each fixed-budget attack: APGD-CE and APGD-DLR from
adv-lib when the ``attacks`` extra is installed, else dmm's PGD on the CE and on the CW margin, each with
restarts (``settings()["library"]`` says which). An image is robust at ε when it is correctly classified and
no attack fooled it within ε — nor within any smaller budget, whose adversarial examples lie in the ε-ball
too (so the curve cannot rise with ε; ``nonmonotone@ε`` counts the images where the attack at ε alone missed
what a smaller budget found, a sign of a weak attack). Around that:

- *convergence*: every attack again with twice the steps and twice the restarts on the same images; the
  images only these runs break may lower robust accuracy by less than 0.5 points, else ``convergence/flag@ε``
  is 1;
- *sanity*: at a budget covering the whole [0, 1] box (its diameter unless ``sanity_eps``), robust accuracy
  must be 0 — anything else means the attack cannot follow the gradient (Carlini et al. 2019);
- *norm needed*: the early-stopped PGD of ``attack`` gives the norm each image needed; the robust accuracy
  it implies is an upper bound (labelled ``_upper``), as are FMN's minimal norms (continuous, free of the step
  quantisation of early stopping; FMN starts from PGD's adversarial examples where there are any), next to it;
- ``robust_acc@ε`` folds everything in: the strongest evidence per image.

Rates get Wilson 95 % intervals (``_ci_low``/``_ci_high``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from dmm.attacks import PGD
from dmm.attacks.library import APGD, FMN, adv_lib_version, available, seeded
from dmm.errors import DmmError
from dmm.measures.base import Batch, Measure, Models
from dmm.measures.statistics import censored_median, paired_ratio_median, wilson
from dmm.tensors import predict

CONVERGENCE_POINTS = 0.5
"""Largest drop in robust accuracy (percentage points) that doubling steps and restarts may cause."""
TOLERANCE = 1e-6
"""A norm needed of eps + rounding counts as within eps (as in :mod:`dmm.measures.decomposition`)."""


def distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """(B,) L2 or L∞ norm of x_adv − x."""
    return torch.linalg.vector_norm((x_adv - x).flatten(1), ord=2 if norm == "l2" else math.inf, dim=1)


def batch_seed(batch: Batch) -> int:
    """A seed for the attacks' random starts, from the images' own generators (none of them is drawn from)."""
    return sum(g.initial_seed() for g in batch.generators) % 2**31


def attack_at(attack, model, x: Tensor, y: Tensor, eps: float, seed: int) -> Tensor:
    """x_adv of a PGD or library attack at budget eps, its random starts seeded by ``seed``."""
    if isinstance(attack, PGD):
        with seeded(seed, x.device):
            return attack.replace(eps=eps)(model, x, y)
    return attack.replace(eps=eps, seed=seed)(model, x, y)


class Robustness(Measure):
    """Fixed-budget robust accuracy with restarts, its convergence and sanity checks, and norm-needed bounds.

    Args:
        eps_curve: the budgets (in ``attack.norm``).
        attack: the early-stopped PGD whose norms are the "norm needed" upper-bound curve; its norm is the threat
            model of every attack, its eps must cover the curve.
        library: "auto" (adv-lib's APGD-CE + APGD-DLR when installed, else dmm's PGD-CE + PGD-margin),
            "adv-lib" (required: an error without it) or "dmm".
        steps: iterations of each fixed-budget attack.
        restarts: runs per attack (dmm's PGD: the first from x, the others from random starts).
        convergence: rerun every attack with 2x steps and 2x restarts.
        sanity_eps: the "unbounded" budget; ``None``: the box's diameter (√n for L2, 1 for L∞).
        fmn_steps: steps of adv-lib's FMN minimal-norm attack; 0 (or no adv-lib) leaves it out.
    """

    name = "robustness"
    needs_manifold = False

    def __init__(
        self,
        eps_curve: list[float] = [0.5, 1.0, 1.5, 2.0],  # noqa: B006  (read, never changed)
        attack: PGD = PGD(eps=4.0, steps=100, step_size=0.05, early_stop=True),  # noqa: B008  (frozen)
        library: Literal["auto", "adv-lib", "dmm"] = "auto",
        steps: int = 100,
        restarts: int = 1,
        convergence: bool = True,
        sanity_eps: float | None = None,
        fmn_steps: int = 100,
    ) -> None:
        if not eps_curve or any(not (math.isfinite(e) and e > 0) for e in eps_curve):
            raise DmmError(f"robustness eps_curve must hold finite numbers > 0, got {list(eps_curve)}")
        if not attack.early_stop or attack.eps < max(eps_curve) or attack.reach < max(eps_curve):
            raise DmmError("robustness attack must stop early and reach (eps and steps x step_size) the largest "
                           f"budget {max(eps_curve):g}; got {attack}")  # fmt: skip
        if library not in ("auto", "adv-lib", "dmm"):
            raise DmmError(f"robustness library must be auto, adv-lib or dmm, got {library!r}")
        if library == "adv-lib" and not available():
            raise DmmError('robustness library "adv-lib" is not installed: pip install -e ".[attacks]"')
        for field, value, low in (("steps", steps, 1), ("restarts", restarts, 1), ("fmn_steps", fmn_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DmmError(f"robustness {field} must be an integer >= {low}, got {value!r}")
        if sanity_eps is not None and not (math.isfinite(sanity_eps) and sanity_eps > 0):
            raise DmmError(f"robustness sanity_eps must be a finite number > 0 or null, got {sanity_eps!r}")
        self.eps_curve, self.attack = tuple(sorted({float(e) for e in eps_curve})), attack
        self.steps, self.restarts, self.convergence, self.sanity_eps = steps, restarts, convergence, sanity_eps
        self.library = "adv-lib" if library == "adv-lib" or (library == "auto" and available()) else "dmm"
        norm = attack.norm
        if self.library == "adv-lib":
            self.attacks = {f"apgd_{loss}": APGD(norm=norm, loss=loss, steps=steps, restarts=restarts)
                            for loss in ("ce", "dlr")}  # fmt: skip
        else:
            self.attacks = {f"pgd_{loss}": PGD(norm=norm, loss=loss, steps=steps, restarts=restarts)
                            for loss in ("ce", "margin")}  # fmt: skip
        self.fmn = FMN(norm=norm, steps=fmn_steps) if fmn_steps and self.library == "adv-lib" else None

    def settings(self) -> dict:
        version = adv_lib_version() if self.library == "adv-lib" else None
        return {
            "library": f"adv-lib {version}" if version else "dmm",
            "attacks": {name: a.as_dict() for name, a in self.attacks.items()},
            "eps_curve": list(self.eps_curve),
            "attack": self.attack.as_dict(),
            "convergence": self.convergence,
            "sanity_eps": self.sanity_eps,
            "fmn": None if self.fmn is None else self.fmn.as_dict(),
        }

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per image (B,): ``correct``; ``{attack}/robust@{e}`` (and ``{attack}_2x/...`` for the convergence
        runs): correct and not fooled at budget e; ``sanity/robust``; ``pgd/norm`` and ``pgd/success`` of the
        early-stopped PGD; ``fmn/norm`` and ``fmn/success`` when FMN runs. Norms are in ``attack.norm``."""
        model, x, y, seed = models.classifier, batch.x, batch.y, batch_seed(batch)
        correct = predict(model, x) == y
        out: dict[str, Tensor] = {"correct": correct}
        runs = dict(self.attacks)
        if self.convergence:
            runs.update({f"{n}_2x": a.replace(steps=2 * a.steps, restarts=2 * a.restarts) for n, a in runs.items()})
        for name, attack in runs.items():
            for eps in self.eps_curve:
                x_adv = attack_at(attack, model, x, y, eps, seed)
                out[f"{name}/robust@{eps:g}"] = correct & (predict(model, x_adv) == y)
        huge = self.sanity_eps or (math.sqrt(x[0].numel()) if self.attack.norm == "l2" else 1.0)
        out["sanity/robust"] = correct.clone()
        for attack in self.attacks.values():
            out["sanity/robust"] &= predict(model, attack_at(attack, model, x, y, huge, seed)) == y
        with seeded(seed, x.device):
            x_adv = self.attack(model, x, y)
        sources = {"pgd": x_adv}
        if self.fmn is not None:  # warm-started at PGD's successes: minimal norms, at most PGD's
            sources["fmn"] = self.fmn(model, x, y, start=x_adv)
        for source, x_adv in sources.items():
            out[f"{source}/norm"] = distance(x_adv, x, self.attack.norm)
            out[f"{source}/success"] = correct & (predict(model, x_adv) != y)
        return out

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Figures over all images (rates over all of them, so robust accuracy counts misclassified images as not
        robust). Per e: each attack's ``{a}/robust_acc@e``; ``fixed_budget/robust_acc@e`` (all attacks, this and
        smaller budgets); ``convergence/robust_acc@e`` with the 2x runs too, ``convergence/change_points@e`` the
        drop in points and ``convergence/flag@e``; ``norm_needed/robust_acc_upper@e`` and
        ``fmn/robust_acc_upper@e``; ``robust_acc@e``, all of it. Then ``sanity/robust_acc`` and
        ``sanity/passed``, censored medians of the norms needed and the median FMN / PGD norm ratio."""
        correct = records["correct"]
        n = correct.numel()
        s: dict[str, float] = {"num_images": float(n)}

        def rate(key: str, hits: Tensor) -> None:
            s[key] = int(hits.sum()) / n if n else math.nan
            s[f"{key}_ci_low"], s[f"{key}_ci_high"] = wilson(int(hits.sum()), n)

        rate("clean_acc", correct)
        names = list(self.attacks)
        doubled = [f"{a}_2x" for a in names if f"{a}_2x/robust@{self.eps_curve[0]:g}" in records]
        broken = {kind: torch.zeros_like(correct) for kind in ("fixed", "convergence", "all")}
        for eps in self.eps_curve:
            e = f"{eps:g}"
            for a in names + doubled:
                rate(f"{a}/robust_acc@{e}", records[f"{a}/robust@{e}"])
            robust = torch.stack([records[f"{a}/robust@{e}"] for a in names]).all(0)
            s[f"nonmonotone@{e}"] = int((robust & broken["fixed"]).sum()) / n if n else math.nan
            broken["fixed"] |= correct & ~robust
            rate(f"fixed_budget/robust_acc@{e}", correct & ~broken["fixed"])
            robust = torch.stack([robust] + [records[f"{a}/robust@{e}"] for a in doubled]).all(0)
            broken["convergence"] |= correct & ~robust
            if doubled:
                rate(f"convergence/robust_acc@{e}", correct & ~broken["convergence"])
                added = int((broken["convergence"] & ~broken["fixed"]).sum())  # images only the 2x runs broke
                change = 100 * added / n
                s[f"convergence/change_points@{e}"] = change
                s[f"convergence/flag@{e}"] = float(change >= CONVERGENCE_POINTS)
            broken["all"] |= broken["convergence"]
            for source in ("pgd", "fmn"):
                if f"{source}/norm" in records:
                    within = records[f"{source}/success"] & (records[f"{source}/norm"] <= eps + TOLERANCE)
                    label = "norm_needed" if source == "pgd" else source
                    rate(f"{label}/robust_acc_upper@{e}", correct & ~within)
                    broken["all"] |= within
            rate(f"robust_acc@{e}", correct & ~broken["all"])
        if doubled:
            s["convergence/flagged"] = max(s[f"convergence/flag@{eps:g}"] for eps in self.eps_curve)
        rate("sanity/robust_acc", records["sanity/robust"])
        s["sanity/passed"] = float(not bool(records["sanity/robust"].any()))
        for source in ("pgd", "fmn"):
            if f"{source}/norm" in records:
                norms, ok = records[f"{source}/norm"][correct], records[f"{source}/success"][correct]
                s[f"{source}/norm_needed_median"] = censored_median(norms, ok)
        if "fmn/norm" in records:
            both = records["fmn/success"] & records["pgd/success"]
            ratio, pairs = paired_ratio_median(records["fmn/norm"], records["pgd/norm"], both)
            s["fmn/ratio_to_pgd_median"], s["fmn/ratio_to_pgd_pairs"] = ratio, float(pairs)
        return s
