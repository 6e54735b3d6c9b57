"""[cifar_tangent] Tangent bases per second of the CIFAR-10 autoencoder's decoder (k = 128, n = 3072).

``dmm.manifold.tangent_basis`` (k batched forward-mode passes, then QR) against the textbook
``vmap(jacfwd)`` + QR, on random latents and random weights (timing does not depend on them). Always float32,
contiguous and eager, whatever ``--precision``, ``--channels-last`` and ``--compile`` say: a bf16 Jacobian
would carry ~3 significant digits into an orthonormalisation, and the basis is the object being measured.
"""

from __future__ import annotations

import torch

from dmm.bench.cifar import autoencoder
from dmm.bench.core import Options, PeakMemory, Row, median, repeat_times
from dmm.bench.speed import full_precision
from dmm.bench.tangent import jacfwd_basis
from dmm.manifold import principal_angles, tangent_basis

SIZES = {"cuda": (64, 5), "cpu": (8, 3), "quick": (2, 1)}  # latents per call, repeats


def run(opts: Options) -> list[Row]:
    batch, repeats = SIZES["quick" if opts.quick else torch.device(opts.device).type]
    _, decoder = autoencoder(opts.quick)
    decoder = decoder.to(opts.device)
    k = decoder.linear.in_features
    z = torch.randn(batch, k, generator=torch.Generator().manual_seed(0)).to(opts.device)
    last: dict[str, torch.Tensor] = {}
    with full_precision(decoder):
        calls = {
            "ours": lambda: last.__setitem__("ours", tangent_basis(decoder, z)),
            "jacfwd": lambda: last.__setitem__("jacfwd", jacfwd_basis(decoder, z)),
        }
        samples = repeat_times(calls, repeats=repeats, device=opts.device)
        with PeakMemory(opts.device) as peak:
            calls["ours"]()
    rate = {name: batch / median(times) for name, times in samples.items()}
    basis = last["ours"]
    assert basis.dtype == torch.float32, basis.dtype
    angle = principal_angles(basis, last["jacfwd"]).max().item()
    return [
        Row(
            f"cifar_tangent/k={k} vs vmap(jacfwd)+QR",
            rate["ours"],
            unit="img/s",
            reference=rate["jacfwd"],
            ratio=rate["jacfwd"] / rate["ours"],
            peak_mb=peak.mb,
            note=f"bases (n={basis.shape[1]}, k={k}) per second, float32 always; same span (max angle {angle:.0e} "
            f"rad); decoder {'1/16 width (quick)' if opts.quick else 'as configured'}, random weights, batch {batch}",
            samples=samples,
        )
    ]
