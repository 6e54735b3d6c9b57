"""How a classifier runs when it trains or is attacked: bf16 autocast, ``channels_last``, ``torch.compile``.

These settings are numerically safe where the benchmarks apply them: a classifier's forward pass for
training steps and attack steps, whose logits come back in float32 so that losses, gradients' norms and
the perturbation itself stay in float32. They are never applied to tangent bases (Jacobians and QR of a
decoder), nor to the matrix-free projection: those stay float32, contiguous and eager.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

log = logging.getLogger("dmm.bench")


@dataclass(frozen=True)
class Speed:
    """Settings for a classifier's training and attack steps.

    Attributes:
        precision: "fp32", or "bf16" for the forward pass under ``torch.autocast(dtype=torch.bfloat16)``.
        channels_last: weights and images in ``torch.channels_last`` memory format (NHWC convolutions).
        compile: ``torch.compile`` the classifier; on any failure the eager model is used, with a warning.
    """

    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    def __str__(self) -> str:
        parts = [self.precision]
        parts += ["channels_last"] * self.channels_last + ["compile"] * self.compile
        return " + ".join(parts)

    @property
    def is_plain(self) -> bool:
        return self == FP32


FP32 = Speed()


class Autocast(nn.Module):
    """The wrapped classifier's forward pass under bf16 autocast, its logits returned in float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


def compiled(model: nn.Module, warmup: Callable[[nn.Module], object]) -> tuple[nn.Module, str]:
    """``torch.compile(model)`` after one ``warmup(compiled)`` call (compilation is lazy), or on failure the
    eager model; the second value says which, for the row's note."""
    try:
        fast = torch.compile(model)
        warmup(fast)
        return fast, "compiled"
    except Exception as error:  # no compiler, an unsupported op, a dynamo bug: time the eager model instead
        log.warning("torch.compile failed (%s: %s); timing the eager model", type(error).__name__, error)
        return model, f"compile failed ({type(error).__name__}), eager"


def prepare(model: nn.Module, speed: Speed, warmup: Callable[[nn.Module], object]) -> tuple[nn.Module, str]:
    """``model`` set up for ``speed`` (the module itself is converted in place to ``channels_last``), and a
    note on compilation ("" when not asked for)."""
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if speed.precision == "bf16":
        model = Autocast(model)
    if speed.compile:
        return compiled(model, warmup)
    return model, ""


def images_for(x: Tensor, speed: Speed) -> Tensor:
    """Images (B, C, H, W) in the memory format ``speed`` asks for."""
    return x.contiguous(memory_format=torch.channels_last) if speed.channels_last else x.contiguous()


@contextlib.contextmanager
def full_precision(module: nn.Module) -> Iterator[None]:
    """Float32, contiguous and no autocast, whatever the caller set: for tangent bases and projections.

    Raises:
        ValueError: the module holds parameters that are not float32 or not contiguous.
    """
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and (tensor.dtype != torch.float32 or not tensor.is_contiguous()):
            raise ValueError(f"{name} is {tensor.dtype}, contiguous={tensor.is_contiguous()}: tangents need float32")
    device_types = {t.device.type for t in module.parameters()} or {"cpu"}
    with contextlib.ExitStack() as stack:
        for device_type in device_types:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
