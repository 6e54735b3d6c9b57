"""Tangent spaces and the decomposition, proved by properties and an independent brute-force Jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmm import manifold
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


def test_projector_hook_matches_decompose_on_rows() -> None:
    torch.manual_seed(0)
    q = manifold.random_basis(5, 16, 3)
    v = torch.randn(2, 1, 4, 4)
    index = torch.tensor([4, 1])
    on, off = manifold.decompose(v, q[index])
    assert torch.allclose(manifold.projector(q)(v, index), on)
    assert torch.allclose(manifold.projector(q, off=True)(v, index), off)


def test_random_subspace_captures_sqrt_k_over_n() -> None:
    """The critics' baseline: a random direction's on-subspace fraction is about sqrt(k / n)."""
    n, k = 784, 16
    generator = torch.Generator().manual_seed(0)
    q = manifold.random_basis(2000, n, k, generator=generator)
    assert torch.allclose(q.transpose(1, 2) @ q, torch.eye(k).expand(2000, k, k), atol=1e-5)
    d = torch.randn(2000, n, generator=generator)
    mean = manifold.on_fraction(d, q).mean().item()
    assert mean == pytest.approx(math.sqrt(k / n), rel=0.03)


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
