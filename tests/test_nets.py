"""Networks: the factory conventions, shapes, decoder ranges and Jacobians, ResNet-50 against torchvision's."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50

import dmm.nets
from dmm.errors import DmmError
from dmm.manifold import decoder_jacobian
from dmm.models import Autoencoder
from dmm.nets import VGG, ConvDecoder, ConvEncoder, ResNet50, SegNetDecoder, SegNetEncoder

SMALL_SEGNET = ((4, 4), (8,))  # two blocks: 16x16 -> 4x4 latent map


def test_package_keeps_every_public_name():
    names = ["CNN", "MLP", "ConvEncoder", "ConvDecoder", "MLPEncoder", "MLPDecoder", "Shape"]
    names += ["ClassifierFactory", "EncoderFactory", "DecoderFactory", "VGG", "ResNet50", "SegNetEncoder"]
    assert all(hasattr(dmm.nets, name) for name in [*names, "SegNetDecoder"])
    assert set(dmm.nets.__all__) >= set(names)


@pytest.mark.parametrize("name", ["CNN", "MLP"])
def test_small_classifiers_follow_the_factory_convention(name):
    net = getattr(dmm.nets, name)((3, 32, 32), 7)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_cnn_pooling_fixes_the_parameter_count_and_is_the_identity_where_maps_already_fit():
    sizes = {n: sum(p.numel() for p in dmm.nets.CNN((1, n, n), 10, pool=4).parameters()) for n in (16, 28, 56)}
    assert len(set(sizes.values())) == 1  # unpooled, the dense layer grows 16x from 16x16 to 56x56 inputs
    assert sum(p.numel() for p in dmm.nets.CNN((1, 56, 56), 10).parameters()) > 10 * sizes[56]
    torch.manual_seed(0)
    plain = dmm.nets.CNN((1, 16, 16), 10).eval()
    pooled = dmm.nets.CNN((1, 16, 16), 10, pool=4).eval()
    pooled.load_state_dict(plain.state_dict())  # same parameters: the 4x4 maps of a 16x16 input pool to themselves
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(pooled(x), plain(x))
    glob = dmm.nets.CNN((1, 28, 28), 10, pool=1).eval()  # global average pooling: 64 channel means
    assert glob.head[1].in_features == 64
    with pytest.raises(DmmError, match="pool must be >= 1"):
        dmm.nets.CNN((1, 28, 28), 10, pool=0)


def test_vgg_is_the_replications_cifar_network():
    net = VGG((3, 32, 32), 10)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [128, 128, 256, 256, 512, 512]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 6
    assert net.head[-1].in_features == 512 * 4 * 4
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert VGG((3, 32, 32), 2, blocks=((8,), (16, 16)))(torch.rand(3, 3, 32, 32)).shape == (3, 2)


def test_vgg_refuses_sizes_its_pools_cannot_halve():
    with pytest.raises(DmmError, match="divisible by 8"):
        VGG((3, 28, 28), 10)


def test_cifar_autoencoder_of_the_config_fits_32x32():
    encoder = ConvEncoder((3, 32, 32), 128, channels=(8, 16, 16, 32))
    decoder = ConvDecoder(128, (3, 32, 32), channels=(32, 16, 16, 8))
    z = encoder(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, 128) and decoder(z).shape == (2, 3, 32, 32)


def test_resnet50_reduced_width_shapes():
    net = ResNet50((3, 64, 64), 5, width=8)
    assert net.fc.in_features == 8 * 8 * 4
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 5)


@pytest.fixture(scope="module")
def torchvision_resnet(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    reference = resnet50(weights=None).eval()  # random init, nothing downloaded
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_resnet50_is_torchvisions_and_loads_its_weights(torchvision_resnet):
    reference, path = torchvision_resnet
    net = ResNet50((3, 224, 224), 1000, weights_path=str(path)).eval()
    assert list(net.state_dict()) == list(reference.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))


def test_resnet50_other_class_count_replaces_only_the_head(torchvision_resnet):
    reference, path = torchvision_resnet
    net = ResNet50((3, 224, 224), 10, weights_path=str(path))
    assert net.fc.out_features == 10
    torch.testing.assert_close(net.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),  # no file at all
        (b"not a checkpoint", "not a torchvision resnet50 state dict"),
        ("width 8", "of width 16"),  # a real state dict, of another architecture
    ],
)
def test_resnet50_bad_weights_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "width 8":
        torch.save(ResNet50((3, 64, 64), 1000, width=8).state_dict(), path)
    with pytest.raises(DmmError, match=message) as info:
        ResNet50((3, 64, 64), 1000, weights_path=str(path), width=16)
    assert str(path.resolve()) in str(info.value) and "\n" not in str(info.value)


def test_segnet_default_bottleneck_is_512x7x7():
    encoder = SegNetEncoder((3, 224, 224), 512 * 7 * 7)
    decoder = SegNetDecoder(512 * 7 * 7, (3, 224, 224))
    assert decoder.bottleneck == (512, 7, 7)
    assert [m.out_channels for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)][:13] == [
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512
    ]  # fmt: skip
    # No max-unpooling: nothing but the latent crosses the bottleneck.
    assert not any(isinstance(m, torch.nn.MaxUnpool2d) for m in decoder.modules())


def test_segnet_reduced_shapes_and_decoder_range():
    encoder = SegNetEncoder((3, 16, 16), 32, blocks=SMALL_SEGNET)
    decoder = SegNetDecoder(32, (3, 16, 16), blocks=SMALL_SEGNET)
    z = encoder(torch.rand(4, 3, 16, 16))
    assert z.shape == (4, 32) and decoder.bottleneck == (2, 4, 4)
    out = decoder(100 * torch.randn(4, 32))  # far outside the data's latents
    assert out.shape == (4, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    model = Autoencoder(partial(SegNetEncoder, blocks=SMALL_SEGNET), partial(SegNetDecoder, blocks=SMALL_SEGNET),
                        input_shape=(3, 16, 16), latent_dim=32)  # fmt: skip
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("shape", "latent_dim", "message"), [((3, 18, 16), 32, "divisible by 4"), ((3, 16, 16), 30, "multiple of 4x4")]
)
def test_segnet_refuses_shapes_it_cannot_mirror(shape, latent_dim, message):
    for build in (
        lambda: SegNetEncoder(shape, latent_dim, SMALL_SEGNET),
        lambda: SegNetDecoder(latent_dim, shape, SMALL_SEGNET),
    ):
        with pytest.raises(DmmError, match=message):
            build()


def test_segnet_decoder_jacobian_matches_finite_differences():
    torch.manual_seed(0)
    blocks = ((4,), (4,))  # (3, 8, 8) images, a (2, 2, 2) latent map: k = 8, n = 192
    decoder = SegNetDecoder(8, (3, 8, 8), blocks=blocks).double()
    decoder.train()
    decoder(torch.randn(16, 8, dtype=torch.float64))  # move BatchNorm's running statistics off their defaults
    z = torch.randn(3, 8, dtype=torch.float64)
    jacobian = decoder_jacobian(decoder, z)  # forward mode through Upsample and eval-mode BatchNorm
    assert jacobian.shape == (3, 192, 8) and decoder.training  # its mode is restored
    # Independent reference without autodiff: central differences in float64, column by column.
    decoder.eval()
    h, eye = 1e-6, torch.eye(8, dtype=torch.float64)
    with torch.no_grad():
        reference = torch.stack([(decoder(z + h * e) - decoder(z - h * e)).flatten(1) / (2 * h) for e in eye], -1)
    torch.testing.assert_close(jacobian, reference, rtol=1e-6, atol=1e-8)
    assert torch.linalg.matrix_rank(jacobian[0]) == 8
