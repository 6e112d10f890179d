"""Metrics that survive class imbalance: always answering "nv" scores ~67%
accuracy on HAM10000, so accuracy alone says little.

- LabelAccuracy: accuracy that also reads mixup's soft targets.
- BalancedAccuracy: a streaming Keras metric, logged by fit() as
  "balanced_accuracy"/"val_balanced_accuracy" and usable for early stopping.
- evaluate_predictions: the full report on a finished model's predictions,
  computed with scikit-learn, as plain JSON-serialisable values.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tensorflow as tf
import tf_keras as keras
from sklearn import metrics as skm

from skincluster.config import MELANOMA


def class_indices(y_true: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Flat int32 class indices from integer labels ((batch,) or Keras' (batch, 1)
    column) or from target rows (batch, num_classes), whose largest entry wins
    (for mixup's class-weighted rows: the class that weighs most in the blend).

    Decided on the static shape, which fit() knows: its training step (mixup
    targets) and its validation step (integer labels) are traced apart.
    """
    y_true = tf.convert_to_tensor(y_true)
    if is_target_rows(y_true, num_classes):
        return tf.argmax(y_true, axis=-1, output_type=tf.int32)
    return tf.reshape(tf.cast(y_true, tf.int32), [-1])


def is_target_rows(y_true: tf.Tensor, num_classes: int | None) -> bool:
    """Whether `y_true` holds (batch, num_classes) target rows rather than integer
    labels, by its static shape; the one rule for the losses and the metrics."""
    return num_classes is not None and num_classes > 1 and y_true.shape.rank == 2 \
        and y_true.shape[-1] == num_classes


