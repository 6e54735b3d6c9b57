"""Tangent spaces and the decomposition, proved by properties and an independent brute-force Jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmm import manifold
from dmm.errors import DmmError
from dmm.nets import ConvDecoder, MLPDecoder


class LinearDecoder(nn.Module):
    """D(z) = A z + b reshaped to images: its tangent space is exactly the column space of A."""

    def __init__(self, k: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.linear = nn.Linear(k, math.prod(shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z).view(-1, *self.shape)


def brute_force_jacobian(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """(B, n, k) by reverse mode, one sample at a time (the public replication's method, small here)."""
    decoder.eval()

    def single(v: torch.Tensor) -> torch.Tensor:
        return decoder(v[None]).flatten()

    return torch.stack([torch.autograd.functional.jacobian(single, v) for v in z])


def test_linear_decoder_basis_spans_exactly_its_column_space() -> None:
    torch.manual_seed(0)
    decoder = LinearDecoder(5, (1, 6, 6)).double()
    z = torch.randn(3, 5, dtype=torch.float64)
    q = manifold.tangent_basis(decoder, z)
    a = decoder.linear.weight.detach()  # (n, k)
    assert q.shape == (3, 36, 5)
    assert torch.allclose(q.transpose(1, 2) @ q, torch.eye(5, dtype=q.dtype).expand(3, 5, 5), atol=1e-12)
    exact = torch.linalg.qr(a).Q.expand(3, -1, -1)
    assert manifold.principal_angles(exact, q).max() < 1e-7
    # The projection equals the least-squares projector A (A^T A)^-1 A^T.
    d = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    on, _ = manifold.decompose(d, q)
    reference = (a @ torch.linalg.solve(a.T @ a, a.T @ d.flatten(1).T)).T
    assert torch.allclose(on.flatten(1), reference, atol=1e-10)


@pytest.mark.parametrize(
    ("decoder", "k"),
    [(MLPDecoder(4, (1, 8, 8), hidden=(32, 32)), 4), (ConvDecoder(6, (1, 28, 28), channels=(16, 8, 8, 4)), 6)],
)
def test_basis_matches_brute_force_jacobian(decoder: nn.Module, k: int) -> None:
    torch.manual_seed(0)
    decoder.train()  # BatchNorm in train mode: tangent_basis must use eval statistics and restore the mode
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        decoder(3 * torch.randn(16, k))
    z = torch.randn(5, k)
    jacobian = manifold.decoder_jacobian(decoder, z)
    assert decoder.training
    reference = brute_force_jacobian(decoder, z)
    decoder.train()
    assert torch.allclose(jacobian, reference, atol=1e-5 * reference.abs().max().item())
    angles = manifold.principal_angles(manifold.orthonormalize(reference).basis, manifold.tangent_basis(decoder, z))
    assert angles.max() < 1e-4


def test_chunked_jacobian_equals_unchunked() -> None:
    torch.manual_seed(0)
    decoder = MLPDecoder(6, (1, 5, 5), hidden=(16,))
    z = torch.randn(4, 6)
    assert torch.allclose(manifold.decoder_jacobian(decoder, z), manifold.decoder_jacobian(decoder, z, chunk_size=2))


def test_works_under_inference_mode_like_lightning_validation() -> None:
    decoder = MLPDecoder(3, (1, 4, 4), hidden=(8,))
    z = torch.randn(2, 3)
    expected = manifold.tangent_basis(decoder, z)
    with torch.inference_mode():
        q = manifold.tangent_basis(decoder, z)
    assert torch.allclose(q, expected)


def test_singular_values_flag_a_degenerate_decoder() -> None:
    decoder = LinearDecoder(3, (1, 4, 4)).double()
    with torch.no_grad():
        decoder.linear.weight[:, 2] = decoder.linear.weight[:, 0]  # rank 2, not 3
    space = manifold.tangent_space(decoder, torch.zeros(1, 3, dtype=torch.float64))
    assert space.singular_values[0, -1] < 1e-12 * space.singular_values[0, 0]
    assert space.condition[0] > 1e10


def test_decomposition_is_exact_orthogonal_and_idempotent() -> None:
    torch.manual_seed(0)
    q = manifold.random_basis(4, 3 * 5 * 5, 7)
    d = torch.randn(4, 3, 5, 5)
    on, off = manifold.decompose(d, q)
    assert on.shape == d.shape and off.shape == d.shape
    assert torch.equal(on + off, on + (d - on))  # off is d - on by construction ...
    assert torch.allclose(on + off, d, atol=1e-6)  # ... so the parts add up to d
    assert (on.flatten(1) * off.flatten(1)).sum(1).abs().max() < 1e-5
    on_again, off_again = manifold.decompose(on, q)
    assert torch.allclose(on_again, on, atol=1e-6) and off_again.abs().max() < 1e-6
    fraction = manifold.on_fraction(d, q)
    assert torch.allclose(fraction, on.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1), atol=1e-6)
    assert torch.equal(manifold.on_fraction(torch.zeros_like(d), q), torch.zeros(4))  # 0, not NaN


