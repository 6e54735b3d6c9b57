"""Lightning data modules: MNIST-style, CIFAR-10 and ImageNet images, and a synthetic manifold with known tangents."""

from dmm.data.cifar10 import CIFAR10DataModule
from dmm.data.imagenet import ImageNetDataModule
from dmm.data.mnist import FashionMNISTDataModule, MNISTDataModule
from dmm.data.relabelled import RelabelledAdversarialDataModule
from dmm.data.synthetic import ManifoldGenerator, SyntheticManifoldDataModule

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "ManifoldGenerator",
    "RelabelledAdversarialDataModule",
    "SyntheticManifoldDataModule",
]
