"""Images on a k-dimensional affine subspace of pixel space: the setting of Melamed, Yehudai & Vardi (NeurIPS 2023).

"Adversarial examples exist in two-layer ReLU networks for low dimensional linear subspaces": a two-layer ReLU
network trained on such data has a large input gradient orthogonal to the subspace; a smaller initialisation or
L2 regularisation shrinks it. The manifold is linear, so its tangent space is the same everywhere and known
exactly, and the exact encoder ``A^T (x - c)`` inverts the decoder for any image, not only the data's.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dmm.data.loading import InMemorySplits
from dmm.data.synthetic import SPLITS, rng_stream
from dmm.errors import DmmError
from dmm.manifold import ExactManifold


class LinearEncoder(nn.Module):
    """Images (B, C, H, W) -> latents ``A^T (x - c)`` (B, k): the orthogonal projection's coordinates, exact for
    any image (an image off the subspace gets the latent of its nearest point on it).

    Args:
        basis: A (n, k), orthonormal columns, n = C*H*W.
        offset: c, a constant added to every pixel.
    """

    def __init__(self, basis: Tensor, offset: float) -> None:
        super().__init__()
        self.register_buffer("basis", basis.detach().clone())
        self.offset = offset

    @property
    def latent_dim(self) -> int:
        return self.basis.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1) - self.offset) @ self.basis.to(x.dtype)


class LinearDecoder(nn.Module):
    """Latents (B, k) -> images ``c + A z`` (B, C, H, W); its Jacobian is A at every z.

    Args:
        basis: A (n, k), orthonormal columns, n = C*H*W.
        offset: c, a constant added to every pixel.
        output_shape: (C, H, W) of the images.
    """

    def __init__(self, basis: Tensor, offset: float, output_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("basis", basis.detach().clone())
        self.offset, self.output_shape = offset, tuple(output_shape)

    def forward(self, z: Tensor) -> Tensor:
        return (self.offset + z @ self.basis.to(z.dtype).T).reshape(*z.shape[:-1], *self.output_shape)


class LinearSubspaceDataModule(InMemorySplits):
    """Images x = c + A z, z ~ N(0, s^2 I_k): data on a k-dim affine subspace of pixel space, known exactly.

    A (n, k), n = H*W, is a seeded random orthonormal basis (QR of a Gaussian matrix) and c the constant image
    ``offset``. The class of a sample is ``argmax(V z)``, V (C, k) the first C rows of a seeded random orthogonal
    matrix: a linear rule on z (for C = 2, the sign of (v0 - v1) . z), whose C classes are equally likely. Pixels
    are never clamped, so the data lie exactly on the subspace, as in Melamed et al.; but the attacks take images
    in [0, 1], so a sample whose pixels would leave [0, 1] has its z shrunk towards 0 just enough that they do not
    (its class is unchanged: argmax(V z) ignores a positive factor). Pixel i has std about s ||A_i|| (s sqrt(k / n)
    = 1/8 on average at the defaults), and at the defaults (seed 0) 17 % of the training samples are shrunk, by a
    factor 0.84 on average (0.43 at least). Give the classifier ``mean = offset`` and it sees a linear subspace
    through 0, as in the paper. Batches are ``(x, y)``: ``x`` float32 ``(B, 1, H, W)``, ``y`` int64 ``(B,)``.
    After ``setup``, ``latents[split]`` holds the (N, k) latents in order; :meth:`exact_manifold` (no setup
    needed) is the subspace as an encoder and decoder, for ``--evaluation.autoencoder data``. Everything is
    drawn from ``seed``, the same whatever the stage.

    Args:
        latent_dim: k, the subspace's dimension, in [2, H*W).
        image_size: H = W of the single-channel images.
        num_classes: C, in [2, k].
        latent_std: s, the std of each latent coordinate before the shrinking (> 0).
        offset: c, added to every pixel, in (0, 1).
        num_train: Training samples.
        num_val: Validation samples.
        num_test: Test samples (also used for predict).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of A, V and the latents.
    """

    def __init__(
        self,
        latent_dim: int = 4,
        image_size: int = 16,
        num_classes: int = 2,
        latent_std: float = 1.0,
        offset: float = 0.5,
        num_train: int = 4096,
        num_val: int = 512,
        num_test: int = 512,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_size < 2 or not 2 <= latent_dim < image_size * image_size:
            raise DmmError(
                f"--data.image_size must be >= 2 and --data.latent_dim in [2, image_size**2), got {image_size} "
                f"and {latent_dim}."
            )
        if not 2 <= num_classes <= latent_dim:
            raise DmmError(f"--data.num_classes must be in [2, latent_dim={latent_dim}], got {num_classes}.")
        if not (latent_std > 0 and 0 < offset < 1):
            raise DmmError(f"--data.latent_std must be > 0 and --data.offset in (0, 1), got {latent_std} and {offset}.")
        if min(num_train, num_val, num_test) < 1:
            raise DmmError(f"--data.num_train/num_val/num_test must be >= 1, got {num_train}/{num_val}/{num_test}.")
        if batch_size < 1 or num_workers < 0:
            raise DmmError(
                f"--data.batch_size must be >= 1 and --data.num_workers >= 0, got {batch_size} and {num_workers}."
            )
        self.num_classes = num_classes
        self.input_shape = (1, image_size, image_size)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        n = image_size * image_size
        basis, _ = torch.linalg.qr(torch.randn(n, latent_dim, generator=rng_stream(seed, "linear/basis")))
        self.basis = basis.contiguous()  # A (n, k), orthonormal columns
        labels = rng_stream(seed, "linear/labels")
        orthogonal, _ = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=labels))
        self.label_map = orthogonal[:num_classes].contiguous()  # V (C, k), orthonormal rows
        self.latents: dict[str, Tensor] = {}
        self.datasets: dict[str, TensorDataset] = {}

    def label(self, z: Tensor) -> Tensor:
        """Class of each latent (N, k): int64 (N,) in [0, C), ``argmax(V z)``."""
        return (z @ self.label_map.T).argmax(dim=1)

    def shrink(self, z: Tensor) -> Tensor:
        """The factor (N,) in (0, 1] that keeps the pixels of ``c + A z`` (z (N, k)) in [0, 1]: 1 where they are."""
        margin = min(self.hparams.offset, 1 - self.hparams.offset) * (1 - 1e-6)  # rounding stays inside
        reach = (z @ self.basis.T).abs().amax(dim=1)  # largest |pixel - c| of each sample
        return (margin / reach.clamp_min(torch.finfo(z.dtype).tiny)).clamp(max=1)

    def decode(self, z: Tensor) -> Tensor:
        """Images (N, 1, H, W) ``c + A z`` of latents z (N, k)."""
        return (self.hparams.offset + z @ self.basis.T).reshape(len(z), *self.input_shape)

    def setup(self, stage: str | None = None) -> None:
        """Draw all three splits, whatever ``stage``; later calls keep them."""
        if self.datasets:
            return
        for split in SPLITS:
            gen = rng_stream(self.hparams.seed, f"linear/{split}")
            z = self.hparams.latent_std * torch.randn(self.sizes[split], self.hparams.latent_dim, generator=gen)
            z = z * self.shrink(z)[:, None]
            self.latents[split] = z
            self.datasets[split] = TensorDataset(self.decode(z), self.label(z))

    def exact_manifold(self) -> ExactManifold:
        """The subspace as ``encoder`` (:class:`LinearEncoder`) and ``decoder`` (:class:`LinearDecoder`), holding
        copies of A: moving them to a device leaves this data module's A where it is."""
        basis, offset = copy.deepcopy(self.basis), self.hparams.offset
        encoder = LinearEncoder(basis, offset)
        return ExactManifold(encoder, LinearDecoder(basis, offset, self.input_shape), self.input_shape)
