"""Strong, standard attacks from adv-lib (Rony et al., github.com/jeromerony/adversarial-library), not rewritten.

:class:`APGD` (Auto-PGD with the CE or DLR loss, Croce & Hein, ICML 2020) and :class:`FMN` (Fast Minimum-Norm,
Pintor et al., NeurIPS 2021) are frozen, validated configurations that are the attack, called like
:class:`dmm.attacks.PGD`: ``attack(model, x, y)`` on [0, 1] pixels, the model in eval mode (its modes restored
after) and autograd on even inside Lightning's ``inference_mode``. dmm's own PGD stays for what no library
does: per-sample subspace restrictions. adv-lib is the optional extra ``attacks``, imported on first call.

adv-lib draws random starts from torch's global generator; :func:`seeded` forks it, so a call seeded with
``seed`` is reproducible and leaves the caller's random state alone (the draws depend on the whole batch).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from dmm.attacks.pgd import _check_inputs, _per_sample, _real
from dmm.errors import DmmError
from dmm.tensors import autograd_on, eval_mode

NORMS = {"l2": 2.0, "linf": math.inf}
"""dmm's norm names -> adv-lib's ``norm`` argument."""


def available() -> bool:
    """Whether adv-lib is installed (the ``attacks`` extra)."""
    return importlib.util.find_spec("adv_lib") is not None


def adv_lib_version() -> str | None:
    """The installed adv-lib's version, or None."""
    if not available():
        return None
    from importlib.metadata import version

    return version("adv-lib")


