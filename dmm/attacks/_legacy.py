"""TEMPORARY shims for code not yet moved to the PGD object (removed before the protocol change lands)."""

from dmm.attacks.pgd import PGD
from dmm.tensors import eval_mode as _eval_mode  # noqa: F401


def pgd(model, x, y, *, eps, project=None, **settings):
    return PGD(**settings)(model, x, y, project, eps=eps)


def fgsm(model, x, y, *, eps, norm="linf", project=None, **settings):
    return PGD(norm=norm, steps=1, **settings)(model, x, y, project, eps=eps)
