"""Isometric regularisers: vanish exactly on isometries, agree with full Jacobians, train, leave BatchNorm's
running statistics alone, reload."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmm.cli import main
from dmm.data import SyntheticManifoldDataModule
from dmm.manifold import decoder_jacobian, tangent_space
from dmm.models import Autoencoder, Isometry, Regularizer, RelaxedDistortion, load_autoencoder
from dmm.models.regularizers import decoder_jvp, frozen_running_stats, metric_traces, pseudo_inverse_loss, sphere
from dmm.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE, K = (1, 4, 4), 3  # n = 16 pixels, a 3-d latent

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`", "ignore:LightningCLI's args")


class LinearDecoder(nn.Module):
    """D(z) = A z + b: its Jacobian is A everywhere."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, z: Tensor) -> Tensor:
        return (z @ self.a.T + self.b).view(-1, *SHAPE)


class LinearEncoder(LinearDecoder):
    """E(x) = A^T (x - b): the pseudo-inverse of D(z) = A z + b when A has orthonormal columns."""

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1) - self.b) @ self.a


def linear_autoencoder(regularizer: Regularizer, singular_values: list[float]) -> Autoencoder:
    """An autoencoder whose decoder's Jacobian A = U diag(s) V^T (U: orthonormal columns) and encoder A^T (x - b)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(16, K, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(K, K, generator=gen)).Q
    a, b = u @ torch.diag(torch.tensor(singular_values)) @ v.T, torch.rand(16, generator=gen)
    encoder, decoder = LinearEncoder(a, b), LinearDecoder(a, b)
    return Autoencoder(lambda *_: encoder, lambda *_: decoder, SHAPE, K, regularizer=regularizer)


def regularise(model: Autoencoder) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The model's training regulariser on a random batch, and its gradient's norm over decoder, encoder parameters."""
    torch.manual_seed(1)
    x = torch.rand(64, *SHAPE)
    terms = model.regularize(x, model.encode(x))
    norms = []
    for net in (model.decoder, model.encoder):
        grads = torch.autograd.grad(sum(terms.values()), list(net.parameters()), retain_graph=True, allow_unused=True)
        norms.append(torch.stack([torch.zeros(())] + [g.norm() for g in grads if g is not None]).norm())
    return terms, *norms


UNIT = {
    Isometry: Isometry(iso_weight=1.0, piso_weight=1.0),
    RelaxedDistortion: RelaxedDistortion(distortion_weight=1.0),
}


@pytest.mark.parametrize("cls", [Isometry, RelaxedDistortion])
def test_an_isometry_is_a_minimum(cls: type[Regularizer]) -> None:
    terms, decoder_grad, encoder_grad = regularise(linear_autoencoder(UNIT[cls], [1.0, 1.0, 1.0]))
    assert all(abs(value) < 1e-5 for value in terms.values()), terms
    assert decoder_grad < 1e-5 and encoder_grad < 1e-5


def test_only_the_scale_free_regulariser_accepts_a_scaled_isometry() -> None:
    irvae_terms, *irvae_grads = regularise(linear_autoencoder(UNIT[RelaxedDistortion], [3.0, 3.0, 3.0]))
    assert irvae_terms["distortion"] < 1e-5 and max(irvae_grads) < 1e-5
    iae_terms, *_ = regularise(linear_autoencoder(UNIT[Isometry], [3.0, 3.0, 3.0]))
    assert iae_terms["iso"] > 1 and iae_terms["piso"] > 1  # (||3 u|| - 1)^2 = 4 for every unit u


@pytest.mark.parametrize("cls", [Isometry, RelaxedDistortion])
def test_a_distorting_decoder_is_penalised_with_a_gradient(cls: type[Regularizer]) -> None:
    terms, decoder_grad, encoder_grad = regularise(linear_autoencoder(UNIT[cls], [2.0, 1.0, 0.5]))
    assert all(value > 0.05 for value in terms.values()), terms
    assert decoder_grad > 0.05  # through the jvp (and vjp) into the decoder's weights
    if cls is Isometry:
        assert encoder_grad > 0.05  # L_piso, through the encoder's vjp
    else:
        assert encoder_grad == 0  # the latents are detached: the distortion shapes the decoder only


