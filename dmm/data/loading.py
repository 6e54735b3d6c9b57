"""Data loaders over in-memory tensors whose shuffle order depends only on (seed, epoch).

A resumed run then sees exactly the batches the uninterrupted run would have seen: Lightning calls
``set_epoch`` on the sampler at the start of every epoch, and the order is drawn from a generator seeded
with ``seed + epoch`` rather than from the global RNG. Under DDP Lightning swaps this ``RandomSampler``
for a ``DistributedSampler``, which is seeded per epoch in the same way.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose permutation for epoch e is a function of ``seed + e`` alone."""

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def tensor_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over an in-memory dataset; shuffled loaders use :class:`EpochRandomSampler`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochRandomSampler(dataset, seed) if shuffle else None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class InMemorySplits(L.LightningDataModule):
    """Base of data modules holding their splits in memory: ``self.datasets`` maps "train", "val" and "test"
    to datasets, filled by ``setup``; hyperparameters ``batch_size``, ``num_workers`` and ``seed``. Predict
    reads the test split."""

    datasets: dict[str, Dataset]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError("setup() has not been called yet")
        hp = self.hparams
        return tensor_loader(self.datasets[split], hp.batch_size, hp.num_workers, shuffle, hp.seed)
