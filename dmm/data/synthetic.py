"""Images on a known k-dimensional manifold, so the exact tangent space at every sample is available."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from dmm.data.loading import InMemorySplits
from dmm.errors import DmmError

SPLITS = ("train", "val", "test")


def rng_stream(seed: int, stream: str) -> torch.Generator:
    """A generator for one named stream, so streams never share draws across seeds or splits."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class ManifoldGenerator(nn.Module):
    """A fixed random smooth map from latents to images: ``z -> sigmoid(W2 tanh(W1 z + b1) + b2)``.

    Each column of ``W2`` is a blurred random field, so images look like smooth blobs rather than
    pixel noise. Weights are drawn from ``seed`` alone and frozen. Plain layers and no in-place ops,
    so it works under ``torch.func.jvp``/``vmap``.

    Args:
        latent_dim: k, the manifold's dimension.
        image_size: H = W of the single-channel output image.
        hidden_dim: Width of the tanh hidden layer; must be >= ``latent_dim``.
        seed: Seed of the weights.

    Shapes:
        ``z`` (B, k) float32 -> images (B, 1, H, W) float32 in (0, 1).
    """

    def __init__(self, latent_dim: int = 4, image_size: int = 16, hidden_dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= latent_dim <= hidden_dim:
            raise DmmError(f"latent_dim must be in [1, hidden_dim={hidden_dim}], got {latent_dim}.")
        self.latent_dim, self.image_size = latent_dim, image_size
        gen = rng_stream(seed, "generator")
        self.hidden = nn.Linear(latent_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, image_size * image_size)
        with torch.no_grad():
            # Unit-variance hidden pre-activations for z ~ N(0, I): tanh is curved but not saturated.
            self.hidden.weight.copy_(torch.randn(hidden_dim, latent_dim, generator=gen) / math.sqrt(latent_dim))
            self.hidden.bias.copy_(0.5 * torch.randn(hidden_dim, generator=gen))
            fields = _smooth_fields(hidden_dim + 1, image_size, gen)  # (hidden + 1, H*W), unit std each
            # Output logits have std ~2.5 across the latent range: images swing visibly within [0, 1].
            self.out.weight.copy_(3.0 * fields[:-1].T / math.sqrt(hidden_dim))
            self.out.bias.copy_(0.5 * fields[-1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ManifoldGenerator:
        # A fixed map: it never leaves eval mode, whatever a parent module asks.
        return super().train(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pixels = torch.sigmoid(self.out(torch.tanh(self.hidden(z))))
        return pixels.reshape(*z.shape[:-1], 1, self.image_size, self.image_size)

    def jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """Exact tangent vectors at ``z`` (B, k): float32 (B, H*W, k); column j is d image / d z_j."""

        def flat(zi: torch.Tensor) -> torch.Tensor:
            return self(zi).reshape(-1)

        return torch.func.vmap(torch.func.jacfwd(flat))(z)


def _smooth_fields(count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` white-noise images blurred by a Gaussian of width size/8, each scaled to unit std."""
    sigma = max(size / 8, 0.5)
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2)[None, None]  # (1, 1, K, K)
    noise = torch.randn(count, 1, size, size, generator=gen)
    fields = F.conv2d(F.pad(noise, (radius,) * 4, mode="circular"), kernel).reshape(count, -1)
    fields = fields - fields.mean(dim=1, keepdim=True)
    return fields / fields.std(dim=1, keepdim=True)


class SyntheticManifoldDataModule(InMemorySplits):
    """Images ``generator(z)`` with ``z ~ N(0, I_k)``: data on a known k-manifold in pixel space.

    The class of a sample is the angular sector of ``(z0, z1)``: ``floor((atan2(z1, z0) + pi) * C / 2pi)``.
    ``z`` is isotropic, so the C sectors are equally likely. Batches are ``(x, y)``: ``x`` float32
    ``(B, 1, H, W)`` in [0, 1], ``y`` int64 ``(B,)``. After ``setup``, ``latents[split]`` holds the
    (N, k) latents of each split in order, and ``generator.jacobian(latents[split])`` the exact
    tangent vectors at each clean sample. Everything is drawn from ``seed``, the same whatever stage.

    Args:
        latent_dim: k, the manifold's dimension (>= 2: the classes use z0 and z1).
        image_size: H = W of the single-channel images.
        num_classes: C, the number of angular sectors.
        num_train: Training samples.
        num_val: Validation samples.
        num_test: Test samples (also used for predict).
        noise_std: Std of Gaussian pixel noise added after generation (then clamped to [0, 1]);
            0 keeps the data exactly on the manifold.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of the generator's weights, the latents and the noise.
    """

    def __init__(
        self,
        latent_dim: int = 4,
        image_size: int = 16,
        num_classes: int = 4,
        num_train: int = 4096,
        num_val: int = 512,
        num_test: int = 512,
        noise_std: float = 0.0,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 2 <= latent_dim < image_size * image_size:
            raise DmmError(f"--data.latent_dim must be in [2, image_size**2), got {latent_dim}.")
        if num_classes < 2 or min(num_train, num_val, num_test) < 1 or noise_std < 0:
            raise DmmError(
                "--data.num_classes must be >= 2, --data.num_train/num_val/num_test >= 1 and "
                f"--data.noise_std >= 0; got {num_classes}, {num_train}/{num_val}/{num_test}, {noise_std}."
            )
        if batch_size < 1 or num_workers < 0:
            raise DmmError(
                f"--data.batch_size must be >= 1 and --data.num_workers >= 0, got {batch_size} and {num_workers}."
            )
        self.num_classes = num_classes
        self.input_shape = (1, image_size, image_size)
        self.generator = ManifoldGenerator(latent_dim, image_size, hidden_dim=max(64, latent_dim), seed=seed)
        self.latents: dict[str, torch.Tensor] = {}
        self.datasets: dict[str, TensorDataset] = {}

    def label(self, z: torch.Tensor) -> torch.Tensor:
        """Class of each latent (N, k): int64 (N,) in [0, C), the angular sector of (z0, z1)."""
        angle = torch.atan2(z[:, 1], z[:, 0]) + math.pi  # [0, 2pi]
        return (angle * self.num_classes / (2 * math.pi)).long().clamp_(max=self.num_classes - 1)

    def setup(self, stage: str | None = None) -> None:
        """Generate all three splits (whatever ``stage``); later calls keep them."""
        if self.datasets:
            return
        sizes = {"train": self.hparams.num_train, "val": self.hparams.num_val, "test": self.hparams.num_test}
        for split in SPLITS:
            gen = rng_stream(self.hparams.seed, split)
            z = torch.randn(sizes[split], self.hparams.latent_dim, generator=gen)
            with torch.no_grad():
                x = self.generator(z)
            if self.hparams.noise_std > 0:
                noise = torch.randn(x.shape, generator=gen)
                x = (x + self.hparams.noise_std * noise).clamp(0, 1)
            self.latents[split] = z
            self.datasets[split] = TensorDataset(x, self.label(z))
