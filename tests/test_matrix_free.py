"""The matrix-free tangent projection against the dense Subspace, in PGD and in the decomposition measure."""

from __future__ import annotations

import pytest
import torch
from test_manifold import LinearDecoder
from torch import nn

import dmm.manifold.tangent as tangent_module
import dmm.measures.decomposition as decomposition_module
from dmm import manifold
from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.manifold import MatrixFreeTangent, Subspace, project_tangent
from dmm.measures import Decomposition, Models, make_batch
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
def test_matches_dense_subspace(name: str, dtype: torch.dtype, tol: float, bound: float) -> None:
    torch.manual_seed(0)
    decoder, k = DECODERS[name]()
    decoder = decoder.to(dtype)
    decoder.train()  # the solver must linearise in eval mode and give the mode back
    z = torch.randn(4, k, dtype=dtype)
    d = torch.randn(4, *decoder.eval()(z).shape[1:], dtype=dtype)
    decoder.train()
    dense = Subspace(manifold.tangent_basis(decoder, z))
    on, off = dense.split(d)
    free = MatrixFreeTangent(decoder, z, tol=tol)
    free_on, free_off = free.split(d)
    assert decoder.training
    assert relative_error(free_on, on) < bound
    assert relative_error(free_off, off) < bound
    assert (free.last.residual < tol).all() and (free.last.iterations <= 3 * k).all()
    assert torch.allclose(free.fraction(d), dense.fraction(d), atol=bound)
    # The complement: the parts swap, its fraction is the dense complement's.
    off_first, on_second = free.complement().split(d)
    assert relative_error(off_first, off) < bound and relative_error(on_second, on) < bound
    assert torch.allclose(free.complement().fraction(d), dense.complement().fraction(d), atol=bound)


def test_projection_is_idempotent_and_orthogonal_within_tolerance() -> None:
    torch.manual_seed(0)
    decoder = MLPDecoder(4, (1, 8, 8), hidden=(32, 32))
    z, d = torch.randn(6, 4), torch.randn(6, 1, 8, 8)
    free = MatrixFreeTangent(decoder, z, tol=1e-6)
    index = torch.arange(6)
    on, off = free.split(d)
    assert torch.equal(off, d - on)
    assert relative_error(free(on, index), on) < 1e-4  # P P d = P d
    assert ((on * off).flatten(1).sum(1).abs() / (on.flatten(1).norm(dim=1) * d.flatten(1).norm(dim=1))).max() < 1e-4
    # A perturbation orthogonal to the tangent space up to rounding: stopped by the orthogonality test at once.
    solve = project_tangent(decoder, z, off - free(off, index))
    assert solve.on.abs().max() < 1e-5 and (solve.iterations <= 1).all()


def test_complement_shares_the_space_and_keeps_its_own_last_solve() -> None:
    decoder = MLPDecoder(3, (1, 4, 4), hidden=(8,))
    z, d = torch.randn(3, 3), torch.randn(3, 1, 4, 4)
    free = MatrixFreeTangent(decoder, z)
    other = free.complement()
    assert other.is_complement and not free.is_complement and other.complement().is_complement is False
    assert other.decoder is free.decoder and other.z is free.z
    other.split(d)
    assert other.last is not None and free.last is None


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
    dense = Subspace(manifold.tangent_basis(decoder, z))
    v, index = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([4, 1])
    free = MatrixFreeTangent(decoder, z, tol=1e-12)
    with torch.inference_mode():
        on, off = free(v, index), free.complement()(v, index)
        fraction = free.fraction(v, index)
    assert relative_error(on, dense(v, index)) < 1e-9
    assert relative_error(off, dense.complement()(v, index)) < 1e-9
    assert torch.allclose(fraction, dense.fraction(v, index), atol=1e-9)


