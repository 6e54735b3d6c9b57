"""Lightning systems: what is trained (losses, metrics, optimisers) around the plain networks."""

from dmm.models.autoencoder import Autoencoder
from dmm.models.classifier import Classifier

__all__ = ["Autoencoder", "Classifier"]
