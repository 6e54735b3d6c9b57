"""``python -m dmm.bench``: a rerunnable benchmark suite that prints a table and records it per machine.

Each benchmark is one module with a ``run(options) -> list[Row]`` function; by default each runs in a
fresh Python process, so its peak memory is its own (measured one way for all: :class:`~dmm.bench.core.PeakMemory`).
Results go to a JSON file and, with ``--markdown``, to a Markdown section keyed by machine and device, so
figures from several machines (a laptop CPU, a GPU node) live side by side and a rerun replaces only its own
section. ``python -m dmm.bench --device cuda`` runs them all on a GPU; on a CPU the GPU-sized ones
(:data:`GPU_SIZED`) run only when named with ``--only``.

===================  ==================================================================================
pgd                  dmm's PGD vs the floor of its gradient steps (forward + input gradient), vs
                     torchattacks / foolbox when installed, and the work early stopping saves (MNIST)
tangent              dmm.manifold.tangent_basis vs the per-pixel backward loop and vs vmap(jacfwd) + QR
callback             the decomposition the evaluation callback runs on 1000 MNIST images, split by part
lightning            Lightning training throughput of the MNIST CNN vs a plain PyTorch loop
projector            the matrix-free tangent projection at ImageNet size, and its agreement with dense
cifar_pgd            PGD images·steps/s on the CIFAR-10 VGG and a ResNet-18: fp32 vs --precision etc.
cifar_train          training images/s of the same two networks: fp32 vs --precision etc.
cifar_tangent        tangent bases per second of the CIFAR-10 autoencoder (k = 128), always float32
cifar_decomposition  the DMM decomposition of 1000 CIFAR-shaped images, end to end
===================  ==================================================================================
"""

from dmm.bench.core import Options, Row, Target
from dmm.bench.speed import Speed

# name -> module holding its run(options); imported only when that benchmark runs.
BENCHMARKS = {
    "pgd": "dmm.bench.pgd",
    "tangent": "dmm.bench.tangent",
    "callback": "dmm.bench.callback",
    "lightning": "dmm.bench.training",
    "projector": "dmm.bench.projector",
    "cifar_pgd": "dmm.bench.cifar_pgd",
    "cifar_train": "dmm.bench.cifar_train",
    "cifar_tangent": "dmm.bench.cifar_tangent",
    "cifar_decomposition": "dmm.bench.cifar_decomposition",
}
GPU_SIZED = ("cifar_pgd", "cifar_train", "cifar_tangent", "cifar_decomposition")
"""Benchmarks sized for a GPU: part of the default set on CUDA only (minutes each on a CPU at full size)."""


def default_benchmarks(device: str) -> list[str]:
    """The benchmarks a run without ``--only`` runs on ``device`` ("cpu" or "cuda")."""
    return [name for name in BENCHMARKS if device == "cuda" or name not in GPU_SIZED]


__all__ = ["BENCHMARKS", "GPU_SIZED", "Options", "Row", "Speed", "Target", "default_benchmarks"]
