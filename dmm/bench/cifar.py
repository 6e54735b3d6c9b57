"""The CIFAR-shaped models and images of the GPU-sized benchmarks, and the one place they call dmm's attack
and decomposition (so an API change there is a change here only).

Timing does not depend on the weights, so every model keeps its random initialisation: the configured
CIFAR-10 VGG (``configs/cifar10/classifier.yaml``), a ResNet-18 in its CIFAR form (3x3 stem, no max-pool:
11.2 M parameters, 0.56 GMAC per image), and the configured autoencoder (``configs/cifar10/autoencoder.yaml``,
k = 128). Quick sizes shrink the widths; the figures then mean nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dmm.bench.core import Options, PeakMemory, Row, median, model_args, repeat_times
from dmm.bench.speed import FP32, Speed
from dmm.nets import VGG, ConvDecoder, ConvEncoder

SHAPE = (3, 32, 32)
CLASSES = 10


class Normalized(nn.Module):
    """A network behind the per-channel input normalisation that the classifier system applies."""

    def __init__(self, network: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.network((x - self.mean) / self.std)


def _normalized(network: nn.Module) -> nn.Module:
    args = model_args("classifier", "cifar10")
    return Normalized(network, args["mean"], args["std"])


def vgg(quick: bool = False) -> nn.Module:
    """The configured CIFAR-10 VGG (128-256-512 channels); quick: 16-32-64."""
    blocks = ((16, 16), (32, 32), (64, 64)) if quick else ((128, 128), (256, 256), (512, 512))
    return _normalized(VGG(SHAPE, CLASSES, blocks=blocks))


def resnet18(quick: bool = False) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); quick: one block a stage."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1] if quick else [2, 2, 2, 2], num_classes=CLASSES)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return _normalized(net)


CLASSIFIERS: dict[str, Callable[[bool], nn.Module]] = {"VGG": vgg, "ResNet-18": resnet18}


def autoencoder(quick: bool = False) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of the configured CIFAR-10 autoencoder, k = 128, in eval mode; quick: 1/16 the width."""
    args = model_args("autoencoder", "cifar10")
    k = args["latent_dim"]
    encoder_channels = args["encoder"]["init_args"]["channels"]
    decoder_channels = args["decoder"]["init_args"]["channels"]
    if quick:
        encoder_channels = [max(c // 16, 4) for c in encoder_channels]
        decoder_channels = [max(c // 16, 4) for c in decoder_channels]
    encoder = ConvEncoder(SHAPE, k, channels=encoder_channels).eval()
    decoder = ConvDecoder(k, SHAPE, channels=decoder_channels).eval()
    return encoder, decoder


def images(count: int, device: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` random CIFAR-shaped images (B, 3, 32, 32) in [0, 1] and labels (B,) on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, *SHAPE, generator=generator)
    y = torch.randint(0, CLASSES, (count,), generator=generator)
    return x.to(device), y.to(device)


def attack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, norm: str = "l2") -> Tensor:
    """x_adv by dmm's PGD with every step taken (no early stop, no random start), clamped to [0, 1]."""
    from dmm.attacks import PGD

    return PGD(eps=eps, norm=norm, steps=steps, early_stop=False)(model, x, y)


def decompose(
    classifier: nn.Module, encoder: nn.Module, decoder: nn.Module, x: Tensor, y: Tensor, index: Tensor, steps: int
) -> tuple[dict[str, Tensor], str]:
    """dmm's DMM decomposition of one batch as the evaluation callback runs it, but every attack takes all
    ``steps`` (no early stop: the cost's upper bound, the same for any weights); the records and the arms."""
    from dmm.measures import Decomposition, Models, make_batch

    measure = Decomposition()
    measure = Decomposition(attack=dataclasses.replace(measure.attack, steps=steps, early_stop=False))
    records = measure.measure(Models(classifier, encoder, decoder), make_batch(x, y, index, seed=0))
    return records, ", ".join(measure.arms)


def speed_rows(
    opts: Options,
    benchmark: str,
    unit: str,
    work: int,
    make_call: Callable[[nn.Module, Speed], tuple[Callable[[], object], str]],
    setting: str,
    *,
    train: bool,
    repeats: int,
) -> list[Row]:
    """Time each classifier of :data:`CLASSIFIERS` in float32 and in ``opts.speed``: one row each.

    Args:
        make_call: ``(fresh model, speed) -> (call, note)``, the call doing ``work`` units (images or
            image-steps) with the model set up for ``speed``.
        train: models in train mode with gradients (else eval mode, frozen).
    """
    speeds = [FP32] if opts.speed.is_plain else [FP32, opts.speed]
    rows = []
    for net, build in CLASSIFIERS.items():
        calls, notes, peaks = {}, {}, {}
        for speed in speeds:
            torch.manual_seed(0)
            model = build(opts.quick).to(opts.device)
            model = model.train() if train else model.eval().requires_grad_(False)
            calls[str(speed)], notes[str(speed)] = make_call(model, speed)
            with PeakMemory(opts.device) as peak:
                calls[str(speed)]()
            peaks[str(speed)] = peak.mb
        samples = repeat_times(calls, repeats=repeats, device=opts.device)
        rate = {name: work / median(times) for name, times in samples.items()}
        fp32 = str(FP32)
        for speed in speeds:
            name, plain = str(speed), speed.is_plain
            rows.append(
                Row(
                    f"{benchmark}/{net} {name}" + ("" if plain else " vs fp32"),
                    rate[name],
                    unit=unit,
                    reference=None if plain else rate[fp32],
                    ratio=None if plain else rate[fp32] / rate[name],
                    peak_mb=peaks[name],
                    note="; ".join(n for n in (notes[name], setting) if n),
                    samples={name: samples[name]} if plain else {name: samples[name], fp32: samples[fp32]},
                )
            )
    return rows
