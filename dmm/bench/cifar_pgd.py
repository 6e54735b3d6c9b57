"""[cifar_pgd] PGD throughput, images·steps/s, on the CIFAR-10 VGG and a ResNet-18, float32 and as ``--precision``,
``--channels-last`` and ``--compile`` ask.

Every step is taken (no early stop), so the figure is the attack's cost per image and step whatever the
weights; under bf16 autocast only the classifier's forward pass is bf16, its logits and the perturbation
stay float32. The ratio is float32's throughput over the faster setting's: below 1 means faster.
"""

from __future__ import annotations

import torch
from torch import nn

from dmm.bench.cifar import attack, images, speed_rows
from dmm.bench.core import Options, Row
from dmm.bench.speed import Speed, images_for, prepare

EPS = 0.5  # L2, the usual CIFAR-10 budget; without early stop the timing does not depend on it
SIZES = {"cuda": (256, 10, 5), "cpu": (32, 5, 3), "quick": (4, 2, 1)}  # batch, steps, repeats


def run(opts: Options) -> list[Row]:
    batch, steps, repeats = SIZES["quick" if opts.quick else torch.device(opts.device).type]
    clean, y = images(batch, opts.device)

    def make_call(model: nn.Module, speed: Speed):
        x = images_for(clean, speed)
        fast, note = prepare(model, speed, lambda net: attack(net, x, y, eps=EPS, steps=1))
        return (lambda: attack(fast, x, y, eps=EPS, steps=steps)), note

    setting = f"random weights, batch {batch} of random 3x32x32 images, {steps} L2 steps, eps {EPS:g}"
    return speed_rows(opts, "cifar_pgd", "img·steps/s", batch * steps, make_call, setting, train=False, repeats=repeats)