@pytest.mark.parametrize("complement", [False, True])
def test_pgd_hook_keeps_the_perturbation_in_its_subspace(complement: bool) -> None:
    torch.manual_seed(0)
    shape, k = (1, 8, 8), 3
    classifier = MLP(shape, 3, hidden=(32,), dropout=0.0)
    decoder = MLPDecoder(k, shape, hidden=(16,))
    x, y, z = torch.rand(8, *shape), torch.randint(0, 3, (8,)), torch.randn(8, k)
    dense = Subspace(manifold.tangent_basis(decoder, z))
    free = MatrixFreeTangent(decoder, z, tol=1e-6)
    if complement:
        dense, free = dense.complement(), free.complement()
    attack = PGD(eps=1.0, steps=5, step_size=0.3, clamp=False)
    delta = attack(classifier, x, y, free) - x
    outside = dense.complement().fraction(delta)
    # The on-attack is a sum of J c products: in the tangent space to rounding, not only to the tolerance.
    assert outside.max() < (1e-3 if complement else 1e-5)
    assert relative_error(delta, attack(classifier, x, y, dense) - x) < 1e-3


@pytest.fixture
def models() -> Models:
    torch.manual_seed(0)
    shape = (1, 8, 8)
    return Models(
        MLP(shape, 3, hidden=(32,), dropout=0.0),
        MLPEncoder(shape, 3, hidden=(16,)),
        MLPDecoder(3, shape, hidden=(16,)),
    )


def _matrix_free_above(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make the measure's tangent_subspace go matrix-free for n * k above ``limit``."""
    real = manifold.tangent_subspace
    monkeypatch.setattr(
        decomposition_module, "tangent_subspace", lambda decoder, z, n: real(decoder, z, n, dense_limit=limit)
    )


def test_measure_goes_matrix_free_above_the_limit(models, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 1, 8, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    measure = Decomposition(attack=PGD(eps=2.0, steps=20, step_size=0.1, clamp=False, early_stop=True), nulls=[])
    dense = measure.measure(models, make_batch(x, y, torch.arange(32), seed=0))

    def no_dense_basis(*args, **kwargs):
        raise AssertionError("measure formed a dense tangent basis above DENSE_LIMIT")

    _matrix_free_above(monkeypatch, 8 * 8 * 3 - 1)  # n * k = 192 is now too big
    monkeypatch.setattr(tangent_module, "tangent_space", no_dense_basis)
    free = measure.measure(models, make_batch(x, y, torch.arange(32), seed=0))
    assert free.keys() == dense.keys()
    assert free["tangent_condition"].isnan().all() and torch.isfinite(dense["tangent_condition"]).all()
    assert torch.equal(free["full_l2"], dense["full_l2"])  # the unconstrained attack needs no projector
    assert torch.allclose(free["on_fraction"], dense["on_fraction"], atol=1e-4)
    assert torch.allclose(free["on_l2"], dense["on_l2"], atol=1e-3)
    assert torch.allclose(free["off_l2"], dense["off_l2"], atol=1e-3)
    assert free["leak_on"].max() < 1e-5 and free["leak_off"].max() < 1e-3  # clamp=False: no box leak
    a, b = measure.summarize(free), measure.summarize(dense)
    for key in a:
        if key.startswith(("tangent_condition", "random_fraction")):
            continue
        assert a[key] == pytest.approx(b[key], abs=1e-3, nan_ok=True), key
    assert a["random_fraction_mean"] == pytest.approx(b["random_fraction_mean"], rel=0.25)


def test_measure_refuses_random_arms_matrix_free(models, monkeypatch: pytest.MonkeyPatch) -> None:
    _matrix_free_above(monkeypatch, 0)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    measure = Decomposition(attack=PGD(eps=1.0, steps=2), nulls=["random"])
    with pytest.raises(DmmError, match="dense basis"):
        measure.measure(models, make_batch(x, y, torch.arange(2), 0))


def test_measure_warns_when_solves_stop_short(models, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    _matrix_free_above(monkeypatch, 0)
    monkeypatch.setattr(tangent_module, "MATRIX_FREE_MAX_ITER", 1)
    with caplog.at_level("WARNING", logger="dmm.measures.decomposition"):
        Decomposition(attack=PGD(eps=1.0, steps=2), nulls=[]).measure(models, make_batch(x, y, torch.arange(4), 0))
    assert "stopped at max_iter=1" in caplog.text


@pytest.mark.parametrize("settings", [{"tol": 0.0}, {"tol": -1e-5}, {"max_iter": 0}])
def test_bad_arguments_are_reported(settings) -> None:
    with pytest.raises(DmmError, match="tol"):
        MatrixFreeTangent(nn.Identity(), torch.zeros(1, 2), **settings)
