"""ImageNet networks: ResNet-50 (torchvision's, from a local weights file) and a SegNet-style autoencoder."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dmm.errors import DmmError
from dmm.nets.layers import Shape, conv_bn, smooth

# VGG-16's conv layers, the encoder of SegNet: 224 -> 7 after five pools.
# What torch.load / load_state_dict raise on a file that is not a matching state dict.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, OSError, EOFError, TypeError, ValueError, KeyError)
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 (v1.5), optionally with weights from a local file; never downloads.

    With ``width=64`` the module and state-dict names are exactly torchvision's ``resnet50``, so a file
    saved from it (e.g. ``resnet50-11ad3fa6.pth``, ``IMAGENET1K_V2``) loads strictly. A smaller ``width``
    scales every stage (tests). Those weights expect ImageNet-normalised input: set the classifier's
    ``mean``/``std`` to (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225).

    Args:
        input_shape: (C, H, W) of the images; any H, W >= 32 (global average pooling).
        num_classes: number of logits; other than 1000, the loaded 1000-way ``fc`` is replaced by a fresh one.
        weights_path: a torchvision ``resnet50`` state dict (``torch.save(model.state_dict(), path)``);
            ``None`` initialises at random as torchvision does.
        width: channels of the stem; the four stages have 4 * width * (1, 2, 4, 8) output channels.

    Shapes:
        images (B, C, H, W) -> logits (B, num_classes).

    Example:
        >>> net = ResNet50((3, 224, 224), 1000, weights_path="resnet50-11ad3fa6.pth")
        >>> net(torch.rand(2, 3, 224, 224)).shape  # torch.Size([2, 1000])
    """

    def __init__(self, input_shape: Shape, num_classes: int, weights_path: str | None = None, width: int = 64) -> None:
        # Imported here: torchvision adds ~1.5 s to `import dmm.nets`, which otherwise needs only torch.
        from torchvision.models.resnet import Bottleneck, conv1x1

        super().__init__()
        # The layout of torchvision.models.ResNet(Bottleneck, [3, 4, 6, 3]), whose stem width is fixed at 64.
        self.conv1 = nn.Conv2d(input_shape[0], width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = width
        for stage, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2), strict=True), start=1):
            planes = width * 2 ** (stage - 1)
            out = planes * Bottleneck.expansion
            downsample = nn.Sequential(conv1x1(channels, out, stride), nn.BatchNorm2d(out))
            layer = [Bottleneck(channels, planes, stride, downsample)]
            layer += [Bottleneck(out, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
            channels = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 1000 if weights_path else num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if weights_path:
            self._load(Path(weights_path))
            if num_classes != 1000:
                self.fc = nn.Linear(channels, num_classes)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise DmmError(
                f"ResNet50 weights not found at {path.resolve()}; pass a local torchvision resnet50 state dict "
                "(--model.init_args.network.init_args.weights_path), or null for random initialisation."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state)
        except _LOAD_ERRORS as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DmmError(
                f"{path.resolve()} is not a torchvision resnet50 state dict of width {self.conv1.out_channels} "
                f"({detail[:300]})."
            ) from err

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _bottleneck(shape: Shape, latent_dim: int, blocks: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """(channels, h, w) of the spatial latent: H and W halved once per block, channels = k / (h * w)."""
    _, height, width = shape
    scale = 2 ** len(blocks)
    if height % scale or width % scale:
        raise DmmError(f"a SegNet of {len(blocks)} blocks needs H and W divisible by {scale}, got {height}x{width}.")
    h, w = height // scale, width // scale
    if latent_dim % (h * w):
        raise DmmError(f"SegNet latent_dim must be a multiple of {h}x{w} = {h * w} (channels of the latent map).")
    return latent_dim // (h * w), h, w


class SegNetEncoder(nn.Module):
    """SegNet's encoder: VGG blocks of 3x3 conv-BN-ReLU layers, each ending in a 2x2 max-pool.

    A 1x1 convolution maps the last block to ``latent_dim / (h * w)`` channels of the (h, w) = (H, W) /
    2 ** len(blocks) map, flattened: with the defaults on (3, 224, 224), latent_dim = 512 * 7 * 7 = 25088
    is SegNet's own bottleneck. Pooling indices are not kept: the decoder upsamples without them.

    Args:
        input_shape: (C, H, W) of the images; H and W divisible by 2 ** len(blocks).
        latent_dim: k, a multiple of h * w.
        blocks: output channels of the conv layers of each block (VGG-16's by default).

    Shapes:
        images (B, C, H, W) -> latents (B, k), the (B, k / (h * w), h, w) map flattened channel-major.
    """

    def __init__(self, input_shape: Shape, latent_dim: int, blocks: Sequence[Sequence[int]] = VGG16_BLOCKS) -> None:
        super().__init__()
        c_latent = _bottleneck(input_shape, latent_dim, blocks)[0]
        c = input_shape[0]
        layers: list[nn.Module] = []
        for block in blocks:
            for out in block:
                layers += conv_bn(c, out, nn.ReLU())
                c = out
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(c, c_latent, 1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SegNetDecoder(nn.Module):
    """The mirror of :class:`SegNetEncoder`, upsampling bilinearly instead of max-unpooling, sigmoid output.

    Takes the encoder's ``blocks`` unchanged and mirrors them (as SegNet does: each decoder block's last
    conv narrows to the previous encoder block's width). Bilinear upsampling needs no pooling indices,
    so the decoder is a function of the latent alone; its activations are smooth (Softplus) so its
    Jacobian is continuous, and it works under ``torch.func.jvp`` in eval mode.

    Args:
        latent_dim: k, a multiple of h * w, (h, w) = (H, W) / 2 ** len(blocks).
        output_shape: (C, H, W) of the images.
        blocks: the encoder's blocks, in the encoder's order.

    Shapes:
        latents (B, k) -> images (B, C, H, W) in [0, 1].
    """

    def __init__(self, latent_dim: int, output_shape: Shape, blocks: Sequence[Sequence[int]] = VGG16_BLOCKS) -> None:
        super().__init__()
        self.bottleneck = _bottleneck(output_shape, latent_dim, blocks)  # (c, h, w) of the latent map
        c = blocks[-1][-1]
        layers: list[nn.Module] = [nn.Conv2d(self.bottleneck[0], c, 1), nn.BatchNorm2d(c), smooth()]
        for i in reversed(range(len(blocks))):
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            widths = list(blocks[i][::-1][1:]) + [blocks[i - 1][-1] if i else blocks[0][0]]
            for out in widths:
                layers += conv_bn(c, out, smooth())
                c = out
        layers += [nn.Conv2d(c, output_shape[0], 3, padding=1), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z.reshape(-1, *self.bottleneck))
