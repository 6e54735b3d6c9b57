"""Benchmark of the matrix-free tangent projector (``dmm.manifold.project_tangent``) against the dense basis.

Three parts, all on random-weight decoders (cost does not depend on the weights; iteration counts do):

* ``agreement``: a small conv decoder where the dense basis fits, in float32 and float64: relative error
  ||P_mf d - P_dense d|| / ||P_dense d||, iterations, seconds per image of both methods;
* ``segnet_small``: a narrow SegNet decoder at 32x32, where the dense Jacobian still fits: its spectrum
  (numerical rank, conditioning) and how far CGLS gets, against the projection onto the numerically
  nonzero singular directions;
* ``imagenet``: the SegNet decoder at 3x224x224 with a 512x7x7 latent (n = 150 528, k = 25 088, a dense
  basis of 15 GB per image), each size in a fresh subprocess: peak RSS (``ru_maxrss``), seconds of setup
  (linearisation, first J^T d) and per CGLS iteration. Solving to tolerance there takes minutes to hours
  on a CPU, so the iterations are run a few at a time and the total is extrapolated in the report.

Run ``python -m dmm.bench_projector [--quick]`` (about 1 min / 15 s on 2 CPU cores); prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dmm.manifold import decoder_jacobian, decompose, project_tangent, tangent_basis
from dmm.nets import ConvDecoder, SegNetDecoder
from dmm.nets.imagenet import VGG16_BLOCKS

IMAGENET = (3, 224, 224)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny decoders on one thread: on a shared CPU their 2-thread ops stall ~100x on thread sync."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ``ru_maxrss`` survives ``exec``, so a child would
    report its parent's peak if that were higher; ``VmHWM`` belongs to the new process image alone."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def agreement(batch: int = 4) -> list[dict]:
    """Matrix-free against dense on a well-conditioned conv decoder (k = 32, n = 3072)."""
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        torch.manual_seed(0)
        decoder = ConvDecoder(32, (3, 32, 32), channels=(32, 16, 8)).to(dtype).eval()
        z = torch.randn(batch, 32, dtype=dtype)
        d = torch.randn(batch, 3, 32, 32, dtype=dtype)
        tangent_basis(decoder, z[:1]), project_tangent(decoder, z[:1], d[:1], max_iter=2)  # warm-up
        dense_s, q = _seconds(lambda: tangent_basis(decoder, z))  # noqa: B023 (called at once)
        on = decompose(d, q)[0]
        free_s, solve = _seconds(lambda: project_tangent(decoder, z, d, tol=tol))  # noqa: B023
        rows.append(
            {
                "decoder": "ConvDecoder(32, (3, 32, 32), channels=(32, 16, 8))",
                "dtype": str(dtype).removeprefix("torch."),
                "tol": tol,
                "relative_error": _relative_error(solve.on, on),
                "iterations_max": int(solve.iterations.max()),
                "dense_s_per_image": dense_s / batch,
                "matrix_free_s_per_image": free_s / batch,
            }
        )
    return rows


def segnet_small(max_iter: int = 300) -> dict:
    """A random SegNet decoder is rank-deficient: how the solver fares against the truncated projection."""
    torch.manual_seed(0)
    decoder = SegNetDecoder(4 * 4 * 8, (3, 32, 32), blocks=((8,), (8,), (8,))).eval()
    z, d = torch.randn(2, 128), torch.randn(2, 3, 32, 32)
    jacobian = decoder_jacobian(decoder.double(), z.double())
    u, s, _ = torch.linalg.svd(jacobian, full_matrices=False)
    decoder.float()
    relative = s / s[:, :1]
    row: dict = {"n": 3072, "k": 128, "tol": 1e-5, "max_iter": max_iter}
    for rcond in (1e-2, 1e-4, 1e-8):
        row[f"rank@{rcond:g}"] = int((relative[0] > rcond).sum())
    elapsed, solve = _seconds(lambda: project_tangent(decoder, z, d, tol=1e-5, max_iter=max_iter))
    row.update(iterations=solve.iterations.tolist(), residual=solve.residual.tolist(), seconds=elapsed)
    for rcond in (1e-2, 1e-4, 1e-8):  # the reference: projection onto singular directions above rcond
        basis = u * (relative > rcond)[:, None, :]
        reference = decompose(d.double(), basis)[0]
        row[f"error_vs_rank@{rcond:g}"] = _relative_error(solve.on.double(), reference)
    return row


def imagenet_child(width_divisor: int, batch: int, iterations: int) -> dict:
    """One SegNet size, timed and measured in this process (run it fresh: ``ru_maxrss`` is a high-water mark)."""
    blocks = tuple(tuple(c // width_divisor for c in block) for block in VGG16_BLOCKS)
    k = blocks[-1][-1] * 7 * 7
    torch.manual_seed(0)
    decoder = SegNetDecoder(k, IMAGENET, blocks).eval()
    z, d = torch.randn(batch, k), torch.randn(batch, *IMAGENET)
    base_mb = _peak_rss_mb()  # interpreter, torch, weights
    with torch.no_grad():
        decoder(z)  # warm-up
    setup_s, _ = _seconds(lambda: project_tangent(decoder, z, d, max_iter=0))
    total_s, solve = _seconds(lambda: project_tangent(decoder, z, d, max_iter=iterations))
    n = d[0].numel()
    return {
        "width": f"VGG-16 widths / {width_divisor}",
        "n": n,
        "k": k,
        "batch": batch,
        "iterations": iterations,
        "residual": solve.residual.tolist(),
        "setup_s": setup_s,
        "s_per_iteration_per_image": (total_s - setup_s) / iterations / batch,
        "rss_before_solving_mb": base_mb,  # after import and building the decoder
        "peak_rss_mb": _peak_rss_mb(),
        "dense_basis_gb_per_image": n * k * 4 / 1e9,
    }


def imagenet(width_divisor: int, batch: int, iterations: int) -> dict:
    """:func:`imagenet_child` in a fresh interpreter, so that its peak RSS is its own."""
    args = json.dumps([width_divisor, batch, iterations])
    cmd = [sys.executable, "-m", "dmm.bench_projector", "--child", args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    """All three parts; ``quick`` shrinks the ImageNet SegNet 8x in width and runs fewer iterations."""
    sizes = [(8, 1, 1)] if quick else [(1, 1, 3), (1, 2, 1)]
    result = {"imagenet": [imagenet(*size) for size in sizes]}
    with _one_thread():
        result["agreement"] = agreement(batch=2 if quick else 4)
        result["segnet_small"] = segnet_small(max_iter=100 if quick else 400)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about 15 s")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one imagenet size, JSON [w, batch, iters]
    args = parser.parse_args()
    result = imagenet_child(*json.loads(args.child)) if args.child else run(quick=args.quick)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
