"""A known manifold in the autoencoder's shape: the exact inverse of a generator on its own images (pure torch).

A data set made as x = G(z) knows every image's latent. :class:`ExactEncoder` returns it: the latent of the
stored image nearest x in pixel space (distance 0 for a data set image, so E(x) is the very latent that made
x and G(E(x)) = x), refined for an image off the data by :func:`~dmm.manifold.project_to_manifold` towards
the manifold point nearest it. :class:`ExactManifold` pairs it with G as ``encoder`` and ``decoder``, with
``latent_dim`` and ``input_shape``, so the measurements run on the exact manifold where they would run on
a learned autoencoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmm.errors import DmmError
from dmm.manifold.projection import project_to_manifold

SEARCH_CHUNK = 4096
"""Stored images compared with a batch at once: the (B, chunk) distance block bounds the search's memory."""


class ExactEncoder(nn.Module):
    """Images -> the latents that generated them: nearest stored image, then Levenberg–Marquardt off the data.

    Args:
        decoder: G, latents (B, k) -> images (B, C, H, W); used only to refine latents of images off the data.
        images: the stored images, flattened: (N, n) float, n = C*H*W.
        latents: their latents (N, k), row i the latent with G(latents[i]) = images[i] (up to pixel noise).
        refine_steps: Levenberg–Marquardt steps for an image that is not a stored one (0: the nearest
            stored image's latent as it is).

    Shapes:
        ``x`` (B, C, H, W) with C*H*W = n -> latents (B, k) in x's dtype. A stored image (distance exactly 0)
        gets its stored latent unchanged; any other image a latent whose decoding is no farther from it
        than the nearest stored image's decoding.
    """

    def __init__(self, decoder: nn.Module, images: Tensor, latents: Tensor, refine_steps: int = 3) -> None:
        super().__init__()
        if images.dim() != 2 or latents.dim() != 2 or len(images) != len(latents) or len(images) == 0:
            raise DmmError(
                f"ExactEncoder needs images (N, n) and latents (N, k) with the same N >= 1, "
                f"got {tuple(images.shape)} and {tuple(latents.shape)}"
            )
        if refine_steps < 0:
            raise DmmError(f"ExactEncoder's refine_steps must be >= 0, got {refine_steps}")
        self.decoder, self.refine_steps = decoder, refine_steps
        self.register_buffer("images", images.detach().clone())
        self.register_buffer("latents", latents.detach().clone())
        # ||image||² of each stored image (N,), for the distances' expansion; derived, so not saved.
        self.register_buffer("squared_norms", images.detach().pow(2).sum(dim=1), persistent=False)

    @property
    def latent_dim(self) -> int:
        return self.latents.shape[1]

    def nearest(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Index (B,) int64 of the stored image nearest each row of ``flat`` (B, n), and its distance (B,).

        Candidates come from ||x||² − 2 x·s + ||s||² block by block; the winner's distance is then recomputed
        as ||x − s||, which is exactly 0 when x is that stored image (the expansion alone is rarely 0 then).
        """
        flat = flat.to(self.images.dtype)
        best = torch.full((len(flat),), float("inf"), dtype=flat.dtype, device=flat.device)
        index = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
        for start in range(0, len(self.images), SEARCH_CHUNK):
            block = self.images[start : start + SEARCH_CHUNK]  # (chunk, n)
            squared = self.squared_norms[start : start + SEARCH_CHUNK][None] - 2 * flat @ block.T  # (B, chunk)
            value, position = squared.min(dim=1)
            better = value < best
            best = torch.where(better, value, best)
            index = torch.where(better, position + start, index)
        return index, torch.linalg.vector_norm(flat - self.images[index], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            index, distance = self.nearest(x.flatten(1))
        z = self.latents[index].to(x.dtype)
        off = (distance > 0).nonzero().squeeze(1)
        if self.refine_steps and len(off):
            refined, _ = project_to_manifold(self.decoder, x[off], z[off], self.refine_steps)
            z = z.index_put((off,), refined)
        return z


class ExactManifold(nn.Module):
    """A known manifold with the interface the measurements take from an autoencoder.

    Attributes:
        encoder: the :class:`ExactEncoder`, images (B, C, H, W) -> latents (B, k).
        decoder: G, latents (B, k) -> images (B, C, H, W) in [0, 1].
        latent_dim: k.
        input_shape: (C, H, W).
    """

    def __init__(self, encoder: ExactEncoder, decoder: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.input_shape = encoder.latent_dim, tuple(input_shape)
