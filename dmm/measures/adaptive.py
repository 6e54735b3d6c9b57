"""Adaptive attacks on project-then-classify, f(D(E(x))): is the autoencoder a defence, or does it hide gradients?

A defence that projects inputs onto the manifold can look robust to white-box PGD only because the gradient
through E and D is uninformative (Athalye, Carlini & Wagner, ICML 2018). Each image is therefore attacked, per
budget ε (L2, fixed budget, with restarts), by four attacks, and its pipeline counted robust only if it
withstands all of them — and every smaller budget:

- ``whitebox``: PGD through the whole pipeline (the attack of :class:`~dmm.measures.Detection`);
- ``bpda``: PGD on :class:`BPDA`, the pipeline with the identity as the backward pass of D∘E;
- ``latent``: :class:`LatentPGD`, PGD on the latent code z with the decoder in the loop;
- ``transfer``: PGD on the undefended classifier, its adversarial examples evaluated on the pipeline.

The same autoencoder as a *detector* (flag x when ‖x − D(E(x))‖ exceeds the clean images' 95th percentile) meets
an adversary who knows it: :class:`EvasivePGD` fools the classifier while keeping the score low, and the detection
rate it leaves is reported next to that of a detector-blind PGD.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmm.attacks import PGD
from dmm.attacks.library import seeded
from dmm.errors import DmmError
from dmm.measures.base import Batch, Measure, Models
from dmm.measures.detection import ProjectThenClassify
from dmm.measures.ptc_attacks import BPDA, EvasivePGD, LatentPGD
from dmm.measures.robustness import batch_seed
from dmm.measures.statistics import auroc, wilson
from dmm.tensors import eval_mode, norms, predict

ATTACKS = ("whitebox", "bpda", "latent", "transfer")
BISECTION = 16
"""Bisection steps pulling a latent iterate back into the budget: its reach is within 2^-16 of the segment."""
DETECTION_FPR = 0.05
"""The detector's false-positive rate: its threshold is the clean scores' 95th percentile (in-sample)."""


class AdaptivePTC(Measure):
    """Robust accuracy of project-then-classify under white-box, BPDA, latent and transfer attacks.

    Args:
        attack: steps, restarts and loss of every attack (L2, fixed budget: ``early_stop`` false; PGD's restarts
            after the first start at random). Its eps is only the model checks' budget.
        eps_curve: the budgets.
        detector_penalty: the :class:`EvasivePGD` penalty of the detection part, at ``attack.eps`` and
            ``attack.steps``; ``None`` leaves detection out.
    """

    name = "adaptive"
    needs_manifold = True

    def __init__(
        self,
        attack: PGD = PGD(eps=2.0, steps=40, restarts=2),  # noqa: B008  (frozen: one shared default is safe)
        eps_curve: list[float] = [0.5, 1.0, 1.5, 2.0],  # noqa: B006  (read, never changed)
        detector_penalty: float | None = 1.0,
    ) -> None:
        if not eps_curve or any(not (math.isfinite(e) and e > 0) for e in eps_curve):
            raise DmmError(f"adaptive eps_curve must hold finite numbers > 0, got {list(eps_curve)}")
        if attack.norm != "l2" or attack.early_stop:
            raise DmmError(f"adaptive attack must be L2 and fixed-budget (norm: l2, early_stop: false); got {attack}")
        self.attack, self.eps_curve = attack, tuple(sorted({float(e) for e in eps_curve}))
        self.latent = LatentPGD(steps=attack.steps, restarts=attack.restarts, loss=attack.loss)
        self.evasive = None
        if detector_penalty is not None:
            self.evasive = EvasivePGD(eps=attack.eps, steps=attack.steps, penalty=detector_penalty)

    def settings(self) -> dict:
        evasive = None if self.evasive is None else self.evasive.as_dict()
        return {**self.attack.as_dict(), "eps_curve": list(self.eps_curve), "attacks": list(ATTACKS),
                "evasive": evasive}  # fmt: skip

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per image (B,): ``classifier/correct``, ``ptc/correct``; per e of ``eps_curve``
        ``classifier/robust@{e}`` (the transfer attack's source) and ``ptc/{attack}/robust@{e}`` for each of
        :data:`ATTACKS`: the pipeline is correct at x and at that attack's x_adv; with detection,
        ``detect/{clean,standard,evasive}/score`` and ``detect/{standard,evasive}/fooled`` (the classifier)."""
        classifier, encoder, decoder = models.classifier, models.encoder, models.decoder
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
        if self.evasive is not None:
            with seeded(seed, x.device):
                standard = self.attack(classifier, x, y)
            found = {"clean": x, "standard": standard, "evasive": self.evasive(classifier, autoencoder, x, y)}
            for kind, images in found.items():
                with torch.no_grad(), eval_mode(autoencoder):
                    out[f"detect/{kind}/score"] = norms(images - autoencoder(images))
                if kind != "clean":
                    out[f"detect/{kind}/fooled"] = out["classifier/correct"] & (predict(classifier, images) != y)
        return out

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """Rates over all images with Wilson 95 % intervals: clean accuracies; per e ``classifier/robust_acc@e``,
        each attack's ``ptc/{attack}/robust_acc@e`` and ``ptc/{attack}/unique@e`` (images only it broke), and
        ``ptc/robust_acc@e``: robust to every attack at e and at every smaller budget — at most each attack's.
        Detection (at ``attack.eps``): ``detect/threshold``; per adversary (``standard``: detector-blind PGD,
        ``evasive``: :class:`EvasivePGD`) ``success_rate`` (fools the classifier), ``detection_rate`` (of those,
        flagged), ``undetected_rate`` (fools both; over all images) and ``auroc`` (clean vs its fooling images)."""
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
        if "detect/clean/score" in records:
            clean = records["detect/clean/score"].double()
            threshold = torch.quantile(clean, 1 - DETECTION_FPR).item() if n else math.nan
            s["detect/threshold"] = threshold
            for kind in ("standard", "evasive"):
                fooled, score = records[f"detect/{kind}/fooled"], records[f"detect/{kind}/score"].double()
                rate(f"detect/{kind}/success_rate", fooled)
                rate(f"detect/{kind}/undetected_rate", fooled & (score <= threshold))  # fools classifier and detector
                hits, among = int((fooled & (score > threshold)).sum()), int(fooled.sum())
                key = f"detect/{kind}/detection_rate"  # among the images it fooled
                s[key] = hits / among if among else math.nan
                s[f"{key}_ci_low"], s[f"{key}_ci_high"] = wilson(hits, among)
                s[f"detect/{kind}/auroc"] = auroc(clean[fooled], score[fooled])
        return s
