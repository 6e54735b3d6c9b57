"""Lightning systems: what is trained (losses, metrics, optimisers) around the plain networks."""

from dmm.models.autoencoder import Autoencoder
from dmm.models.classifier import Classifier
from dmm.models.isometric import IRAutoencoder, IsometricAutoencoder

__all__ = ["Autoencoder", "Classifier", "IRAutoencoder", "IsometricAutoencoder"]
