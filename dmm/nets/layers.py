"""What every network shares: the factory types the systems accept, and the layer helpers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Shape = tuple[int, ...]
ClassifierFactory = Callable[[Shape, int], nn.Module]
EncoderFactory = Callable[[Shape, int], nn.Module]
DecoderFactory = Callable[[int, Shape], nn.Module]


def smooth() -> nn.Module:
    """The decoders' activation: Softplus(beta=100) is ReLU to within 0.007 but has a continuous derivative."""
    return nn.Softplus(beta=100)


def conv_bn(c_in: int, c_out: int, activation: nn.Module) -> list[nn.Module]:
    """A size-preserving 3x3 convolution, BatchNorm and ``activation`` (the conv has no bias: BN adds one)."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), activation]
