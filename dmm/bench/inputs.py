"""The benchmarks' models and images: the MNIST systems as ``configs/mnist/*.yaml`` builds them, real or random data."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from dmm import nets
from dmm.bench.core import Options, model_args
from dmm.errors import DmmError
from dmm.models import Autoencoder, Classifier

SHAPE = (1, 28, 28)


def network(spec: str | dict) -> functools.partial:
    """A ``dmm.nets`` factory from a config entry: ``dmm.nets.CNN`` or ``{class_path, init_args}``."""
    spec = {"class_path": spec} if isinstance(spec, str) else spec
    module, _, name = spec["class_path"].rpartition(".")
    if module not in ("dmm.nets", "") or not isinstance(getattr(nets, name, None), type):
        raise DmmError(f"the benchmarks build networks from dmm.nets only; the config names {spec['class_path']}")
    return functools.partial(getattr(nets, name), **spec.get("init_args", {}))


def classifier(opts: Options, config: str = "classifier") -> tuple[Classifier, str]:
    """The configured MNIST classifier in eval mode on ``opts.device``, and what its weights are."""
    if opts.classifier is not None:
        model = Classifier.load_from_checkpoint(opts.classifier, weights_only=True, map_location="cpu")
        weights = f"trained ({opts.classifier})"
    else:
        args = model_args(config)
        model = Classifier(network(args["network"]), SHAPE, 10, mean=args["mean"], std=args["std"])
        weights = "random weights"
    return model.to(opts.device).eval().requires_grad_(False), weights


def autoencoder(opts: Options) -> tuple[Autoencoder, str]:
    """The configured MNIST conv autoencoder in eval mode on ``opts.device``, and what its weights are."""
    if opts.autoencoder is not None:
        from dmm.models import load_autoencoder

        model, weights = load_autoencoder(opts.autoencoder, SHAPE), f"trained ({opts.autoencoder})"
    else:
        args = model_args("autoencoder")
        model = Autoencoder(network(args["encoder"]), network(args["decoder"]), SHAPE, args["latent_dim"])
        weights = "random weights"
    return model.to(opts.device).eval().requires_grad_(False), weights


@functools.lru_cache(maxsize=2)
def _mnist(data_dir: Path, split: str) -> tuple[Tensor, Tensor] | None:
    from dmm.data import MNISTDataModule

    data = MNISTDataModule(str(data_dir), download=False)
    if not data.raw_dir.is_dir():
        return None
    data.setup("fit")  # a folder that is there but broken raises, rather than quietly timing noise
    return data.train_set.tensors if split == "train" else data.val_set.tensors


def images(opts: Options, count: int, split: str = "val", seed: int = 0) -> tuple[Tensor, Tensor, str]:
    """``count`` images (B, 1, 28, 28) in [0, 1] and labels (B,) on the device, and where they came from.

    MNIST's val split (the callback's images) or train split from ``opts.data_dir``, a seeded random
    subset; uniform noise with random labels when the files are absent.
    """
    generator = torch.Generator().manual_seed(seed)
    data = _mnist(Path(opts.data_dir), split)
    if data is None:
        x, y = torch.rand(count, *SHAPE, generator=generator), torch.randint(0, 10, (count,), generator=generator)
        source = "random images"
    else:
        order = torch.randperm(len(data[1]), generator=generator)[:count]
        x, y = data[0][order], data[1][order]
        source = f"MNIST {split}"
    return x.to(opts.device), y.to(opts.device), source
