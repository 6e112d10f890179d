"""Model registry and the seven architectures of the study.

>>> from skincluster.models import create_model, get_recipe, list_models
>>> model = create_model("mobilenet", weights=None)

Importing this package registers every architecture and the custom Keras
objects (layers, loss, metric) a saved model needs to load with
keras.models.load_model.
"""

from skincluster.models import baselines, transfer  # noqa: F401  (registers the models)
from skincluster.models.registry import (
    FROM_RECIPE,
    BuildSpec,
    create_model,
    get_recipe,
    list_models,
    register_model,
)
from skincluster.models.training import (
    SparseCategoricalFocalLoss,
    SparseCategoricalSmoothedCrossentropy,
    build_callbacks,
    class_weights,
    compile_model,
    set_precision,
)
from skincluster.models.transfer import backbone_of


def load_model(path: str):
    """Load a saved skincluster model (``.keras`` or SavedModel folder) for inference.

    Goes through this package so the custom layers are registered first: a
    bare ``keras.models.load_model`` in a fresh process fails on ResNet50's
    preprocessing layer.
    """
    import tf_keras as keras

    return keras.models.load_model(path, compile=False)

__all__ = [
    "FROM_RECIPE",
    "BuildSpec",
    "SparseCategoricalFocalLoss",
    "SparseCategoricalSmoothedCrossentropy",
    "backbone_of",
    "build_callbacks",
    "class_weights",
    "compile_model",
    "create_model",
    "get_recipe",
    "list_models",
    "load_model",
    "register_model",
    "set_precision",
]
