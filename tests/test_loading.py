"""Loaders: checkpoints of earlier dmm versions load with their meaning, today's with weights only; clear errors."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning
import pytest
import torch

from dmm.attacks import PGD
from dmm.errors import DmmError
from dmm.models import Autoencoder, Classifier, Isometry, RelaxedDistortion, load_autoencoder, load_classifier
from dmm.models.loading import migrate_hyperparameters
from dmm.nets import MLP, MLPDecoder, MLPEncoder

SHAPE = (1, 4, 4)
CLI = {"_instantiator": "lightning.pytorch.cli.instantiate_module"}  # what LightningCLI adds to hyperparameters
ADAM = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}


def save(path: Path, model: lightning.LightningModule, hparams: dict) -> Path:
    """A checkpoint holding ``model``'s tensors under hand-written ``hparams``, as ``dmm fit`` writes them."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
            "optimizer_states": [],
        },
        path,
    )
    return path


def autoencoder(regularizer=None) -> Autoencoder:
    torch.manual_seed(0)
    encoder, decoder = functools.partial(MLPEncoder, hidden=(8,)), functools.partial(MLPDecoder, hidden=(8,))
    return Autoencoder(encoder, decoder, SHAPE, latent_dim=2, regularizer=regularizer)


def old_autoencoder_hparams(class_name: str, **extra) -> dict:
    """Hyperparameters of an autoencoder checkpoint before regularisers were injected (dmm <= Nov 2026)."""
    return {
        "_class_path": f"dmm.{class_name}",
        "encoder": {"class_path": "dmm.nets.MLPEncoder", "init_args": {"hidden": [8]}},
        "decoder": {"class_path": "dmm.nets.MLPDecoder", "init_args": {"hidden": [8]}},
        "input_shape": SHAPE,
        "latent_dim": 2,
        **extra,
        "geometry_samples": 64,
        "optimizer": ADAM,
        "scheduler": None,
        "num_classes": 4,
        **CLI,
    }


OLD_AUTOENCODERS = {
    "plain": ("Autoencoder", {}, None),
    "iae": ("IsometricAutoencoder", {"iso_weight": 0.2, "piso_weight": 0.3, "mixup": 0.4}, Isometry),
    "irvae": ("IRAutoencoder", {"distortion_weight": 0.05, "eta": 0.1}, RelaxedDistortion),
}


@pytest.mark.parametrize("kind", OLD_AUTOENCODERS)
def test_old_autoencoder_checkpoints_load_with_their_regulariser(tmp_path: Path, kind: str) -> None:
    class_name, settings, regularizer = OLD_AUTOENCODERS[kind]
    reference = autoencoder()  # the networks' parameter names are those of the old subclasses
    model = load_autoencoder(save(tmp_path / "old.ckpt", reference, old_autoencoder_hparams(class_name, **settings)))
    assert type(model) is Autoencoder and not model.training
    if regularizer is None:
        assert model.regularizer is None
    else:
        assert type(model.regularizer) is regularizer
        assert model.regularizer.as_config()["init_args"] == settings
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = torch.rand(5, *SHAPE)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_old_isometric_checkpoint_saved_outside_the_cli_is_migrated_too(tmp_path: Path) -> None:
    # Without LightningCLI's class path, the subclass's own arguments tell what it was.
    reference = autoencoder()
    hparams = {"input_shape": SHAPE, "latent_dim": 2, "iso_weight": 0.5, "piso_weight": 0.1, "mixup": 0.5}
    hparams |= {k: v for k, v in old_autoencoder_hparams("IsometricAutoencoder").items() if k in ("encoder", "decoder")}
    hparams |= CLI  # the instantiator turns the nets' dicts into factories
    model = load_autoencoder(save(tmp_path / "old.ckpt", reference, hparams))
    assert isinstance(model.regularizer, Isometry) and model.regularizer.iso_weight == 0.5


