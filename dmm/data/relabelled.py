"""Ilyas et al.'s relabelled training set, loaded from the folder that ``dmm predict`` wrote.

The folder (written by :class:`dmm.callbacks.ShardWriter` around :class:`dmm.models.Relabeller`):
``provenance.json`` first, ``pieces/<split>-<start>-<stop>.pt`` while it runs, then ``train.pt`` and ``val.pt``
(columns :data:`COLUMNS`, rows in index order) and last ``complete.json``: the provenance, the rows per split
and the share of True in each boolean column. Without ``complete.json`` the folder is not whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dmm.data.loading import tensor_loader
from dmm.data.splits import SPLITS, data_provenance, wrapped
from dmm.errors import DmmError

log = logging.getLogger(__name__)

COLUMNS = ("x", "y", "label", "success")  # x_adv, target t (the label N2 learns), true y, N1(x_adv) == t
PROVENANCE, COMPLETE, PIECES = "provenance.json", "complete.json", "pieces"
MAKE_IT = (
    "dmm predict --config configs/<dataset>/relabel.yaml --model.init_args.classifier <N1 checkpoint> "
    "--trainer.callbacks.init_args.output_dir {folder}"
)


class RelabelledDataModule(L.LightningDataModule):
    """Every image moved by targeted PGD on N1 towards a wrong class t_i, and labelled t_i alone.

    Reference: Ilyas et al., "Adversarial Examples Are Not Bugs, They Are Features", 2019 (retold by the
    DMM paper, Shamir et al., 2021). x_i stays within eps of the clean s_i and still shows class y_i to
    a person, so a network N2 trained on {(x_i, t_i)} that beats chance on the CLEAN test set has learned
    from the features the attack put in. The images come from ``dmm predict --config
    configs/<dataset>/relabel.yaml`` (:class:`dmm.models.Relabeller`); this module only loads them.

    Batches are ``(x, y)``: x float32 (B, C, H, W) in [0, 1], y int64 (B,).
    train: {(x_i, t_i)} from the wrapped module's training split. val: the same on its validation split,
    labelled with the targets t_i (val/acc is the fit to the relabelled task); ``clean_val_dataloader()``
    gives the clean val split with true labels. test, predict: the wrapped module's CLEAN test split with
    true labels, or with ``test_labels="next"`` labelled (y + 1) mod C: test/acc is then the share of clean
    images N2 maps by the relabelling rule, as it would if it had learnt the digits' visible (robust)
    features and the label shift rather than the attack's features. Testing does not read ``path``.

    ``setup`` logs N1's targeted success rate (the share of x_i that N1 classifies as t_i) and refuses a
    folder made from other data (another wrapped class or image settings) than ``data``.

    Args:
        path: the folder ``dmm predict`` wrote (its ``--trainer.callbacks.init_args.output_dir``).
        data: the wrapped data module, e.g. ``MNISTDataModule`` (a nested class_path in YAML): the source of
            the clean test split, and the data the folder must have been made from.
        batch_size: images per batch of the relabelled splits.
        seed: seeds the shuffling of the relabelled training split.
        test_labels: "true" or "next": the labels of the clean test split.
    """

    def __init__(
        self,
        path: str,
        data: L.LightningDataModule,
        batch_size: int = 128,
        seed: int = 0,
        test_labels: Literal["true", "next"] = "true",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore="data")  # a module among the hparams would not load with weights_only
        if test_labels not in ("true", "next"):
            raise DmmError(f"--data.init_args.test_labels must be 'true' or 'next', got {test_labels!r}")
        if batch_size < 1:
            raise DmmError(f"--data.init_args.batch_size must be >= 1, got {batch_size}")
        self.data = wrapped(data)
        self.num_classes, self.input_shape = data.num_classes, tuple(data.input_shape)
        self.folder = Path(path)
        self.datasets: dict[str, TensorDataset] = {}
        self.success_rate: dict[str, float] = {}

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """The wrapped module's splits for ``stage``, and for fit/validate the relabelled train and val splits."""
        self.data.setup(stage)
        if stage not in ("fit", "validate", None) or self.datasets:
            return
        record = self._record()
        for split in SPLITS:
            remedy = f"make the folder again with: {MAKE_IT.format(folder=self.folder)}"
            rows = read_rows(self.folder / f"{split}.pt", record["rows"][split], remedy, COLUMNS)
            self.datasets[split] = TensorDataset(rows["x"], rows["y"])
            self.success_rate[split] = rows["success"].float().mean().item()
        rates = ", ".join(f"{split} {100 * rate:.1f} %" for split, rate in self.success_rate.items())
        log.info("relabelled data %s: N1 classifies as their target t_i %s (targeted success rate)", self.folder, rates)

    def _record(self) -> dict:
        """``complete.json``, checked to describe this run's wrapped data."""
        file = self.folder / COMPLETE
        if not file.is_file():
            make = MAKE_IT.format(folder=self.folder)
            raise DmmError(
                f"relabelled data {self.folder} is missing or incomplete (no {COMPLETE}); make it with: {make}"
            )
        record = json.loads(file.read_text())
        mine = json.loads(json.dumps(data_provenance(self.data), default=str))  # tuples as JSON has them
        theirs = {key: record.get(key) for key in mine}
        if theirs != mine:
            raise DmmError(
                f"relabelled data {self.folder} was made from {theirs}, not from this run's {mine}: "
                "give --data.init_args.data the settings of the dmm predict run, or make a folder for these"
            )
        return record

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        loader = self.data.test_dataloader()
        if self.hparams.test_labels == "true":
            return loader
        dataset = _NextLabels(loader.dataset, self.num_classes)
        return DataLoader(dataset, batch_size=loader.batch_size, num_workers=loader.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.data.predict_dataloader()

    def clean_val_dataloader(self) -> DataLoader:
        """The wrapped module's clean validation split, true labels."""
        return self.data.val_dataloader()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError("setup() has not loaded the relabelled splits yet")
        return tensor_loader(self.datasets[split], self.hparams.batch_size, 0, shuffle, self.hparams.seed)


class _NextLabels(Dataset):
    """A dataset of ``(x, y, ...)`` items seen as ``(x, (y + 1) mod C)``."""

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index][:2]
        return x, (torch.as_tensor(y) + 1) % self.num_classes


def read_rows(file: Path, size: int | None, remedy: str, columns: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """A file of columns written by ``dmm predict``: ``columns`` among them, each of ``size`` rows (any: ``None``).

    Raises:
        DmmError: the file is missing, damaged or of another length; the message ends with ``remedy``.
    """
    try:
        rows = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(rows, dict) or not set(columns) <= rows.keys():
            raise ValueError(f"not a dict with columns {columns}")
        lengths = {len(column) for column in rows.values()}
        if len(lengths) != 1 or (size is not None and lengths != {size}):
            raise ValueError("columns of unequal or unexpected length")
    except Exception as error:  # torch/pickle raise many types for a damaged file
        raise DmmError(f"{file} is missing or unreadable ({type(error).__name__}); {remedy}") from None
    return rows
