"""Autoencoders whose decoder is pushed towards an isometry, so that latent distances are pixel distances.

Both regularise the decoder's metric G = J^T J (J its Jacobian at a latent, n x k) through a few
Jacobian-vector products with random directions; no full Jacobian is ever formed:

* :class:`IsometricAutoencoder`, I-AE (Gropp, Atzmon, Lipman, "Isometric Autoencoders", arXiv 2006.09289):
  G -> I, and the encoder -> the decoder's pseudo-inverse;
* :class:`IRAutoencoder`, after IRVAE (Lee, Yoon, Son, Park, "Regularized Autoencoders for Isometric
  Representation Learning", ICLR 2022): G -> c I for a free scale c (a scaled isometry).

Directional derivatives use ``torch.autograd.forward_ad``, the engine under ``torch.func.jvp``: the latter
refuses modules that update BatchNorm statistics in training mode, as :class:`dmm.nets.ConvDecoder` does. The
regularisers see the module in its current mode, the function the reconstruction loss trains; in training
mode BatchNorm couples a batch's samples, which perturbs each per-sample derivative by O(1/sqrt(batch)).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from dmm.models.autoencoder import Autoencoder
from dmm.nets import ConvDecoder, ConvEncoder, DecoderFactory, EncoderFactory, Shape


def sphere(batch: int, dim: int, like: Tensor, radius: float = 1.0) -> Tensor:
    """(batch, dim) directions uniform on the sphere of ``radius``, in ``like``'s dtype and device."""
    u = torch.randn(batch, dim, dtype=like.dtype, device=like.device)
    return radius * u / u.norm(dim=1, keepdim=True)