def test_a_regularizer_object_is_stored_as_plain_data(tmp_path: Path) -> None:
    model = autoencoder(Isometry(iso_weight=0.3))
    config = model.hparams["regularizer"]
    assert config == {
        "class_path": "dmm.models.regularizers.Isometry",
        "init_args": {"iso_weight": 0.3, "piso_weight": 0.1, "mixup": 0.5},
    }
    hparams = old_autoencoder_hparams("Autoencoder", regularizer=config)  # today's form: no migration
    torch.save(hparams, tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == hparams
    loaded = load_autoencoder(save(tmp_path / "new.ckpt", model, hparams))
    assert loaded.regularizer.as_config() == config and loaded.hparams["regularizer"] == config
    assert autoencoder(config).regularizer.as_config() == config  # the dict rebuilds the object outside the CLI
    assert autoencoder().hparams["regularizer"] is None


def old_classifier_hparams(adv_eps: float) -> dict:
    """Hyperparameters of a classifier checkpoint before ``adversary`` (dmm <= Nov 2026)."""
    return {
        "_class_path": "dmm.Classifier",
        "network": {"class_path": "dmm.nets.MLP", "init_args": {"hidden": [8], "dropout": 0.0}},
        "input_shape": SHAPE,
        "num_classes": 3,
        "mean": [0.0],
        "std": [1.0],
        "optimizer": ADAM,
        "scheduler": None,
        "adv_eps": adv_eps,
        "adv_norm": "linf",
        "adv_steps": 5,
        "adv_step_size": 0.01,
        "adv_fraction": 0.5,
        "adv_random_start": False,
        **CLI,
    }


@pytest.mark.parametrize("adv_eps", [0.0, 0.1])
def test_old_classifier_checkpoints_load_with_their_adversary(tmp_path: Path, adv_eps: float) -> None:
    torch.manual_seed(0)
    reference = Classifier(functools.partial(MLP, hidden=(8,), dropout=0.0), SHAPE, 3).eval()
    model = load_classifier(save(tmp_path / "old.ckpt", reference, old_classifier_hparams(adv_eps)), SHAPE, 3)
    expected = PGD(eps=0.1, norm="linf", steps=5, step_size=0.01, random_start=False) if adv_eps else None
    assert model.adversary == expected and model.hparams.adv_fraction == 0.5 and not model.training
    assert not any(key.startswith("adv_") and key != "adv_fraction" for key in model.hparams)
    x = torch.rand(4, *SHAPE)
    torch.testing.assert_close(model(x), reference(x))


def test_loaders_refuse_the_other_kind_and_missing_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = Classifier(functools.partial(MLP, hidden=(8,), dropout=0.0), SHAPE, 3)
    classifier_path = save(tmp_path / "classifier.ckpt", classifier, old_classifier_hparams(0.0))
    autoencoder_path = save(tmp_path / "ae.ckpt", autoencoder(), old_autoencoder_hparams("IsometricAutoencoder"))
    with pytest.raises(DmmError, match="holds a dmm.Classifier, not an autoencoder.*autoencoder.yaml"):
        load_autoencoder(classifier_path)
    with pytest.raises(DmmError, match="holds a dmm.IsometricAutoencoder, not a classifier.*classifier.yaml"):
        load_classifier(autoencoder_path)
    with pytest.raises(DmmError, match="not found: train one"):
        load_autoencoder(tmp_path / "missing.ckpt")
    with pytest.raises(DmmError, match="trained on images"):
        load_autoencoder(autoencoder_path, (1, 8, 8))
    with pytest.raises(DmmError, match="takes .* images and 3 classes"):
        load_classifier(classifier_path, SHAPE, 10)


def test_migration_leaves_todays_hyperparameters_alone() -> None:
    # The CLI runs it on every --ckpt_path checkpoint, of either system, old or new.
    autoencoder_hparams = old_autoencoder_hparams("Autoencoder", regularizer=Isometry().as_config())
    classifier_hparams = {k: v for k, v in old_classifier_hparams(0.0).items() if not k.startswith("adv_")}
    classifier_hparams |= {"adversary": PGD(eps=0.5).as_dict(), "adv_fraction": 1.0}
    for hparams in (autoencoder_hparams, classifier_hparams):
        assert migrate_hyperparameters(hparams) == hparams
    old = migrate_hyperparameters(old_autoencoder_hparams("IRAutoencoder", distortion_weight=0.05, eta=0.1))
    assert old["_class_path"] == "dmm.models.Autoencoder" and "eta" not in old
    assert old["regularizer"] == RelaxedDistortion(distortion_weight=0.05, eta=0.1).as_config()
    assert migrate_hyperparameters(old_classifier_hparams(0.1))["adversary"]["norm"] == "linf"
