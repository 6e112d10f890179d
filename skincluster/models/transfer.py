"""Transfer-learning models: an ImageNet backbone with a small classification head.

Three of the study's defects are fixed here rather than copied:

- each backbone gets its own ``preprocess_input`` (as a layer named
  ``preprocess``, so a saved model needs only an image);
- the backbone is a nested sub-model called with ``training=False``, so its
  BatchNormalization layers keep their ImageNet statistics while the last
  layers are fine-tuned (Keras transfer-learning guide); ``Recipe.adapt_batchnorm``
  opts out, to measure letting them move;
- mobilenet_enhanced's BatchNormalization really sits between the pooling and
  the dropout.

"Trainable layer count" (``Recipe.trainable_layers = n``) means: the last `n`
entries of ``backbone.layers`` have ``trainable=True`` and all earlier ones
``trainable=False``; weightless layers (ReLU, padding, ...) count like any
other, and the head outside the backbone is always trainable. So
``sum(layer.trainable for layer in backbone_of(model).layers) == n``.
(A flat ``model.layers[:-23]`` count, head included, would free three fewer
backbone layers.) ``n=None`` leaves the whole backbone trainable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tensorflow as tf
import tf_keras as keras

from skincluster.config import ENHANCED_AUGMENTATION, STUDY_AUGMENTATION, Recipe
from skincluster.models.registry import (
    AUGMENTATION_LAYER,
    BuildSpec,
    augment,
    image_input,
    register_model,
    softmax_output,
)

if TYPE_CHECKING:
    from tf_keras.src.engine.keras_tensor import KerasTensor

#: ImageNet statistics used by the "caffe" and "torch" preprocess_input modes.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
#: The smallest input side keras.applications accepts for these backbones.
MIN_BACKBONE_SIDE = 32


@keras.saving.register_keras_serializable(package="skincluster")
class CaffePreprocessing(keras.layers.Layer):
    """``keras.applications.resnet50.preprocess_input`` as a layer that saves:
    RGB -> BGR, then subtract the ImageNet mean per channel (no scaling)."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # Cast explicitly: Keras autocasts floating inputs only, not uint8.
        bgr = tf.cast(inputs, self.compute_dtype)[..., ::-1]
        return bgr - tf.constant(IMAGENET_BGR_MEAN, dtype=self.compute_dtype)


def _mobilenet_preprocess() -> keras.layers.Layer:
    """"tf" mode: 0..255 -> -1..1."""
    return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")


def _resnet_preprocess() -> keras.layers.Layer:
    """"caffe" mode."""
    return CaffePreprocessing(name="preprocess")


def _densenet_preprocess() -> keras.layers.Layer:
    """"torch" mode, (x / 255 - mean) / std, folded into one (x - 255 mean) / (255 std)."""
    return keras.layers.Normalization(
        mean=[255 * m for m in IMAGENET_RGB_MEAN],
        variance=[(255 * s) ** 2 for s in IMAGENET_RGB_STD],
        name="preprocess",
    )


@dataclass(frozen=True)
class _Backbone:
    constructor: Callable[..., keras.Model]
    preprocess: Callable[[], keras.layers.Layer]
    #: Whether the constructor takes MobileNet's width multiplier.
    has_alpha: bool = False


_MOBILENET = _Backbone(keras.applications.MobileNet, _mobilenet_preprocess, has_alpha=True)
_RESNET50 = _Backbone(keras.applications.ResNet50, _resnet_preprocess)
_DENSENET121 = _Backbone(keras.applications.DenseNet121, _densenet_preprocess)


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The nested backbone sub-model of a transfer model (None for the baselines)."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    backbones = [layer for layer in nested if layer.name != AUGMENTATION_LAYER]
    return backbones[0] if backbones else None


def _backbone_input_shape(spec: BuildSpec) -> tuple[int, int, int]:
    """The image shape scaled by ``recipe.input_scale``, channels unchanged."""
    height, width = (round(side * spec.recipe.input_scale) for side in spec.input_shape[:2])
    if min(height, width) < MIN_BACKBONE_SIDE:
        raise ValueError(f"input_scale {spec.recipe.input_scale} gives the backbone {height}x{width} pixels; "
                         f"Keras' ImageNet backbones need at least {MIN_BACKBONE_SIDE} on each side")
    return (height, width, spec.input_shape[2])


def _upsample(x: KerasTensor, spec: BuildSpec) -> KerasTensor:
    """Resize to the backbone's input shape (bilinear; named for the usual scale > 1); no layer at 1."""
    if spec.recipe.input_scale == 1.0:
        return x
    height, width, _ = _backbone_input_shape(spec)
    return keras.layers.Resizing(height, width, interpolation="bilinear", name="upsample")(x)


