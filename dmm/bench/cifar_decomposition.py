"""[cifar_decomposition] The DMM decomposition of 1000 CIFAR-shaped images, end to end.

The measurement the evaluation callback runs (``dmm.measures.Decomposition``: tangent bases of the
configured CIFAR-10 autoencoder, k = 128, and one PGD attack per arm) with the configured VGG, on random
images and random weights. Every attack takes all its steps (no early stop), so the figure is the cost's
upper bound and the same for any weights; a trained pair stops most attacks early. Float32 throughout:
the tangent bases never run in bf16 (see :mod:`dmm.bench.speed`).
"""

from __future__ import annotations

import torch

from dmm.bench.cifar import autoencoder, decompose, images, vgg
from dmm.bench.core import Options, PeakMemory, Row, timed

SIZES = {"cuda": (1000, 250, 100), "cpu": (32, 16, 20), "quick": (4, 2, 2)}  # images, batch, attack steps


def run(opts: Options) -> list[Row]:
    count, batch, steps = SIZES["quick" if opts.quick else torch.device(opts.device).type]
    torch.manual_seed(0)
    classifier = vgg(opts.quick).to(opts.device).eval().requires_grad_(False)
    encoder, decoder = (m.to(opts.device) for m in autoencoder(opts.quick))
    x, y = images(count, opts.device)
    index = torch.arange(count)
    decompose(classifier, encoder, decoder, x[:2], y[:2], index[:2], steps=1)  # warm-up
    arms = ""

    def all_batches() -> None:
        nonlocal arms
        for i in range(0, count, batch):
            _, arms = decompose(
                classifier, encoder, decoder, x[i : i + batch], y[i : i + batch], index[i : i + batch], steps
            )

    with PeakMemory(opts.device) as peak:
        total = timed(all_batches, opts.device)
    width = "1/8-1/16 widths (quick)" if opts.quick else "as configured"
    return [
        Row(
            "cifar_decomposition/total",
            total,
            peak_mb=peak.mb,
            note=f"{count / total:.3g} img/s; one timed run of {count} random 3x32x32 images, batch {batch}; arms "
            f"{arms}, {steps} L2 steps each, no early stop; VGG and autoencoder (k=128) {width}, random weights",
        )
    ]
