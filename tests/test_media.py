"""Titled image grids: one titled column per entry, signed columns around mid-grey, a PNG and an RGB array."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmm.media import display_images, titled_grid, to_rgb


def _columns(channels: int = 1, rows: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(rows, channels, 8, 8)
    d_on, d_off = 0.01 * torch.randn_like(x), 0.03 * torch.randn_like(x)
    return {"x": x, "x_adv": (x + d_on + d_off).clamp(0, 1), "d": d_on + d_off, "d_on": d_on, "d_off": d_off}


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_has_one_titled_column_per_entry_and_one_row_per_image(channels: int, tmp_path: Path) -> None:
    columns = _columns(channels)
    fig = titled_grid(columns, signed={"d", "d_on", "d_off"}, row_labels=["a", "b", "c"], title="val, epoch 3")
    assert len(fig.axes) == 3 * 5
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles == ["x", "x_adv", "d (±)", "d_on (±)", "d_off (±)"]
    assert all(ax.get_title() == "" for ax in fig.axes[5:])  # titles on the top row only
    assert fig.axes[0].get_ylabel().startswith("a\n± ") and fig.axes[5].get_ylabel().startswith("b\n")
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == ((8, 8) if channels == 1 else (8, 8, 3))
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    rgb = to_rgb(fig)
    assert rgb.dtype == torch.uint8 and rgb.dim() == 3 and rgb.shape[2] == 3
    width, height = fig.get_size_inches() * fig.dpi
    assert abs(rgb.shape[1] - width) <= 1 and abs(rgb.shape[0] - height) <= 1


def test_signed_columns_share_one_scale_per_row_around_mid_grey() -> None:
    columns = _columns()
    shown = display_images(columns, signed={"d", "d_on", "d_off"})
    for name in ("d", "d_on", "d_off"):
        assert 0 <= shown[name].min() and shown[name].max() <= 1
    # One scale per row over all signed columns: the parts add up around 0.5 as the perturbations do.
    torch.testing.assert_close(shown["d"] - 0.5, (shown["d_on"] - 0.5) + (shown["d_off"] - 0.5))
    extreme = torch.stack([(shown[n] - 0.5).abs().flatten(1).amax(1) for n in ("d", "d_on", "d_off")]).amax(0)
    torch.testing.assert_close(extreme, torch.full((3,), 0.5))  # each row's largest value reaches black or white
    torch.testing.assert_close(shown["x"], columns["x"])  # images are drawn as they are
    zero = display_images({"d": torch.zeros(2, 1, 4, 4)}, signed={"d"})["d"]
    assert torch.equal(zero, torch.full_like(zero, 0.5))


@pytest.mark.parametrize(
    ("columns", "kwargs"),
    [
        ({}, {}),
        ({"x": torch.rand(2, 1, 4, 4), "y": torch.rand(3, 1, 4, 4)}, {}),
        ({"x": torch.rand(2, 2, 4, 4)}, {}),
        ({"x": torch.rand(2, 1, 4, 4)}, {"signed": {"d"}}),
        ({"x": torch.rand(2, 1, 4, 4)}, {"row_labels": ["only one"]}),
    ],
)
def test_bad_columns_are_refused(columns: dict, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        titled_grid(columns, **kwargs)
