"""The study's from-scratch models: a dense network and a small CNN.

Layer sizes, dropout rates and recipes follow the study exactly (DESIGN.md,
"The seven architectures"). Pixels are standardised per channel inside the
model with the training split's statistics, so nothing outside the model has
to remember them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tf_keras as keras

from skincluster.config import STUDY_AUGMENTATION, Recipe
from skincluster.models.registry import BuildSpec, augment, image_input, register_model, softmax_output

if TYPE_CHECKING:
    from tf_keras.src.engine.keras_tensor import KerasTensor

#: Used when no train-split statistics are given: maps 0..255 to -1..1.
DEFAULT_PIXEL_MEAN = 127.5
DEFAULT_PIXEL_STD = 127.5

#: The study's CNN: three conv blocks, with dropout growing by 1.5x per block.
CNN_BLOCK_DROPOUT = (0.15, 0.225, 0.3375)
CNN_HEAD_DROPOUT = 0.506


def _standardized_input(spec: BuildSpec) -> tuple[KerasTensor, KerasTensor]:
    """The image input, then augmentation, then (x - mean) / std per channel.

    The statistics are constants in the Normalization layer's config, so a
    saved model carries them.
    """
    if spec.weights is not None:
        raise ValueError(f"{spec.name} is trained from scratch; weights must be None, got {spec.weights!r}")
    if spec.alpha != 1.0:
        raise ValueError(f"alpha is MobileNet's width multiplier; {spec.name} takes none, got {spec.alpha}")
    if spec.recipe.input_scale != 1.0:
        raise ValueError(f"input_scale resizes a backbone's input; {spec.name} has none, "
                         f"got {spec.recipe.input_scale}")
    if spec.recipe.adapt_batchnorm:
        raise ValueError(f"adapt_batchnorm is about a backbone's BatchNorm statistics; {spec.name} has no backbone")
    channels = spec.input_shape[-1]
    mean = spec.channel_mean or (DEFAULT_PIXEL_MEAN,) * channels
    std = spec.channel_std or (DEFAULT_PIXEL_STD,) * channels
    inputs = image_input(spec)
    x = augment(inputs, spec.recipe.augmentation)
    x = keras.layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="preprocess")(x)
    return inputs, x


@register_model("nn", recipe=Recipe(learning_rate=7.5e-4, epochs=50, weights=None))
def nn(spec: BuildSpec) -> keras.Model:
    """Flatten -> 5 x Dense(64, relu) -> Dense(num_classes) -> softmax."""
    inputs, x = _standardized_input(spec)
    x = keras.layers.Flatten(name="flatten")(x)
    for block in range(1, 6):
        x = keras.layers.Dense(64, activation="relu", name=f"dense_{block}")(x)
    return keras.Model(inputs, softmax_output(x, spec.num_classes), name=spec.name)


def _cnn(spec: BuildSpec) -> keras.Model:
    """3 x [Conv 32 3x3 -> MaxPool 2 -> Dropout] -> Dense 256 -> Dense 128 -> Dropout -> softmax."""
    inputs, x = _standardized_input(spec)
    for block, rate in enumerate(CNN_BLOCK_DROPOUT, start=1):
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name=f"conv_{block}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool_{block}")(x)
        x = keras.layers.Dropout(rate, name=f"dropout_{block}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(256, activation="relu", name="dense_256")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense_128")(x)
    x = keras.layers.Dropout(CNN_HEAD_DROPOUT, name="dropout_head")(x)
    return keras.Model(inputs, softmax_output(x, spec.num_classes), name=spec.name)


# cnn and cnn_aug share the architecture; the augmentation comes from the recipe.
register_model("cnn", recipe=Recipe(learning_rate=1e-4, epochs=50, weights=None))(_cnn)
register_model(
    "cnn_aug",
    recipe=Recipe(
        learning_rate=1e-4,
        epochs=50,
        augmentation=STUDY_AUGMENTATION,
        reduce_lr_on_plateau=True,
        weights=None,
    ),
)(_cnn)
