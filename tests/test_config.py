"""Typed config overrides: values from the command line, dotted and per-model keys."""

import dataclasses
import json
import re

import pytest

from skincluster.config import Recipe, Scaling, load_overrides, overrides_for_model, parse_assignments, replace_fields


def test_command_line_values_are_typed():
    recipe = Recipe(learning_rate=1e-4, epochs=50)
    out = replace_fields(recipe, parse_assignments(
        ["epochs=5", "augmentation.zoom=0.3", "weights=none", "mixed_precision=true", "class_weight=balanced"]))
    assert out.epochs == 5 and out.augmentation.zoom == 0.3 and out.weights is None
    assert out.mixed_precision is True and out.class_weight == "balanced"


@pytest.mark.parametrize("bad", [{"epoch": "5"}, {"class_weight": "sometimes"}, {"epochs": "five"}])
def test_bad_overrides_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        replace_fields(Recipe(learning_rate=1e-4, epochs=50), bad)


@pytest.mark.parametrize("field, value", [
    ("epochs", "0"), ("batch_size", "-1"), ("learning_rate", "0"), ("early_stopping_patience", "-3"),
    ("time_budget_minutes", "0"), ("lr_factor", "1.5"), ("min_lr", "-1e-6"), ("trainable_layers", "-1"),
    ("input_scale", "0"), ("input_scale", "inf"), ("label_smoothing", "1"), ("label_smoothing", "-0.1"),
    ("label_smoothing", "nan"), ("augmentation.zoom", "-5"), ("augmentation.zoom", "1.5"), ("augmentation.shift", "2"),
    ("augmentation.rotation_degrees", "-10"), ("adam_beta_1", "1"), ("adam_beta_2", "-0.1"), ("adam_epsilon", "0"),
    ("min_lr", "nan"), ("focal_gamma", "nan"), ("augmentation.zoom", "nan"), ("ema_decay", "0"), ("ema_decay", "1"),
    ("ema_decay", "nan"), ("mixup_alpha", "-0.2"), ("mixup_alpha", "inf"), ("mixup_alpha", "nan"),
])
def test_impossible_values_are_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        replace_fields(Recipe(learning_rate=1e-4, epochs=50), {field: value})


@pytest.mark.parametrize("field, value, expected", [
    ("epochs", 2.5, "expected int, got float"), ("epochs", True, "expected int, got bool"),
    ("class_weight", 3, "expected one of none"), ("augmentation", 5, "expected Augmentation, got int"),
    ("weights", 3, "expected str | None, got int"), ("mixed_precision", 1, "expected bool, got int"),
])
def test_typed_values_from_a_config_file_must_have_the_fields_type(tmp_path, field, value, expected):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}: {expected}")):
        replace_fields(Recipe(learning_rate=1e-4, epochs=50), load_overrides(str(path)))


def test_typed_values_of_the_right_type_are_kept():
    recipe = replace_fields(
        Recipe(learning_rate=1e-4, epochs=50),
        {"epochs": 3, "learning_rate": 1, "weights": None, "augmentation.zoom": 0.2, "mixed_precision": True},
    )
    assert (recipe.epochs, recipe.learning_rate, recipe.weights, recipe.augmentation.zoom) == (3, 1.0, None, 0.2)
    assert recipe.mixed_precision is True and isinstance(recipe.learning_rate, float)


def test_a_cosine_floor_above_the_learning_rate_is_an_error():
    with pytest.raises(ValueError, match="min_lr 0.001 is above learning_rate 0.0001"):
        Recipe(learning_rate=1e-4, epochs=5, cosine_decay_epochs=4, min_lr=1e-3)
    Recipe(learning_rate=1e-4, epochs=5, min_lr=1e-3)  # the plateau rule never raises the LR to its floor


def test_adapting_batchnorm_of_a_frozen_backbone_is_an_error_naming_both_fields():
    recipe = Recipe(learning_rate=1e-4, epochs=50, trainable_layers=0)
    with pytest.raises(ValueError, match="adapt_batchnorm.*trainable_layers=0"):
        replace_fields(recipe, {"adapt_batchnorm": "true"})
    assert replace_fields(recipe, {"adapt_batchnorm": "false"}).adapt_batchnorm is False
    unfrozen = Recipe(learning_rate=1e-4, epochs=50, trainable_layers=3)
    assert replace_fields(unfrozen, {"adapt_batchnorm": "true"}).adapt_batchnorm is True


