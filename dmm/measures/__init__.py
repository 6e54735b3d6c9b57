"""Measurements as small pure modules (no Lightning): settings in ``__init__``, ``measure(models, batch)`` ->
per-image records, ``summarize(records)`` -> figures. :class:`dmm.callbacks.Evaluation` runs any of them.

=============  ===========================================================================================
base           :class:`Measure`, the :class:`Models` and :class:`Batch` it is given, per-image seeds
decomposition  the DMM decomposition: attacks per arm (tangent, complement, random, support, other-image nulls)
parts          what a perturbation's parts do alone: margins, margin shares, their records and summary
partners       the other-image null's partners, chosen from the whole subset
detection      off-manifold detection with its equal-norm noise control, and project-then-classify
geometry       input-gradient alignment and boundary distances along and across the tangent space
robustness     fixed-budget robust accuracy (APGD-CE/DLR via adv-lib, or PGD), convergence, FMN distances
smoothness     attack-free on/off-manifold robustness: softmax change under random tangent/normal noise
adaptive       adaptive attacks on project-then-classify (BPDA, latent, transfer) and on the detector
checks         model checks before any attack (logits, determinism, gradients, FGM vs PGD, noise vs PGD)
statistics     censored medians, survival curves, paired ratios, Wilson intervals, rank AUROC
=============  ===========================================================================================
"""

from dmm.measures.adaptive import AdaptivePTC
from dmm.measures.base import Batch, Measure, Models, image_seed, make_batch
from dmm.measures.checks import model_checks
from dmm.measures.decomposition import Decomposition
from dmm.measures.detection import Detection, ProjectThenClassify
from dmm.measures.geometry import Geometry
from dmm.measures.ptc_attacks import BPDA, EvasivePGD, LatentPGD
from dmm.measures.robustness import Robustness
from dmm.measures.smoothness import ManifoldSmoothness

__all__ = [
    "AdaptivePTC",
    "BPDA",
    "EvasivePGD",
    "LatentPGD",
    "Robustness",
    "Batch",
    "Decomposition",
    "Detection",
    "Geometry",
    "ManifoldSmoothness",
    "Measure",
    "Models",
    "ProjectThenClassify",
    "image_seed",
    "make_batch",
    "model_checks",
]