def interpolate(z: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Mixup of latents (B, k): a z_i + (1 - a) z_j with j a random partner and a ~ U(low, high) per row."""
    a = torch.empty(z.shape[0], 1, dtype=z.dtype, device=z.device).uniform_(low, high)
    return a * z + (1 - a) * z[torch.randperm(z.shape[0], device=z.device)]


def decoder_jvp(decoder: nn.Module, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """D(z) and J_D(z) v (both (B, C, H, W)) by one forward-mode pass, differentiable w.r.t. the parameters."""
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(decoder(fwAD.make_dual(z, v)))
    return primal, tangent


def isometry_loss(decoder: nn.Module, z: Tensor, u: Tensor) -> Tensor:
    """I-AE's L_iso: mean over rows of (||J_D(z) u|| - 1)^2 for unit u (B, k); 0 wherever J^T J = I."""
    _, ju = decoder_jvp(decoder, z, u)
    return (ju.flatten(1).norm(dim=1) - 1).pow(2).mean()


def pseudo_inverse_loss(encoder: nn.Module, x: Tensor, u: Tensor) -> Tensor:
    """I-AE's L_piso: mean of (||u^T J_E(x)|| - 1)^2 for unit u (B, k) in latent space, by one vjp.

    Zero for every u iff J_E J_E^T = I; with J_E J_D = I (reconstruction) and J_D^T J_D = I this forces
    J_E = J_D^T = J_D^+, i.e. the encoder projects orthogonally onto the learned manifold.
    """
    x = x.detach().requires_grad_(True)
    (u_je,) = torch.autograd.grad(encoder(x), x, u, create_graph=True)
    return (u_je.flatten(1).norm(dim=1) - 1).pow(2).mean()


def metric_traces(decoder: nn.Module, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Hutchinson samples of tr G and tr G^2 at each latent: ||J v||^2 and ||J^T J v||^2, each (B,).

    Unbiased for directions v (B, k) with E[v v^T] = I; one jvp and one vjp, differentiable w.r.t. the
    decoder's parameters.
    """
    z = z.detach().requires_grad_(True)
    image, jv = decoder_jvp(decoder, z, v)
    (gv,) = torch.autograd.grad(image, z, jv, create_graph=True)
    return jv.flatten(1).pow(2).sum(dim=1), gv.pow(2).sum(dim=1)


class IsometricAutoencoder(Autoencoder):
    """I-AE: reconstruction + iso_weight * L_iso + piso_weight * L_piso (Gropp et al., arXiv 2006.09289).

    L_iso = E (||J_D(z) u|| - 1)^2 makes the decoder an isometry (||J_D u|| = 1 for all unit u iff
    J_D^T J_D = I); L_piso = E (||u^T J_E(x)|| - 1)^2 makes the encoder the decoder's pseudo-inverse. In
    both, u is uniform on the unit sphere of the latent space R^k (the paper's u in S^{d-1}, d the latent
    dimension): J_E is k x n, so u^T J_E is one vjp of the encoder; a u in pixel space would not fit it.
    One u per sample; one jvp of the decoder and one vjp of the encoder per batch.

    The decoder is regularised on z ~ P_iso, the batch's encoded latents of which a fraction ``mixup`` is
    replaced by interpolations t z_i + (1 - t) z_j, t ~ U(0, 1): the paper's encoded codes plus codes in
    between them, where new samples are decoded. These z are detached, so L_iso shapes the decoder, not
    where the encoder puts the data. Logs the weighted terms as ``train/iso`` and ``train/piso``.

    Args:
        encoder: builds the encoder from ``(input_shape, latent_dim)``.
        decoder: builds the decoder from ``(latent_dim, input_shape)``.
        input_shape: (C, H, W) of the images (linked from the data module by the CLI).
        latent_dim: k, the dimension of the learned manifold.
        iso_weight: lambda_iso, weight of the decoder-isometry loss. On the synthetic data after 600 steps,
            0.1 for both weights left 1/16 of the plain autoencoder's isometry error at 1.5x its
            reconstruction error; 0.01 left 1/6 of it at the same reconstruction error.
        piso_weight: lambda_piso, weight of the pseudo-inverse loss.
        mixup: fraction of the isometry latents that are interpolations between two encoded latents.
        geometry_samples: validation latents used for the geometry metrics (0 turns them off).
        optimizer: optimiser factory, called with the parameters.
        scheduler: optional learning-rate scheduler factory, called with the optimiser; stepped per epoch.
        num_classes: classes of the data it was trained on (linked by the CLI); provenance only, unused.
    """

    def __init__(
        self,
        encoder: EncoderFactory = ConvEncoder,
        decoder: DecoderFactory = ConvDecoder,
        input_shape: Shape = (1, 28, 28),
        latent_dim: int = 16,
        iso_weight: float = 0.1,
        piso_weight: float = 0.1,
        mixup: float = 0.5,
        geometry_samples: int = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
    ) -> None:
        # Explicit arguments, not **kwargs: the CLI would route its num_classes link into **kwargs.
        super().__init__(encoder, decoder, input_shape, latent_dim, geometry_samples, optimizer, scheduler, num_classes)
        self.save_hyperparameters()

    def regularizer(self, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        z = z.detach()
        mixed = torch.rand(z.shape[0], 1, device=z.device) < self.hparams.mixup
        z_iso = torch.where(mixed, interpolate(z), z)
        iso = isometry_loss(self.decoder, z_iso, sphere(*z.shape, like=z))
        piso = pseudo_inverse_loss(self.encoder, x, sphere(*z.shape, like=z))
        return {"iso": self.hparams.iso_weight * iso, "piso": self.hparams.piso_weight * piso}


class IRAutoencoder(Autoencoder):
    """Reconstruction + distortion_weight * (F - 1/k), the relaxed distortion of IRVAE (Lee et al., ICLR 2022).

    F = E_z[tr G^2] / (E_z[tr G])^2 (expectations over the batch) is scale-free and >= 1/k, with equality iff
    G = c I at every z for one c: the decoder is a scaled isometry, distances preserved up to a global factor.
    Subtracting 1/k changes no gradient and puts the optimum at 0. tr G and tr G^2 are estimated by
    :func:`metric_traces` with one direction v per sample, uniform on the sphere of radius sqrt(k) rather
    than the paper's N(0, I): the same E[v v^T] = I and thus the same expectations, a smaller variance, and
    an estimate of F that is itself >= 1/k (Cauchy-Schwarz then Jensen) and exactly 1/k for a scaled isometry.

    The latents are the paper's mixup a z_i + (1 - a) z_j, a ~ U(-eta, 1 + eta), detached (the regulariser
    shapes the decoder only; IRVAE's code also lets it move the encoder through z). The paper regularises a
    VAE; this autoencoder is deterministic like the rest of dmm, so the manifold is {D(z)} with no posterior
    noise and the two isometric models differ only in their regulariser. Logs ``train/distortion``.

    Args:
        encoder: builds the encoder from ``(input_shape, latent_dim)``.
        decoder: builds the decoder from ``(latent_dim, input_shape)``.
        input_shape: (C, H, W) of the images (linked from the data module by the CLI).
        latent_dim: k, the dimension of the learned manifold.
        distortion_weight: lambda. IRVAE's MNIST config uses 100 against a Gaussian NLL summed over pixels,
            ||x - D(z)||^2 / (2 sigma^2) with a learned sigma; against the mean squared error that is
            200 sigma^2 / n: 0.26 at its initial sigma = 1, 0.003 at sigma^2 = 0.01 (a trained MNIST error).
            0.01 lies in that range and on the synthetic data kept the plain autoencoder's error; 0.1 and
            more shrank the decoder and cost reconstruction.
        eta: mixup extrapolation; 0.2 as in the paper.
        geometry_samples: validation latents used for the geometry metrics (0 turns them off).
        optimizer: optimiser factory, called with the parameters.
        scheduler: optional learning-rate scheduler factory, called with the optimiser; stepped per epoch.
        num_classes: classes of the data it was trained on (linked by the CLI); provenance only, unused.
    """

    def __init__(
        self,
        encoder: EncoderFactory = ConvEncoder,
        decoder: DecoderFactory = ConvDecoder,
        input_shape: Shape = (1, 28, 28),
        latent_dim: int = 16,
        distortion_weight: float = 0.01,
        eta: float = 0.2,
        geometry_samples: int = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
    ) -> None:
        # Explicit arguments, not **kwargs: the CLI would route its num_classes link into **kwargs.
        super().__init__(encoder, decoder, input_shape, latent_dim, geometry_samples, optimizer, scheduler, num_classes)
        self.save_hyperparameters()

    def regularizer(self, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        z = interpolate(z.detach(), -self.hparams.eta, 1 + self.hparams.eta)
        k = z.shape[1]
        tr_g, tr_g2 = metric_traces(self.decoder, z, sphere(*z.shape, like=z, radius=k**0.5))
        distortion = tr_g2.mean() / tr_g.mean().pow(2) - 1 / k
        return {"distortion": self.hparams.distortion_weight * distortion}
