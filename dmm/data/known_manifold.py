"""MNIST-sized images on a manifold known exactly: the ground truth a learned autoencoder's tangents are judged by."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset
from tqdm import tqdm

from dmm.data.loading import InMemorySplits
from dmm.data.synthetic import SPLITS, ManifoldGenerator, rng_stream
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.manifold import ExactEncoder, ExactManifold, tangent_basis

CHUNK = 4096
"""Samples generated at once, one cache file each. Each chunk draws its own pixel noise, so with noise this is
part of the data's identity; the latents and labels do not depend on it."""
FORMAT = 1
"""Version of the generation recipe, part of the cache folder's name: bump it when the images change."""


class Embedded(nn.Module):
    """U∘G: a generator's images bilinearly upsampled to ``size`` x ``size``, the same manifold in more pixels.

    U is ``interpolate(mode="bilinear", align_corners=False)``, a fixed linear map: every output pixel is a convex
    combination of input pixels (images in [0, 1] stay there) and, as ``size`` >= G's size, U is injective, so
    U∘G is a k-manifold again, with tangent space U J at U G(z). Pure torch with no in-place ops: works under
    ``torch.func.jvp``/``vmap``.

    Args:
        generator: G, latents (..., k) -> images (..., C, H, W) with H = W = ``generator.image_size``.
        size: Height = width of the embedded images, >= H.

    Shapes:
        ``z`` (..., k) -> images (..., C, size, size) in G's dtype.
    """

    def __init__(self, generator: ManifoldGenerator, size: int) -> None:
        super().__init__()
        if size < generator.image_size:
            raise DmmError(f"Embedded's size must be >= the generator's image_size {generator.image_size}, got {size}")
        self.generator, self.latent_dim, self.image_size = generator, generator.latent_dim, size

    def forward(self, z: Tensor) -> Tensor:
        x = self.generator(z)
        lead, image = x.shape[:-3], x.shape[-3:]
        # interpolate takes (N, C, H, W): flatten any leading dims (none under vmap's per-sample calls) and back.
        up = F.interpolate(x.reshape(-1, *image), size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return up.reshape(*lead, image[0], self.image_size, self.image_size)


class KnownManifoldDataModule(InMemorySplits):
    """Images x = G(z), z ~ N(0, I_k), of a fixed smooth generator G: a k-manifold in pixel space, known exactly.

    G is a seeded random :class:`~dmm.data.ManifoldGenerator`, ``z -> sigmoid(W2 tanh(W1 z + b1) + b2)``, at
    MNIST's size by default. With ``ambient_size`` the images are U G(z), U the bilinear upsampling of
    :class:`Embedded`: the same latents, labels and intrinsic manifold in a larger pixel space. The class of a
    sample is ``argmax(V z)``, V (C, k) the first C rows of a seeded random orthogonal matrix: V z ~ N(0, I_C), so
    the C classes are equally likely, and a linear probe on z is perfect by construction. Batches are ``(x, y)``:
    ``x`` float32 ``(B, 1, H, W)`` in [0, 1] (H = W = ``ambient_size``, or else ``image_size``), ``y`` int64
    ``(B,)``. After ``setup``, ``latents[split]`` holds the (N, k) latents in order, :meth:`tangent` the exact
    tangent bases and :meth:`exact_manifold` the generator (G, or U∘G) with its exact inverse, for
    ``--evaluation.autoencoder data``. Everything is drawn from ``seed``, the same whatever the stage.

    Args:
        latent_dim: k, the manifold's dimension.
        image_size: Height = width of G's single-channel images.
        hidden_dim: Width of G's tanh layer (>= k).
        num_classes: C, in [2, k].
        num_train: Training samples.
        num_val: Validation samples.
        num_test: Test samples (also used for predict).
        noise_std: Std of Gaussian pixel noise added after generation (and embedding; then clamped to [0, 1]);
            0 keeps the data exactly on the manifold.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of G's weights, V, the latents and the noise.
        cache_dir: ``None``: generate in memory; a folder: keep the images there, one file per chunk of
            ``CHUNK`` samples, written atomically, so a rerun (or a killed run's rerun) makes only what is missing.
        refine_steps: Levenberg–Marquardt steps of :meth:`exact_manifold`'s encoder for images off the data.
        ambient_size: ``None``: the images are G's. An int >= ``image_size``: G's images upsampled to
            ``ambient_size`` x ``ambient_size`` (:class:`Embedded`), more pixels for the same k-manifold.
    """

    def __init__(
        self,
        latent_dim: int = 10,
        image_size: int = 28,
        hidden_dim: int = 128,
        num_classes: int = 10,
        num_train: int = 20000,
        num_val: int = 5000,
        num_test: int = 5000,
        noise_std: float = 0.0,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        refine_steps: int = 3,
        ambient_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 1 <= latent_dim <= min(hidden_dim, image_size * image_size - 1):
            raise DmmError(
                f"--data.latent_dim must be in [1, min(hidden_dim, image_size**2 - 1)], got {latent_dim} "
                f"(hidden_dim {hidden_dim}, image_size {image_size})."
            )
        if not 2 <= num_classes <= latent_dim:
            raise DmmError(f"--data.num_classes must be in [2, latent_dim={latent_dim}], got {num_classes}.")
        if min(num_train, num_val, num_test) < 1 or noise_std < 0 or refine_steps < 0:
            raise DmmError(
                "--data.num_train/num_val/num_test must be >= 1, --data.noise_std >= 0 and --data.refine_steps "
                f">= 0; got {num_train}/{num_val}/{num_test}, {noise_std} and {refine_steps}."
            )
        if batch_size < 1 or num_workers < 0:
            raise DmmError(
                f"--data.batch_size must be >= 1 and --data.num_workers >= 0, got {batch_size} and {num_workers}."
            )
        if ambient_size is not None and ambient_size < image_size:
            raise DmmError(
                f"--data.ambient_size must be >= --data.image_size={image_size} (an upsampling), or null; "
                f"got {ambient_size}."
            )
        self.num_classes = num_classes
        size = image_size if ambient_size is None else ambient_size
        self.input_shape = (1, size, size)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        generator = ManifoldGenerator(latent_dim, image_size, hidden_dim, seed=seed)
        # The data's generator, G or U∘G: images, tangents and the exact manifold all come from it.
        self.generator: nn.Module = generator if ambient_size is None else Embedded(generator, ambient_size)
        # (C, k) orthonormal rows: V z ~ N(0, I_C) for z ~ N(0, I_k), so argmax(V z) is uniform over classes.
        orthogonal, _ = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=rng_stream(seed, "known/labels")))
        self.label_map = orthogonal[:num_classes].contiguous()
        self.latents: dict[str, Tensor] = {}
        self.datasets: dict[str, TensorDataset] = {}

    def label(self, z: Tensor) -> Tensor:
        """Class of each latent (N, k): int64 (N,) in [0, C), ``argmax(V z)``."""
        return (z @ self.label_map.T).argmax(dim=1)

    def split_latents(self, split: str) -> Tensor:
        """The (N, k) latents of ``split``, drawn from their own stream of ``seed``."""
        gen = rng_stream(self.hparams.seed, f"known/{split}")
        return torch.randn(self.sizes[split], self.hparams.latent_dim, generator=gen)

    @property
    def cache_folder(self) -> Path | None:
        """``<cache_dir>/known_manifold-<digest>``: the digest covers every setting the images depend on."""
        if self.hparams.cache_dir is None:
            return None
        hp = self.hparams
        keys = ("latent_dim", "image_size", "hidden_dim", "noise_std", "seed")
        identity = {"format": FORMAT, "chunk": CHUNK, "sizes": self.sizes, **{key: hp[key] for key in keys}}
        if hp.get("ambient_size") is not None:  # absent otherwise: caches made before the option keep their folder
            identity["ambient_size"] = hp.ambient_size
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return Path(hp.cache_dir) / f"known_manifold-{digest}"

    def prepare_data(self) -> None:
        """With ``cache_dir``, generate the chunks that are missing (once per node, before any ``setup``)."""
        if self.cache_folder is not None:
            for split in SPLITS:
                self._images(split, self.split_latents(split), bar=None)

    def setup(self, stage: str | None = None) -> None:
        """Generate (or read from the cache) all three splits, whatever ``stage``; later calls keep them."""
        if self.datasets:
            return
        total = sum(-(-size // CHUNK) for size in self.sizes.values())
        show = rank_zero_only.rank == 0 and total > 1
        with tqdm(total=total, desc="known manifold", unit="chunk", disable=None if show else True) as bar:
            for split in SPLITS:
                z = self.split_latents(split)
                self.latents[split] = z
                self.datasets[split] = TensorDataset(self._images(split, z, bar), self.label(z))

    def _images(self, split: str, z: Tensor, bar: tqdm | None) -> Tensor:
        """Images (N, 1, H, W) of the latents z (N, k) of ``split``, chunk by chunk, from the cache where there."""
        chunks = []
        for index, start in enumerate(range(0, len(z), CHUNK)):
            chunks.append(self._chunk(split, index, z[start : start + CHUNK]))
            if bar is not None:
                bar.update(1)
        return torch.cat(chunks)

    def _chunk(self, split: str, index: int, z: Tensor) -> Tensor:
        folder = self.cache_folder
        path = None if folder is None else folder / f"{split}-{index:05d}.pt"
        if path is not None and path.is_file():
            return self._read(path, len(z))
        with torch.no_grad():
            x = self.generator(z)
        if self.hparams.noise_std > 0:
            noise = torch.randn(x.shape, generator=rng_stream(self.hparams.seed, f"known/{split}/noise/{index}"))
            x = (x + self.hparams.noise_std * noise).clamp(0, 1)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: torch.save(x, p))
        return x

    def _read(self, path: Path, count: int) -> Tensor:
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch/pickle raise many types for a damaged file
            raise DmmError(
                f"cached chunk {path} is unreadable ({type(error).__name__}); delete it to regenerate"
            ) from None
        if not isinstance(x, Tensor) or tuple(x.shape) != (count, *self.input_shape):
            raise DmmError(
                f"cached chunk {path} does not hold {count} images {self.input_shape}; delete it to regenerate"
            )
        return x

    def tangent(self, split: str, indices: Tensor | Sequence[int]) -> Tensor:
        """Exact tangent bases at samples ``indices`` of ``split``: float32 (B, n, k), orthonormal columns,
        spanning the generator's Jacobian (G's, or U J for U∘G) at each sample's latent (n = H*W)."""
        self._check_setup()
        return tangent_basis(self.generator, self.latents[split][torch.as_tensor(indices, dtype=torch.long)])

    def exact_manifold(self) -> ExactManifold:
        """The generator (G, or U∘G) and its exact inverse over all three splits' images, as ``encoder`` and
        ``decoder`` (copies: moving them to a device leaves this data module's generator where it is)."""
        self._check_setup()
        images = torch.cat([self.datasets[split].tensors[0].flatten(1) for split in SPLITS])  # (N, n)
        latents = torch.cat([self.latents[split] for split in SPLITS])  # (N, k)
        decoder = copy.deepcopy(self.generator)
        encoder = ExactEncoder(decoder, images, latents, self.hparams.refine_steps)
        return ExactManifold(encoder, decoder, self.input_shape)

    def _check_setup(self) -> None:
        if not self.datasets:
            raise RuntimeError("setup() has not been called yet")
