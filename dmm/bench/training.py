"""[lightning] Training throughput of the MNIST CNN system under a Lightning Trainer vs a plain PyTorch loop.

Both train the same configured :class:`dmm.models.Classifier` from the same seed with Adam (lr 1e-3) on
the same in-memory images through the same shuffling DataLoader (batch 128). The plain loop is the least
one would write (forward, cross-entropy, backward, step); the Lightning side also runs what the system
does in ``training_step`` (accuracy metric, ``self.log``, a finiteness check), so the ratio is the whole
price of training through the system and the Trainer. Both are timed from the first step after warm-up
to the end of the last step, in blocks; images/s is the median over blocks.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dmm.bench.core import Options, PeakMemory, Row, Target, median, synchronize
from dmm.bench.inputs import classifier, images

TARGET = Target(1.10)


@dataclass(frozen=True)
class Sizes:
    batch: int = 128
    warmup: int = 10
    steps: int = 100
    blocks: int = 5  # the timed steps split into this many blocks, one throughput figure each


FULL, QUICK = Sizes(), Sizes(batch=32, warmup=2, steps=6, blocks=3)


class _BlockClock:
    """Timestamps at the start of step ``warmup`` and after every ``per_block`` steps from there."""

    def __init__(self, sizes: Sizes, device: str) -> None:
        self.sizes, self.device, self.stamps = sizes, device, []
        self.per_block = sizes.steps // sizes.blocks

    def tick(self, step: int) -> None:
        """Call with the number of steps completed so far."""
        done = step - self.sizes.warmup
        if done >= 0 and done % self.per_block == 0 and len(self.stamps) <= self.sizes.blocks:
            synchronize(self.device)
            self.stamps.append(time.perf_counter())

    def images_per_second(self) -> list[float]:
        per_block = self.per_block * self.sizes.batch
        return [per_block / (b - a) for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


class _ClockCallback(L.Callback):
    def __init__(self, clock: _BlockClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.tick(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.clock.sizes.warmup + self.clock.sizes.steps:
            self.clock.tick(trainer.global_step)


def _plain(model: torch.nn.Module, loader: DataLoader, clock: _BlockClock) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    total = clock.sizes.warmup + clock.sizes.steps
    for step, (x, y) in enumerate(loader):
        x, y = x.to(clock.device), y.to(clock.device)
        clock.tick(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 == total:
            clock.tick(total)
            return


def _lightning(model: L.LightningModule, loader: DataLoader, clock: _BlockClock, device: str) -> None:
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        # Expected here: the system has a validation_step but the benchmark trains only.
        warnings.filterwarnings("ignore", message=".*validation_step.*val_dataloader")
        trainer = L.Trainer(
            accelerator="gpu" if torch.device(device).type == "cuda" else "cpu",
            devices=1,
            max_steps=clock.sizes.warmup + clock.sizes.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[_ClockCallback(clock)],
        )
        trainer.fit(model, train_dataloaders=loader)


def run(opts: Options) -> list[Row]:
    sizes = QUICK if opts.quick else FULL
    x, y, source = images(opts, sizes.batch * (sizes.warmup + sizes.steps + 1), split="train")
    dataset = TensorDataset(x.cpu(), y.cpu())  # in memory, moved per batch as a DataModule's would be
    throughput, peaks = {}, {}
    for name in ("plain", "lightning"):
        torch.manual_seed(0)
        model, _ = classifier(dataclasses.replace(opts, classifier=None))  # fresh random weights, same seed
        model.train().requires_grad_(True)
        loader = DataLoader(dataset, batch_size=sizes.batch, shuffle=True)
        clock = _BlockClock(sizes, opts.device)
        with PeakMemory(opts.device) as memory:
            _plain(model, loader, clock) if name == "plain" else _lightning(model, loader, clock, opts.device)
        throughput[name], peaks[name] = clock.images_per_second(), memory.mb
    ours, plain = median(throughput["lightning"]), median(throughput["plain"])
    return [
        Row(
            "lightning/training vs plain loop",
            ours,
            unit="img/s",
            reference=plain,
            ratio=plain / ours,
            target=TARGET,
            peak_mb=peaks["lightning"],
            note=f"CNN, Adam 1e-3, batch {sizes.batch} of {source}, {sizes.steps} steps after {sizes.warmup} "
            f"warm-up, median of {sizes.blocks} blocks; Lightning side includes the system's metric and logging",
            samples={"lightning_img_s": throughput["lightning"], "plain_img_s": throughput["plain"]},
        )
    ]
