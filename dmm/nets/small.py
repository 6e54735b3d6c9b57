"""The small networks: MNIST-sized classifiers, and conv / MLP encoders and decoders for any (C, H, W)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from dmm.errors import DmmError
from dmm.nets.layers import Shape, smooth


class MLP(nn.Module):
    """Fully connected classifier: the MNIST MLP of the public replications (784-256-256-10).

    Args:
        input_shape: (C, H, W) of the images.
        num_classes: number of logits.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(
        self, input_shape: Shape, num_classes: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """Small convolutional classifier (two conv-BN-ReLU-pool blocks, one hidden dense layer).

    Reaches > 99 % on MNIST in a few CPU epochs; works on any (C, H, W).

    Args:
        input_shape: (C, H, W) of the images.
        num_classes: number of logits.
        channels: output channels of the two conv blocks.
        hidden: width of the dense layer.
        dropout: dropout probability before the last layer.
        pool: average-pool the last feature maps to ``pool`` x ``pool`` (1: global average pooling) before the
            dense layer, so the parameter count no longer depends on the image size; None (default) flattens the
            maps as they are. Where the maps already are ``pool`` x ``pool`` the pooling is the identity.
    """

    def __init__(
        self,
        input_shape: Shape,
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
        pool: int | None = None,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        if pool is not None:
            if pool < 1:
                raise DmmError(f"CNN's pool must be >= 1 (or null for no pooling), got {pool}")
            blocks.append(nn.AdaptiveAvgPool2d(pool))
            h = w = pool
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_sizes(size: int, blocks: int) -> list[int]:
    """Spatial sizes after each stride-2, kernel-3, padding-1 convolution, starting with ``size``."""
    sizes = [size]
    for _ in range(blocks):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvEncoder(nn.Module):
    """Convolutional encoder: stride-2 conv-BN-Softplus blocks, then a linear map to the latent.

    With the default channels (128, 256, 512, 1024) and a 16-d latent this is the MNIST encoder of the
    public DMM replication (28 -> 14 -> 7 -> 4 -> 2).

    Args:
        input_shape: (C, H, W) of the images.
        latent_dim: k, the latent dimension.
        channels: output channels of each stride-2 block.
    """

    def __init__(self, input_shape: Shape, latent_dim: int, channels: Sequence[int] = (128, 256, 512, 1024)) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), smooth()]
            c = out
        hs, ws = _conv_sizes(h, len(channels)), _conv_sizes(w, len(channels))
        layers += [nn.Flatten(), nn.Linear(c * hs[-1] * ws[-1], latent_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: linear map, then stride-2 transposed convs, sigmoid output.

    Output padding is chosen per layer so the output has exactly ``output_shape`` (e.g. 2 -> 4 -> 7 -> 14 -> 28).

    Args:
        latent_dim: k, the latent dimension.
        output_shape: (C, H, W) of the images.
        channels: input channels of each transposed block, from the bottleneck outwards.
    """

    def __init__(self, latent_dim: int, output_shape: Shape, channels: Sequence[int] = (1024, 512, 256, 128)) -> None:
        super().__init__()
        c_out, h, w = output_shape
        hs, ws = _conv_sizes(h, len(channels))[::-1], _conv_sizes(w, len(channels))[::-1]
        self.bottleneck = (channels[0], hs[0], ws[0])
        self.linear = nn.Linear(latent_dim, math.prod(self.bottleneck))
        layers: list[nn.Module] = [smooth()]
        outs = list(channels[1:]) + [c_out]
        for i, (c_in, c) in enumerate(zip(channels, outs, strict=True)):
            # A transposed conv (k=3, s=2, p=1) maps n -> 2n - 1 + output_padding.
            pad = (hs[i + 1] - 2 * hs[i] + 1, ws[i + 1] - 2 * ws[i] + 1)
            layers.append(nn.ConvTranspose2d(c_in, c, 3, stride=2, padding=1, output_padding=pad))
            last = i == len(outs) - 1
            layers += [nn.Sigmoid()] if last else [nn.BatchNorm2d(c), smooth()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(self.linear(z).view(-1, *self.bottleneck))


class MLPEncoder(nn.Module):
    """Fully connected encoder with smooth activations (for the synthetic data and quick tests).

    Args:
        input_shape: (C, H, W) of the images.
        latent_dim: k, the latent dimension.
        hidden: widths of the hidden layers.
    """

    def __init__(self, input_shape: Shape, latent_dim: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), smooth()]
            width = h
        layers.append(nn.Linear(width, latent_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MLPDecoder(nn.Module):
    """Fully connected decoder with smooth activations and a sigmoid output in [0, 1].

    Args:
        latent_dim: k, the latent dimension.
        output_shape: (C, H, W) of the images.
        hidden: widths of the hidden layers, from the latent outwards.
    """

    def __init__(self, latent_dim: int, output_shape: Shape, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)
        layers: list[nn.Module] = []
        width = latent_dim
        for h in hidden:
            layers += [nn.Linear(width, h), smooth()]
            width = h
        layers += [nn.Linear(width, math.prod(output_shape)), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z).view(-1, *self.output_shape)
