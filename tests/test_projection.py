"""`project_to_manifold`: exact on a linear decoder, never farther, and a critical point where it converges."""

from __future__ import annotations

import torch
from torch import nn

from dmm.manifold import decoder_jacobian, project_to_manifold
from dmm.nets import MLPDecoder

SHAPE = (1, 6, 6)


class Affine(nn.Module):
    """D(z) = A z + c, reshaped to SHAPE: its manifold is the affine plane c + span(A)."""

    def __init__(self, k: int, generator: torch.Generator) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(36, k, generator=generator, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(36, generator=generator, dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.a.T + self.c).reshape(-1, *SHAPE)


def test_one_undamped_step_is_the_orthogonal_projection_on_a_linear_decoder() -> None:
    g = torch.Generator().manual_seed(0)
    decoder = Affine(4, g)
    x = torch.randn(8, *SHAPE, generator=g, dtype=torch.float64)
    z0 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    # Least squares by an independent route: the normal equations' solution via lstsq on the plane.
    a, c = decoder.a.detach(), decoder.c.detach()
    exact = torch.linalg.lstsq(a.expand(8, 36, 4), (x.flatten(1) - c)[..., None]).solution.squeeze(-1)
    z, error = project_to_manifold(decoder, x, z0, 1, damping=0.0)
    assert torch.allclose(z, exact, atol=1e-10)
    residual = x.flatten(1) - decoder(z).detach().flatten(1)
    assert torch.allclose(error, residual.norm(dim=1)) and (a.T @ residual.T).abs().max() < 1e-9
    damped, _ = project_to_manifold(decoder, x, z0, 12)  # damped steps converge to the same point
    assert torch.allclose(damped, exact, atol=1e-8)


def test_never_farther_and_stationary_on_a_nonlinear_decoder() -> None:
    torch.manual_seed(0)
    decoder = MLPDecoder(3, SHAPE, hidden=(16,)).double()
    g = torch.Generator().manual_seed(1)
    z_true = torch.randn(10, 3, generator=g, dtype=torch.float64)
    noise = 0.01 * torch.randn(10, *SHAPE, generator=g, dtype=torch.float64)
    with torch.no_grad():
        x = decoder(z_true) + noise
    z0 = z_true + 0.5 * torch.randn(10, 3, generator=g, dtype=torch.float64)  # a poor encoder's guess
    _, start = project_to_manifold(decoder, x, z0, 0)
    errors = [project_to_manifold(decoder, x, z0, steps)[1] for steps in (1, 3, 30)]
    for before, after in zip([start, *errors], errors, strict=False):
        assert (after <= before).all()
    assert (errors[-1] <= noise.flatten(1).norm(dim=1)).all()  # at least as near as the point x came from
    # Converged: the residual is orthogonal to the tangent space (the first-order condition J^T r = 0).
    z, _ = project_to_manifold(decoder, x, z0, 30)
    jac = decoder_jacobian(decoder, z)
    residual = (x - decoder(z).detach()).flatten(1)
    assert (
        (jac.mT @ residual[..., None]).squeeze(-1).norm(dim=1) / (jac.norm(dim=(1, 2)) * residual.norm(dim=1))
    ).max() < 1e-5


def test_zero_steps_and_inference_mode() -> None:
    torch.manual_seed(0)
    decoder = MLPDecoder(3, SHAPE, hidden=(16,))
    x, z0 = torch.rand(4, *SHAPE), torch.randn(4, 3)
    with torch.inference_mode():  # as under Lightning's validate/test
        z, error = project_to_manifold(decoder, x, z0, 3)
        same, _ = project_to_manifold(decoder, x, z0, 0)
    assert torch.equal(same, z0) and z.shape == z0.shape and torch.isfinite(error).all()
    assert decoder.training  # the decoder's mode is restored
