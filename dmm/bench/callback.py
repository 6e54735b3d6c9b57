"""[callback] The decomposition the ManifoldDecomposition callback runs: 1000 MNIST val images, batch 250.

``dmm.decomposition.measure`` is called exactly as the callback calls it, with the callback's default
:class:`AttackSettings` (L2, eps 4, 100 steps of 0.05, early stop). The split into tangent basis and
the three attacks comes from timers wrapped around the two functions ``measure`` looks up in its module,
so nothing runs twice. With early stop the attacks' cost depends on how robust the classifier is:
the figures only mean something with trained checkpoints (``--classifier``, ``--autoencoder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import torch

from dmm import decomposition
from dmm.bench.core import Options, PeakMemory, Row, Target, synchronize, timed
from dmm.bench.inputs import autoencoder, classifier, images
from dmm.decomposition import ATTACKS, AttackSettings, measure

TOTAL_TARGET = Target(60.0, of="ours")  # seconds for 1000 images on 2 CPU cores


@contextlib.contextmanager
def _split_timers(device: str) -> Iterator[dict[str, float]]:
    """Seconds spent in ``tangent_space`` and in each attack of ``measure``, summed over calls."""
    spent = dict.fromkeys(("tangent", *ATTACKS), 0.0)
    originals = decomposition.tangent_space, decomposition.pgd
    calls = 0

    def tangent_space(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = originals[0](*args, **kwargs)
        synchronize(device)
        spent["tangent"] += time.perf_counter() - start
        return out

    def pgd(*args, **kwargs):
        nonlocal calls
        name = ATTACKS[calls % len(ATTACKS)]  # measure attacks in ATTACKS order: full, on, off
        calls += 1
        synchronize(device)
        start = time.perf_counter()
        out = originals[1](*args, **kwargs)
        synchronize(device)
        spent[name] += time.perf_counter() - start
        return out

    decomposition.tangent_space, decomposition.pgd = tangent_space, pgd
    try:
        yield spent
    finally:
        decomposition.tangent_space, decomposition.pgd = originals


def run(opts: Options) -> list[Row]:
    count, batch = (16, 8) if opts.quick else (1000, 250)
    settings = dataclasses.replace(AttackSettings(), steps=5) if opts.quick else AttackSettings()
    model, model_weights = classifier(opts)
    ae, ae_weights = autoencoder(opts)
    x, y, source = images(opts, count)
    generator = torch.Generator(device=opts.device).manual_seed(0)

    def decompose_all() -> list[dict]:
        return [
            measure(model, ae.encoder, ae.decoder, x[i : i + batch], y[i : i + batch], settings, generator=generator)
            for i in range(0, count, batch)
        ]

    measure(model, ae.encoder, ae.decoder, x[:4], y[:4], dataclasses.replace(settings, steps=2))  # warm-up
    records: list[dict] = []
    with PeakMemory(opts.device) as memory, _split_timers(opts.device) as spent:
        total = timed(lambda: records.extend(decompose_all()), opts.device)
    peak = memory.mb
    correct = torch.cat([r["correct"] for r in records])
    fooled = {name: torch.cat([r[f"{name}_success"] for r in records]).sum().item() for name in ATTACKS}
    trained = opts.classifier is not None and opts.autoencoder is not None
    weights = "trained" if trained else "RANDOM weights: early-stop timings not meaningful"
    setting = (
        f"one timed run; {count} {source}, batch {batch}, {settings.norm} eps {settings.eps:g}, "
        f"{settings.steps} steps of {settings.step_size}, early stop; "
        f"classifier {model_weights}, autoencoder {ae_weights}"
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
    for name in ATTACKS:
        note = f"{spent[name] / total:.0%} of total; fooled {fooled[name]} of {correct.sum().item()} correct"
        rows.append(Row(f"callback/attack {name}", spent[name], peak_mb=peak, note=note))
    return rows
