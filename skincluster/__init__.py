"""skincluster: train and compare skin-lesion classifiers on HAM10000 with Ray.

Importing the package pins Keras 2 (tf-keras) before TensorFlow is imported
anywhere: with Keras 3, MultiWorkerMirroredStrategy crashes inside
``model.fit`` (keras-team/keras#20585, ray-project/ray#47464). This is the only
place that sets it; Ray workers get the same value through ``RAY_RUNTIME_ENV``.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter buries our own output; warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Environment every Ray worker must start with (passed as runtime_env env_vars).
RAY_RUNTIME_ENV = {"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}}

__version__ = "0.1.0"
