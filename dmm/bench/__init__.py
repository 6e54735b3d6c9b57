"""``python -m dmm.bench``: a rerunnable benchmark suite that prints a table and records it per machine.

Each benchmark is one module with a ``run(options) -> list[Row]`` function; by default each runs in a
fresh Python process, so its peak memory is its own. Results go to a JSON file and, with
``--markdown``, to a Markdown section keyed by machine and device, so figures from several machines
(a laptop CPU, a GPU node) live side by side and a rerun replaces only its own section.

=========  ==========================================================================================
pgd        dmm.attacks.pgd vs the floor of its gradient steps (forward + input gradient), vs
           torchattacks / foolbox when installed, and the work early stopping saves
tangent    dmm.manifold.tangent_basis vs the per-pixel backward loop and vs vmap(jacfwd) + QR
callback   the decomposition the ManifoldDecomposition callback runs on 1000 MNIST images, split by part
lightning  Lightning training throughput of the MNIST CNN vs a plain PyTorch loop
=========  ==========================================================================================
"""

from dmm.bench.core import Options, Row, Target

# name -> module holding its run(options); imported only when that benchmark runs.
BENCHMARKS = {
    "pgd": "dmm.bench.pgd",
    "tangent": "dmm.bench.tangent",
    "callback": "dmm.bench.callback",
    "lightning": "dmm.bench.training",
}

__all__ = ["BENCHMARKS", "Options", "Row", "Target"]
