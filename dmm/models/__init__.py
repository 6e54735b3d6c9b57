"""Lightning systems: what is trained (losses, metrics, optimisers) around the plain networks, and their loaders."""

from dmm.models.autoencoder import Autoencoder
from dmm.models.classifier import Classifier
from dmm.models.loading import load_autoencoder, load_classifier
from dmm.models.regularizers import Isometry, Regularizer, RelaxedDistortion
from dmm.models.relabeller import Relabeller

__all__ = [
    "Autoencoder",
    "Classifier",
    "Isometry",
    "Regularizer",
    "RelaxedDistortion",
    "Relabeller",
    "load_autoencoder",
    "load_classifier",
]
