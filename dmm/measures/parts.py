"""What the parts of a perturbation do alone: classification margins, each part's share of the margin drop, and
the records and summary figures of the parts of d in a subspace and its complement (pure torch)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dmm.tensors import eval_mode, fools


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


def record_parts(out: dict, prefix: str, f, x: Tensor, y: Tensor, d: Tensor, correct: Tensor, splits: dict) -> None:
    """For each (inside, outside) name pair of ``splits`` and its subspace: whether d's part in it and the
    rest alone fool f (clamped to the box), ``{prefix}{name}_part_fools``, and their shares of the margin
    drop, ``{prefix}{name}_margin_share``."""
    for (inside, outside), space in splits.items():
        parts = dict(zip((inside, outside), space.split(d), strict=True))
        for name, part in parts.items():
            out[f"{prefix}{name}_part_fools"] = fools(f, (x + part).clamp(0, 1), y) & correct
        shares = margin_shares(f, x, y, parts[inside], parts[outside])
        out[f"{prefix}{inside}_margin_share"], out[f"{prefix}{outside}_margin_share"] = shares


def summarize_parts(s: dict, records: dict, prefix: str, among: Tensor, parts: list[str]) -> None:
    """Rates of the parts fooling alone and median margin shares over ``among`` (``budget/`` for the
    full-budget perturbation)."""
    label = "budget/" if prefix else ""
    for part in parts:
        fooled, share = records[f"{prefix}{part}_part_fools"], records.get(f"{prefix}{part}_margin_share")
        s[f"{label}{part}_part_fools_rate"] = fooled[among].float().mean().item() if among.any() else math.nan
        if share is not None:
            s[f"{label}{part}_margin_share_median"] = share[among].median().item() if among.any() else math.nan
