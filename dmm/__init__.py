"""dmm: measure the Dimpled Manifold Model -- on/off-manifold geometry of adversarial perturbations.

The maths (:mod:`dmm.attacks`, :mod:`dmm.manifold`, :mod:`dmm.nets`) imports only torch; the Lightning
systems, data modules and callbacks are re-exported here lazily, so ``import dmm.attacks`` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "Classifier": "dmm.models",
    "Autoencoder": "dmm.models",
    "Isometry": "dmm.models",
    "RelaxedDistortion": "dmm.models",
    "MNISTDataModule": "dmm.data",
    "FashionMNISTDataModule": "dmm.data",
    "CIFAR10DataModule": "dmm.data",
    "ImageNetDataModule": "dmm.data",
    "SyntheticManifoldDataModule": "dmm.data",
    "RelabelledDataModule": "dmm.data",
    "PredictSplits": "dmm.data",
    "Relabeller": "dmm.models",
    "ShardWriter": "dmm.callbacks",
    "Evaluation": "dmm.callbacks",
    "ManifoldDynamics": "dmm.callbacks",
    "Decomposition": "dmm.measures",
    "Detection": "dmm.measures",
    "Geometry": "dmm.measures",
    "Robustness": "dmm.measures",
    "AdaptivePTC": "dmm.measures",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dmm' has no attribute {name!r}")