# --- Subspace: the split and the attacks' projector --------------------------------------------------------


def test_subspace_split_sums_orthogonal_and_complement_swaps() -> None:
    g = torch.Generator().manual_seed(0)
    q = manifold.random_basis(4, 48, 6, generator=g, dtype=torch.float64)
    d = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    space = manifold.Subspace(q)
    inside, outside = space.split(d)
    assert torch.allclose(inside + outside, d, atol=1e-12)
    assert (inside * outside).flatten(1).sum(1).abs().max() < 1e-12
    # An independent reference: the least-squares projection onto the span of the columns.
    coef = torch.linalg.lstsq(q, d.flatten(1)[..., None]).solution
    assert torch.allclose(inside.flatten(1), (q @ coef).squeeze(-1), atol=1e-12)
    swapped = space.complement().split(d)
    assert torch.equal(swapped[0], outside) and torch.equal(swapped[1], inside)
    again = space.complement().complement()
    assert not again.is_complement and torch.equal(again.split(d)[0], inside)
    f, f_off = space.fraction(d), space.complement().fraction(d)
    assert torch.allclose(f**2 + f_off**2, torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(f_off, outside.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1), atol=1e-12)


def test_complement_fraction_is_a_residual_norm_accurate_when_tiny() -> None:
    """d almost wholly in the subspace (off part 1e-4 of it): the complement's fraction must come from the
    residual d - QQ^T d, not from sqrt(1 - f^2), which float32 rounds to 0 here (f rounds to 1)."""
    g = torch.Generator().manual_seed(1)
    q64 = manifold.random_basis(3, 64, 5, generator=g, dtype=torch.float64)
    inside = (q64 @ torch.randn(3, 5, 1, generator=g, dtype=torch.float64)).squeeze(-1)
    noise = torch.randn(3, 64, generator=g, dtype=torch.float64)
    noise -= (q64 @ (q64.transpose(1, 2) @ noise[..., None])).squeeze(-1)  # orthogonal to the subspace
    d64 = inside + 1e-4 * noise * (inside.norm(dim=1) / noise.norm(dim=1))[:, None]
    reference = 1e-4 / math.sqrt(1 + 1e-8)  # ||off|| / ||d|| exactly, by construction
    f_off = manifold.Subspace(q64.float(), complement=True).fraction(d64.float())
    assert torch.allclose(f_off.double(), torch.full((3,), reference, dtype=torch.float64), rtol=2e-2)
    f = manifold.Subspace(q64.float()).fraction(d64.float())
    assert (torch.sqrt((1 - f**2).clamp_min(0)) < 0.5 * reference).any()  # what the shortcut would give