def test_relaxed_distortion_estimate_is_never_below_its_minimum() -> None:
    # With directions of norm sqrt(k), Cauchy-Schwarz then Jensen give F_hat >= 1/k for any decoder and batch.
    for seed in range(5):
        torch.manual_seed(seed)
        model = Autoencoder(
            encoder=functools.partial(MLPEncoder, hidden=(16,)),
            decoder=functools.partial(MLPDecoder, hidden=(16,)),
            input_shape=SHAPE,
            latent_dim=K,
            regularizer=RelaxedDistortion(),
        )
        x = torch.rand(8, *SHAPE)
        assert model.regularize(x, model.encode(x))["distortion"] > -1e-6  # 0 up to rounding


def test_directional_derivatives_match_full_jacobians() -> None:
    torch.manual_seed(0)
    decoder, encoder = MLPDecoder(K, SHAPE, hidden=(16,)), MLPEncoder(SHAPE, K, hidden=(16,))
    z, x = torch.randn(5, K), torch.rand(5, *SHAPE)
    u = sphere(5, K, like=z)
    _, ju = decoder_jvp(decoder, z, u)
    torch.testing.assert_close(ju.flatten(1), torch.einsum("bnk,bk->bn", decoder_jacobian(decoder, z), u))
    # u^T J_E(x) by one vjp against the encoder's full Jacobian (B, k, n) by reverse mode, row by row.
    j_e = torch.func.vmap(torch.func.jacrev(lambda xi: encoder(xi[None])[0]))(x).flatten(2)
    expected = (torch.einsum("bk,bkn->bn", u, j_e).norm(dim=1) - 1).pow(2).mean()
    torch.testing.assert_close(pseudo_inverse_loss(encoder, x, u), expected)


def test_hutchinson_traces_match_the_exact_metric() -> None:
    torch.manual_seed(0)
    decoder, z, draws = MLPDecoder(K, SHAPE, hidden=(16,)), torch.randn(4, K), 4000
    j = decoder_jacobian(decoder, z)
    g = j.mT @ j  # (B, k, k)
    exact = (g.diagonal(dim1=1, dim2=2).sum(-1), (g @ g).diagonal(dim1=1, dim2=2).sum(-1))
    zs = z.repeat(draws, 1)
    estimates = metric_traces(decoder, zs, sphere(*zs.shape, like=zs, radius=K**0.5))
    for samples, value in zip(estimates, exact, strict=True):
        samples = samples.detach().view(draws, 4)
        # The mean of `draws` iid samples is within 5 standard errors (estimated from the samples themselves)
        # with probability 1 - 6e-7 by the CLT; a band below 5 % of the value shows the check has teeth.
        stderr = samples.std(dim=0) / draws**0.5
        assert ((samples.mean(dim=0) - value).abs() < 5 * stderr).all()
        assert (5 * stderr < 0.05 * value).all()


