"""Lightning callback: clinging then dimpling, tracked on fixed validation points while the classifier trains."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor

from dmm.attacks import PGD
from dmm.callbacks.evaluation import finite_or_none, fixed_subset
from dmm.errors import DmmError
from dmm.io import atomic_write
from dmm.manifold import Subspace, random_basis, tangent_basis
from dmm.measures.geometry import ARMS, GRADIENTS, Geometry, recalibrated
from dmm.models.loading import load_autoencoder

log = logging.getLogger(__name__)


class ManifoldDynamics(L.Callback):
    """Track the input gradient's on-manifold fraction and the boundary distances during training.

    On a fixed seeded set of ``num_points`` validation images, whose tangent bases (and fixed random
    control subspaces) are computed once when fit starts, it measures (see :mod:`dmm.measures.geometry`) after
    global step 1, every ``every_n_steps`` steps and after the last batch of every epoch (with ``doubling``
    also after steps 2, 4, 8, ... below ``every_n_steps``, to resolve the fast early phase): the on-manifold
    fraction of the CE and margin input gradients next to the random baseline, and the median and quartiles
    of the L2 distance to the decision boundary found by early-stopped PGD, unconstrained, on- and
    off-manifold. Each measurement goes to every logger as ``dynamics/...`` at its global step and is kept
    in the callback's state, so the history survives a resume. ``dynamics.json`` is written into the run
    folder after every epoch; at the end of fit also ``dynamics.png`` and, with a WandbLogger, W&B line
    plots of the whole history.

    Args:
        autoencoder: path of a ``dmm fit`` autoencoder checkpoint (the manifold model); ``None`` turns
            the callback off.
        num_points: size of the fixed validation subset.
        every_n_steps: measure every this many optimizer steps.
        doubling: also measure at the powers of two below ``every_n_steps`` (a log-spaced start).
        attack: the boundary search, early-stopped L2 PGD: ``eps`` the largest distance searched (farther
            points count as ``inf``), ``step_size`` the resolution; ``steps * step_size`` should reach ``eps``.
        batch_size: points measured at once (and the size of each recalibration batch).
        seed: seeds the subset, the random control subspaces and the recalibration images.
        recalibrate: before each measurement, re-estimate BatchNorm's running statistics on this many fixed
            training batches (:func:`dmm.measures.geometry.recalibrated`; restored afterwards): early in
            training the eval-mode statistics lag the weights by many updates, so without it the measured
            network is not the trained one. 0 measures the network as its running statistics stand.
        random_arm: also search the boundary along the random subspace.
    """

    def __init__(
        self,
        autoencoder: str | None = None,
        num_points: int = 256,
        every_n_steps: int = 50,
        doubling: bool = True,
        attack: PGD = PGD(eps=4.0, steps=100, step_size=0.05, early_stop=True),
        batch_size: int = 256,
        seed: int = 0,
        recalibrate: int = 8,
        random_arm: bool = True,
    ) -> None:
        if recalibrate < 0:
            raise DmmError(f"ManifoldDynamics recalibrate must be >= 0, got {recalibrate}")
        for name, value in (("num_points", num_points), ("every_n_steps", every_n_steps)):
            if value < 1:
                raise DmmError(f"ManifoldDynamics {name} must be >= 1, got {value}")
        if batch_size < 1:
            raise DmmError(f"ManifoldDynamics batch_size must be >= 1, got {batch_size}")
        self.geometry = Geometry(attack, random_arm)
        self.recalibrate = recalibrate
        if attack.reach < attack.eps:
            rank_zero_warn(
                f"ManifoldDynamics: steps * step_size = {attack.reach:g} < eps = {attack.eps:g}; "
                "distances beyond it are never found"
            )
        self.autoencoder_path = autoencoder
        self.num_points, self.every_n_steps, self.batch_size, self.seed = num_points, every_n_steps, batch_size, seed
        self.doubling = doubling
        self.autoencoder = None
        self.points: dict[str, Tensor] = {}  # x, y, basis, random of the fixed subset
        self.history: list[dict[str, float]] = []

    # --- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict["history"]]

    # --- hooks -------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.autoencoder_path is None:
            rank_zero_warn("ManifoldDynamics is off: no autoencoder checkpoint given")
            return
        shape = getattr(pl_module, "hparams", {}).get("input_shape")
        self.autoencoder = load_autoencoder(self.autoencoder_path, shape)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, unlike in setup, the model is already on its device.
        if self.autoencoder is not None:
            self.points = self._fixed_points(trainer, pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.points:
            return
        step = trainer.global_step
        epoch_end = batch_idx + 1 == trainer.num_training_batches
        if self.history and self.history[-1]["step"] == step:
            return  # gradient accumulation, or the epoch end falling on a measured step, or a resume
        if self.due(step) or epoch_end:
            self._measure(trainer, pl_module)

    def due(self, step: int) -> bool:
        """Whether global step ``step`` (>= 1) is on the schedule (epoch ends are measured as well)."""
        early_power_of_two = self.doubling and 0 < step < self.every_n_steps and step & (step - 1) == 0
        return step == 1 or step % self.every_n_steps == 0 or early_power_of_two

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.points:
            self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.points:
            self._write(trainer, final=True)

    # --- work --------------------------------------------------------------------------------------------

    def _fixed_points(self, trainer: L.Trainer, device: torch.device) -> dict[str, Tensor]:
        if trainer.datamodule is None:
            raise DmmError("ManifoldDynamics needs a data module with a validation set (data.val_dataloader)")
        dataset = trainer.datamodule.val_dataloader().dataset
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: the same points on any device
        torch.randperm(len(dataset), generator=generator)  # the draw fixed_subset makes: the random bases follow it
        x, y, _, _ = fixed_subset(dataset, self.num_points, self.seed)
        autoencoder = self.autoencoder.to(device)
        bases = []
        for start in range(0, len(x), self.batch_size):
            with torch.no_grad():
                z = autoencoder.encoder(x[start : start + self.batch_size].to(device))
            bases.append(tangent_basis(autoencoder.decoder, z))
        basis = torch.cat(bases)
        random = random_basis(*basis.shape, generator=generator).to(device)
        points = {"x": x.to(device), "y": y.to(device), "basis": basis, "random": random}
        if self.recalibrate:
            train = trainer.datamodule.train_dataloader().dataset
            images, _, _, _ = fixed_subset(train, self.recalibrate * self.batch_size, self.seed + 1)
            points["recalibration"] = images.to(device)
        return points

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        p, b = self.points, self.batch_size
        batches = list(p["recalibration"].split(b)) if "recalibration" in p else []
        with recalibrated(pl_module, batches) as model:
            shards = [
                self.geometry.measure_at(model, p["x"][i : i + b], p["y"][i : i + b], Subspace(p["basis"][i : i + b]),
                                         Subspace(p["random"][i : i + b]))
                for i in range(0, len(p["x"]), b)
            ]  # fmt: skip
        summary = self.geometry.summarize({key: torch.cat([s[key] for s in shards]) for key in shards[0]})
        # Straight to the loggers: self.log would drop every step that is not a multiple of log_every_n_steps.
        metrics = {f"dynamics/{key}": value for key, value in summary.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **summary})

    @rank_zero_only
    def _write(self, trainer: L.Trainer, final: bool = False) -> None:
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        n, k = self.points["basis"].shape[1:]
        payload = {
            "autoencoder": str(self.autoencoder_path),
            "num_points": len(self.points["x"]),
            "latent_dim": k,
            "num_pixels": n,
            "sqrt_k_over_n": math.sqrt(k / n),
            "every_n_steps": self.every_n_steps,
            "doubling": self.doubling,
            "search": self.geometry.attack.as_dict(),
            "null": "a distance quantile beyond the search (inf), or a figure with no points to average (NaN)",
            "history": [finite_or_none(h) for h in self.history],
        }
        text = json.dumps(payload, indent=2, allow_nan=False)
        atomic_write(folder / "dynamics.json", lambda path: path.write_text(text))
        if not final:
            return
        figure = plot_history(self.history, self.geometry.attack.eps, math.sqrt(k / n))
        atomic_write(folder / "dynamics.png", lambda path: figure.savefig(path, format="png", dpi=120))
        for logger in trainer.loggers:
            if hasattr(logger, "log_to_experiment"):  # dmm's ResilientWandbLogger: guarded rich media
                try:
                    media = self._media(folder / "dynamics.png")
                except Exception as error:  # W&B media must never cost a run whose results are on disk
                    log.warning("W&B plots of the dynamics not logged (%s: %s)", type(error).__name__, error)
                else:
                    logger.log_to_experiment(media)

    def _media(self, png: Path) -> dict:
        import wandb

        steps = [h["step"] for h in self.history]
        eps = self.geometry.attack.eps

        def series(key: str) -> list[float]:
            return [min(h[key], eps) if key.startswith("distance") else h[key] for h in self.history]

        return {
            "dynamics/distance_plot": wandb.plot.line_series(
                xs=steps,
                ys=[series(f"distance/{a}/all_median") for a in ARMS if f"distance/{a}/median" in self.history[0]],
                keys=[a for a in ARMS if f"distance/{a}/median" in self.history[0]],
                title=f"median L2 distance to the boundary (capped at eps = {eps:g})",
                xname="global step",
            ),
            "dynamics/gradient_plot": wandb.plot.line_series(
                xs=steps,
                ys=[series(f"grad_{kind}/{g}") for g in GRADIENTS for kind in ("on", "random")],
                keys=[f"{g} {kind}" for g in GRADIENTS for kind in ("on", "random")],
                title="on-manifold fraction of the input gradient",
                xname="global step",
            ),
            "dynamics/plot": wandb.Image(str(png)),
        }


def plot_history(history: list[dict[str, float]], eps: float, baseline: float) -> Figure:
    """Two panels over global steps: boundary distances (median, interquartile band), gradient fractions."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    distances, gradients = figure.subplots(1, 2)
    steps = [h["step"] for h in history]
    arms = [a for a in ARMS if history and f"distance/{a}/median" in history[0]]
    colours, styles = ("black", "tab:blue", "tab:red", "tab:grey"), ("--", "-", "-", ":")
    for attack, colour, style in zip(arms, colours, styles, strict=False):
        # Distances beyond the search are inf: drawn at eps, the dashed line.
        # Over the whole fixed population (see Geometry.summarize), not the points correct at each step.
        q = {key: [min(h[f"distance/{attack}/all_{key}"], eps) for h in history] for key in ("q25", "median", "q75")}
        distances.plot(
            steps,
            q["median"],
            color=colour,
            linestyle=style,
            label=attack,
            marker=".",
            zorder=4 if attack == "full" else 3,
        )
        distances.fill_between(steps, q["q25"], q["q75"], color=colour, alpha=0.15, linewidth=0)
    distances.axhline(eps, color="grey", linestyle="--", linewidth=1, label="search limit")
    distances.set(
        xlabel="global step", ylabel="L2 distance to the boundary", title="distance (all points): median, quartiles"
    )
    for name, colour in zip(GRADIENTS, ("tab:green", "tab:purple"), strict=True):
        gradients.plot(steps, [h[f"grad_on/{name}"] for h in history], color=colour, marker=".", label=name)
        gradients.plot(steps, [h[f"grad_random/{name}"] for h in history], color=colour, linestyle=":")
    gradients.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="sqrt(k/n)")
    gradients.set(
        xlabel="global step",
        ylabel="||Proj g|| / ||g||",
        ylim=(0, 1),
        title="gradient on-manifold (dotted: random)",
    )
    for axes in (distances, gradients):
        axes.set_xscale("log")  # clinging happens in the first few hundred steps
        axes.legend(fontsize="small")
    return figure
