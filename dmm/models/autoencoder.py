"""The autoencoder system: the data manifold's model, x ~ D(E(x)), with tangent-space diagnostics."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dmm.errors import DmmError
from dmm.manifold import tangent_space
from dmm.models.optim import configure_optimizers
from dmm.models.regularizers import Regularizer, build_regularizer, frozen_running_stats
from dmm.nets import ConvDecoder, ConvEncoder, DecoderFactory, EncoderFactory, Shape


class Autoencoder(L.LightningModule):
    """Deterministic autoencoder trained on mean squared reconstruction error.

    Images are in [0, 1], (B, C, H, W); latents are (B, latent_dim); the decoder's output is in [0, 1].
    On the first validation batch it also logs the decoder's geometry at the encoded latents: the mean
    condition number of the metric G = J^T J and the isometry error mean_i (s_i - 1)^2 over the
    singular values s of J (0 for an isometric decoder).

    An optional ``regularizer`` (:mod:`dmm.models.regularizers`: :class:`~dmm.models.Isometry` for I-AE,
    :class:`~dmm.models.RelaxedDistortion` for IRVAE-style training) adds loss terms to each training step,
    logged as ``train/<name>`` next to ``train/loss``. Its extra passes through the networks run in the same
    (training) mode as the reconstruction, so BatchNorm normalises them by their own batch statistics as
    before, but they update no running statistics (:func:`~dmm.models.regularizers.frozen_running_stats`):
    the eval-mode networks that validation, cond(G) and the tangent spaces use keep the statistics of the
    data the reconstruction sees, not of mixup latents (whose variance differs).

    Args:
        encoder: builds the encoder from ``(input_shape, latent_dim)``.
        decoder: builds the decoder from ``(latent_dim, input_shape)``.
        input_shape: (C, H, W) of the images (linked from the data module by the CLI).
        latent_dim: k, the dimension of the learned manifold.
        regularizer: extra training loss terms, e.g. ``Isometry(iso_weight=0.1, piso_weight=0.1)`` (YAML:
            ``regularizer: {class_path: Isometry, init_args: {iso_weight: 0.1}}``); ``None``: plain autoencoder.
        geometry_samples: validation latents used for the geometry metrics (0 turns them off).
        num_classes: classes of the data it was trained on (linked by the CLI); provenance only, unused.
        optimizer: optimiser factory, called with the parameters.
        scheduler: optional learning-rate scheduler factory, called with the optimiser; stepped per epoch.
    """

    def __init__(
        self,
        encoder: EncoderFactory = ConvEncoder,
        decoder: DecoderFactory = ConvDecoder,
        input_shape: Shape = (1, 28, 28),
        latent_dim: int = 16,
        regularizer: Regularizer | None = None,
        geometry_samples: int = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["regularizer"])  # a module: saved below as plain data instead
        if isinstance(regularizer, dict):  # a checkpoint's hyperparameters, or a plain dict
            regularizer = build_regularizer(regularizer)
        # {class_path, init_args} as LightningCLI writes it: the checkpoint loads with weights_only=True.
        self.hparams["regularizer"] = regularizer.as_config() if regularizer is not None else None
        self.input_shape, self.latent_dim = tuple(input_shape), latent_dim
        self.encoder = encoder(self.input_shape, latent_dim)
        self.decoder = decoder(latent_dim, self.input_shape)
        self.regularizer = regularizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self.example_input_array = torch.zeros(2, *self.input_shape)
        self._check_shapes()

    def _check_shapes(self) -> None:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            z = self.encoder(torch.zeros(2, *self.input_shape))
            out = self.decoder(z)
        self.train(was_training)
        if tuple(z.shape) != (2, self.latent_dim) or tuple(out.shape[1:]) != self.input_shape:
            raise DmmError(
                f"the autoencoder maps images {self.input_shape} to latents {tuple(z.shape[1:])} and back to "
                f"{tuple(out.shape[1:])}: encoder and decoder must map (C, H, W) = {self.input_shape} to "
                f"({self.latent_dim},) and back; check model.encoder / model.decoder in the config"
            )

    def encode(self, x: Tensor) -> Tensor:
        """Latents (B, k) of images x in [0, 1], (B, C, H, W)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] of latents z (B, k)."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructions D(E(x)) of images x in [0, 1], same shape."""
        return self.decode(self.encode(x))

    def regularize(self, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        """The regulariser's weighted loss terms for a batch x with latents z ({} without one); its passes
        through the networks update no BatchNorm running statistics."""
        if self.regularizer is None:
            return {}
        with frozen_running_stats(self.encoder, self.decoder):
            return self.regularizer(self, x, z)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x = batch[0]
        z = self.encode(x)
        mse = F.mse_loss(self.decode(z), x)
        terms = self.regularize(x, z) if stage == "train" else {}
        loss = mse + sum(terms.values())
        if not torch.isfinite(loss):
            raise DmmError(
                f"{stage} loss is {loss.item()} at global step {self.global_step}: lower the learning rate "
                "(--model.optimizer.init_args.lr) or the regulariser weights"
            )
        sync = stage != "train"
        self.log(f"{stage}/mse", mse, prog_bar=True, sync_dist=sync)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, sync_dist=sync)
        if terms:
            self.log(f"{stage}/loss", loss, sync_dist=sync)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
        if batch_idx == 0 and self.hparams.geometry_samples > 0:
            self._log_geometry(batch[0][: self.hparams.geometry_samples], "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")
        if batch_idx == 0 and self.hparams.geometry_samples > 0:
            self._log_geometry(batch[0][: self.hparams.geometry_samples], "test")

    def _log_geometry(self, x: Tensor, stage: str) -> None:
        s = tangent_space(self.decoder, self.encode(x)).singular_values
        self.log(f"{stage}/cond_G", (s[:, 0] / s[:, -1]).pow(2).mean(), sync_dist=True)
        self.log(f"{stage}/isometry_error", (s - 1).pow(2).mean(), sync_dist=True)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer, self.scheduler)
