"""What every measurement shares: the models it is given, the batch it sees, and the shape of a measure.

A measure is a small class whose ``__init__`` holds its validated settings (so YAML can name it by
``class_path`` and jsonargparse builds it), with two pure methods: ``measure(models, batch)`` returns
per-image records, ``summarize(records)`` turns the records of all images into the logged figures. The
evaluation callback (:mod:`dmm.callbacks.evaluation`) does everything else: the seeded image subset, the
manifold model, caching, DDP gathering, files and loggers. Pure torch.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn


class Models(NamedTuple):
    """The networks a measure may use: all map [0, 1] images (B, C, H, W) as documented.

    Attributes:
        classifier: images -> logits (B, classes).
        encoder: images -> latents (B, k); ``None`` when the measure needs no manifold model.
        decoder: latents -> images in [0, 1].
        exact: the data's known manifold as (encoder, decoder), when the data has one and ``encoder`` and
            ``decoder`` are a learned model of it: measures then also report how far the learned one is off.
    """

    classifier: nn.Module
    encoder: nn.Module | None = None
    decoder: nn.Module | None = None
    exact: tuple[nn.Module, nn.Module] | None = None


class Batch(NamedTuple):
    """Images to measure: x (B, C, H, W) in [0, 1], labels y (B,) int64, their dataset indices (B,) int64,
    and one CPU generator per image seeded by (seed, index), so an image's random draws (null subspaces,
    restarts) do not depend on its batch or process."""

    x: Tensor
    y: Tensor
    index: Tensor
    generators: list[torch.Generator]


def image_seed(seed: int, index: int) -> int:
    """A 32-bit seed per (seed, image index); hashed because torch keeps only a CPU seed's low 32 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "little")


def make_batch(x: Tensor, y: Tensor, index: Tensor, seed: int) -> Batch:
    """A :class:`Batch` whose generators are seeded by :func:`image_seed`."""
    generators = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in index]
    return Batch(x, y, index, generators)


class Measure:
    """Base of the measures. Subclasses set ``name`` and implement ``settings``, ``measure`` and ``summarize``.

    Attributes:
        name: the folder (``<run>/<name>/``) and metric prefix (``{stage}/<name>/...``) of its results.
        needs_manifold: whether ``measure`` uses the encoder and decoder.
        image_columns: titles of the image columns in ``records["_images"]`` (B, columns, C, H, W), if any.
    """

    name: ClassVar[str] = "measure"
    needs_manifold: ClassVar[bool] = True
    image_columns: ClassVar[tuple[str, ...]] = ()

    @property
    def needs_subset(self) -> bool:
        """Whether :meth:`prepare` must see the whole image subset before the first batch."""
        return False

    def prepare(self, x: Tensor, y: Tensor, index: Tensor) -> None:
        """Sees the whole subset (N, C, H, W), labels (N,) and dataset indices (N,) before any batch, on every
        process, when :attr:`needs_subset`; records must still not depend on how the subset is batched."""

    def settings(self) -> dict:
        """Everything the records depend on besides models and images (JSON-able): cache key and provenance."""
        raise NotImplementedError

    def measure(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        """Per-image records: (B,) tensors, plus optionally ``_images`` (B, columns, C, H, W) for image grids."""
        raise NotImplementedError

    def summarize(self, records: dict[str, Tensor]) -> dict[str, float]:
        """The figures of all images' records concatenated (any number of batches and processes)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"
