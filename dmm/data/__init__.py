"""Lightning data modules: MNIST-style image sets and a synthetic manifold with known tangents."""

from dmm.data.mnist import FashionMNISTDataModule, MNISTDataModule
from dmm.data.synthetic import ManifoldGenerator, SyntheticManifoldDataModule

__all__ = ["FashionMNISTDataModule", "MNISTDataModule", "ManifoldGenerator", "SyntheticManifoldDataModule"]
