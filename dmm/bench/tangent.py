"""[tangent] ``dmm.manifold.tangent_basis`` against the per-pixel backward loop and ``vmap(jacfwd)`` + QR.

The public replication builds the Jacobian one output pixel at a time: n = C·H·W reverse-mode passes
per image (784 on MNIST). Ours runs k forward-mode passes over the whole batch. Both references
finish with the same reduced QR, so all three return an orthonormal tangent basis (B, n, k). Timing does
not depend on the weights: the decoder keeps its random initialisation unless ``--autoencoder`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacfwd, vmap

from dmm.bench.core import Options, Row, Target, median, peak_memory_mb, repeat_times
from dmm.bench.inputs import SHAPE, autoencoder, model_args
from dmm.manifold import principal_angles, tangent_basis
from dmm.nets import ConvDecoder

PER_PIXEL_TARGET = Target(0.01)  # ours at least 100× faster per image
JACFWD_TARGET = Target(1.0)
REPLICATION_CHANNELS = (1024, 512, 256, 128)  # dmm.nets.ConvDecoder's default: the replication's decoder


@dataclass(frozen=True)
class Sizes:
    batch: int  # latents per tangent_basis call
    pixel_images: int  # images timed with the per-pixel loop (one repeat each)
    repeats: int
    pixels: int | None = None  # per-pixel loop over this many pixels, time scaled to all n (quick mode)


def per_pixel_basis(decoder: nn.Module, z: Tensor, pixels: int | None = None) -> Tensor:
    """Orthonormal basis (n, k) at one latent z (k,): one ``autograd.grad`` per output pixel, then QR.

    ``pixels`` stops after that many rows (warm-up, quick mode); the basis then spans only those rows' J.
    """
    with torch.enable_grad():
        z = z.detach()[None].requires_grad_(True)
        out = decoder(z).flatten()
        rows = [torch.autograd.grad(out[i], z, retain_graph=True)[0][0] for i in range(pixels or out.numel())]
    return torch.linalg.qr(torch.stack(rows)).Q  # J is (n, k)


def jacfwd_basis(decoder: nn.Module, z: Tensor) -> Tensor:
    """Orthonormal bases (B, n, k) by the textbook ``vmap(jacfwd(decode one image))`` and QR."""

    def single(v: Tensor) -> Tensor:
        return decoder(v[None]).flatten()

    return torch.linalg.qr(vmap(jacfwd(single))(z)).Q


def _rows(decoder: nn.Module, label: str, sizes: Sizes, opts: Options, weights: str) -> list[Row]:
    k = decoder.linear.in_features
    z = torch.randn(sizes.batch, k, generator=torch.Generator().manual_seed(0)).to(opts.device)
    setting = f"{label} decoder, {weights}, k = {k}, batch {sizes.batch}"
    last: dict[str, Tensor] = {}  # each function's latest result, to check that all three agree

    def keep(name, fn, *args):
        return lambda: last.__setitem__(name, fn(decoder, *args))

    samples = repeat_times(
        {"ours": keep("ours", tangent_basis, z), "jacfwd": keep("jacfwd", jacfwd_basis, z)},
        repeats=sizes.repeats,
        device=opts.device,
    )
    per_image = {name: [t / sizes.batch for t in times] for name, times in samples.items()}
    q = last["ours"]
    n = q.shape[1]
    pixels = min(sizes.pixels or n, n)
    per_pixel_basis(decoder, z[0], pixels=8)  # warm-up
    pixel_samples = repeat_times(
        {"per_pixel": keep("per_pixel", per_pixel_basis, z[0], pixels)},
        repeats=sizes.pixel_images,
        device=opts.device,
        warmup=0,
    )["per_pixel"]
    pixel_samples = [t * n / pixels for t in pixel_samples]
    ours, jac, loop = median(per_image["ours"]), median(per_image["jacfwd"]), median(pixel_samples)
    peak = peak_memory_mb(lambda: tangent_basis(decoder, z), opts.device)
    angle = principal_angles(q, last["jacfwd"]).max().item()
    if pixels == n:
        loop_agrees = f"same span (max angle {principal_angles(q[:1], last['per_pixel'][None]).max().item():.0e} rad)"
    else:
        loop_agrees = f"time extrapolated from {pixels} of {n} pixels"
    return [
        Row(
            f"tangent/{label} vs per-pixel loop",
            ours,
            unit="s/img",
            reference=loop,
            ratio=ours / loop,
            target=PER_PIXEL_TARGET,
            peak_mb=peak,
            note=f"{loop / ours:.0f}× faster; loop: {n} backward passes per image, {sizes.pixel_images} timed; "
            f"{loop_agrees}; {setting}",
            samples={"ours": per_image["ours"], "per_pixel": pixel_samples},
        ),
        Row(
            f"tangent/{label} vs vmap(jacfwd)+QR",
            ours,
            unit="s/img",
            reference=jac,
            ratio=ours / jac,
            target=JACFWD_TARGET,
            peak_mb=peak,
            note=f"same span (max angle {angle:.0e} rad); {setting}",
            samples=per_image,
        ),
    ]


def run(opts: Options) -> list[Row]:
    model, weights = autoencoder(opts)
    channels = tuple(model_args("autoencoder")["decoder"]["init_args"]["channels"])
    sizes = (
        Sizes(batch=2, pixel_images=1, repeats=1, pixels=32)
        if opts.quick
        else Sizes(batch=64, pixel_images=2, repeats=3)
    )
    rows = _rows(model.decoder, f"config {list(channels)}", sizes, opts, weights)
    if not opts.quick:  # the replication's width, for reference: 16× the compute per image
        torch.manual_seed(0)
        decoder = ConvDecoder(model.latent_dim, SHAPE, REPLICATION_CHANNELS).to(opts.device).eval()
        rows += _rows(decoder, f"replication {list(REPLICATION_CHANNELS)}", Sizes(8, 1, 3), opts, "random weights")
    return rows