def test_projector_call_matches_split_on_rows() -> None:
    torch.manual_seed(0)
    q = manifold.random_basis(5, 16, 3)
    v = torch.randn(2, 1, 4, 4)
    index = torch.tensor([4, 1])
    on, off = manifold.decompose(v, q[index])
    space = manifold.Subspace(q)
    assert torch.allclose(space(v, index), on) and torch.allclose(space.complement()(v, index), off)
    assert torch.equal(space.split(v, index)[0], space(v, index))
    assert torch.allclose(space.fraction(v, index), manifold.on_fraction(v, q[index]))
    for i, row in enumerate(index):  # row by row, its own basis
        assert torch.allclose(space(v[i : i + 1], row[None]), manifold.decompose(v[i : i + 1], q[row, None])[0])


def test_subspace_rejects_a_basis_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError):
        manifold.Subspace(torch.zeros(16, 3))
    with pytest.raises(ValueError):
        manifold.Subspace(torch.zeros(1, 3, 16))


def test_tangent_subspace_of_a_linear_decoder_is_the_span_of_its_weights() -> None:
    """D(z) = W z + b: the tangent space is span(W) at every z and J = W, so cond(J) = cond(W)."""
    torch.manual_seed(0)
    decoder = LinearDecoder(4, (1, 5, 5)).double()
    z = 3 * torch.randn(3, 4, dtype=torch.float64)
    space, condition = manifold.tangent_subspace(decoder, z, 25)
    w = decoder.linear.weight.detach()
    assert isinstance(space, manifold.Subspace)
    assert manifold.principal_angles(torch.linalg.qr(w).Q.expand(3, -1, -1), space.basis).max() < 1e-7
    assert torch.allclose(condition, torch.linalg.cond(w).expand(3), rtol=1e-10)
    d = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    on, off = space.split(d)
    reference = (w @ torch.linalg.solve(w.T @ w, w.T @ d.flatten(1).T)).T
    assert torch.allclose(on.flatten(1), reference, atol=1e-10)
    assert (w.T @ off.flatten(1).T).abs().max() < 1e-10  # the rest is orthogonal to every column of W


def test_tangent_subspace_goes_matrix_free_above_the_limit() -> None:
    decoder = MLPDecoder(3, (1, 4, 4), hidden=(8,))
    z = torch.randn(2, 3)
    free, condition = manifold.tangent_subspace(decoder, z, 16, dense_limit=16 * 3 - 1)
    assert isinstance(free, manifold.MatrixFreeTangent) and condition.isnan().all() and condition.shape == (2,)
    dense, condition = manifold.tangent_subspace(decoder, z, 16, dense_limit=16 * 3)
    assert isinstance(dense, manifold.Subspace) and torch.isfinite(condition).all()


# --- the null models ---------------------------------------------------------------------------------------


def _within(samples: torch.Tensor, mean: float, sigmas: float = 4.0) -> bool:
    """Whether the sample mean is within ``sigmas`` standard errors of ``mean``."""
    error = samples.std().item() / math.sqrt(samples.numel())
    return abs(samples.mean().item() - mean) < sigmas * error


def test_random_fraction_mean_closed_forms() -> None:
    assert manifold.random_fraction_mean(1, 2) == pytest.approx(2 / math.pi)  # E|cos| on the circle
    assert manifold.random_fraction_mean(1, 3) == pytest.approx(0.5)  # E|u_1| on the sphere (Archimedes)
    assert manifold.random_fraction_mean(5, 5) == pytest.approx(1.0)
    assert manifold.random_fraction_mean(16, 784) == pytest.approx(math.sqrt(16 / 784), rel=0.02)
    assert manifold.random_fraction_mean(16, 784) < math.sqrt(16 / 784)  # Jensen: E sqrt(X) < sqrt(E X)


