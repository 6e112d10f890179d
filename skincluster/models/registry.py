"""Model registry (timm style): each architecture is a small factory registered
by name together with the Recipe that trains it.

Every registered model follows one contract, so a saved model needs nothing
but an image:

- input ``image``: raw RGB pixels 0-255, dtype uint8, shape ``input_shape``
  (float input is cast by Keras on the way in);
- optional ``augmentation`` (Keras preprocessing layers, active only when
  ``training=True``), placed before any scaling;
- a layer named ``preprocess`` that scales pixels the way the network expects;
- output ``probabilities``: a float32 softmax over ``num_classes``, float32 even
  under a mixed_float16 policy so the loss is computed in full precision.

The blocks below build the shared parts of that contract; baselines.py and
transfer.py hold the factories.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tf_keras as keras

from skincluster.config import CLASS_NAMES, IMAGE_SHAPE, Augmentation, Recipe

if TYPE_CHECKING:  # tf-keras exports no public name for the symbolic tensor type
    from tf_keras.src.engine.keras_tensor import KerasTensor


class _Default(enum.Enum):
    RECIPE = "recipe"


#: Name of the nested Sequential that holds the augmentation layers.
AUGMENTATION_LAYER = "augmentation"

#: Marks an argument of create_model that defaults to the recipe's value
#: (``None`` cannot, since ``weights=None`` means "random init").
FROM_RECIPE = _Default.RECIPE


@dataclass(frozen=True)
class BuildSpec:
    """Everything a factory needs, resolved from create_model's arguments."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    recipe: Recipe
    #: "imagenet", None (random init) or a local weights file for the backbone.
    weights: str | None
    alpha: float
    #: Per-channel train-split pixel statistics for the from-scratch models.
    channel_mean: tuple[float, ...] | None
    channel_std: tuple[float, ...] | None


ModelFactory = Callable[[BuildSpec], keras.Model]


@dataclass(frozen=True)
class _Entry:
    factory: ModelFactory
    recipe: Recipe


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, recipe: Recipe) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(spec) -> keras.Model`` under `name` with its recipe."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(factory, recipe)
        return factory

    return decorate


def list_models() -> list[str]:
    """Registered model names, in registration order (the study's order)."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def get_recipe(name: str) -> Recipe:
    """The recipe registered with model `name` (the study's settings)."""
    return _entry(name).recipe


def create_model(
    name: str,
    input_shape: tuple[int, int, int] = IMAGE_SHAPE,
    num_classes: int = len(CLASS_NAMES),
    weights: str | os.PathLike | None | _Default = FROM_RECIPE,
    alpha: float | _Default = FROM_RECIPE,
    recipe: Recipe | None = None,
    channel_mean: Sequence[float] | None = None,
    channel_std: Sequence[float] | None = None,
) -> keras.Model:
    """Build registered model `name`, uncompiled (see training.compile_model).

    `recipe` defaults to the registered one; `weights` and `alpha` default to the
    recipe's. `channel_mean`/`channel_std` (train-split pixel statistics, one
    value per channel, on the 0-255 scale) are used by the from-scratch models
    nn/cnn/cnn_aug; when None they scale with 127.5/127.5, i.e. to [-1, 1].
    Backbones ignore them: they must see pixels scaled as in their pre-training.
    Set the mixed-precision policy (training.set_precision) before calling this.
    """
    entry = _entry(name)
    recipe = recipe or entry.recipe
    if weights is FROM_RECIPE:
        weights = recipe.weights
    spec = BuildSpec(
        name=name,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        recipe=recipe,
        weights=os.fspath(weights) if isinstance(weights, os.PathLike) else weights,
        alpha=recipe.alpha if alpha is FROM_RECIPE else alpha,
        channel_mean=_channel_stat("channel_mean", channel_mean, input_shape[-1]),
        channel_std=_channel_stat("channel_std", channel_std, input_shape[-1]),
    )
    if spec.channel_std is not None and min(spec.channel_std) <= 0:
        raise ValueError(f"channel_std must be positive, got {spec.channel_std}")
    return entry.factory(spec)


def _channel_stat(what: str, values: Sequence[float] | None, channels: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    stat = tuple(float(v) for v in values)
    if len(stat) != channels:
        raise ValueError(f"{what} needs one value per channel ({channels}), got {stat}")
    return stat


# Shared blocks of the model contract ------------------------------------------------


def image_input(spec: BuildSpec) -> KerasTensor:
    """Raw uint8 pixels: a saved model takes an image as it comes off disk."""
    return keras.Input(shape=spec.input_shape, dtype="uint8", name="image")


def augment(x: KerasTensor, augmentation: Augmentation) -> KerasTensor:
    """The study's ImageDataGenerator settings as layers; identity unless training.

    Zoom samples height and width factors independently, as ImageDataGenerator
    did; "nearest" fill replaces its default fill_mode. Returns `x` unchanged
    when the recipe has no augmentation, so the model has no dead layers.
    """
    if not augmentation.enabled:
        return x
    layers: list[keras.layers.Layer] = []
    if augmentation.rotation_degrees:
        layers.append(keras.layers.RandomRotation(augmentation.rotation_degrees / 360, fill_mode="nearest"))
    if augmentation.zoom:
        layers.append(keras.layers.RandomZoom(augmentation.zoom, augmentation.zoom, fill_mode="nearest"))
    if augmentation.shift:
        layers.append(keras.layers.RandomTranslation(augmentation.shift, augmentation.shift, fill_mode="nearest"))
    flip = {
        (True, True): "horizontal_and_vertical",
        (True, False): "horizontal",
        (False, True): "vertical",
    }.get((augmentation.horizontal_flip, augmentation.vertical_flip))
    if flip:
        layers.append(keras.layers.RandomFlip(flip))
    return keras.Sequential(layers, name=AUGMENTATION_LAYER)(x)


def softmax_output(x: KerasTensor, num_classes: int, **dense_kwargs) -> KerasTensor:
    """Dense logits in the compute dtype, softmax in float32 (mixed-precision safe)."""
    logits = keras.layers.Dense(num_classes, name="logits", **dense_kwargs)(x)
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
