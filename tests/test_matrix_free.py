"""The matrix-free tangent projection against the dense basis, its hooks in PGD and in ``measure``."""

from __future__ import annotations

import math

import pytest
import torch
from test_manifold import LinearDecoder
from torch import nn

from dmm import decomposition, manifold
from dmm.attacks import pgd
from dmm.decomposition import AttackSettings, measure, summarize
from dmm.errors import DmmError
from dmm.manifold import MatrixFreeTangent, project_tangent, random_subspace_fraction
from dmm.nets import MLP, ConvDecoder, MLPDecoder, MLPEncoder


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over samples of ||a - b|| / ||b||."""
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


DECODERS = {
    "linear": lambda: (LinearDecoder(5, (1, 6, 6)), 5),
    "mlp": lambda: (MLPDecoder(4, (1, 8, 8), hidden=(32, 32)), 4),
    "conv": lambda: (ConvDecoder(6, (1, 28, 28), channels=(16, 8, 8, 4)), 6),
}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize(("dtype", "tol", "bound"), [(torch.float32, 1e-5, 1e-3), (torch.float64, 1e-12, 1e-9)])
def test_matches_dense_decompose(name: str, dtype: torch.dtype, tol: float, bound: float) -> None:
    torch.manual_seed(0)
    decoder, k = DECODERS[name]()
    decoder = decoder.to(dtype)
    decoder.train()  # the solver must linearise in eval mode and give the mode back
    z = torch.randn(4, k, dtype=dtype)
    d = torch.randn(4, *decoder.eval()(z).shape[1:], dtype=dtype)
    decoder.train()
    q = manifold.tangent_basis(decoder, z)
    on, off = manifold.decompose(d, q)
    free = MatrixFreeTangent(decoder, z, tol=tol)
    free_on, free_off = free.decompose(d)
    assert decoder.training
    assert relative_error(free_on, on) < bound
    assert relative_error(free_off, off) < bound
    assert (free.last.residual < tol).all() and (free.last.iterations <= 3 * k).all()
    fraction = free.on_fraction(d)
    assert torch.allclose(fraction, manifold.on_fraction(d, q), atol=bound)


def test_projection_is_idempotent_and_orthogonal_within_tolerance() -> None:
    torch.manual_seed(0)
    decoder = MLPDecoder(4, (1, 8, 8), hidden=(32, 32))
    z, d = torch.randn(6, 4), torch.randn(6, 1, 8, 8)
    free = MatrixFreeTangent(decoder, z, tol=1e-6)
    on, off = free.decompose(d)
    assert torch.equal(off, d - on)
    assert relative_error(free.project(on), on) < 1e-4  # P P d = P d
    assert ((on * off).flatten(1).sum(1).abs() / (on.flatten(1).norm(dim=1) * d.flatten(1).norm(dim=1))).max() < 1e-4
    # A perturbation orthogonal to the tangent space up to rounding: stopped by the orthogonality test at once.
    solve = project_tangent(decoder, z, off - free.project(off))
    assert solve.on.abs().max() < 1e-5 and (solve.iterations <= 1).all()


def test_rank_deficient_decoder_projects_onto_its_column_space() -> None:
    """Where the dense QR basis has a spurious column (condition ~1e16), the solve still projects exactly."""
    decoder = LinearDecoder(3, (1, 4, 4)).double()
    with torch.no_grad():
        decoder.linear.weight[:, 2] = decoder.linear.weight[:, 0]  # rank 2, not 3
    a = decoder.linear.weight.detach()[:, :2]
    d = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    reference = (a @ torch.linalg.solve(a.T @ a, a.T @ d.flatten(1).T)).T
    solve = project_tangent(decoder, torch.zeros(2, 3, dtype=torch.float64), d, tol=1e-12)
    assert relative_error(solve.on.flatten(1), reference) < 1e-9


def test_hooks_select_rows_and_work_under_inference_mode() -> None:
    torch.manual_seed(0)
    decoder = MLPDecoder(3, (1, 4, 4), hidden=(8,)).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    q = manifold.tangent_basis(decoder, z)
    v, index = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([4, 1])
    free = MatrixFreeTangent(decoder, z, tol=1e-12)
    with torch.inference_mode():
        on, off = free.projector()(v, index), free.projector(off=True)(v, index)
    dense_on, dense_off = manifold.decompose(v, q[index])
    assert relative_error(on, dense_on) < 1e-9 and relative_error(off, dense_off) < 1e-9


@pytest.mark.parametrize("off", [False, True])
def test_pgd_hook_keeps_the_perturbation_in_its_subspace(off: bool) -> None:
    torch.manual_seed(0)
    shape, k = (1, 8, 8), 3
    classifier = MLP(shape, 3, hidden=(32,), dropout=0.0)
    decoder = MLPDecoder(k, shape, hidden=(16,))
    x, y, z = torch.rand(8, *shape), torch.randint(0, 3, (8,)), torch.randn(8, k)
    q = manifold.tangent_basis(decoder, z)
    hook = MatrixFreeTangent(decoder, z, tol=1e-6).projector(off=off)
    kwargs = dict(eps=1.0, steps=5, step_size=0.3, clamp=False)
    delta = pgd(classifier, x, y, project=hook, **kwargs) - x
    on, rest = manifold.decompose(delta, q)
    # The on-attack is a sum of J c products: in the tangent space to rounding, not only to the tolerance.
    outside = (on if off else rest).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
    assert outside.max() < (1e-3 if off else 1e-5)
    dense = pgd(classifier, x, y, project=manifold.projector(q, off=off), **kwargs) - x
    assert relative_error(delta, dense) < 1e-3


@pytest.fixture
def models() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    shape = (1, 8, 8)
    return (
        MLP(shape, 3, hidden=(32,), dropout=0.0),
        MLPEncoder(shape, 3, hidden=(16,)),
        MLPDecoder(3, shape, hidden=(16,)),
    )


def test_measure_goes_matrix_free_above_the_limit(models, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 1, 8, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    settings = AttackSettings(eps=2.0, steps=20, step_size=0.1, clamp=False)
    dense = measure(*models, x, y, settings, generator=torch.Generator().manual_seed(0))

    def no_dense_basis(*args, **kwargs):
        raise AssertionError("measure formed a dense tangent basis above DENSE_LIMIT")

    monkeypatch.setattr(decomposition, "DENSE_LIMIT", 8 * 8 * 3 - 1)  # n * k = 192 is now too big
    monkeypatch.setattr(decomposition, "tangent_space", no_dense_basis)
    free = measure(*models, x, y, settings, generator=torch.Generator().manual_seed(0))
    assert free.keys() == dense.keys()
    assert free["tangent_condition"].isnan().all()
    assert torch.equal(free["full_l2"], dense["full_l2"])  # the unconstrained attack needs no projector
    assert torch.allclose(free["on_fraction"], dense["on_fraction"], atol=1e-4)
    assert torch.allclose(free["on_l2"], dense["on_l2"], atol=1e-3)
    assert torch.allclose(free["off_l2"], dense["off_l2"], atol=1e-3)
    assert free["leak_on"].max() < 1e-5 and free["leak_off"].max() < 1e-3  # clamp=False: no box leak
    a, b = summarize(free, [0.5, 1.0]), summarize(dense, [0.5, 1.0])
    for key in a:
        if key.startswith(("tangent_condition", "random_fraction")):
            continue
        assert a[key] == pytest.approx(b[key], abs=1e-3), key
    assert a["random_fraction_mean"] == pytest.approx(b["random_fraction_mean"], rel=0.25)


def test_beta_baseline_matches_random_bases() -> None:
    n, k, samples = 784, 16, 2000
    generator = torch.Generator().manual_seed(0)
    d = torch.randn(samples, n, generator=generator)
    dense = manifold.on_fraction(d, manifold.random_basis(samples, n, k, generator=generator))
    state = torch.get_rng_state()
    beta = random_subspace_fraction(d, k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # seeded from the generator, the global RNG untouched
    assert torch.equal(beta, random_subspace_fraction(d, k, generator=torch.Generator().manual_seed(1)))
    assert beta.mean().item() == pytest.approx(dense.mean().item(), rel=0.02)
    assert beta.std().item() == pytest.approx(dense.std().item(), rel=0.1)
    assert beta.mean().item() == pytest.approx(math.sqrt(k / n), rel=0.03)
    # One generator per sample: a sample's draw does not depend on the batch it is in.
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    alone = random_subspace_fraction(d[2:3], k, generator=[torch.Generator().manual_seed(2)])
    assert random_subspace_fraction(d[:4], k, generator=generators)[2] == alone[0]
    d[:3] = 0
    assert (random_subspace_fraction(d, k)[:3] == 0).all()
    assert (random_subspace_fraction(d[3:], n) == 1).all()


def test_measure_warns_when_solves_stop_short(models, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    monkeypatch.setattr(decomposition, "DENSE_LIMIT", 0)
    monkeypatch.setattr(decomposition, "MATRIX_FREE_MAX_ITER", 1)
    with caplog.at_level("WARNING", logger="dmm.decomposition"):
        measure(*models, x, y, AttackSettings(eps=1.0, steps=2))
    assert "stopped at max_iter=1" in caplog.text


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(DmmError, match="tol"):
        MatrixFreeTangent(nn.Identity(), torch.zeros(1, 2), tol=0.0)
    with pytest.raises(DmmError, match="k must be"):
        random_subspace_fraction(torch.ones(2, 4), 5)