def _attacks():
    """adv_lib.attacks, or a DmmError saying how to install it."""
    if not available():
        raise DmmError('adv-lib is not installed: pip install -e ".[attacks]" (the optional attacks extra)')
    with warnings.catch_warnings():  # adv-lib 0.2.x still imports distutils' LooseVersion
        warnings.simplefilter("ignore", DeprecationWarning)
        import adv_lib.attacks

    return adv_lib.attacks


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators (CPU, and ``device``'s if CUDA) forked and seeded; restored on exit."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _validate(attack, ints: tuple[str, ...], choices: dict[str, tuple]) -> None:
    def bad(field: str, rule: str) -> DmmError:
        return DmmError(f"{type(attack).__name__} {field} must be {rule}; got {getattr(attack, field)!r}")

    for field in ints:
        value = getattr(attack, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(field, "an integer >= 1")
    for field, allowed in choices.items():
        if getattr(attack, field) not in allowed:
            raise bad(field, f"one of {list(allowed)}")
    if not isinstance(attack.seed, int) or isinstance(attack.seed, bool):
        raise bad("seed", "an integer")


def _no_projection(attack, project) -> None:
    if project is not None:
        raise DmmError(f"{type(attack).__name__} cannot be restricted to a subspace; use dmm.attacks.PGD for that")


@dataclass(frozen=True)
class APGD:
    """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness...", ICML 2020), adv-lib's ``apgd``.

    A fixed-budget attack: step sizes adapt (halved when the loss stalls), momentum 0.75, a random start on the
    sphere of radius eps per restart; an image fooled by one restart is not attacked again. Images never fooled
    come back unchanged (x), fooled ones as the first adversarial iterate found.

    Attributes:
        eps: radius of the threat ball in [0, 1] pixel space; 0 returns x.
        norm: "l2" or "linf".
        loss: "ce" (cross-entropy, APGD-CE) or "dlr" (difference of logits ratio, APGD-DLR; needs >= 3 classes).
        steps: iterations per restart, each one forward and backward.
        restarts: random restarts.
        seed: seeds the random starts (see :func:`seeded`).

    Example:
        >>> x_adv = APGD(eps=2.0, loss="dlr")(model, x, y)  # x (B, C, H, W) in [0, 1], y (B,) int64
    """

    eps: float = 2.0
    norm: Literal["l2", "linf"] = "l2"
    loss: Literal["ce", "dlr"] = "ce"
    steps: int = 100
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not _real(self.eps) or not self.eps >= 0:
            raise DmmError(f"APGD eps must be a finite number >= 0; got {self.eps!r}")
        _validate(self, ("steps", "restarts"), {"norm": tuple(NORMS), "loss": ("ce", "dlr")})

    def replace(self, **changes) -> APGD:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {"attack": "APGD", **asdict(self)}

    def __call__(self, model, x: Tensor, y: Tensor, project=None, *, eps=None) -> Tensor:
        """x_adv (same shape, dtype, device as x, detached), each within ``eps`` (float or (B,)) of x, in [0, 1]."""
        _check_inputs(x, y)
        _no_projection(self, project)
        attacks = _attacks()
        with autograd_on(), eval_mode(model), seeded(self.seed, x.device):
            x, y = x.clone(), y.clone()
            radius = _per_sample(self.eps if eps is None else eps, "eps", x, allow_zero=True)
            if self.loss == "dlr":
                with torch.no_grad():
                    classes = model(x[:1]).shape[1]
                if classes < 3:
                    raise DmmError(f"APGD-DLR needs at least 3 classes (it normalises by z_1 - z_3); got {classes}")
            attack = radius > 0  # adv-lib's step size is 2 eps: a zero radius would divide 0 by 0
            out = x.clone()
            if bool(attack.any()):
                out[attack] = attacks.apgd(
                    model, x[attack], y[attack], eps=radius[attack], norm=NORMS[self.norm], n_iter=self.steps,
                    n_restarts=self.restarts, loss_function=self.loss,
                )  # fmt: skip
            return out.detach()


@dataclass(frozen=True)
class FMN:
    """Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021), adv-lib's ``fmn``: the smallest perturbation it
    finds, no budget. ``norms(x_adv - x)`` (or L∞) are then the distances, free of a fixed step's quantisation;
    images never fooled come back unchanged (x), so success must be read off the model.

    Attributes:
        norm: "l2" or "linf".
        steps: iterations (step size and the norm's adjustment γ are cosine-annealed over them).
        step_size: initial step size α (FMN's default 1.0 for L2; the final one is α / 100).
        gamma: initial factor γ by which the norm bound moves each step (annealed to 0.001).

    Example:
        >>> x_adv = FMN(steps=100)(model, x, y)
        >>> distance = torch.where(model(x_adv).argmax(1) != y, (x_adv - x).flatten(1).norm(dim=1), math.inf)
    """

    norm: Literal["l2", "linf"] = "l2"
    steps: int = 100
    step_size: float = 1.0
    gamma: float = 0.05
    seed: int = 0  # FMN draws nothing at random; kept so every library attack has the same fields

    def __post_init__(self) -> None:
        for field in ("step_size", "gamma"):
            if not _real(getattr(self, field)) or not getattr(self, field) > 0:
                raise DmmError(f"FMN {field} must be a finite number > 0; got {getattr(self, field)!r}")
        _validate(self, ("steps",), {"norm": tuple(NORMS)})

    def replace(self, **changes) -> FMN:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {"attack": "FMN", **asdict(self)}

    def __call__(self, model, x: Tensor, y: Tensor, project=None, *, start: Tensor | None = None) -> Tensor:
        """x_adv (same shape, dtype, device as x, detached), in [0, 1]; x itself where FMN found nothing.

        ``start`` (same shape as x), e.g. an early-stopped PGD's x_adv, warm-starts FMN at the images where it is
        adversarial: a binary search between x and it, then FMN's steps; FMN's own estimate of the distance to
        the boundary lands it *on* the boundary, so from x alone it can stall just short of it (a linear model
        near the box edges). The other images start from x.
        """
        _check_inputs(x, y)
        _no_projection(self, project)
        attacks = _attacks()
        with autograd_on(), eval_mode(model), seeded(self.seed, x.device):
            x, y = x.clone(), y.clone()
            warm = torch.zeros_like(y, dtype=torch.bool)
            if start is not None:
                start = start.detach().clone()
                with torch.no_grad():
                    warm = model(start).argmax(dim=1) != y
            out = x.clone()
            for rows, begin in ((warm, start), (~warm, None)):
                if bool(rows.any()):
                    out[rows] = attacks.fmn(
                        model, x[rows], y[rows], norm=NORMS[self.norm], steps=self.steps, α_init=self.step_size,
                        γ_init=self.gamma, starting_points=None if begin is None else begin[rows],
                    )  # fmt: skip
            return out.detach()
