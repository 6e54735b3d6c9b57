"""Regularisers an :class:`~dmm.models.Autoencoder` takes to push its decoder towards an isometry.

Both regularise the decoder's metric G = J^T J (J its Jacobian at a latent, n x k) through a few
Jacobian-vector products with random directions; no full Jacobian is ever formed:

* :class:`Isometry`, I-AE (Gropp, Atzmon, Lipman, "Isometric Autoencoders", arXiv 2006.09289):
  G -> I, and the encoder -> the decoder's pseudo-inverse;
* :class:`RelaxedDistortion`, after IRVAE (Lee, Yoon, Son, Park, "Regularized Autoencoders for Isometric
  Representation Learning", ICLR 2022): G -> c I for a free scale c (a scaled isometry).

A regulariser is called as ``regularizer(autoencoder, x, z)`` with the training batch x (B, C, H, W) and its
latents z (B, k), and returns its weighted loss terms by name (logged as ``train/<name>``). It holds no
parameters, so checkpoints hold the same tensors with or without one.

Directional derivatives use ``torch.autograd.forward_ad``, the engine under ``torch.func.jvp``: the latter
refuses modules that update BatchNorm statistics in training mode, as :class:`dmm.nets.ConvDecoder` does. The
regularisers see the networks in their current mode, the function the reconstruction loss trains; in training
mode BatchNorm couples a batch's samples, which perturbs each per-sample derivative by O(1/sqrt(batch)).
The autoencoder runs them inside :func:`frozen_running_stats`, so their extra passes leave the running
statistics (those of the evaluated networks) to the reconstruction pass.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dmm.errors import DmmError

if TYPE_CHECKING:
    from dmm.models.autoencoder import Autoencoder


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


@contextmanager
def frozen_running_stats(*modules: nn.Module) -> Iterator[None]:
    """BatchNorm layers in ``modules`` normalise as they would, but update no running statistics.

    In training mode a layer normalises by the batch's statistics, and would move its running mean and
    variance (used in eval mode) towards them. Turning ``track_running_stats`` off for the duration makes
    PyTorch pass no running buffers to ``F.batch_norm``: the same batch-statistics normalisation, so the same
    outputs and gradients, with no update and no ``num_batches_tracked`` step. In eval mode the layers keep
    using their running statistics. Flags are restored on exit, even on error.
    """
    layers = [m for module in modules for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    try:
        for layer in layers:
            layer.track_running_stats = False
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class Regularizer(nn.Module):
    """Base of the autoencoder's regularisers: ``forward(autoencoder, x, z) -> {name: weighted term}``.

    Every ``__init__`` argument is kept as an attribute of the same name, so :meth:`as_config` can write the
    regulariser into a checkpoint as plain data (``{"class_path": ..., "init_args": ...}``, loadable with
    ``weights_only=True``) and :func:`build_regularizer` can rebuild it.
    """

    def forward(self, autoencoder: Autoencoder, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def as_config(self) -> dict[str, Any]:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_config()["init_args"].items())


def build_regularizer(config: dict[str, Any]) -> Regularizer:
    """A :class:`Regularizer` from ``{"class_path": ..., "init_args": {...}}`` (e.g. a checkpoint's hparams).

    The class path must name a Regularizer subclass that is already imported (a short name means one in
    this module); nothing the checkpoint names is imported, as in Lightning's own checkpoint loading.
    """
    class_path = str(config.get("class_path", ""))
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module or __name__), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise DmmError(f"model.regularizer: {class_path!r} is not a regulariser, e.g. dmm.models.Isometry")
    return cls(**config.get("init_args", {}))


def _check(name: str, value: float, low: float = 0.0, high: float = math.inf) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float) and low <= value <= high):
        raise DmmError(f"model.regularizer.init_args.{name} must be in [{low}, {high}], got {value!r}")


class Isometry(Regularizer):
    """I-AE: iso_weight * L_iso + piso_weight * L_piso (Gropp et al., arXiv 2006.09289).

    L_iso = E (||J_D(z) u|| - 1)^2 makes the decoder an isometry (||J_D u|| = 1 for all unit u iff
    J_D^T J_D = I); L_piso = E (||u^T J_E(x)|| - 1)^2 makes the encoder the decoder's pseudo-inverse. In
    both, u is uniform on the unit sphere of the latent space R^k (the paper's u in S^{d-1}, d the latent
    dimension): J_E is k x n, so u^T J_E is one vjp of the encoder; a u in pixel space would not fit it.
    One u per sample; one jvp of the decoder and one vjp of the encoder per batch.

    The decoder is regularised on z ~ P_iso, the batch's encoded latents of which a fraction ``mixup`` is
    replaced by interpolations t z_i + (1 - t) z_j, t ~ U(0, 1): the paper's encoded codes plus codes in
    between them, where new samples are decoded. These z are detached, so L_iso shapes the decoder, not
    where the encoder puts the data. Returns the weighted terms ``iso`` and ``piso``.

    Args:
        iso_weight: lambda_iso, weight of the decoder-isometry loss. On the synthetic data after 600 steps,
            0.1 for both weights left 1/16 of the plain autoencoder's isometry error at 1.5x its
            reconstruction error; 0.01 left 1/6 of it at the same reconstruction error.
        piso_weight: lambda_piso, weight of the pseudo-inverse loss.
        mixup: fraction of the isometry latents that are interpolations between two encoded latents.

    Example:
        >>> model = Autoencoder(latent_dim=16, regularizer=Isometry(iso_weight=0.1, piso_weight=0.1))
    """

    def __init__(self, iso_weight: float = 0.1, piso_weight: float = 0.1, mixup: float = 0.5) -> None:
        super().__init__()
        _check("iso_weight", iso_weight)
        _check("piso_weight", piso_weight)
        _check("mixup", mixup, high=1.0)
        self.iso_weight, self.piso_weight, self.mixup = iso_weight, piso_weight, mixup

    def forward(self, autoencoder: Autoencoder, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        z = z.detach()
        mixed = torch.rand(z.shape[0], 1, device=z.device) < self.mixup
        z_iso = torch.where(mixed, interpolate(z), z)
        iso = isometry_loss(autoencoder.decoder, z_iso, sphere(*z.shape, like=z))
        piso = pseudo_inverse_loss(autoencoder.encoder, x, sphere(*z.shape, like=z))
        return {"iso": self.iso_weight * iso, "piso": self.piso_weight * piso}


class RelaxedDistortion(Regularizer):
    """distortion_weight * (F - 1/k), the relaxed distortion of IRVAE (Lee et al., ICLR 2022).

    F = E_z[tr G^2] / (E_z[tr G])^2 (expectations over the batch) is scale-free and >= 1/k, with equality iff
    G = c I at every z for one c: the decoder is a scaled isometry, distances preserved up to a global factor.
    Subtracting 1/k changes no gradient and puts the optimum at 0. tr G and tr G^2 are estimated by
    :func:`metric_traces` with one direction v per sample, uniform on the sphere of radius sqrt(k) rather
    than the paper's N(0, I): the same E[v v^T] = I and thus the same expectations, a smaller variance, and
    an estimate of F that is itself >= 1/k (Cauchy-Schwarz then Jensen) and exactly 1/k for a scaled isometry.

    The latents are the paper's mixup a z_i + (1 - a) z_j, a ~ U(-eta, 1 + eta), detached (the regulariser
    shapes the decoder only; IRVAE's code also lets it move the encoder through z). The paper regularises a
    VAE; dmm's autoencoder is deterministic, so the manifold is {D(z)} with no posterior noise and the two
    isometric models differ only in their regulariser. Returns the weighted term ``distortion``.

    Args:
        distortion_weight: lambda. IRVAE's MNIST config uses 100 against a Gaussian NLL summed over pixels,
            ||x - D(z)||^2 / (2 sigma^2) with a learned sigma; against the mean squared error that is
            200 sigma^2 / n: 0.26 at its initial sigma = 1, 0.003 at sigma^2 = 0.01 (a trained MNIST error).
            0.01 lies in that range and on the synthetic data kept the plain autoencoder's error; 0.1 and
            more shrank the decoder and cost reconstruction.
        eta: mixup extrapolation; 0.2 as in the paper.

    Example:
        >>> model = Autoencoder(latent_dim=16, regularizer=RelaxedDistortion(distortion_weight=0.01))
    """

    def __init__(self, distortion_weight: float = 0.01, eta: float = 0.2) -> None:
        super().__init__()
        _check("distortion_weight", distortion_weight)
        _check("eta", eta)
        self.distortion_weight, self.eta = distortion_weight, eta

    def forward(self, autoencoder: Autoencoder, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        z = interpolate(z.detach(), -self.eta, 1 + self.eta)
        k = z.shape[1]
        tr_g, tr_g2 = metric_traces(autoencoder.decoder, z, sphere(*z.shape, like=z, radius=k**0.5))
        distortion = tr_g2.mean() / tr_g.mean().pow(2) - 1 / k
        return {"distortion": self.distortion_weight * distortion}