def predicted_classes(y_pred: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Flat int32 index of each row's most probable class."""
    return tf.argmax(tf.reshape(y_pred, [-1, num_classes]), axis=-1, output_type=tf.int32)


@keras.saving.register_keras_serializable(package="skincluster")
class LabelAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy against integer labels or, for mixup's target rows, their largest
    entry (class_indices). Training accuracy on blends is a rough guide only.

    Keras' SparseCategoricalAccuracy would broadcast a (batch, num_classes)
    target against the predicted indices and report nonsense.
    """

    def __init__(self, num_classes: int, name: str = "accuracy", dtype: Any = None):
        super().__init__(_label_accuracy, name=name, dtype=dtype, num_classes=num_classes)


def _label_accuracy(y_true: tf.Tensor, y_pred: tf.Tensor, num_classes: int) -> tf.Tensor:
    return tf.cast(tf.equal(class_indices(y_true, num_classes), predicted_classes(y_pred, num_classes)), tf.float32)


@keras.saving.register_keras_serializable(package="skincluster")
class BalancedAccuracy(keras.metrics.Metric):
    """Mean per-class recall over the classes present in y_true, streamed.

    Matches ``sklearn.metrics.balanced_accuracy_score`` (adjusted=False): a
    class absent from y_true is left out of the mean, even if it was
    predicted; a present class that is never predicted counts as recall 0.

    The state is one num_classes x num_classes confusion matrix (rows = true
    class) with SUM aggregation, so under MirroredStrategy or
    MultiWorkerMirroredStrategy the replicas' counts add up before recall is
    computed; averaging per-replica recalls would be wrong. Per-class recall
    is unchanged by per-class sample weights, so fit(class_weight=...) does
    not distort it.

    y_true: integer class indices, shape (batch,) or (batch, 1), or target
    rows (batch, num_classes) such as mixup's, counted as their largest entry.
    y_pred: class probabilities (or logits), shape (batch, num_classes).
    """

    def __init__(self, num_classes: int, name: str = "balanced_accuracy", dtype: Any = None, **kwargs: Any):
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.num_classes = num_classes
        self.confusion = self.add_weight(
            name="confusion_matrix",
            shape=(num_classes, num_classes),
            initializer="zeros",
            aggregation=tf.VariableAggregation.SUM,
        )

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        labels = class_indices(y_true, self.num_classes)
        predicted = predicted_classes(y_pred, self.num_classes)
        weights = None if sample_weight is None else tf.reshape(tf.cast(sample_weight, self.dtype), [-1])
        batch = tf.math.confusion_matrix(
            labels, predicted, num_classes=self.num_classes, weights=weights, dtype=self.dtype
        )
        self.confusion.assign_add(batch)

    def result(self) -> tf.Tensor:
        support = tf.reduce_sum(self.confusion, axis=1)
        recall = tf.math.divide_no_nan(tf.linalg.diag_part(self.confusion), support)
        present = tf.cast(support > 0, self.dtype)
        # 0 before any sample has been seen (sklearn would give NaN).
        return tf.math.divide_no_nan(tf.reduce_sum(recall * present), tf.reduce_sum(present))

    def reset_state(self) -> None:
        self.confusion.assign(tf.zeros_like(self.confusion))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Score predicted class probabilities against integer labels.

    Returns plain Python values only (json.dumps(..., allow_nan=False) works):
    a metric that is undefined on this data (e.g. the recall of a class with no
    samples) is None, never NaN.

    Keys: n, accuracy, balanced_accuracy, macro_f1 (sklearn's default: over
    the classes present in y_true or predicted), per_class {name: {precision,
    recall, f1, support, roc_auc}}, melanoma_recall, roc_auc_ovr (macro mean of
    one-vs-rest AUCs over the classes that have both positives and negatives in
    y_true, listed in roc_auc_classes; the others in roc_auc_missing),
    confusion_matrix (rows = true class, columns = predicted), log_loss.
    """
    labels = np.asarray(y_true, dtype=np.int64).reshape(-1)
    # Softmax outputs in float32 sum to 1 only within ~1e-6; sklearn's log_loss
    # rejects rows that do not sum to 1 at float64 precision.
    probs = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    if probs.shape != (len(labels), num_classes):
        raise ValueError(f"probabilities must have shape ({len(labels)}, {num_classes}), got {probs.shape}")
    totals = probs.sum(axis=1, keepdims=True)
    broken = np.flatnonzero(~np.isfinite(probs).all(axis=1) | (totals[:, 0] <= 0))
    if len(broken):
        # sklearn would say only "Input contains NaN", after a whole run.
        raise ValueError(f"{len(broken)} of {len(probs)} rows of predicted probabilities are NaN, infinite or all "
                         f"zero (first: row {broken[0]}): the model diverged; try a lower learning_rate")
    probs = probs / totals
    predicted = probs.argmax(axis=1)
    all_classes = list(range(num_classes))

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=all_classes, zero_division=np.nan
    )
    class_auc = [_one_vs_rest_auc(labels == c, probs[:, c]) for c in all_classes]
    per_class = {
        name: {
            "precision": _plain(precision[c]),
            "recall": _plain(recall[c]),
            "f1": _plain(f1[c]),
            "support": int(support[c]),
            "roc_auc": class_auc[c],
        }
        for c, name in enumerate(class_names)
    }
    auc_classes = [name for name, auc in zip(class_names, class_auc) if auc is not None]

    with warnings.catch_warnings():
        # sklearn warns when y_pred holds a class absent from y_true; that class
        # is left out of the mean by definition, which is what we report.
        warnings.simplefilter("ignore", UserWarning)
        balanced = skm.balanced_accuracy_score(labels, predicted)

    return {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(skm.f1_score(labels, predicted, average="macro", zero_division=0)),
        "per_class": per_class,
        "melanoma_recall": per_class[MELANOMA]["recall"] if MELANOMA in per_class else None,
        "roc_auc_ovr": float(np.mean([per_class[n]["roc_auc"] for n in auc_classes])) if auc_classes else None,
        "roc_auc_classes": auc_classes,
        "roc_auc_missing": [name for name in class_names if name not in auc_classes],
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=all_classes).tolist(),
        "log_loss": float(skm.log_loss(labels, probs, labels=all_classes)),
    }


def _one_vs_rest_auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
    """Binary ROC AUC of one class against the rest; None without both outcomes."""
    if is_class.all() or not is_class.any():
        return None
    return float(skm.roc_auc_score(is_class, score))


def _plain(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
