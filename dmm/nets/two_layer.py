"""The two-layer ReLU network of Melamed, Yehudai & Vardi (NeurIPS 2023), with its initialisation scale."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmm.errors import DmmError
from dmm.nets.layers import Shape


class TwoLayerReLU(nn.Module):
    """Classifier ``x -> W2 relu(W1 flatten(x) + b1) + b2``: one hidden ReLU layer of ``width`` units.

    Every parameter (weights and biases of both layers) is PyTorch's default ``nn.Linear`` initialisation times
    ``init_scale``, so at the same seed the initial parameters are exactly ``init_scale`` times those of
    ``init_scale=1``. Melamed et al. show that a smaller initialisation shrinks the trained network's input
    gradient orthogonal to a linear data subspace. The input gradient of logit j is
    ``W1^T (relu'(W1 x + b1) * W2[j])``.

    Args:
        input_shape: (C, H, W) of the images; n = C*H*W inputs.
        num_classes: number of logits.
        width: hidden units.
        init_scale: factor on the default initialisation (> 0).

    Shapes:
        ``x`` (B, C, H, W) -> logits (B, num_classes). The layers are ``hidden`` (W1 (width, n), b1) and ``out``
        (W2 (num_classes, width), b2).
    """

    def __init__(self, input_shape: Shape, num_classes: int, width: int = 1000, init_scale: float = 1.0) -> None:
        super().__init__()
        if width < 1 or not (init_scale > 0 and math.isfinite(init_scale)):
            raise DmmError(f"TwoLayerReLU needs width >= 1 and a finite init_scale > 0, got {width} and {init_scale}")
        self.hidden = nn.Linear(math.prod(input_shape), width)
        self.out = nn.Linear(width, num_classes)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.mul_(init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))
