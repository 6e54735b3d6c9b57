"""Attacks on the input (pure torch): the :class:`PGD` configuration-and-attack object, the norm balls it
steps in, the bisection to the boundary along a found perturbation (PGD's ``refine``), and the
:class:`Projector` protocol through which it is restricted to a subspace."""

from dmm.attacks.balls import BALLS, Ball, L2Ball, LinfBall
from dmm.attacks.boundary import bisect_to_boundary
from dmm.attacks.library import APGD, FMN
from dmm.attacks.pgd import LOSSES, PGD, Projector, box_exact

__all__ = [
    "APGD",
    "BALLS",
    "FMN",
    "LOSSES",
    "PGD",
    "Ball",
    "L2Ball",
    "LinfBall",
    "Projector",
    "bisect_to_boundary",
    "box_exact",
]