def test_random_subspaces_match_the_exact_mean() -> None:
    """2000 random 8-dim subspaces of R^100 (float64): the mean fraction of a vector in them, and in their
    complements, is E ||Pu|| within a few standard errors, by the dense bases and by the Beta draw."""
    n, k, samples = 100, 8, 2000
    g = torch.Generator().manual_seed(0)
    q = manifold.random_basis(samples, n, k, generator=g, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64).expand(samples, k, k)
    assert torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-12)
    d = torch.randn(samples, n, generator=g, dtype=torch.float64)
    space = manifold.Subspace(q)
    assert _within(space.fraction(d), manifold.random_fraction_mean(k, n))
    assert _within(space.complement().fraction(d), manifold.random_fraction_mean(n - k, n))
    beta = manifold.random_subspace_fraction(d, k, generator=torch.Generator().manual_seed(1))
    assert beta.dtype == torch.float64 and _within(beta, manifold.random_fraction_mean(k, n))
    assert beta.std().item() == pytest.approx(space.fraction(d).std().item(), rel=0.1)
    # The check has power: a subspace one dimension larger or smaller would be rejected.
    assert not _within(beta, manifold.random_fraction_mean(k + 1, n))
    assert not _within(beta, manifold.random_fraction_mean(k - 1, n))


