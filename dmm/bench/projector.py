"""[projector] The matrix-free tangent projection (``dmm.manifold.project_tangent``, CGLS) at ImageNet size,
and its agreement with the dense basis where that fits. Random-weight decoders: cost does not depend on the
weights, iteration counts do.

* ``imagenet``: the SegNet decoder at 3x224x224 with a 512x7x7 latent (n = 150 528, k = 25 088: a dense basis
  would be 15 GB per image): peak memory, setup (linearisation, first J^T d) and seconds per CGLS iteration per
  image. On a CPU a solve to tolerance takes minutes, so a few iterations are timed and the rest is per
  iteration; on CUDA the solve runs up to ``max_iter``.
* ``agreement``: a small conv decoder (k = 32, n = 3072) in float32 and float64: relative error of the
  projection against the dense ``decompose``, iterations, seconds per image of both.
* ``segnet 32x32``: a narrow SegNet decoder, whose random-weight Jacobian is numerically rank-deficient: how
  far CGLS gets against the projection onto the numerically non-zero singular directions.

Float32 (or float64), contiguous and eager always, like tangent bases (see :mod:`dmm.bench.speed`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from dmm.bench.core import Options, PeakMemory, Row, Target, synchronize
from dmm.manifold import decoder_jacobian, decompose, project_tangent, tangent_basis
from dmm.nets import ConvDecoder, SegNetDecoder
from dmm.nets.imagenet import VGG16_BLOCKS

IMAGENET = (3, 224, 224)
MEMORY_TARGET = Target(4096, of="ours")  # MiB for one image: a dense basis would need 15 GB
AGREEMENT_TARGET = Target(1e-3, of="ours")
# (image shape, VGG-16 width divisor, batch, CGLS iterations) per ImageNet-size run.
IMAGENET_SIZES = {
    "cuda": [(IMAGENET, 1, 1, 200), (IMAGENET, 1, 4, 50)],
    "cpu": [(IMAGENET, 1, 1, 3), (IMAGENET, 1, 2, 1)],
    "quick": [((3, 64, 64), 16, 1, 1)],
}


@contextlib.contextmanager
def _threads(device: str) -> Iterator[None]:
    """Tiny decoders on one CPU thread: on a shared CPU their 2-thread ops stall ~100x on thread sync."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def _seconds(fn, device: str):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def imagenet_rows(opts: Options) -> list[Row]:
    rows = []
    sizes = IMAGENET_SIZES["quick" if opts.quick else torch.device(opts.device).type]
    for shape, divisor, batch, iterations in sizes:
        blocks = tuple(tuple(c // divisor for c in block) for block in VGG16_BLOCKS)
        k = blocks[-1][-1] * (shape[1] // 32) * (shape[2] // 32)
        torch.manual_seed(0)
        decoder = SegNetDecoder(k, shape, blocks).to(opts.device).eval()
        z = torch.randn(batch, k, device=opts.device)
        d = torch.randn(batch, *shape, device=opts.device)
        with torch.no_grad():
            decoder(z)  # warm-up
        with PeakMemory(opts.device) as peak:
            setup_s, _ = _seconds(lambda: project_tangent(decoder, z, d, max_iter=0), opts.device)  # noqa: B023
            total_s, solve = _seconds(
                lambda: project_tangent(decoder, z, d, max_iter=iterations),  # noqa: B023
                opts.device,
            )
        n = d[0].numel()
        done = solve.iterations.tolist()
        per_iteration = (total_s - setup_s) / max(max(done), 1) / batch
        size = "x".join(map(str, shape)) + ("" if divisor == 1 else f", VGG-16 widths / {divisor}")
        rows.append(
            Row(
                f"projector/{size} batch {batch}",
                per_iteration,
                unit="s/img",
                peak_mb=peak.mb,
                note=f"seconds per CGLS iteration per image; setup {setup_s:.3g} s; iterations {done} of at most "
                f"{iterations}, residual {[f'{r:.1e}' for r in solve.residual.tolist()]}; n = {n}, k = {k}, a dense "
                f"basis would be {n * k * 4 / 1e9:.3g} GB per image; SegNet decoder, random weights",
            )
        )
        if batch == 1:
            rows.append(
                Row(
                    f"projector/{size} peak memory",
                    peak.mb,
                    unit="MiB",
                    target=MEMORY_TARGET if divisor == 1 else None,
                    peak_mb=peak.mb,
                    note="one image, setup and solve; the process's peak RSS on CPU (imports and weights included), "
                    "the peak allocated on CUDA",
                )
            )
    return rows


def agreement_rows(opts: Options) -> list[Row]:
    """Matrix-free against dense on a well-conditioned conv decoder (k = 32, n = 3072)."""
    batch = 2 if opts.quick else 4
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        torch.manual_seed(0)
        decoder = ConvDecoder(32, (3, 32, 32), channels=(32, 16, 8)).to(opts.device, dtype).eval()
        z = torch.randn(batch, 32, dtype=dtype, device=opts.device)
        d = torch.randn(batch, 3, 32, 32, dtype=dtype, device=opts.device)
        tangent_basis(decoder, z[:1]), project_tangent(decoder, z[:1], d[:1], max_iter=2)  # warm-up
        dense_s, q = _seconds(lambda: tangent_basis(decoder, z), opts.device)  # noqa: B023
        on = decompose(d, q)[0]
        free_s, solve = _seconds(lambda: project_tangent(decoder, z, d, tol=tol), opts.device)  # noqa: B023
        name = str(dtype).removeprefix("torch.")
        rows.append(
            Row(
                f"projector/agreement {name}",
                _relative_error(solve.on, on),
                unit="",
                target=AGREEMENT_TARGET if dtype == torch.float32 else None,
                note=f"relative error vs the dense basis, tol {tol:g}, {int(solve.iterations.max())} iterations; "
                f"{free_s / batch:.3g} s/img matrix-free, {dense_s / batch:.3g} s/img dense; "
                "ConvDecoder(32, (3, 32, 32), channels=(32, 16, 8))",
            )
        )
    return rows


def segnet_small_row(opts: Options) -> Row:
    """A random SegNet decoder is rank-deficient: how the solver fares against the truncated projection."""
    max_iter = 20 if opts.quick else 400
    torch.manual_seed(0)
    decoder = SegNetDecoder(4 * 4 * 8, (3, 32, 32), blocks=((8,), (8,), (8,))).eval().to(opts.device)
    z = torch.randn(2, 128, device=opts.device)
    d = torch.randn(2, 3, 32, 32, device=opts.device)
    jacobian = decoder_jacobian(decoder.double(), z.double())
    u, s, _ = torch.linalg.svd(jacobian, full_matrices=False)
    decoder.float()
    relative = s / s[:, :1]
    elapsed, solve = _seconds(lambda: project_tangent(decoder, z, d, tol=1e-5, max_iter=max_iter), opts.device)
    errors, ranks = {}, {}
    for rcond in (1e-2, 1e-4, 1e-8):  # the reference: projection onto the singular directions above rcond
        ranks[rcond] = (relative > rcond).sum(dim=1).tolist()
        reference = decompose(d.double(), u * (relative > rcond)[:, None, :])[0]
        errors[rcond] = _relative_error(solve.on.double(), reference)
    return Row(
        "projector/segnet 32x32 vs rank@1e-4",
        errors[1e-4],
        unit="",
        note=f"relative error vs the projection onto singular directions above 1e-4 of the largest; numerical "
        f"rank of 128 at 1e-2/1e-4/1e-8: {ranks[1e-2]}/{ranks[1e-4]}/{ranks[1e-8]}; error vs rank@1e-2 "
        f"{errors[1e-2]:.2g}, @1e-8 {errors[1e-8]:.2g}; iterations {solve.iterations.tolist()} of at most "
        f"{max_iter}, {elapsed:.3g} s; random weights",
    )


def run(opts: Options) -> list[Row]:
    rows = imagenet_rows(opts)
    with _threads(opts.device):
        rows += agreement_rows(opts)
        rows.append(segnet_small_row(opts))
    return rows
