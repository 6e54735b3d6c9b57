"""The CIFAR-10 classifier of the public DMM replications: a VGG-style CNN with BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dmm.errors import DmmError
from dmm.nets.layers import Shape, conv_bn


class VGG(nn.Module):
    """VGG-style classifier: blocks of 3x3 conv-BN-ReLU layers, each block ending in a 2x2 max-pool.

    The defaults are the CIFAR-10 network of the public replications,
    conv128-conv128-pool-conv256-conv256-pool-conv512-conv512-pool-dense (32 -> 16 -> 8 -> 4).

    Args:
        input_shape: (C, H, W) of the images; H and W divisible by 2 ** len(blocks).
        num_classes: number of logits.
        blocks: output channels of the conv layers of each block.
        dropout: dropout probability before the dense layer.

    Shapes:
        images (B, C, H, W) -> logits (B, num_classes).

    Example:
        >>> VGG((3, 32, 32), 10)(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        input_shape: Shape,
        num_classes: int,
        blocks: Sequence[Sequence[int]] = ((128, 128), (256, 256), (512, 512)),
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        scale = 2 ** len(blocks)
        if h % scale or w % scale:
            raise DmmError(f"VGG with {len(blocks)} pooling blocks needs H and W divisible by {scale}, got {h}x{w}.")
        layers: list[nn.Module] = []
        for block in blocks:
            for out in block:
                layers += conv_bn(c, out, nn.ReLU())
                c = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * (h // scale) * (w // scale), num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
