"""The linear-subspace data and the two-layer ReLU net of Melamed et al.: the subspace, its exact inverse and
tangents, the labels' rule, the init scale and the input gradient's formula against independent references; the
configs agree with each other and a sampled point of the regimes sweep runs through the CLI.

Tiny sizes (8x8 images on a 3-d subspace, 64/32/32 samples): the maths, not the scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_runs import run
from test_sweeps import dmm_arguments

from dmm.data import LinearSubspaceDataModule
from dmm.data.synthetic import SPLITS, rng_stream
from dmm.errors import DmmError
from dmm.manifold import decoder_jacobian, tangent_basis
from dmm.nets import TwoLayerReLU

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "linear_subspace"
TINY = {"latent_dim": 3, "image_size": 8, "num_classes": 3, "num_train": 64, "num_val": 32, "num_test": 32,
        "batch_size": 16}  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def tiny(**changes) -> LinearSubspaceDataModule:
    data = LinearSubspaceDataModule(**(TINY | changes))
    data.setup()
    return data


def test_images_and_labels_have_the_documented_shapes_and_ranges() -> None:
    data = tiny()
    assert (data.num_classes, data.input_shape, tuple(data.basis.shape)) == (3, (1, 8, 8), (64, 3))
    for split, size in (("train", 64), ("val", 32), ("test", 32)):
        x, y = data.datasets[split].tensors
        assert x.shape == (size, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.shape == (size,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 3
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)


def test_data_lie_exactly_in_the_offset_plus_the_span_of_an_orthonormal_basis() -> None:
    data = tiny(latent_std=3.0)  # many samples shrunk: they too stay on the subspace
    a = data.basis.double()
    assert torch.allclose(a.T @ a, torch.eye(3, dtype=torch.float64), atol=1e-6)
    for split in SPLITS:
        centred = data.datasets[split].tensors[0].flatten(1).double() - 0.5
        residual = centred - centred @ a @ a.T  # the part outside span(A)
        assert residual.norm(dim=1).max() < 1e-6
        assert torch.allclose(centred, data.latents[split].double() @ a.T, atol=1e-6)  # x = c + A z, z stored


def test_shrinking_keeps_pixels_in_the_box_and_scales_each_latent_without_changing_its_class() -> None:
    data = tiny(latent_std=3.0)
    raw = 3.0 * torch.randn(64, 3, generator=rng_stream(0, "linear/train"))  # the draw before shrinking
    factor = data.latents["train"] / raw  # one factor per row, in (0, 1]
    assert torch.allclose(factor, factor[:, :1].expand(-1, 3), atol=1e-5)
    assert 0 < factor.min() and factor.max() <= 1 and (factor[:, 0] < 1).sum() > 10 and (factor[:, 0] == 1).any()
    pixels = 0.5 + raw @ data.basis.T
    assert torch.equal(factor[:, 0] == 1, ((pixels >= 0) & (pixels <= 1)).all(dim=1))  # only those that left
    assert torch.equal(data.label(raw), data.datasets["train"].tensors[1])


def test_labels_are_the_linear_rule_read_back_from_the_images() -> None:
    data = tiny(num_train=3000)
    v = data.label_map.double()
    assert torch.allclose(v @ v.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    x, y = data.datasets["train"].tensors
    z = (x.flatten(1).double() - 0.5) @ data.basis.double()  # the latent, recovered from the image alone
    scores = z @ v.T
    assert torch.equal(scores.argmax(dim=1), y)
    assert (torch.bincount(y, minlength=3) / 3000 - 1 / 3).abs().max() < 0.04  # equally likely classes
    binary = tiny(num_classes=2, num_train=500)  # two classes: the sign of (v1 - v0) . z
    direction = binary.label_map[1] - binary.label_map[0]
    assert torch.equal((binary.latents["train"] @ direction > 0).long(), binary.datasets["train"].tensors[1])


def test_the_seed_fixes_everything_and_another_seed_changes_everything() -> None:
    one, again, other = tiny(), tiny(), tiny(seed=1)
    for split in SPLITS:
        assert torch.equal(one.datasets[split].tensors[0], again.datasets[split].tensors[0])
        assert not torch.allclose(one.datasets[split].tensors[0], other.datasets[split].tensors[0])
    assert not torch.allclose(one.basis, other.basis)


def test_exact_manifold_inverts_on_the_data_and_projects_orthogonally_off_it() -> None:
    data = tiny()
    manifold = data.exact_manifold()
    assert (manifold.latent_dim, manifold.input_shape) == (3, (1, 8, 8))
    x = data.datasets["test"].tensors[0]
    z = manifold.encoder(x)
    assert torch.allclose(z, data.latents["test"], atol=1e-6)
    assert torch.allclose(manifold.decoder(z), x, atol=1e-6)
    # Off the data: E(x + v) = E(x) for v orthogonal to span(A), and x + v - D(E(x + v)) = v is orthogonal to A.
    a = data.basis
    noise = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    v = (noise - noise @ a @ a.T).view_as(x)
    assert torch.allclose(manifold.encoder(x + v), z, atol=1e-5)
    assert torch.allclose(x + v - manifold.decoder(manifold.encoder(x + v)), v, atol=1e-5)
    manifold.to(torch.float64)  # a copy of A: the data module's keeps its dtype
    assert data.basis.dtype == torch.float32


def test_tangents_are_the_span_of_the_basis_everywhere() -> None:
    data = tiny()
    decoder = data.exact_manifold().decoder
    z = 5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(2))  # anywhere, not only at the data
    jacobian = decoder_jacobian(decoder, z)
    assert torch.allclose(jacobian, data.basis.expand(4, -1, -1), atol=1e-6)
    q = tangent_basis(decoder, z)
    projector = data.basis @ data.basis.T
    assert torch.allclose(q @ q.transpose(1, 2), projector.expand(4, -1, -1), atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latent_dim": 1}, "latent_dim"),
        ({"latent_dim": 64}, "latent_dim"),
        ({"num_classes": 4}, "num_classes"),
        ({"latent_std": 0.0}, "latent_std"),
        ({"offset": 1.0}, "offset"),
        ({"num_val": 0}, "num_train/num_val/num_test"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_are_one_line_errors(changes: dict, message: str) -> None:
    with pytest.raises(DmmError, match=message):
        LinearSubspaceDataModule(**(TINY | changes))


def test_init_scale_multiplies_the_default_initialisation_exactly() -> None:
    torch.manual_seed(0)
    default = TwoLayerReLU((1, 8, 8), 3, width=50)
    for scale in (0.01, 0.3, 2.0):
        torch.manual_seed(0)
        scaled = TwoLayerReLU((1, 8, 8), 3, width=50, init_scale=scale)
        for (name, p), q in zip(default.named_parameters(), scaled.parameters(), strict=True):
            assert torch.equal(q, p * scale), name
    assert default(torch.rand(5, 1, 8, 8)).shape == (5, 3)
    assert (default.hidden.weight.shape, default.out.weight.shape) == ((50, 64), (3, 50))


def test_input_gradient_is_w1_transposed_times_active_units_times_w2() -> None:
    net = TwoLayerReLU((1, 8, 8), 3, width=40).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w1, b1, w2 = net.hidden.weight, net.hidden.bias, net.out.weight
    active = (x.flatten(1) @ w1.T + b1 > 0).double()  # relu'(W1 x + b1), (B, width)
    for j in range(3):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(xg)[:, j].sum(), xg)
        formula = (active * w2[j]) @ w1  # row b: W1^T diag(relu'(W1 x_b + b1)) W2[j]
        assert torch.allclose(grad.flatten(1), formula, atol=1e-12)


@pytest.mark.parametrize(("width", "init_scale"), [(0, 1.0), (10, 0.0), (10, -1.0), (10, float("inf"))])
def test_bad_network_arguments_are_one_line_errors(width: int, init_scale: float) -> None:
    with pytest.raises(DmmError, match="TwoLayerReLU"):
        TwoLayerReLU((1, 8, 8), 2, width=width, init_scale=init_scale)


def test_classifier_and_geometry_configs_describe_the_same_model_and_measure() -> None:
    classifier = yaml.safe_load((CONFIGS / "classifier.yaml").read_text())
    geometry = yaml.safe_load((CONFIGS / "geometry.yaml").read_text())
    for key in ("network", "mean", "std"):
        assert classifier["model"]["init_args"][key] == geometry["model"]["init_args"][key], key
    assert classifier["evaluation"]["measure"] == geometry["evaluation"]["measure"]
    assert classifier["evaluation"]["every_n_epochs"] == classifier["trainer"]["max_epochs"]  # once, at the end
    assert classifier["model"]["init_args"]["mean"] == [LinearSubspaceDataModule().hparams.offset]


def test_a_sampled_point_of_the_regimes_sweep_measures_its_geometry(tmp_path: Path) -> None:
    sweep = yaml.safe_load((ROOT / "sweeps" / "linear_subspace_regimes.yaml").read_text())
    values = {key: spec["values"][1] for key, spec in sweep["parameters"].items()}
    args = dmm_arguments(sweep, values)
    base = args.index("--config") + 1
    args[base] = str(ROOT / args[base])
    cheap = ["--trainer.max_epochs=1", "--evaluation.every_n_epochs=1", "--trainer.limit_train_batches=2",
             "--trainer.limit_val_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             "--evaluation.num_images=8", "--evaluation.measure.attack.steps=5", "--evaluation.num_grid=0",
             "--evaluation.checks=false"]  # fmt: skip
    run(*args, *cheap, f"--trainer.default_root_dir={tmp_path}")
    (folder,) = tmp_path.iterdir()
    result = json.loads((folder / "geometry" / "val-epoch0.json").read_text())
    assert result["autoencoder"] == "data" and result["settings"]["clamp"] is False
    assert sweep["metric"]["name"].removeprefix("val/geometry/") in result["summary"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["init_args"]["network"]["init_args"]["init_scale"] == 0.1
    assert config["model"]["init_args"]["optimizer"]["init_args"]["weight_decay"] == 0.01
