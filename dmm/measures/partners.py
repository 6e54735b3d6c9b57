"""The other-image null's partners: for each image, another image of its class, chosen from the whole evaluated
subset so that the choice does not depend on batches or processes (pure torch)."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from dmm.errors import DmmError
from dmm.measures.base import Batch


def partners(y: Tensor) -> tuple[Tensor, Tensor]:
    """For each image, another image of the same class: the next one in order, cyclically.

    Returns (partner (B,) int64, same_class (B,) bool); an image alone in its class gets the next image of any
    class (``same_class`` False).
    """
    batch = len(y)
    partner = (torch.arange(batch, device=y.device) + 1) % max(batch, 1)
    same = torch.zeros(batch, dtype=torch.bool, device=y.device)
    for i in range(batch):
        mates = ((y == y[i]).nonzero().squeeze(1)).tolist()
        mates = [j for j in mates if j != i]
        if mates:
            later = [j for j in mates if j > i]
            partner[i], same[i] = (later or mates)[0], True
    return partner, same


class PartnerPool:
    """Each image's partner, by dataset index, from the subset given to :meth:`prepare` (:func:`partners` in
    subset order); ``digest`` names that subset (the evaluation cache keys on it)."""

    def __init__(self) -> None:
        self._pairs: dict[int, tuple[Tensor, bool]] | None = None
        self.digest = ""

    def prepare(self, x: Tensor, y: Tensor, index: Tensor) -> None:
        """The whole subset: images x (N, C, H, W), labels y (N,), dataset indices (N,)."""
        partner, same = partners(y)
        self._pairs = {int(i): (x[int(p)].cpu(), bool(s)) for i, p, s in zip(index, partner, same, strict=True)}
        self.digest = hashlib.sha256(index.cpu().numpy().tobytes()).hexdigest()[:16]

    def _lookup(self, batch: Batch) -> list[tuple[Tensor, bool]]:
        if self._pairs is None:
            raise DmmError("the other-image null needs Decomposition.prepare(x, y, index) with the whole subset")
        missing = [int(i) for i in batch.index if int(i) not in self._pairs]
        if missing:
            raise DmmError(f"images {missing[:5]} were not in the subset given to Decomposition.prepare")
        return [self._pairs[int(i)] for i in batch.index]

    def images(self, batch: Batch) -> Tensor:
        """The partners of the batch's images, shaped and placed like ``batch.x``."""
        return torch.stack([p for p, _ in self._lookup(batch)]).to(device=batch.x.device, dtype=batch.x.dtype)

    def same_class(self, batch: Batch) -> Tensor:
        """(B,) bool: whether each partner shares its image's class."""
        return torch.tensor([s for _, s in self._lookup(batch)], device=batch.x.device)