def _build_backbone(spec: BuildSpec, backbone: _Backbone) -> keras.Model:
    """Build without the top; a weights path is loaded after a weights=None build."""
    kwargs = {"alpha": spec.alpha} if backbone.has_alpha else {}
    if not backbone.has_alpha and spec.alpha != 1.0:
        raise ValueError(f"alpha is MobileNet's width multiplier; {spec.name} takes none, got {spec.alpha}")
    from_file = spec.weights not in (None, "imagenet")
    if from_file and not os.path.isfile(spec.weights):
        raise FileNotFoundError(f"{spec.name}: backbone weights file not found: {spec.weights}")
    base = backbone.constructor(
        include_top=False,
        weights=None if from_file else spec.weights,
        input_shape=_backbone_input_shape(spec),
        **kwargs,
    )
    if from_file:
        # Legacy .h5 files (what keras.applications downloads) load by topology;
        # .keras and .weights.h5 files by the layers' structure.
        try:
            base.load_weights(spec.weights)
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{spec.name}: cannot load {spec.weights} into {base.name}: {exc}") from exc
    return base


def _train_only_last(base: keras.Model, n: int | None) -> None:
    """Make exactly the last `n` backbone layers trainable (see module docstring)."""
    base.trainable = True
    if n is None:
        return
    if not 0 <= n <= len(base.layers):
        raise ValueError(f"trainable_layers must be in 0..{len(base.layers)} for {base.name}, got {n}")
    first_trainable = len(base.layers) - n
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= first_trainable


def _transfer_model(
    spec: BuildSpec,
    backbone: _Backbone,
    head: Callable[[KerasTensor, BuildSpec], KerasTensor],
) -> keras.Model:
    inputs = image_input(spec)
    x = augment(inputs, spec.recipe.augmentation)
    x = _upsample(x, spec)
    x = backbone.preprocess()(x)
    base = _build_backbone(spec, backbone)
    _train_only_last(base, spec.recipe.trainable_layers)
    if spec.recipe.adapt_batchnorm and not any(
        layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
    ):
        raise ValueError(f"adapt_batchnorm=True has nothing to adapt in {spec.name}: its last "
                         f"{spec.recipe.trainable_layers} trainable_layers hold no BatchNormalization layer")
    # training=False keeps BatchNorm in inference mode even during fit();
    # None lets fit() run the trainable BatchNorm layers in training mode.
    x = base(x, training=None if spec.recipe.adapt_batchnorm else False)
    return keras.Model(inputs, head(x, spec), name=spec.name)


def _study_head(features: KerasTensor, spec: BuildSpec) -> KerasTensor:
    """GAP -> Dropout .3 -> Dense."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    return softmax_output(x, spec.num_classes)


def _enhanced_head(features: KerasTensor, spec: BuildSpec) -> KerasTensor:
    """GAP -> BatchNorm -> Dropout .5 -> Dense with L2 1e-3 on the kernel."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    x = keras.layers.BatchNormalization(name="batchnorm")(x)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    return softmax_output(x, spec.num_classes, kernel_regularizer=keras.regularizers.L2(1e-3))


_STUDY_TRANSFER_RECIPE = Recipe(
    learning_rate=1e-4,
    epochs=50,
    augmentation=STUDY_AUGMENTATION,
    reduce_lr_on_plateau=True,
    trainable_layers=23,
    weights="imagenet",
)


@register_model("mobilenet", recipe=_STUDY_TRANSFER_RECIPE)
def mobilenet(spec: BuildSpec) -> keras.Model:
    return _transfer_model(spec, _MOBILENET, _study_head)


@register_model("resnet50", recipe=_STUDY_TRANSFER_RECIPE)
def resnet50(spec: BuildSpec) -> keras.Model:
    return _transfer_model(spec, _RESNET50, _study_head)


@register_model("densenet121", recipe=_STUDY_TRANSFER_RECIPE)
def densenet121(spec: BuildSpec) -> keras.Model:
    return _transfer_model(spec, _DENSENET121, _study_head)


@register_model(
    "mobilenet_enhanced",
    recipe=Recipe(
        learning_rate=1e-3,
        epochs=500,
        augmentation=ENHANCED_AUGMENTATION,
        reduce_lr_on_plateau=True,
        early_stopping_patience=20,
        trainable_layers=50,
        weights="imagenet",
    ),
)
def mobilenet_enhanced(spec: BuildSpec) -> keras.Model:
    return _transfer_model(spec, _MOBILENET, _enhanced_head)
