"""Attacks on the input (pure torch): the :class:`PGD` configuration-and-attack object, the norm balls it
steps in, and the :class:`Projector` protocol through which it is restricted to a subspace."""

from dmm.attacks.balls import BALLS, Ball, L2Ball, LinfBall
from dmm.attacks.library import APGD, FMN
from dmm.attacks.pgd import LOSSES, PGD, Projector, box_exact

__all__ = ["APGD", "BALLS", "FMN", "LOSSES", "PGD", "Ball", "L2Ball", "LinfBall", "Projector", "box_exact"]
