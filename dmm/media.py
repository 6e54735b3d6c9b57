"""Image grids with one titled column per image kind, for report PNGs and W&B images alike (pure: no Lightning).

A grid shows N examples as rows and, e.g., ``x``, ``x_adv``, ``d``, ``d_on``, ``d_off`` as columns. Image
columns hold pixels in [0, 1]. Perturbation columns are signed and tiny, so they are drawn amplified
around mid-grey: per row, one scale for all signed columns (``d = d_on + d_off`` stays readable as a sum,
and the parts' sizes stay comparable), written under the row's label.

Example:
    >>> fig = titled_grid({"x": x, "x_adv": x_adv, "d": x_adv - x}, signed={"d"})
    >>> fig.savefig("grid.png")                        # a report PNG
    >>> wandb.log({"val/examples": wandb.Image(to_rgb(fig).numpy())})
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def signed_scale(columns: Mapping[str, Tensor], signed: Collection[str]) -> Tensor:
    """(N,) largest absolute value over the signed columns of each row (1 where a row is all zero)."""
    stacked = [columns[name].detach().float().flatten(1).abs().amax(dim=1) for name in signed]
    scale = torch.stack(stacked).amax(dim=0)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def display_images(columns: Mapping[str, Tensor], signed: Collection[str] = ()) -> dict[str, Tensor]:
    """Each column as drawn, (N, C, H, W) in [0, 1]: images clamped, signed columns 0.5 + v / (2 · row scale)."""
    scale = signed_scale(columns, signed) if signed else None
    shown = {}
    for name, images in columns.items():
        images = images.detach().float().cpu()
        if name in signed:
            images = 0.5 + images / (2 * scale.cpu().view(-1, 1, 1, 1))
        shown[name] = images.clamp(0, 1)
    return shown


def titled_grid(
    columns: Mapping[str, Tensor],
    *,
    signed: Collection[str] = (),
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.1,
) -> Figure:
    """A figure of N rows and one titled column per entry of ``columns``.

    Args:
        columns: name -> images (N, C, H, W), C = 1 (grey) or 3 (RGB), the same N for all; images in [0, 1].
        signed: names of columns that are signed perturbations, drawn amplified around mid-grey.
        row_labels: N labels, e.g. ``"y=3 → 5"``, written left of each row.
        title: a line above the grid.
        cell_inches: size of one image on the page.

    Returns:
        A matplotlib ``Figure`` (no pyplot state): ``fig.savefig(path)``, or :func:`to_rgb` for an array.
    """
    if not columns:
        raise ValueError("titled_grid needs at least one column")
    unknown = set(signed) - set(columns)
    if unknown:
        raise ValueError(f"signed names {sorted(unknown)} are not columns ({list(columns)})")
    sizes = {name: tuple(images.shape) for name, images in columns.items()}
    if any(len(s) != 4 or s[1] not in (1, 3) for s in sizes.values()) or len({s[0] for s in sizes.values()}) != 1:
        raise ValueError(f"every column must be (N, C, H, W) with C 1 or 3 and the same N; got {sizes}")
    rows = next(iter(sizes.values()))[0]
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    shown = display_images(columns, signed)
    scale = signed_scale(columns, signed) if signed else None

    figure = Figure(figsize=(cell_inches * len(columns) + 0.6, cell_inches * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, len(columns), squeeze=False)
    for j, (name, images) in enumerate(shown.items()):
        axes[0, j].set_title(name + (" (±)" if name in signed else ""), fontsize=9)
        for i in range(rows):
            ax = axes[i, j]
            image = images[i].permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    for i in range(rows):
        label = [row_labels[i]] if row_labels is not None else []
        if scale is not None:
            label.append(f"± {scale[i].item():.2g}")
        axes[i, 0].set_ylabel("\n".join(label), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def to_rgb(figure: Figure) -> Tensor:
    """The figure rendered as an RGB image (H, W, 3), uint8, e.g. for ``wandb.Image``."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return torch.from_numpy(np.array(canvas.buffer_rgba())[..., :3])
