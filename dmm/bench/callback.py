"""[callback] The decomposition the Evaluation callback runs: 1000 MNIST val images, batch 250.

The :class:`~dmm.measures.Decomposition` measure with its defaults (L2, eps 4, 100 steps of 0.05, early stop,
arms full/on/off/random/random_off; the full-budget parts left out, as a separate cost) is called exactly as
the callback calls it. The split into tangent basis and the attack of each arm comes from timers wrapped
around ``tangent_subspace`` and the measure's attack, so nothing runs twice. With early stop the attacks' cost
depends on how robust the classifier is: the figures only mean something with trained checkpoints
(``--classifier``, ``--autoencoder``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from dmm.bench.core import Options, PeakMemory, Row, Target, synchronize, timed
from dmm.bench.inputs import autoencoder, classifier, images
from dmm.measures import Decomposition, Models, make_batch
from dmm.measures import decomposition as module

TOTAL_TARGET = Target(60.0, of="ours")  # seconds for 1000 images on 2 CPU cores


class _TimedAttack:
    """The measure's attack, timing each call under the name of the arm it runs (arms run in order)."""

    def __init__(self, attack, arms: tuple[str, ...], device: str, spent: dict[str, float]) -> None:
        self.attack, self.arms, self.device, self.spent, self.calls = attack, arms, device, spent, 0

    def __call__(self, *args, **kwargs):
        name = self.arms[self.calls % len(self.arms)]
        self.calls += 1
        synchronize(self.device)
        start = time.perf_counter()
        out = self.attack(*args, **kwargs)
        synchronize(self.device)
        self.spent[name] += time.perf_counter() - start
        return out

    def __getattr__(self, name: str):
        return getattr(self.attack, name)


@contextlib.contextmanager
def _split_timers(measure: Decomposition, device: str) -> Iterator[dict[str, float]]:
    """Seconds spent in ``tangent_subspace`` and in each arm's attack, summed over calls."""
    spent = dict.fromkeys(("tangent", *measure.arms), 0.0)
    original_tangent, original_attack = module.tangent_subspace, measure.attack

    def tangent_subspace(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = original_tangent(*args, **kwargs)
        synchronize(device)
        spent["tangent"] += time.perf_counter() - start
        return out

    module.tangent_subspace = tangent_subspace
    measure.attack = _TimedAttack(original_attack, measure.arms, device, spent)
    try:
        yield spent
    finally:
        module.tangent_subspace, measure.attack = original_tangent, original_attack


def run(opts: Options) -> list[Row]:
    count, batch = (16, 8) if opts.quick else (1000, 250)
    measure = Decomposition(full_budget_parts=False)
    if opts.quick:
        measure = Decomposition(measure.attack.replace(steps=5), full_budget_parts=False)
    model, model_weights = classifier(opts)
    ae, ae_weights = autoencoder(opts)
    models = Models(model, ae.encoder, ae.decoder)
    x, y, source = images(opts, count)
    index = torch.arange(count)

    def decompose_all() -> list[dict]:
        return [measure.measure(models, make_batch(x[i : i + batch], y[i : i + batch], index[i : i + batch], 0))
                for i in range(0, count, batch)]  # fmt: skip

    warm = Decomposition(measure.attack.replace(steps=2), full_budget_parts=False)
    warm.measure(models, make_batch(x[:4], y[:4], index[:4], 0))
    records: list[dict] = []
    with PeakMemory(opts.device) as memory, _split_timers(measure, opts.device) as spent:
        total = timed(lambda: records.extend(decompose_all()), opts.device)
    peak = memory.mb
    correct = torch.cat([r["correct"] for r in records])
    fooled = {name: torch.cat([r[f"{name}_success"] for r in records]).sum().item() for name in measure.arms}
    trained = opts.classifier is not None and opts.autoencoder is not None
    weights = "trained" if trained else "RANDOM weights: early-stop timings not meaningful"
    a = measure.attack
    setting = (
        f"one timed run; {count} {source}, batch {batch}, {a.norm} eps {a.eps:g}, {a.steps} steps of {a.step_size}, "
        f"early stop, arms {'/'.join(measure.arms)}; classifier {model_weights}, autoencoder {ae_weights}"
    )
    rows = [
        Row(
            "callback/total",
            total,
            target=TOTAL_TARGET,
            peak_mb=peak,
            note=f"{weights}; clean acc {correct.float().mean().item():.1%}; {setting}",
        ),
        Row("callback/tangent basis", spent["tangent"], peak_mb=peak, note=f"{spent['tangent'] / total:.0%} of total"),
    ]
    for name in measure.arms:
        note = f"{spent[name] / total:.0%} of total; fooled {fooled[name]} of {correct.sum().item()} correct"
        rows.append(Row(f"callback/attack {name}", spent[name], peak_mb=peak, note=note))
    return rows
