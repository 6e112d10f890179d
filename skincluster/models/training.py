"""Everything a Recipe says about training, turned into Keras objects: precision
policy, optimizer, loss, metrics, callbacks and class weights.

Labels are integer class indices, so the loss is the sparse form of the
study's categorical cross-entropy (the same number, without one-hot labels).
The one exception is mixup's training batches, whose targets are blends of
two (class-weighted) one-hot rows; the losses and metrics here take either.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tensorflow as tf
import tf_keras as keras

from skincluster.config import Recipe
from skincluster.train.metrics import BalancedAccuracy, LabelAccuracy, is_target_rows

#: What EarlyStopping watches; the name BalancedAccuracy logs under in fit().
EARLY_STOPPING_MONITOR = "val_balanced_accuracy"
#: What ReduceLROnPlateau watches, as in the study.
REDUCE_LR_MONITOR = "val_accuracy"


def set_precision(recipe: Recipe) -> None:
    """Set the global Keras policy for `recipe`; call before building the model.

    "mixed_float16" computes in float16 with float32 variables (the models'
    softmax stays float32); "float32" otherwise, also undoing an earlier call.
    """
    keras.mixed_precision.set_global_policy("mixed_float16" if recipe.mixed_precision else "float32")


@keras.saving.register_keras_serializable(package="skincluster")
class SparseCategoricalFocalLoss(keras.losses.Loss):
    """Focal loss -(1 - p_t)^gamma * log(p_t) for integer labels and probabilities.

    Down-weights examples the model already gets right, so the rare classes
    weigh more; gamma=0 is sparse categorical cross-entropy (smoothed, if
    label_smoothing is). No alpha term: per-class weighting is
    fit(class_weight=...)'s job. With label smoothing the targets y are
    smoothed one-hot rows and the loss is sum_k y_k * -(1 - p_k)^gamma * log(p_k).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        label_smoothing: float = 0.0,
        name: str = "sparse_categorical_focal_loss",
        **kwargs: Any,
    ):
        super().__init__(name=name, **kwargs)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(y_pred)
        targets, mass = _targets(y_true, y_pred)
        loss = keras.losses.categorical_focal_crossentropy(
            targets, y_pred, alpha=1.0, gamma=self.gamma, label_smoothing=self.label_smoothing
        )
        return _times_mass(loss, mass)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma": self.gamma, "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="skincluster")
class SparseCategoricalSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy for integer labels against smoothed one-hot targets:
    1 - label_smoothing + label_smoothing / K for the true class and
    label_smoothing / K for the others (Keras' own sparse loss has no smoothing).
    Target rows (mixup's, see _targets) are taken as they are, and smoothed the same way.

    A regulariser: the loss stops rewarding ever more confident predictions
    once the target is met. 0 is plain sparse categorical cross-entropy.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        name: str = "sparse_categorical_smoothed_crossentropy",
        **kwargs: Any,
    ):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(y_pred)
        targets, mass = _targets(y_true, y_pred)
        loss = keras.losses.categorical_crossentropy(targets, y_pred, label_smoothing=self.label_smoothing)
        return _times_mass(loss, mass)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def _targets(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
    """(target rows like y_pred that sum to 1, each row's mass or None).

    Integer labels (flat or as the column Keras passes) become one-hot rows
    (mass None: 1). Target rows are mixup's, which carry class weights and
    need not sum to 1 (pipeline.mixup_batches): they are divided by their
    mass, and the loss against them is multiplied back by it. Passing them
    unnormalised would give the right loss value but the wrong gradient:
    Keras computes cross-entropy after a softmax layer from its logits with
    tf.nn.softmax_cross_entropy_with_logits, whose gradient softmax - labels
    assumes rows that sum to 1. Smoothing then applies to the normalised row,
    which is how fit(class_weight=...) weighs a smoothed one-hot row.
    """
    y_true = tf.convert_to_tensor(y_true)
    if is_target_rows(y_true, y_pred.shape[-1]):
        rows = tf.cast(y_true, y_pred.dtype)
        mass = tf.reduce_sum(rows, axis=-1)
        return tf.math.divide_no_nan(rows, mass[..., None]), mass
    labels = tf.reshape(tf.cast(y_true, tf.int32), tf.shape(y_pred)[:-1])
    return tf.one_hot(labels, depth=tf.shape(y_pred)[-1], dtype=y_pred.dtype), None


def _times_mass(loss: tf.Tensor, mass: tf.Tensor | None) -> tf.Tensor:
    return loss if mass is None else loss * tf.cast(mass, loss.dtype)


def make_loss(recipe: Recipe) -> keras.losses.Loss:
    if recipe.loss == "focal":
        return SparseCategoricalFocalLoss(gamma=recipe.focal_gamma, label_smoothing=recipe.label_smoothing)
    if recipe.label_smoothing or recipe.mixup_alpha:
        # Keras' sparse loss cannot take mixup's target rows; this one takes both.
        return SparseCategoricalSmoothedCrossentropy(label_smoothing=recipe.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def make_optimizer(recipe: Recipe) -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(
        learning_rate=recipe.learning_rate,
        beta_1=recipe.adam_beta_1,
        beta_2=recipe.adam_beta_2,
        epsilon=recipe.adam_epsilon,
    )


def compile_model(model: keras.Model, recipe: Recipe, num_classes: int) -> keras.Model:
    """Compile with the recipe's Adam and loss; logs accuracy and balanced_accuracy.

    Under a mixed_float16 policy Keras wraps the optimizer in a
    LossScaleOptimizer by itself. Returns `model` for chaining.
    """
    model.compile(
        optimizer=make_optimizer(recipe),
        loss=make_loss(recipe),
        # Named "accuracy" so fit() logs val_accuracy, which ReduceLROnPlateau watches.
        metrics=[LabelAccuracy(num_classes), BalancedAccuracy(num_classes)],
    )
    return model


def scheduled_learning_rate(recipe: Recipe, epoch: int) -> float:
    """The LR of 0-based `epoch` under the recipe's warm-up and cosine decay.

    Warm-up: linear from learning_rate / 10 (epoch 0) to learning_rate (epoch
    warmup_epochs). Then a half cosine from learning_rate down to min_lr over
    cosine_decay_epochs, and min_lr after it. Without a cosine decay the LR
    stays at learning_rate after the warm-up.
    """
    peak = recipe.learning_rate
    warmup = recipe.warmup_epochs
    if epoch < warmup:
        return peak / 10 + (peak - peak / 10) * epoch / warmup
    if recipe.cosine_decay_epochs is None:
        return peak
    progress = min((epoch - warmup) / recipe.cosine_decay_epochs, 1.0)
    floor = min(recipe.min_lr, peak)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class WeightAverage(keras.callbacks.Callback):
    """An exponential moving average of the trainable weights, updated after
    every training step; the model is validated (and early-stopped,
    checkpointed as "best", exported) with the average, and trains on with its
    own weights.

    fit() validates between the epoch's last step and on_epoch_end, so the
    average goes in at on_test_begin (or at on_epoch_end when there is no
    validation) and the training weights come back at the next
    on_epoch_begin; after the last epoch the model holds the average. The
    first step's weights start the average; step n >= 1 then mixes in with a
    decay that warms up as tf.train.ExponentialMovingAverage's does with
    num_updates, min(decay, (1 + n) / (10 + n)), so the random head's initial
    weights do not linger for thousands of steps.

    Only trainable weights are averaged, as Keras' own optimizer EMA does:
    BatchNorm statistics are already moving averages (and reading them under
    MultiWorkerMirroredStrategy costs a collective per variable), and frozen
    weights never move. The average is paired with the current statistics.

    To resume exactly, keep `training_weights` (the weights to train on while
    the average is loaded, which it then is) and `updates`.
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.average: list[np.ndarray] | None = None
        self.training_weights: list[np.ndarray] | None = None
        self.updates = 0
        self._fitting = False

    def on_train_begin(self, logs=None):
        self._fitting = True

    def on_train_end(self, logs=None):
        self._fitting = False

    def on_epoch_begin(self, epoch, logs=None):
        if self.training_weights is not None:
            keras.backend.batch_set_value(list(zip(self.model.trainable_weights, self.training_weights)))
            self.training_weights = None

    def on_train_batch_end(self, batch, logs=None):
        weights = keras.backend.batch_get_value(self.model.trainable_weights)
        if self.average is None:
            self.average = [np.array(w, copy=True) for w in weights]
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            for average, w in zip(self.average, weights):
                average += (1 - decay) * (w - average)
        self.updates += 1

    def on_test_begin(self, logs=None):
        if self._fitting:
            self._load_average()

    def on_epoch_end(self, epoch, logs=None):
        self._load_average()

    def _load_average(self):
        if self.average is None or self.training_weights is not None:
            return
        self.training_weights = keras.backend.batch_get_value(self.model.trainable_weights)
        keras.backend.batch_set_value(list(zip(self.model.trainable_weights, self.average)))


def build_callbacks(recipe: Recipe) -> list[keras.callbacks.Callback]:
    """The recipe's weight average, LR schedule (plateau, or warm-up and
    cosine decay) and EarlyStopping, each only when enabled. The average comes
    first so that every later callback sees the averaged weights."""
    callbacks: list[keras.callbacks.Callback] = []
    if recipe.ema_decay is not None:
        callbacks.append(WeightAverage(recipe.ema_decay))
    if recipe.cosine_decay_epochs is not None or recipe.warmup_epochs:
        callbacks.append(keras.callbacks.LearningRateScheduler(lambda epoch: scheduled_learning_rate(recipe, epoch)))
    if recipe.reduce_lr_on_plateau:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=REDUCE_LR_MONITOR,
                mode="max",
                patience=recipe.lr_patience,
                factor=recipe.lr_factor,
                min_lr=recipe.min_lr,
            )
        )
    if recipe.early_stopping_patience is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=EARLY_STOPPING_MONITOR,
                mode="max",
                patience=recipe.early_stopping_patience,
                restore_best_weights=True,
            )
        )
    return callbacks


#: How far each class-weight mode goes from no weighting (power 0) to
#: sklearn's "balanced" weights (power 1), on the log scale.
CLASS_WEIGHT_POWERS = {"balanced": 1.0, "sqrt": 0.5, "fourth_root": 0.25}


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """Class weights for fit(class_weight=...): None for mode "none"; for
    "balanced", n / (num_classes * count) as sklearn's compute_class_weight;
    for "sqrt" and "fourth_root", that root of the balanced weights.

    "balanced" makes every class weigh the same in the loss, which buys
    balanced accuracy with a lot of plain accuracy on HAM10000 (two thirds of
    the images are nevi, so nevi get a weight of about 0.2 and dermatofibroma
    about 12); "sqrt" goes half way on the log scale (about 0.46 and 3.5),
    "fourth_root" a quarter of the way (about 0.68 and 1.9).
    Every class gets a key (Keras requires 0..num_classes-1); a class with no
    training sample gets 1.0, a weight nothing is ever multiplied by.
    """
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHT_POWERS:
        known = ", ".join(["none", *CLASS_WEIGHT_POWERS])
        raise ValueError(f"class weight mode must be one of {known}, got {mode!r}")
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"labels hold class {len(counts) - 1}, but num_classes is {num_classes}")
    total = counts.sum()
    power = CLASS_WEIGHT_POWERS[mode]
    return {c: float((total / (num_classes * n)) ** power) if n else 1.0 for c, n in enumerate(counts)}
