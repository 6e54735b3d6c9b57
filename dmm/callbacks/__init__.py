"""Lightning callbacks: measurements of the DMM taken while a classifier trains, validates or tests."""

from dmm.callbacks.checkpoint import Checkpoint
from dmm.callbacks.decomposition import ManifoldDecomposition, load_autoencoder
from dmm.callbacks.detection import AdversarialDetection
from dmm.callbacks.dynamics import ManifoldDynamics
from dmm.callbacks.resume import RNGState

__all__ = [
    "AdversarialDetection",
    "Checkpoint",
    "ManifoldDecomposition",
    "ManifoldDynamics",
    "RNGState",
    "load_autoencoder",
]