def _geometry(model: Autoencoder, x: Tensor) -> dict[str, float]:
    """Reconstruction error, isometry error mean (s - 1)^2, and its scale-free version min_c mean (c s - 1)^2."""
    model.eval()
    with torch.no_grad():
        z = model.encode(x)
        mse = F.mse_loss(model.decode(z), x).item()
    s = tangent_space(model.decoder, z).singular_values
    model.train()
    scaled = 1 - s.mean() ** 2 / s.pow(2).mean()  # the best c is mean(s) / mean(s^2)
    return {"mse": mse, "isometry": (s - 1).pow(2).mean().item(), "scaled": scaled.item()}


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Geometry at the validation latents before and after 150 steps of each autoencoder, same seed and data."""
    results, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny MLPs train several times faster on one thread of a shared CPU
    for name, regularizer in (("plain", None), ("iae", Isometry()), ("irvae", RelaxedDistortion())):
        L.seed_everything(0, verbose=False)
        data = SyntheticManifoldDataModule(latent_dim=2, image_size=8, num_train=1024, num_val=64, batch_size=32)
        data.setup()
        model = Autoencoder(
            encoder=functools.partial(MLPEncoder, hidden=(64, 64)),
            decoder=functools.partial(MLPDecoder, hidden=(64, 64)),
            input_shape=data.input_shape,
            latent_dim=2,
            optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
            regularizer=regularizer,
        )
        optimizer, x_val = model.configure_optimizers(), data.datasets["val"].tensors[0]
        before, step = _geometry(model, x_val), 0
        while step < 150:
            for batch in data.train_dataloader():
                loss = model.training_step(batch, step)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step == 150:
                    break
        results[name] = before, _geometry(model, x_val)
    torch.set_num_threads(threads)
    return results


def test_iae_training_makes_the_decoder_isometric(trained) -> None:
    (before, after), (_, plain) = trained["iae"], trained["plain"]
    assert after["isometry"] < 0.1 * before["isometry"]
    assert after["isometry"] < 0.25 * plain["isometry"]  # not just the scale-up any training does
    assert after["mse"] < 2 * plain["mse"]


def test_irvae_training_makes_the_decoder_a_scaled_isometry(trained) -> None:
    # A freshly initialised MLP decoder is nearly linear with nearly equal singular values, so "before" is
    # already almost scale-free-isometric; the plain autoencoder trained alike is the meaningful reference.
    (_, after), (_, plain) = trained["irvae"], trained["plain"]
    assert after["scaled"] < 0.5 * plain["scaled"]
    assert after["mse"] < 2 * plain["mse"]


def _bn_autoencoder(regularizer: Regularizer | None) -> Autoencoder:
    """A small conv autoencoder with BatchNorm in encoder and decoder (dmm.nets.ConvEncoder, ConvDecoder)."""
    torch.manual_seed(0)
    return Autoencoder(
        functools.partial(ConvEncoder, channels=(4, 8)),
        functools.partial(ConvDecoder, channels=(8, 4)),
        (1, 8, 8),
        latent_dim=2,
        regularizer=regularizer,
    )


@pytest.mark.parametrize("regularizer", [Isometry(mixup=1.0), RelaxedDistortion()])
def test_running_statistics_are_those_of_the_reconstruction_alone(regularizer: Regularizer) -> None:
    # The regularisers decode mixup latents (variance ~0.8 of the encoded ones) and I-AE encodes x once more;
    # had those passes moved the running statistics, the eval-mode networks (val/mse, cond(G), tangent
    # spaces) would not be the ones training fits.
    model = _bn_autoencoder(regularizer)
    plain = copy.deepcopy(model)
    plain.regularizer = None
    batch = (torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    initial = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert model.training_step(batch, 0) > plain.training_step(batch, 0)  # the same MSE, plus positive terms
    for name, buffer in plain.named_buffers():
        assert not torch.equal(buffer, initial[name]), name  # the reconstruction moved every statistic
        assert torch.equal(model.get_buffer(name), buffer), name


def test_frozen_statistics_keep_the_training_mode_gradient() -> None:
    # Freezing changes no output and no gradient: the layers still normalise by the batch's statistics.
    model, x = _bn_autoencoder(Isometry(iso_weight=1.0, piso_weight=1.0)), torch.rand(16, 1, 8, 8)
    tracking = copy.deepcopy(model)
    results = []
    for net, frozen in ((model, True), (tracking, False)):
        torch.manual_seed(1)
        with frozen_running_stats(net.encoder, net.decoder) if frozen else contextlib.nullcontext():
            terms = net.regularizer(net, x, net.encode(x))
        loss = sum(terms.values())
        results.append((loss, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)))
    (frozen_loss, frozen_grads), (loss, grads) = results
    torch.testing.assert_close(frozen_loss, loss, rtol=0, atol=0)
    for frozen_grad, grad in zip(frozen_grads, grads, strict=True):
        torch.testing.assert_close(frozen_grad, grad, rtol=0, atol=0)
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # restored
    assert not all(torch.equal(a, b) for a, b in zip(model.buffers(), tracking.buffers(), strict=True))


@pytest.mark.parametrize(
    ("config", "regularizer", "name", "value"),
    [
        ("autoencoder_iso.yaml", Isometry, "piso_weight", 0.5),
        ("autoencoder_irvae.yaml", RelaxedDistortion, "eta", 0.3),
    ],
)
def test_cli_checkpoints_reload_without_arguments(
    tmp_path: Path, config: str, regularizer: type[Regularizer], name: str, value: float
) -> None:
    os.environ.pop("DMM_RUN_DIR", None)
    main(
        ["fit", "--config", str(CONFIGS / "synthetic" / config), f"--model.regularizer.{name}", str(value)]
        + ["--data.num_train", "64", "--data.num_val", "32", "--trainer.max_steps", "2"]
        + ["--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        + ["--trainer.default_root_dir", str(tmp_path / "runs")]
    )
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoints/last.ckpt")
    # The regulariser is plain data in the checkpoint: Lightning's own loader rebuilds it with weights_only.
    model = Autoencoder.load_from_checkpoint(checkpoint, weights_only=True).eval()
    assert type(model.regularizer) is regularizer and getattr(model.regularizer, name) == value
    assert model.latent_dim == 4
    loaded = load_autoencoder(checkpoint)
    assert type(loaded.regularizer) is regularizer and not loaded.training
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
