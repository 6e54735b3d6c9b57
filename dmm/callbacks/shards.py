"""``dmm predict`` output written as it comes, in pieces a killed run resumes from, merged per split at the end."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from dmm.data.relabelled import COMPLETE, PIECES, PROVENANCE, read_rows
from dmm.data.splits import PredictSplits
from dmm.errors import DmmError
from dmm.io import atomic_write

log = logging.getLogger(__name__)

PIECE = re.compile(r"(?P<split>\w+)-(?P<start>\d+)-(?P<stop>\d+)\.pt")


class ShardWriter(BasePredictionWriter):
    """Write every predict batch of :class:`~dmm.data.PredictSplits` into ``output_dir``; resume a killed run.

    ``predict_step`` returns a dict of (B, ...) tensors, one row per image, among them the batch's ``split``
    and ``index`` (e.g. :class:`~dmm.models.Relabeller`). The folder, read by
    :class:`~dmm.data.RelabelledDataModule`:

    - ``provenance.json``, written first: the model's and the data's ``provenance()`` and the dmm version;
    - ``pieces/<split>-<start>-<stop>.pt``: rows [start, stop) of a split, one file per batch, written atomically;
    - ``<split>.pt``: all rows of the split in index order, once every piece is there;
    - ``complete.json``, written last: the provenance, rows per split and the share of True in each boolean
      column (logged, and sent to the loggers as ``predict/<split>/<column>_rate``). Then the pieces go.

    Resume: rerun the same command. Pieces are named by their index ranges, so the rerun leaves every finished
    row out of the predict loader (:meth:`PredictSplits.skip`), whatever its batch size, and computes the rest; a
    run stopped early (``--trainer.limit_predict_batches``) continues the same way. A folder of other
    provenance is refused; a complete one is left as it is. One process only (DDP would interleave indices).

    Args:
        output_dir: the folder; created if missing.
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.provenance: dict = {}
        self.sizes: dict[str, int] = {}
        self.finished = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        data = trainer.datamodule
        if not isinstance(data, PredictSplits):
            raise DmmError(f"ShardWriter writes what PredictSplits feeds (data.class_path), not {type(data).__name__}")
        if trainer.world_size > 1:
            raise DmmError("ShardWriter runs in one process: use --trainer.devices 1 (DDP interleaves the indices)")
        provenance = {"model": type(pl_module).__qualname__, **getattr(pl_module, "provenance", dict)()}
        provenance |= {**data.provenance(), "dmm_version": metadata.version("dmm")}
        self.provenance = json.loads(json.dumps(provenance, default=str))  # as it reads back from disk
        self.sizes, self.finished = data.sizes, False
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in (COMPLETE, PROVENANCE):  # the first that exists says what the folder holds
            if (self.output_dir / name).is_file():
                self._check_provenance(json.loads((self.output_dir / name).read_text()))
                break
        else:
            atomic_write(self.output_dir / PROVENANCE, lambda p: p.write_text(json.dumps(self.provenance, indent=2)))
        if (self.output_dir / COMPLETE).is_file():
            log.info("%s is complete already: nothing to predict", self.output_dir)
            self.finished = True
        pieces = self._pieces()
        for split, size in self.sizes.items():
            done = range(size) if self.finished else [i for _, start, stop in pieces[split] for i in range(start, stop)]
            data.skip(split, done)
            if done and not self.finished:
                log.info("%s: resuming, %d of %d %s rows written already", self.output_dir, len(done), size, split)
        if not self.finished and all(_tiles(pieces[split], size) for split, size in self.sizes.items()):
            self._finish(trainer)  # killed while merging: only the merge is left

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict[str, Tensor], batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        rows = {name: column.detach().cpu() for name, column in prediction.items()}
        split, index = rows.pop("split"), rows.pop("index")
        # Runs of consecutive indices of one split: the batch itself, unless it spans the end of a split.
        breaks = ((split[1:] != split[:-1]) | (index[1:] != index[:-1] + 1)).nonzero().flatten() + 1
        bounds = [0, *breaks.tolist(), len(index)]
        for lo, hi in itertools.pairwise(bounds):
            name = trainer.datamodule.splits[int(split[lo])]
            piece = {column: values[lo:hi].clone() for column, values in rows.items()}
            file = self.output_dir / PIECES / f"{name}-{int(index[lo]):07d}-{int(index[hi - 1]) + 1:07d}.pt"
            file.parent.mkdir(exist_ok=True)
            atomic_write(file, lambda p, piece=piece: torch.save(piece, p))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.finished:
            self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        """Merge the pieces of every split into ``<split>.pt``, then write ``complete.json`` and drop the pieces."""
        pieces = self._pieces()
        left = {
            split: size - sum(stop - start for _, start, stop in pieces[split]) for split, size in self.sizes.items()
        }
        if any(left.values()):
            log.info("%s: rows still to predict %s; rerun the same command to continue", self.output_dir, left)
            return
        rates = {}
        for split, size in self.sizes.items():
            if not _tiles(pieces[split], size):
                raise DmmError(f"{self.output_dir / PIECES} has overlapping {split} pieces: delete the folder, rerun")
            parts = [
                read_rows(file, stop - start, "delete it to predict it again") for file, start, stop in pieces[split]
            ]
            columns = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
            atomic_write(self.output_dir / f"{split}.pt", lambda p, columns=columns: torch.save(columns, p))
            rates[split] = {name: v.float().mean().item() for name, v in columns.items() if v.dtype == torch.bool}
            shares = ", ".join(f"{name} {100 * rate:.1f} %" for name, rate in rates[split].items())
            log.info("%s: %d %s rows; share true: %s", self.output_dir, size, split, shares or "no boolean columns")
        record = {**self.provenance, "rows": self.sizes, "rates": rates}
        atomic_write(self.output_dir / COMPLETE, lambda p: p.write_text(json.dumps(record, indent=2)))
        shutil.rmtree(self.output_dir / PIECES, ignore_errors=True)
        self.finished = True
        metrics = {f"predict/{split}/{name}_rate": r for split, named in rates.items() for name, r in named.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)

    def _check_provenance(self, record: dict) -> None:
        keys = (self.provenance.keys() | record.keys()) - {"rows", "rates"}
        differ = sorted(key for key in keys if record.get(key) != self.provenance.get(key))
        if differ:
            raise DmmError(
                f"{self.output_dir} holds predictions of other settings (differing: {', '.join(differ)}): "
                "give another --trainer.callbacks.init_args.output_dir, or delete that folder"
            )

    def _pieces(self) -> dict[str, list[tuple[Path, int, int]]]:
        """The pieces on disk of each split as (file, start, stop), sorted by start."""
        pieces = {split: [] for split in self.sizes}
        for file in (self.output_dir / PIECES).glob("*.pt"):
            match = PIECE.fullmatch(file.name)
            if match and match["split"] in pieces:
                pieces[match["split"]].append((file, int(match["start"]), int(match["stop"])))
        return {split: sorted(found, key=lambda piece: piece[1]) for split, found in pieces.items()}


def _tiles(pieces: list[tuple[Path, int, int]], size: int) -> bool:
    """Do the pieces (sorted by start) cover [0, size) exactly once?"""
    end = 0
    for _, start, stop in pieces:
        if start != end:
            return False
        end = stop
    return end == size
