"""Lightning data modules: MNIST-style, CIFAR-10 and ImageNet images, synthetic manifolds with known tangents
(16x16 toy, MNIST-sized, a linear subspace), relabelled adversarial examples, and train/val splits for
``dmm predict``."""

from dmm.data.cifar10 import CIFAR10DataModule
from dmm.data.imagenet import ImageNetDataModule
from dmm.data.known_manifold import KnownManifoldDataModule
from dmm.data.linear_subspace import LinearSubspaceDataModule
from dmm.data.mnist import FashionMNISTDataModule, MNISTDataModule
from dmm.data.relabelled import RelabelledDataModule
from dmm.data.splits import PredictSplits
from dmm.data.synthetic import ManifoldGenerator, SyntheticManifoldDataModule

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "KnownManifoldDataModule",
    "LinearSubspaceDataModule",
    "MNISTDataModule",
    "ManifoldGenerator",
    "PredictSplits",
    "RelabelledDataModule",
    "SyntheticManifoldDataModule",
]
