"""[cifar_train] Training throughput, images/s, of the CIFAR-10 VGG and a ResNet-18, float32 and as ``--precision``,
``--channels-last`` and ``--compile`` ask.

A training step is what every system does: forward, cross-entropy, backward, an SGD step with momentum. Under
bf16 autocast the forward pass is bf16 and the logits, loss and weights float32 (what ``--trainer.precision
bf16-mixed`` does in ``dmm fit``). The ratio is float32's throughput over the faster setting's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dmm.bench.cifar import images, speed_rows
from dmm.bench.core import Options, Row
from dmm.bench.speed import Speed, images_for, prepare

SIZES = {"cuda": (256, 10, 5), "cpu": (32, 3, 3), "quick": (4, 1, 1)}  # batch, steps per timed call, repeats


def run(opts: Options) -> list[Row]:
    batch, steps, repeats = SIZES["quick" if opts.quick else torch.device(opts.device).type]
    clean, y = images(batch, opts.device)

    def make_call(model: nn.Module, speed: Speed):
        x = images_for(clean, speed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train(net: nn.Module, count: int = steps) -> None:
            for _ in range(count):
                loss = F.cross_entropy(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        fast, note = prepare(model, speed, lambda net: train(net, 1))
        return (lambda: train(fast)), note

    setting = f"random weights, batch {batch} of random 3x32x32 images, SGD with momentum, {steps} steps per call"
    return speed_rows(opts, "cifar_train", "img/s", batch * steps, make_call, setting, train=True, repeats=repeats)
