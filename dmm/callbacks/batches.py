"""Evaluations that attack many images batch by batch: a progress bar, and finished batches cached on disk.

A ``dmm validate`` or ``dmm test`` of the evaluation callback attacks hundreds of images;
killed half-way, or rerun to regenerate a report, it should not start again. :class:`BatchCache` keeps each
finished batch's per-image records in ``<cache_dir>/<name>-<digest>/``, where the digest covers what the
records depend on besides the images: the classifier's weights and buffers, the autoencoder's, the attack
settings and the seed. A batch file is named by a digest of its images, labels and dataset indices, so other
data, another batch size or another number of DDP processes recompute just the batches they cannot find.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from tqdm import tqdm

from dmm.errors import DmmError
from dmm.io import atomic_write

log = logging.getLogger(__name__)


def _bytes(tensor: Tensor) -> bytes:
    """dtype, shape and raw bytes of a tensor, for hashing (any dtype, any device)."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    return f"{t.dtype}:{tuple(tensor.shape)}:".encode() + t.view(torch.uint8).numpy().tobytes()


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state: the names and bytes of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode() + _bytes(tensor))
    return digest.hexdigest()


class BatchCache:
    """Per-image records of finished batches, keyed by a provenance dict (JSON-serialisable).

    Args:
        folder: the cache root; ``None`` disables the cache (every batch is computed, nothing written).
        name: prefix of the cache folder, e.g. ``"decomposition-test"``.
        provenance: everything the records depend on; written beside them as ``provenance.json``.
    """

    def __init__(self, folder: str | Path | None, name: str, provenance: dict) -> None:
        text = json.dumps(provenance, sort_keys=True, default=str)
        self.folder = (
            None if folder is None else Path(folder) / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        )
        self.provenance = provenance
        self.hits = 0

    def _file(self, batch: tuple[Tensor, ...]) -> Path:
        digest = hashlib.sha256()
        for t in batch:
            digest.update(_bytes(t))
        return self.folder / f"batch-{digest.hexdigest()[:20]}.pt"

    def load(self, batch: tuple[Tensor, ...]) -> dict[str, Tensor] | None:
        """The records of the batch of tensors ``batch`` (e.g. indices, images, labels), or ``None``."""
        if self.folder is None or not self._file(batch).is_file():
            return None
        try:
            records = torch.load(self._file(batch), map_location="cpu", weights_only=True)
        except Exception as error:  # torch/pickle raise many types for a truncated file
            raise DmmError(
                f"cached batch {self._file(batch)} is unreadable ({type(error).__name__}); delete it to recompute"
            ) from None
        self.hits += 1
        return records

    def save(self, batch: tuple[Tensor, ...], records: dict[str, Tensor]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        provenance = self.folder / "provenance.json"
        if not provenance.is_file():
            text = json.dumps(self.provenance, indent=2, sort_keys=True, default=str)
            atomic_write(provenance, lambda p: p.write_text(text))
        cpu = {key: value.detach().cpu() for key, value in records.items()}
        atomic_write(self._file(batch), lambda p: torch.save(cpu, p))


def evaluation_cache(
    trainer: L.Trainer,
    name: str,
    cache_dir: str | None,
    default_dir: str | Path,
    models: dict[str, nn.Module],
    settings: dict,
) -> BatchCache:
    """The cache of one callback's evaluation: on at ``dmm validate``/``test`` only, whose weights are fixed.

    ``cache_dir`` ``None`` means ``default_dir``, ``""`` no cache. The provenance
    holds the state digest of each of ``models`` (e.g. classifier, autoencoder), ``settings`` and the dmm version.
    """
    if cache_dir == "" or trainer.state.fn not in ("validate", "test"):
        return BatchCache(None, name, {})
    provenance = {f"{key}_state_sha256": module_digest(model) for key, model in models.items()}
    provenance.update(settings=settings, dmm_version=metadata.version("dmm"))
    return BatchCache(cache_dir or default_dir, name, provenance)


def cached_batches(
    trainer: L.Trainer,
    description: str,
    cache: BatchCache,
    keys: tuple[Tensor, ...],
    batch_size: int,
    compute: Callable[[slice], dict[str, Tensor]],
) -> Iterator[dict[str, Tensor]]:
    """Yield the records of each batch of rows ``i : i + batch_size``: from ``cache``, else ``compute(rows)``.

    ``keys`` are (N, ...) tensors whose rows identify the batch (dataset indices, images, labels). A tqdm bar
    counts images on global rank 0 when the trainer shows a progress bar.
    """
    total = len(keys[0])
    show = trainer.is_global_zero and trainer.progress_bar_callback is not None
    with tqdm(total=total, desc=description, unit="img", disable=not show, leave=False) as bar:
        for start in range(0, total, batch_size):
            rows = slice(start, start + batch_size)
            batch = tuple(k[rows] for k in keys)
            records = cache.load(batch)
            if records is None:
                records = compute(rows)
                cache.save(batch, records)
            bar.update(len(batch[0]))
            yield records
    if cache.hits:
        log.info("%s: %d batches read from %s", description, cache.hits, cache.folder)
