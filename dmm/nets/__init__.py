"""Plain networks (no Lightning): classifiers, encoders and decoders.

Every network is built from data facts so that YAML never repeats them (the CLI links them in):

* classifiers: ``Net(input_shape, num_classes, **hparams)``, images (B, C, H, W) -> logits (B, classes);
* encoders: ``Net(input_shape, latent_dim, **hparams)``, images (B, C, H, W) -> latents (B, k);
* decoders: ``Net(latent_dim, output_shape, **hparams)``, latents (B, k) -> images (B, C, H, W) in [0, 1].

Networks see whatever the system feeds them: the systems in :mod:`dmm.models` own input normalisation.
Decoders are smooth (Softplus with a large beta rather than ReLU) because their Jacobian is the object
of study: a piecewise-linear decoder has a tangent space that jumps between pixels' activation regions.

Modules: :mod:`~dmm.nets.small` (MNIST-sized, any shape), :mod:`~dmm.nets.cifar` (VGG),
:mod:`~dmm.nets.imagenet` (ResNet-50, SegNet autoencoder), :mod:`~dmm.nets.two_layer` (the two-layer ReLU
network of Melamed et al., with an initialisation scale).
"""

from dmm.nets.cifar import VGG
from dmm.nets.imagenet import ResNet50, SegNetDecoder, SegNetEncoder
from dmm.nets.layers import ClassifierFactory, DecoderFactory, EncoderFactory, Shape
from dmm.nets.small import CNN, MLP, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from dmm.nets.two_layer import TwoLayerReLU

__all__ = [
    "CNN",
    "MLP",
    "VGG",
    "ClassifierFactory",
    "ConvDecoder",
    "ConvEncoder",
    "DecoderFactory",
    "EncoderFactory",
    "MLPDecoder",
    "MLPEncoder",
    "ResNet50",
    "SegNetDecoder",
    "SegNetEncoder",
    "Shape",
    "TwoLayerReLU",
]
