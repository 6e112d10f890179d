"""Model registry and the seven architectures of the study.

>>> from skincluster.models import create_model, get_recipe, list_models
>>> model = create_model("mobilenet", weights=None)

Importing this package registers every architecture and the custom Keras
objects (layers, loss, metric) a saved model needs to load with
keras.models.load_model.
"""

import json
import os
import tempfile
import zipfile

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


#: What tf-keras writes for a model without assets (the only kind this package makes).
KERAS_FILE_MEMBERS = ["config.json", "metadata.json", "model.weights.h5"]


def load_model(path: str):
    """Load a saved skincluster model (``.keras`` or SavedModel folder) for inference.

    Goes through this package so the custom layers are registered first: a
    bare ``keras.models.load_model`` in a fresh process fails on ResNet50's
    preprocessing layer.
    """
    import tf_keras as keras

    path = os.fspath(path)
    if path.endswith(".keras") and os.path.isfile(path):
        with zipfile.ZipFile(path) as archive:
            if sorted(archive.namelist()) == KERAS_FILE_MEMBERS:
                # tf-keras reads the weights straight out of the zip, where each of
                # h5py's backward seeks re-reads the member from its start; from a
                # copy on disk a finished run's file loads 2-7x faster
                # (benchmarks/model_load.py). Same config and weight loader as
                # tf-keras (safe mode on), so the same model.
                config = json.loads(archive.read("config.json"))
                config["compile_config"] = None
                model = keras.saving.deserialize_keras_object(config)
                with tempfile.TemporaryDirectory(prefix="skincluster-load-") as folder:
                    model.load_weights(archive.extract("model.weights.h5", folder))
                return model
    # Anything else (a SavedModel folder, a .keras file with assets) the way tf-keras reads it.
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