@pytest.mark.parametrize("bad, field", [
    ({"workers": 0}, "workers"), ({"gpus_per_worker": -1}, "gpus_per_worker"),
    ({"cpus_per_worker": 0}, "cpus_per_worker"), ({"max_failures": -2}, "max_failures"),
])
def test_impossible_scaling_is_an_error_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        Scaling(**bad)
    Scaling(cpus_per_worker=0, gpus_per_worker=1)  # a GPU worker may ask for no CPU


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", " x", "a\\b"])
def test_names_must_be_one_folder(name):
    from skincluster.config import check_folder_name
    from skincluster.tune.compare import Comparison

    with pytest.raises(ValueError, match="one folder name"):
        check_folder_name(name, "run name")
    with pytest.raises(ValueError, match="experiment name"):
        Comparison(data="store", name=name)
    check_folder_name("mobilenet-cpu_2.v1", "run name")


@pytest.mark.parametrize("command", ["train nn --local", "compare"])
def test_an_empty_name_on_the_command_line_is_an_error_not_the_default(command, synthetic_store, tmp_path, capsys):
    from skincluster.cli import main as cli_main

    assert cli_main([*command.split(), "--data", synthetic_store, "--storage", str(tmp_path / "runs"),
                     "--name", ""]) == 2
    assert "one folder name" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_bytes(b'{"epochs": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        load_overrides(str(path))


def test_model_prefixed_overrides_apply_to_that_model_only():
    overrides = {"batch_size": "32", "mobilenet:alpha": "0.75", "mobilenet:batch_size": "8"}
    assert overrides_for_model(overrides, "mobilenet") == {"batch_size": "8", "alpha": "0.75"}
    assert overrides_for_model(overrides, "cnn") == {"batch_size": "32"}


def test_every_profile_gives_every_model_a_valid_recipe():
    """Profile overrides are validated when applied (Recipe.__post_init__ raises): e.g.
    a cosine schedule on a model whose recipe has the plateau rule must switch it off."""
    from skincluster.config import PROFILES
    from skincluster.models import get_recipe, list_models

    for profile in PROFILES.values():
        for model in list_models():
            recipe = replace_fields(get_recipe(model), profile.recipe_overrides)
            replace_fields(recipe, profile.model_overrides.get(model, {}))


def test_result_settings_count_replicas_and_fields_added_since_at_their_default():
    from skincluster.config import DataConfig, Recipe, Scaling, TrainRun, as_stored, changed_settings

    run = TrainRun(model="nn", recipe=Recipe(learning_rate=1e-3, epochs=2), data=DataConfig(store="s"),
                   class_names=("a", "b"), channel_mean=(0.0, 0.0, 0.0), channel_std=(1.0, 1.0, 1.0))
    stored = as_stored(run)
    assert changed_settings(stored, dataclasses.replace(run, scaling=Scaling(cpus_per_worker=4))) == []
    # Two GPUs per worker are two replicas: twice the global batch.
    assert changed_settings(stored, dataclasses.replace(run, scaling=Scaling(gpus_per_worker=2))) == [
        "scaling.replicas_per_worker 1 -> 2"]
    assert changed_settings(stored, dataclasses.replace(run, scaling=Scaling(gpus_per_worker=0.5))) == []
    # A config.json written before label_smoothing existed had it at its default, 0.0.
    del stored["recipe"]["label_smoothing"]
    smoothed = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, label_smoothing=0.1))
    assert changed_settings(stored, smoothed) == ["recipe.label_smoothing 0.0 -> 0.1"]
    assert changed_settings(stored, run) == []
    # The store's fingerprint: another store content is another run; one not recorded
    # (a config.json from before it was) is compared by the store's statistics alone.
    fingerprinted = dataclasses.replace(run, data=dataclasses.replace(run.data, fingerprint="f1"))
    assert changed_settings(as_stored(fingerprinted), dataclasses.replace(
        run, data=dataclasses.replace(run.data, fingerprint="f2"))) == ["data.fingerprint 'f1' -> 'f2'"]
    del stored["data"]["fingerprint"]
    assert changed_settings(stored, fingerprinted) == []
