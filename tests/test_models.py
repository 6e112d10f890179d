"""Every registered model, built with weights=None: shape, recipe, training,
saving, augmentation and preprocessing. Parametrised over list_models(), so a
new architecture is tested the day it is registered."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tensorflow as tf
import tf_keras as keras
from sklearn.utils.class_weight import compute_class_weight

from skincluster.config import ENHANCED_AUGMENTATION, IMAGE_SHAPE, NO_AUGMENTATION, STUDY_AUGMENTATION
from skincluster.models import (
    SparseCategoricalFocalLoss,
    SparseCategoricalSmoothedCrossentropy,
    backbone_of,
    build_callbacks,
    class_weights,
    compile_model,
    create_model,
    get_recipe,
    list_models,
    load_model,
    set_precision,
)
from skincluster.models.training import WeightAverage, scheduled_learning_rate

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_7_5_224_tf_no_top.h5"
STUDY_ORDER = ["nn", "cnn", "cnn_aug", "mobilenet", "resnet50", "densenet121", "mobilenet_enhanced"]
BACKBONES = ["mobilenet", "resnet50", "densenet121", "mobilenet_enhanced"]
AUGMENTED = [name for name in list_models() if get_recipe(name).augmentation.enabled]


@pytest.fixture(scope="module")
def built():
    """Each model built once per module: ResNet50 and DenseNet121 are slow on CPU."""
    cache: dict[str, keras.Model] = {}

    def get(name: str) -> keras.Model:
        if name not in cache:
            keras.utils.set_random_seed(0)
            cache[name] = create_model(name, weights=None)
        return cache[name]

    return get


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 100, 125, 3), dtype=np.uint8)


def flat_colour_images(n: int, seed: int = 0) -> np.ndarray:
    """One uniform colour per image: rotation, zoom, shift (nearest fill) and
    flips leave such an image unchanged, so augmentation adds no noise."""
    colours = np.random.default_rng(seed).integers(0, 256, size=(n, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (n, 100, 125, 3)).copy()


def layer_path_to_output(model: keras.Model) -> list[str]:
    """Class names of the layers from the input to the output, walking the
    serialised graph (inbound nodes), not the model.layers list."""
    layers = {layer["name"]: layer for layer in model.get_config()["layers"]}
    name = model.get_config()["output_layers"][0][0]
    path = []
    while True:
        path.append(layers[name]["class_name"])
        inbound = layers[name]["inbound_nodes"]
        if not inbound:
            return path[::-1]
        (sources,) = inbound  # one call per layer
        assert len(sources) == 1, f"{name} has several inputs"
        name = sources[0][0]


# Registry and recipes -----------------------------------------------------------------


def test_registry_lists_the_study_models_in_order():
    assert list_models() == STUDY_ORDER


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*mobilenet_enhanced"):
        create_model("vgg16")
    with pytest.raises(ValueError, match="known models: nn, cnn"):
        get_recipe("vgg16")


@pytest.mark.parametrize(
    "name, lr, epochs, augmentation, reduce_lr, patience, trainable, weights",
    [
        ("nn", 7.5e-4, 50, NO_AUGMENTATION, False, None, None, None),
        ("cnn", 1e-4, 50, NO_AUGMENTATION, False, None, None, None),
        ("cnn_aug", 1e-4, 50, STUDY_AUGMENTATION, True, None, None, None),
        ("mobilenet", 1e-4, 50, STUDY_AUGMENTATION, True, None, 23, "imagenet"),
        ("resnet50", 1e-4, 50, STUDY_AUGMENTATION, True, None, 23, "imagenet"),
        ("densenet121", 1e-4, 50, STUDY_AUGMENTATION, True, None, 23, "imagenet"),
        ("mobilenet_enhanced", 1e-3, 500, ENHANCED_AUGMENTATION, True, 20, 50, "imagenet"),
    ],
)
def test_recipes_follow_the_design_table(name, lr, epochs, augmentation, reduce_lr, patience, trainable, weights):
    recipe = get_recipe(name)
    assert (recipe.learning_rate, recipe.epochs, recipe.batch_size) == (lr, epochs, 10)
    assert (recipe.adam_beta_1, recipe.adam_beta_2, recipe.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert recipe.augmentation == augmentation
    assert recipe.reduce_lr_on_plateau is reduce_lr
    assert recipe.early_stopping_patience == patience
    assert recipe.trainable_layers == trainable
    assert recipe.weights == weights
    assert (recipe.loss, recipe.class_weight, recipe.mixed_precision) == ("crossentropy", "none", False)


# Every model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_output_is_a_float32_softmax(built, name):
    model = built(name)
    assert model.input.dtype == tf.uint8
    assert model.output.shape.as_list() == [None, 7]
    x = random_images(3)
    probabilities = model.predict(x, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # Float pixels 0-255 are cast to uint8 on the way in: same answer.
    np.testing.assert_allclose(model(x.astype(np.float32), training=False), probabilities, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_trainable_layers_match_the_recipe(built, name):
    model = built(name)
    backbone = backbone_of(model)
    expected = get_recipe(name).trainable_layers
    if expected is None:
        assert backbone is None
        assert all(layer.trainable for layer in model.layers)
        assert len(model.trainable_weights) == len(model.weights)
        return
    assert sum(layer.trainable for layer in backbone.layers) == expected
    assert all(layer.trainable for layer in backbone.layers[-expected:])
    frozen = {id(w) for layer in backbone.layers[:-expected] for w in layer.weights}
    assert frozen and not frozen & {id(w) for w in model.trainable_weights}


@pytest.mark.parametrize("name", list_models())
def test_keras_file_round_trip_gives_identical_predictions(built, name, tmp_path):
    model, x = built(name), random_images(2)
    model.save(tmp_path / "model.keras")
    loaded = load_model(str(tmp_path / "model.keras"))
    # Every variable, BatchNorm statistics included, not only what two images exercise.
    assert [w.name for w in loaded.weights] == [w.name for w in model.weights]
    for saved, read in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(read, saved)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=0, atol=1e-6)


def test_a_keras_file_with_other_members_still_loads(built, tmp_path):
    import zipfile

    model, x = built("cnn"), random_images(2)
    model.save(tmp_path / "model.keras")
    with zipfile.ZipFile(tmp_path / "model.keras", "a") as archive:
        archive.writestr("assets/notes.txt", "an asset another tool stored beside the weights")
    loaded = load_model(str(tmp_path / "model.keras"))
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_savedmodel_round_trip_gives_identical_predictions(built, name, tmp_path):
    model, x = built(name), random_images(2)

    @tf.function(input_signature=[tf.TensorSpec((None, 100, 125, 3), tf.uint8, name="image")])
    def serve(image):
        return {"probabilities": model(image, training=False)}

    # Only the serving function is traced: tracing every layer takes ~20 s for DenseNet121.
    model.save(tmp_path / "saved", save_format="tf", save_traces=False, signatures={"serving_default": serve})
    signature = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    loaded = signature(image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(loaded, model(x, training=False), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_predictions_are_deterministic_at_inference(built, name):
    model, x = built(name), random_images(3)  # the batch size predict() was traced with above
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("name", AUGMENTED)
def test_augmentation_is_active_in_training_only(built, name):
    augmentation = built(name).get_layer("augmentation")
    x = tf.constant(random_images(4))
    inference = augmentation(x, training=False).numpy()
    np.testing.assert_array_equal(inference, x.numpy())
    assert not np.allclose(augmentation(x, training=True).numpy(), inference)


@pytest.mark.parametrize("name", sorted(set(list_models()) - set(AUGMENTED)))
def test_models_without_augmentation_have_no_augmentation_layer(built, name):
    assert "augmentation" not in [layer.name for layer in built(name).layers]


@pytest.mark.parametrize("name", list_models())
def test_training_steps_lower_the_loss(built, name):
    # After the save tests in this file, so those save a model without optimizer state.
    model = compile_model(built(name), get_recipe(name), num_classes=7)
    x, y = flat_colour_images(8), np.arange(8) % 7

    def loss() -> float:
        # Inference mode, so dropout does not blur the comparison; called
        # eagerly, since tracing evaluate() for DenseNet121 costs seconds.
        return float(model.loss(y, model(x, training=False)))

    before = loss()
    for _ in range(5):
        model.train_on_batch(x, y)
    assert loss() < before


# Preprocessing inside the graph -----------------------------------------------------------

_KERAS_PREPROCESS = {
    "mobilenet": keras.applications.mobilenet.preprocess_input,
    "mobilenet_enhanced": keras.applications.mobilenet.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "densenet121": keras.applications.densenet.preprocess_input,
}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_scale_pixels_as_keras_preprocess_input(built, name):
    model, x = built(name), random_images(2)
    scaled = keras.Model(model.input, model.get_layer("preprocess").output)(x, training=False).numpy()
    np.testing.assert_allclose(scaled, _KERAS_PREPROCESS[name](x.astype(np.float32)), rtol=1e-5, atol=1e-4)


def test_from_scratch_models_standardise_with_the_given_channel_stats():
    mean, std = (180.0, 140.0, 150.0), (30.0, 40.0, 50.0)
    model = create_model("cnn", channel_mean=mean, channel_std=std)
    x = random_images(2)
    scaled = keras.Model(model.input, model.get_layer("preprocess").output)(x).numpy()
    np.testing.assert_allclose(scaled, (x - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        create_model("nn", channel_mean=(1.0, 2.0))


def test_from_scratch_models_default_to_the_minus_one_to_one_range():
    model = create_model("nn")
    x = random_images(1)
    scaled = keras.Model(model.input, model.get_layer("preprocess").output)(x).numpy()
    np.testing.assert_allclose(scaled, x / 127.5 - 1, rtol=1e-5, atol=1e-5)


# The study's architectures ----------------------------------------------------------------

#: Layers our models add around the study's: input, scaling and float32 softmax.
_ADDED_LAYERS = {"image", "augmentation", "preprocess", "probabilities"}


def test_nn_has_the_study_layers_and_parameters():
    model = create_model("nn")
    flatten = 100 * 125 * 3
    expected = (flatten * 64 + 64) + 4 * (64 * 64 + 64) + (64 * 7 + 7)
    assert expected == 2_417_159
    assert model.count_params() == expected
    assert len([layer for layer in model.layers if layer.name not in _ADDED_LAYERS]) == 7  # Flatten + 6 Dense


def test_cnn_has_the_study_layers_and_parameters():
    model = create_model("cnn")
    conv = (3 * 3 * 3 * 32 + 32) + 2 * (3 * 3 * 32 * 32 + 32)
    flatten = (100 // 8) * (125 // 8) * 32  # three 2x2 poolings, flooring: 12 x 15
    expected = conv + (flatten * 256 + 256) + (256 * 128 + 128) + (128 * 7 + 7)
    assert expected == 1_528_007
    assert model.count_params() == expected
    # 3 x (Conv, MaxPool, Dropout) + Flatten + Dense + Dense + Dropout + Dense
    assert len([layer for layer in model.layers if layer.name not in _ADDED_LAYERS]) == 14
    dropout = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropout == [0.15, 0.225, 0.3375, 0.506]


def test_enhanced_batchnorm_sits_between_pooling_and_dropout():
    model = create_model("mobilenet_enhanced", weights=None)
    path = layer_path_to_output(model)
    assert path[-5:] == ["GlobalAveragePooling2D", "BatchNormalization", "Dropout", "Dense", "Activation"]
    assert model.get_layer("logits").kernel_regularizer.get_config()["l2"] == pytest.approx(1e-3)
    # And it is used: moving its shift moves the predictions.
    x = random_images(2)
    before = model.predict(x, verbose=0)
    model.get_layer("batchnorm").beta.assign(np.linspace(-3, 3, model.get_layer("batchnorm").beta.shape[0]))
    assert not np.allclose(model.predict(x, verbose=0), before)


def test_study_transfer_head_is_pool_dropout_dense():
    path = layer_path_to_output(create_model("mobilenet", weights=None))
    assert path == [
        "InputLayer", "Sequential", "Rescaling", "Functional", "GlobalAveragePooling2D", "Dropout", "Dense", "Activation"
    ]


# Weights ------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_WEIGHTS.exists(), reason=f"shared MobileNet weights absent: {SHARED_WEIGHTS}")
def test_shared_mobilenet_weights_load_and_are_used():
    import h5py

    keras.utils.set_random_seed(0)
    pretrained = create_model("mobilenet", weights=SHARED_WEIGHTS, alpha=0.75)
    keras.utils.set_random_seed(0)
    random_init = create_model("mobilenet", weights=None, alpha=0.75)
    backbone = backbone_of(pretrained)
    with h5py.File(SHARED_WEIGHTS, "r") as h5:
        np.testing.assert_array_equal(backbone.get_layer("conv1").kernel.numpy(), h5["conv1/conv1/kernel:0"][()])
    # The README's way of loading the file gives the same weights.
    reference = keras.applications.MobileNet(
        alpha=0.75, include_top=False, weights=str(SHARED_WEIGHTS), input_shape=(100, 125, 3)
    )
    for ours, theirs in zip(backbone.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    x = random_images(2)
    assert not np.allclose(pretrained.predict(x, verbose=0), random_init.predict(x, verbose=0), atol=1e-3)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "mobilenet.h5"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        create_model("mobilenet", weights=str(missing))


@pytest.mark.skipif(not SHARED_WEIGHTS.exists(), reason=f"shared MobileNet weights absent: {SHARED_WEIGHTS}")
def test_weights_for_another_architecture_are_a_clear_error():
    with pytest.raises(ValueError, match="cannot load .*mobilenet_7_5_224_tf_no_top.h5"):
        create_model("mobilenet", weights=SHARED_WEIGHTS, alpha=1.0)


def test_from_scratch_models_reject_pretrained_weights_and_alpha():
    with pytest.raises(ValueError, match="weights must be None"):
        create_model("cnn", weights="imagenet")
    with pytest.raises(ValueError, match="alpha"):
        create_model("nn", alpha=0.75)
    with pytest.raises(ValueError, match="alpha"):
        create_model("resnet50", weights=None, alpha=0.5)
    with pytest.raises(ValueError, match="input_scale.*cnn"):
        create_model("cnn", recipe=dataclasses.replace(get_recipe("cnn"), input_scale=2.0))
    with pytest.raises(ValueError, match="adapt_batchnorm.*nn"):
        create_model("nn", recipe=dataclasses.replace(get_recipe("nn"), adapt_batchnorm=True))


@pytest.mark.parametrize("adapt, trainable_layers", [(False, None), (True, None), (True, 10)])
def test_backbone_batchnorm_statistics_move_only_when_adapted(adapt, trainable_layers):
    recipe = dataclasses.replace(
        get_recipe("mobilenet"), weights=None, trainable_layers=trainable_layers, adapt_batchnorm=adapt
    )
    model = compile_model(create_model("mobilenet", recipe=recipe), recipe, num_classes=7)
    norms = [layer for layer in backbone_of(model).layers if isinstance(layer, keras.layers.BatchNormalization)]
    trainable = [norm.trainable for norm in norms]
    assert any(trainable) and (trainable_layers is None or not all(trainable))
    before = [norm.moving_mean.numpy().copy() for norm in norms]
    images = np.random.default_rng(0).integers(0, 256, (8, 100, 125, 3), dtype=np.uint8)
    model.fit(images, np.arange(8) % 7, epochs=1, batch_size=8, verbose=0)
    # Exact comparison: behind a frozen random-init stem the activations are
    # tiny (~1e-19), so the updates are tinier but non-zero; a layer that does
    # not adapt leaves its statistics bit for bit.
    moved = [not np.array_equal(b, norm.moving_mean.numpy()) for b, norm in zip(before, norms)]
    # Only adapted, trainable BatchNorm layers move; frozen ones keep their statistics.
    assert moved == [adapt and is_trainable for is_trainable in trainable]
    # predict() uses the moving statistics either way (training=None, not True):
    # an image scores the same alone as in a batch whose statistics differ.
    np.testing.assert_allclose(
        model.predict(images[:1], verbose=0), model.predict(images, verbose=0)[:1], rtol=1e-4, atol=1e-6
    )


def test_adapting_a_backbone_with_no_trainable_batchnorm_is_an_error():
    # MobileNet's last layer is a ReLU: one trainable layer frees no BatchNorm.
    recipe = dataclasses.replace(get_recipe("mobilenet"), weights=None, trainable_layers=1, adapt_batchnorm=True)
    with pytest.raises(ValueError, match="adapt_batchnorm.*mobilenet.*1 trainable_layers"):
        create_model("mobilenet", recipe=recipe)
    create_model("mobilenet", recipe=dataclasses.replace(recipe, trainable_layers=3))  # frees conv_pw_13_bn


# Recipe overrides and precision -------------------------------------------------------------


def test_a_recipe_override_changes_the_built_model():
    recipe = dataclasses.replace(
        get_recipe("mobilenet"), trainable_layers=5, augmentation=NO_AUGMENTATION, weights=None, alpha=0.5
    )
    model = create_model("mobilenet", recipe=recipe)
    backbone = backbone_of(model)
    assert sum(layer.trainable for layer in backbone.layers) == 5
    assert "augmentation" not in [layer.name for layer in model.layers]
    assert backbone.name.startswith("mobilenet_0.50")  # alpha defaults to the recipe's
    assert backbone_of(create_model("mobilenet", recipe=recipe, alpha=0.25)).name.startswith("mobilenet_0.25")


def test_input_scale_resizes_the_image_before_the_backbone(tmp_path):
    recipe = dataclasses.replace(
        get_recipe("mobilenet"), input_scale=1.5, augmentation=NO_AUGMENTATION, weights=None, alpha=0.25
    )
    keras.utils.set_random_seed(0)
    model = create_model("mobilenet", recipe=recipe)
    assert model.input_shape == (None, 100, 125, 3)  # a saved model still takes the stored image
    assert backbone_of(model).input_shape == (None, 150, 188, 3)  # 187.5 rounds to even
    assert layer_path_to_output(model)[:3] == ["InputLayer", "Resizing", "Rescaling"]
    x = random_images(2)
    upsampled = keras.Model(model.input, model.get_layer("upsample").output)(x)
    expected = tf.image.resize(tf.cast(x, tf.float32), (150, 188), method="bilinear")
    np.testing.assert_allclose(upsampled, expected, rtol=0, atol=1e-3)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="input_scale 0.3 gives the backbone 30x38 pixels"):
        create_model("mobilenet", recipe=dataclasses.replace(recipe, input_scale=0.3))


def test_mixed_precision_keeps_the_softmax_float32():
    recipe = dataclasses.replace(get_recipe("cnn_aug"), mixed_precision=True)
    set_precision(recipe)
    try:
        model = compile_model(create_model("cnn_aug", recipe=recipe), recipe, num_classes=7)
        assert model.get_layer("logits").compute_dtype == "float16"
        assert model.get_layer("probabilities").compute_dtype == "float32"
        assert model.output.dtype == tf.float32
        assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        model.train_on_batch(flat_colour_images(4), np.arange(4))
        assert model(random_images(2), training=True).dtype == tf.float32
    finally:
        set_precision(get_recipe("cnn_aug"))
    assert keras.mixed_precision.global_policy().name == "float32"


# Loss, class weights, callbacks --------------------------------------------------------------


def test_focal_loss_reduces_to_crossentropy_at_gamma_zero():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(7), size=16).astype(np.float32)
    labels = rng.integers(0, 7, size=16)

    def focal(gamma: float, y: np.ndarray) -> float:
        return float(SparseCategoricalFocalLoss(gamma=gamma)(y, probabilities))

    crossentropy = float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities))
    assert focal(0.0, labels) == pytest.approx(crossentropy, rel=1e-5)
    p_true = probabilities[np.arange(16), labels]
    expected = np.mean(-((1 - p_true) ** 2) * np.log(p_true))
    assert focal(2.0, labels) == pytest.approx(expected, rel=1e-5)
    assert focal(2.0, labels[:, None]) == pytest.approx(expected, rel=1e-5)  # column labels, as Keras passes them
    assert focal(2.0, labels) < crossentropy  # easy examples weigh less


def test_focal_loss_is_chosen_by_the_recipe_and_serialises():
    recipe = dataclasses.replace(get_recipe("nn"), loss="focal", focal_gamma=3.0)
    model = compile_model(create_model("nn"), recipe, num_classes=7)
    assert isinstance(model.loss, SparseCategoricalFocalLoss) and model.loss.gamma == 3.0
    restored = keras.losses.deserialize(keras.losses.serialize(model.loss))
    assert isinstance(restored, SparseCategoricalFocalLoss) and restored.gamma == 3.0
    default = compile_model(create_model("nn"), get_recipe("nn"), num_classes=7)
    assert isinstance(default.loss, keras.losses.SparseCategoricalCrossentropy)


def test_label_smoothing_mixes_the_one_hot_target_with_a_uniform_one():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(7), size=16).astype(np.float32)
    labels = rng.integers(0, 7, size=16)
    p_true = probabilities[np.arange(16), labels]
    # Target 1 - e + e/7 on the true class and e/7 on each other one.
    expected = np.mean(-(1 - 0.2) * np.log(p_true) - 0.2 / 7 * np.log(probabilities).sum(axis=1))
    smoothed = SparseCategoricalSmoothedCrossentropy(label_smoothing=0.2)
    assert float(smoothed(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
    assert float(smoothed(labels[:, None], probabilities)) == pytest.approx(expected, rel=1e-5)
    crossentropy = float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities))
    unsmoothed = SparseCategoricalSmoothedCrossentropy(label_smoothing=0.0)
    assert float(unsmoothed(labels, probabilities)) == pytest.approx(crossentropy, rel=1e-5)
    # Focal loss smooths the same target: at gamma 0 it is the smoothed cross-entropy,
    # at gamma 2 each class's term is weighted by (1 - p_k)^2.
    focal = SparseCategoricalFocalLoss(gamma=0.0, label_smoothing=0.2)
    assert float(focal(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
    targets = np.full((16, 7), 0.2 / 7) + 0.8 * np.eye(7)[labels]
    focal_expected = np.mean(np.sum(targets * -((1 - probabilities) ** 2) * np.log(probabilities), axis=1))
    focal = SparseCategoricalFocalLoss(gamma=2.0, label_smoothing=0.2)
    assert float(focal(labels, probabilities)) == pytest.approx(focal_expected, rel=1e-5)


def test_label_smoothing_is_chosen_by_the_recipe_and_serialises():
    # 0.15 is neither loss class's default, so a config that drops the value cannot pass.
    recipe = dataclasses.replace(get_recipe("nn"), label_smoothing=0.15)
    model = compile_model(create_model("nn"), recipe, num_classes=7)
    assert isinstance(model.loss, SparseCategoricalSmoothedCrossentropy) and model.loss.label_smoothing == 0.15
    restored = keras.losses.deserialize(keras.losses.serialize(model.loss))
    assert isinstance(restored, SparseCategoricalSmoothedCrossentropy) and restored.label_smoothing == 0.15
    focal = compile_model(create_model("nn"), dataclasses.replace(recipe, loss="focal"), num_classes=7)
    assert isinstance(focal.loss, SparseCategoricalFocalLoss) and focal.loss.label_smoothing == 0.15
    restored = keras.losses.deserialize(keras.losses.serialize(focal.loss))
    assert isinstance(restored, SparseCategoricalFocalLoss) and restored.label_smoothing == 0.15


def test_losses_take_class_weighted_mixup_rows_as_well_as_labels():
    """Target lam * w_a * e_a + (1 - lam) * w_b * e_b costs lam * w_a * CE(a) + (1 - lam) * w_b * CE(b):
    each part weighted as fit(class_weight=...) weighs an unblended image, smoothed or not."""
    rng = np.random.default_rng(2)
    probabilities = rng.dirichlet(np.ones(7), size=16).astype(np.float32)
    a, b = rng.integers(0, 7, size=16), rng.integers(0, 7, size=16)
    lam = rng.uniform(size=16).astype(np.float32)
    w = rng.uniform(0.2, 5.0, size=7).astype(np.float32)
    eye = np.eye(7, dtype=np.float32)
    targets = lam[:, None] * w[a, None] * eye[a] + (1 - lam[:, None]) * w[b, None] * eye[b]

    def expected_loss(e: float, gamma: float = 0.0) -> float:
        def ce(labels):  # the (smoothed, focal) loss of each image against integer labels
            smoothed = (1 - e) * eye[labels] + e / 7
            return np.sum(smoothed * -((1 - probabilities) ** gamma) * np.log(probabilities), axis=1)
        return float(np.mean(lam * w[a] * ce(a) + (1 - lam) * w[b] * ce(b)))

    for e in (0.0, 0.2):
        crossentropy = SparseCategoricalSmoothedCrossentropy(label_smoothing=e)
        assert float(crossentropy(targets, probabilities)) == pytest.approx(expected_loss(e), rel=1e-5)
        focal = SparseCategoricalFocalLoss(gamma=2.0, label_smoothing=e)
        assert float(focal(targets, probabilities)) == pytest.approx(expected_loss(e, gamma=2.0), rel=1e-5)
        # A one-hot row is the integer label, also in the (batch, 1) column Keras passes.
        assert float(crossentropy(eye[a], probabilities)) == pytest.approx(
            float(crossentropy(a[:, None], probabilities)), rel=1e-6)


@pytest.mark.parametrize("loss_class", [SparseCategoricalSmoothedCrossentropy, SparseCategoricalFocalLoss])
def test_weighted_mixup_rows_give_the_gradient_of_the_weighted_parts(loss_class):
    """Behind a softmax layer Keras takes cross-entropy from the logits with
    softmax_cross_entropy_with_logits, whose gradient is only right for rows
    that sum to 1: class-weighted rows must train like the sum of their parts."""
    rng = np.random.default_rng(4)
    inputs = keras.Input((5,))
    outputs = keras.layers.Activation("softmax")(keras.layers.Dense(7)(inputs))
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    a, b = rng.integers(0, 7, size=16), rng.integers(0, 7, size=16)
    lam = rng.uniform(size=16).astype(np.float32)
    w = rng.uniform(0.2, 5.0, size=7).astype(np.float32)
    eye = np.eye(7, dtype=np.float32)
    rows = lam[:, None] * w[a, None] * eye[a] + (1 - lam[:, None]) * w[b, None] * eye[b]
    loss = loss_class(label_smoothing=0.1)
    per_image = loss_class(label_smoothing=0.1, reduction="none")
    with tf.GradientTape(persistent=True) as tape:
        probabilities = model(x)
        blended = loss(rows, probabilities)
        parts = tf.reduce_mean(lam * w[a] * per_image(a, probabilities) + (1 - lam) * w[b] * per_image(b, probabilities))
    assert float(blended) == pytest.approx(float(parts), rel=1e-5)
    for got, want in zip(tape.gradient(blended, model.trainable_weights), tape.gradient(parts, model.trainable_weights)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)

def test_mixup_is_chosen_by_the_recipe_with_metrics_that_read_target_rows():
    recipe = dataclasses.replace(get_recipe("nn"), mixup_alpha=0.2)
    model = compile_model(create_model("nn"), recipe, num_classes=7)
    assert isinstance(model.loss, SparseCategoricalSmoothedCrossentropy) and model.loss.label_smoothing == 0.0
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(24, *IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 7, size=24).astype(np.int32)
    lam = rng.uniform(0.6, 1.0, size=24).astype(np.float32)  # the image's own label dominates
    targets = lam[:, None] * np.eye(7, dtype=np.float32)[labels] + (1 - lam[:, None]) * np.eye(7, dtype=np.float32)[
        (labels + 1) % 7]
    # fit() traces its training step with target rows; the metrics count their largest class.
    model.fit(tf.data.Dataset.from_tensor_slices((images, targets)).batch(24), epochs=1, verbose=0)
    after = model.predict(images, verbose=0).argmax(axis=1)
    logs = model.evaluate(images, labels, verbose=0, return_dict=True)
    assert logs["accuracy"] == pytest.approx(np.mean(after == labels))
    on_rows = model.evaluate(images, targets, verbose=0, return_dict=True)
    assert on_rows["accuracy"] == pytest.approx(logs["accuracy"])
    assert on_rows["balanced_accuracy"] == pytest.approx(logs["balanced_accuracy"])
    default = compile_model(create_model("nn"), get_recipe("nn"), num_classes=7)
    assert isinstance(default.loss, keras.losses.SparseCategoricalCrossentropy)


def test_balanced_class_weights_match_sklearn():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 5 + [4] * 35)
    weights = class_weights(labels, num_classes=5, mode="balanced")
    present = np.unique(labels)
    sklearn = compute_class_weight("balanced", classes=present, y=labels)
    # sklearn's formula n / (k * count) with k = all classes, not only the present ones.
    assert [weights[c] for c in present] == pytest.approx(list(sklearn * len(present) / 5))
    assert weights[0] == pytest.approx(100 / (5 * 50))
    assert weights[3] == 1.0  # no sample: never used, but Keras wants every key
    assert sorted(weights) == [0, 1, 2, 3, 4]
    assert class_weights(labels, num_classes=5, mode="none") is None
    # "sqrt" is the square root of the balanced weight, class by class; order is kept.
    sqrt = class_weights(labels, num_classes=5, mode="sqrt")
    assert [sqrt[c] for c in range(5)] == pytest.approx([weights[c] ** 0.5 for c in range(5)])
    assert sqrt[0] < sqrt[4] < sqrt[1] < sqrt[2]
    fourth_root = class_weights(labels, num_classes=5, mode="fourth_root")
    assert [fourth_root[c] for c in range(5)] == pytest.approx([sqrt[c] ** 0.5 for c in range(5)])
    with pytest.raises(ValueError):
        class_weights(labels, num_classes=5, mode="inverse")


def test_callbacks_follow_the_recipe():
    assert build_callbacks(get_recipe("nn")) == []
    (plateau,) = build_callbacks(get_recipe("mobilenet"))
    assert isinstance(plateau, keras.callbacks.ReduceLROnPlateau)
    assert (plateau.monitor, plateau.mode, plateau.patience, plateau.factor, plateau.min_lr) == (
        "val_accuracy", "max", 5, 0.5, 1e-5
    )
    plateau, stopping = build_callbacks(get_recipe("mobilenet_enhanced"))
    assert isinstance(stopping, keras.callbacks.EarlyStopping)
    assert stopping.monitor == "val_balanced_accuracy"
    assert (stopping.patience, stopping.restore_best_weights) == (20, True)
    assert stopping.monitor_op == np.greater


def test_weight_average_is_validated_and_kept_while_training_goes_on_unchanged():
    """WeightAverage: after every step, average += (1 - d) * (weights - average),
    d = min(decay, (1 + n) / (10 + n)); validation and the model fit() leaves
    behind use the average; the training weights follow the same path as
    without it (the average is swapped out again before each epoch)."""

    def fit(extra_callbacks, validate=True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.layers.Dense(3, activation="softmax", input_shape=(5,))])
        model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
        stepped = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                stepped.append(self.model.get_weights())

        x = np.random.default_rng(1).random((40, 5), dtype=np.float32)
        y = np.arange(40) % 3
        history = model.fit(x, y, batch_size=10, epochs=3, validation_data=(x, y) if validate else None, verbose=0,
                            callbacks=[*extra_callbacks, Record()])
        return model, history.history, stepped, (x, y)

    plain_model, plain, plain_steps, _ = fit([])
    averager = WeightAverage(0.9)
    model, averaged, steps, (x, y) = fit([averager])
    assert len(steps) == 12 and averager.updates == 12
    for a, b in zip(plain_steps, steps):  # the same training path, step by step
        for wa, wb in zip(a, b):
            np.testing.assert_allclose(wa, wb, rtol=1e-6)
    assert averaged["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    expected = [w.copy() for w in steps[0]]
    for n, weights in enumerate(steps[1:], start=1):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = [e + (1 - decay) * (w - e) for e, w in zip(expected, weights)]
    for e, w in zip(expected, model.get_weights()):
        np.testing.assert_allclose(w, e, rtol=1e-5)
    # The last validation saw the average; without it, the last training weights.
    assert averaged["val_loss"][-1] == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-5)
    assert plain["val_loss"][-1] == pytest.approx(plain_model.evaluate(x, y, verbose=0), rel=1e-5)
    assert averaged["val_loss"][-1] != pytest.approx(plain["val_loss"][-1], rel=1e-3)
    # Without validation the average goes in at the epoch's end all the same.
    unvalidated, _, _, _ = fit([WeightAverage(0.9)], validate=False)
    for e, w in zip(expected, unvalidated.get_weights()):
        np.testing.assert_allclose(w, e, rtol=1e-5)


def test_weight_average_comes_before_every_callback_that_reads_the_weights():
    recipe = dataclasses.replace(get_recipe("mobilenet_enhanced"), ema_decay=0.999)
    averager, *others = build_callbacks(recipe)
    assert isinstance(averager, WeightAverage) and averager.decay == 0.999
    assert any(isinstance(c, keras.callbacks.EarlyStopping) for c in others)
    assert not any(isinstance(c, WeightAverage) for c in build_callbacks(get_recipe("mobilenet_enhanced")))


def test_cosine_schedule_warms_up_decays_and_stays_at_the_floor():
    recipe = dataclasses.replace(
        get_recipe("mobilenet"), reduce_lr_on_plateau=False, learning_rate=1e-3, min_lr=1e-5,
        warmup_epochs=2, cosine_decay_epochs=10, early_stopping_patience=5,
    )
    lrs = [scheduled_learning_rate(recipe, epoch) for epoch in range(20)]
    assert lrs[0] == pytest.approx(1e-4)  # warm-up starts at a tenth of the peak
    assert lrs[1] == pytest.approx(5.5e-4)
    assert lrs[2] == pytest.approx(1e-3)  # the peak, where the cosine starts
    assert lrs[7] == pytest.approx((1e-3 + 1e-5) / 2)  # half way down the cosine
    assert all(a > b for a, b in zip(lrs[2:12], lrs[3:13]))
    assert lrs[12:] == pytest.approx([1e-5] * 8)
    # The only callback besides early stopping; plateau and cosine never run together.
    scheduler, stopping = build_callbacks(recipe)
    assert isinstance(scheduler, keras.callbacks.LearningRateScheduler)
    assert isinstance(stopping, keras.callbacks.EarlyStopping)
    with pytest.raises(ValueError, match="two LR schedules"):
        dataclasses.replace(recipe, reduce_lr_on_plateau=True)
    with pytest.raises(ValueError, match="cosine_decay_epochs"):
        dataclasses.replace(recipe, cosine_decay_epochs=0)


def test_cosine_schedule_sets_the_optimizer_lr_during_fit():
    recipe = dataclasses.replace(
        get_recipe("nn"), learning_rate=1e-3, min_lr=0.0, cosine_decay_epochs=2,
    )
    model = compile_model(create_model("nn"), recipe, num_classes=7)
    x, y = flat_colour_images(14), np.arange(14) % 7
    history = model.fit(x, y, epochs=3, batch_size=7, verbose=0, callbacks=build_callbacks(recipe))
    assert history.history["lr"] == pytest.approx([1e-3, 5e-4, 0.0])
    # A resumed fit starts from the schedule's LR for its epoch, not from the optimizer's last.
    history = model.fit(x, y, epochs=2, initial_epoch=1, batch_size=7, verbose=0, callbacks=build_callbacks(recipe))
    assert history.history["lr"] == pytest.approx([5e-4])


def test_fit_logs_balanced_accuracy_for_early_stopping():
    recipe = dataclasses.replace(get_recipe("nn"), early_stopping_patience=1)
    model = compile_model(create_model("nn"), recipe, num_classes=7)
    x, y = flat_colour_images(14), np.arange(14) % 7
    history = model.fit(
        x, y, validation_data=(x, y), epochs=2, batch_size=7, verbose=0,
        class_weight=class_weights(y, 7, "balanced"), callbacks=build_callbacks(recipe),
    )
    assert {"accuracy", "balanced_accuracy", "val_accuracy", "val_balanced_accuracy"} <= set(history.history)


def test_saved_model_loads_in_a_fresh_process(tmp_path):
    """Custom layers must be registered by `skincluster.models.load_model` itself (seen: a Tune
    trial process failed to load ResNet50's preprocessing layer)."""
    import subprocess
    import sys

    from skincluster.models import create_model

    path = tmp_path / "resnet50.keras"
    create_model("resnet50", weights=None).save(path)
    code = f"from skincluster.models import load_model; print(load_model({str(path)!r}).output_shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(None, 7)" in out.stdout