def test_random_subspace_fraction_seeding_and_edge_cases() -> None:
    n, k = 784, 16
    d = torch.randn(8, n, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    beta = manifold.random_subspace_fraction(d, k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # seeded from the generator, the global RNG untouched
    assert torch.equal(beta, manifold.random_subspace_fraction(d, k, generator=torch.Generator().manual_seed(1)))
    # One generator per sample: a sample's draw does not depend on the batch it is in.
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    alone = manifold.random_subspace_fraction(d[2:3], k, generator=[torch.Generator().manual_seed(2)])
    assert manifold.random_subspace_fraction(d[:4], k, generator=generators)[2] == alone[0]
    d[:3] = 0
    assert (manifold.random_subspace_fraction(d, k)[:3] == 0).all()
    assert (manifold.random_subspace_fraction(d[3:], n) == 1).all()
    assert (manifold.random_subspace_fraction(d[3:], 0) == 0).all()
    with pytest.raises(DmmError, match="k must be"):
        manifold.random_subspace_fraction(torch.ones(2, 4), 5)
    with pytest.raises(DmmError, match="generators"):
        manifold.random_subspace_fraction(torch.ones(2, 4), 2, generator=generators)


def test_support_basis_lives_on_the_mask_with_the_beta_mean() -> None:
    """Random 5-dim subspaces of the m = 40 coordinates of a mask in R^100: orthonormal, 0 off the mask, and
    a vector supported on the mask has E ||Pu|| = random_fraction_mean(k, m) in them (not that of n)."""
    n, m, k, samples = 100, 40, 5, 2000
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(samples, n, generator=g).argsort(dim=1) < m  # m random pixels per image
    q = manifold.support_basis(mask, k, generator=g, dtype=torch.float64)
    assert q.shape == (samples, n, k) and q.dtype == torch.float64
    eye = torch.eye(k, dtype=torch.float64).expand(samples, k, k)
    assert torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-12)
    assert q.masked_select(~mask[:, :, None]).abs().max() < 1e-12  # zero outside the mask, to rounding
    d = torch.randn(samples, n, generator=g, dtype=torch.float64) * mask
    fraction = manifold.Subspace(q).fraction(d)
    assert _within(fraction, manifold.random_fraction_mean(k, m))
    assert not _within(fraction, manifold.random_fraction_mean(k, n))


def test_support_basis_per_image_generators_and_short_masks() -> None:
    mask = torch.zeros(5, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 1:5, 2:4] = True  # 8 pixels
    batch = manifold.support_basis(mask, 3, generator=[torch.Generator().manual_seed(i) for i in range(5)])
    alone = manifold.support_basis(mask[2:3], 3, generator=[torch.Generator().manual_seed(2)])
    assert torch.allclose(batch[2], alone[0], atol=1e-6, rtol=0)
    assert not torch.allclose(batch[1], batch[2], atol=1e-2)  # the images' bases differ
    random = manifold.random_basis(5, 36, 3, generator=[torch.Generator().manual_seed(i) for i in range(5)])
    one = manifold.random_basis(1, 36, 3, generator=[torch.Generator().manual_seed(2)])
    assert torch.allclose(random[2], one[0], atol=1e-6, rtol=0)
    # k = m: the basis spans exactly the mask's coordinates, so every mask pixel has weight in it.
    assert torch.equal(manifold.support_basis(mask, 8).abs().sum(dim=2) > 1e-3, mask.flatten(1))
    short = mask.clone()
    short[3, :, 1:5, 3] = False  # 4 pixels in image 3
    with pytest.raises(DmmError, match="1 masks have fewer than k = 5"):
        manifold.support_basis(short, 5)


def test_active_pixels_threshold_and_dilation() -> None:
    x = torch.zeros(2, 3, 7, 7)
    x[0, 1, 3, 3] = 0.5  # one pixel of one channel above 0.1
    x[1, 0, 0, 0] = 0.05  # below the threshold
    for dilation in (0, 1, 2):
        active = manifold.active_pixels(x, threshold=0.1, dilation=dilation).view(2, 3, 7, 7)
        expected = torch.zeros(7, 7, dtype=torch.bool)
        expected[3 - dilation : 4 + dilation, 3 - dilation : 4 + dilation] = True
        assert torch.equal(active[0], expected.expand(3, 7, 7)) and not active[1].any()


def test_principal_angles_accurate_for_tiny_angles() -> None:
    for angle in (1e-6, 1e-3, 0.5, math.pi / 2):
        q1 = torch.tensor([[[1.0], [0.0]]])
        q2 = torch.tensor([[[math.cos(angle)], [math.sin(angle)]]])
        assert manifold.principal_angles(q1, q2).item() == pytest.approx(angle, rel=1e-4)


def test_trained_autoencoder_recovers_the_true_tangent_space(record_property) -> None:
    """On the known synthetic manifold the learned tangent space is far closer to the truth than chance."""
    import logging

    from dmm.data import SyntheticManifoldDataModule
    from dmm.nets import MLPDecoder, MLPEncoder

    torch.manual_seed(0)
    data = SyntheticManifoldDataModule(latent_dim=2, image_size=8, num_train=2048, num_val=64)
    data.setup("fit")
    x_train = data.datasets["train"].tensors[0]
    encoder, decoder = MLPEncoder((1, 8, 8), 2, hidden=(64,)), MLPDecoder(2, (1, 8, 8), hidden=(64,))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    for _ in range(600):
        batch = x_train[torch.randint(0, len(x_train), (128,))]
        loss = torch.nn.functional.mse_loss(decoder(encoder(batch)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_val, z_val = data.datasets["val"].tensors[0], data.latents["val"]
    with torch.no_grad():
        learned = manifold.tangent_basis(decoder, encoder(x_val))
    truth = manifold.tangent_basis(data.generator, z_val)
    angles = torch.rad2deg(manifold.principal_angles(truth, learned))  # (64, 2), ascending
    chance = torch.rad2deg(manifold.principal_angles(truth, manifold.random_basis(64, 64, 2)))
    figures = {
        "reconstruction_mse": loss.item(),
        "largest_angle_median_deg": angles[:, -1].median().item(),
        "random_largest_angle_median_deg": chance[:, -1].median().item(),
    }
    for name, value in figures.items():
        record_property(name, value)
    logging.getLogger(__name__).info("learned vs true tangent space: %s", figures)
    assert figures["largest_angle_median_deg"] < 0.5 * figures["random_largest_angle_median_deg"]
    assert angles[:, 0].median() < 10.0  # the best-aligned direction is nearly exact
