"""The protocol redesign changed no figure: records and summaries equal those of dmm before it, field by field.

``tests/data/legacy_measures.json`` holds the per-image records and summaries that dmm computed at commit
89f0bcc (the script that made them is stored in the file's ``source`` field) on seeded tiny models and a
seeded batch. The measures recompute them here with the same models and images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dmm.attacks import PGD
from dmm.manifold import Subspace, random_basis, tangent_basis
from dmm.measures import Batch, Decomposition, Detection, Geometry, Models
from dmm.nets import MLP, MLPDecoder, MLPEncoder

SHAPE = (1, 8, 8)
LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_measures.json").read_text())


@pytest.fixture(scope="module")
def setup() -> tuple[Models, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    models = Models(MLP(SHAPE, 3, hidden=(32,), dropout=0.0), MLPEncoder(SHAPE, 3, hidden=(16,)),
                    MLPDecoder(3, SHAPE, hidden=(16,)))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    return models, torch.rand(32, *SHAPE, generator=g), torch.randint(0, 3, (32,), generator=g)


def _batch(x, y) -> Batch:
    return Batch(x, y, torch.arange(len(y)), [torch.Generator().manual_seed(1000 + i) for i in range(len(y))])


def _equal(u, v) -> bool:
    """Flags and counts exactly; floats to float32 rounding (1e-6 relative: the same computation, but torch
    releases may order a reduction differently — the lowest-versions job runs torch 2.4)."""
    if isinstance(u, float) or isinstance(v, float):
        return (math.isnan(u) and math.isnan(v)) or math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-7)
    return u == v


def _same(new: dict, old: dict, keys=None) -> None:
    for key in keys or old:
        a = new[key].tolist() if isinstance(new[key], torch.Tensor) else new[key]
        b = old[key]
        if isinstance(b, list):
            assert len(a) == len(b), key
            for u, v in zip(a, b, strict=True):
                assert _equal(u, v), (key, u, v)
        else:
            assert _equal(a, b), (key, a, b)


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("nulls", [[], ["random"], ["random", "support"]])
def test_decomposition_unchanged(setup, clamp: bool, nulls: list[str]) -> None:
    models, x, y = setup
    old = LEGACY[f"decomposition_clamp={clamp}"]
    measure = Decomposition(PGD(eps=2.0, steps=30, step_size=0.1, clamp=clamp, early_stop=True), nulls, [0.5, 1.0])
    records = measure.measure(models, _batch(x, y))
    _same(records, old["records"])
    _same(measure.summarize(records), old["summary"])


def test_detection_unchanged(setup) -> None:
    models, x, y = setup
    old = LEGACY["detection"]
    measure = Detection(PGD(eps=1.0, steps=10), [0.5, 1.0])
    records = measure.measure(models, _batch(x, y))
    _same(records, old["records"])
    summary = measure.summarize(records)
    _same(summary, old["summary"], [k for k in old["summary"] if "auroc" not in k])
    for key in ("detect/auroc_recon", "detect/auroc_offmanifold"):  # torchmetrics then, exact ranks now
        assert summary[key] == pytest.approx(old["summary"][key], abs=1e-6)


def test_geometry_unchanged(setup) -> None:
    models, x, y = setup
    old = LEGACY["dynamics"]
    with torch.no_grad():
        basis = tangent_basis(models.decoder, models.encoder(x))
    random = random_basis(*basis.shape, generator=torch.Generator().manual_seed(7))
    measure = Geometry(PGD(eps=2.0, steps=40, step_size=0.05, early_stop=True), random_arm=True)
    records = measure.measure_at(models.classifier, x, y, Subspace(basis), Subspace(random))
    _same(records, old["records"])
    _same(measure.summarize(records), old["summary"])
