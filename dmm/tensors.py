"""Small tensor helpers that the attacks, the manifold maths and the measures share (pure torch)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def rows(t: Tensor, like: Tensor) -> Tensor:
    """View a per-sample (B,) tensor as (B, 1, ..., 1) so it broadcasts over ``like`` (B, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def norms(v: Tensor) -> Tensor:
    """(B,) L2 norm of each sample of v (B, ...)."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1)


def fraction(part: Tensor, whole: Tensor) -> Tensor:
    """(B,) ||part|| / ||whole|| per sample, 0 where whole is 0 (an image the attack never had to move)."""
    return norms(part) / norms(whole).clamp_min(torch.finfo(whole.dtype).tiny)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm on running statistics, no dropout); afterwards every submodule gets its own flag
    back, even on error. Non-modules (plain functions) are passed through."""
    modules = [m for model in models if isinstance(model, nn.Module) for m in model.modules()]
    modes = [m.training for m in modules]
    try:
        for model in models:
            if isinstance(model, nn.Module):
                model.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


@contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd available even inside Lightning's ``inference_mode`` validation and test loops."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """(B,) predicted classes of ``model`` (eval mode, no gradient)."""
    with torch.no_grad(), eval_mode(model):
        return model(x).argmax(dim=1)


def fools(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B,) whether ``model`` misclassifies x as other than y (eval mode, no gradient)."""
    return predict(model, x) != y
