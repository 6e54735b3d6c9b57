"""Lightning callbacks: measurements of the DMM taken while a classifier trains, validates or tests."""

from dmm.callbacks.decomposition import ManifoldDecomposition, load_autoencoder

__all__ = ["ManifoldDecomposition", "load_autoencoder"]
