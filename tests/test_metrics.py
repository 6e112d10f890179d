"""BalancedAccuracy (streaming, distributed) and evaluate_predictions against scikit-learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)
import tf_keras as keras
from sklearn import metrics as skm

from skincluster.config import CLASS_NAMES
from skincluster.train.metrics import BalancedAccuracy, LabelAccuracy, evaluate_predictions
from skincluster.train.evaluate import format_summary

REPO = Path(__file__).resolve().parents[1]
K = len(CLASS_NAMES)


def random_predictions(n: int, seed: int, absent: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Labels (never one of `absent`) and probabilities that predict every class."""
    rng = np.random.default_rng(seed)
    present = [c for c in range(K) if c not in absent]
    labels = rng.choice(present, size=n)
    probabilities = rng.dirichlet(np.ones(K), size=n)
    # Lean towards the true class so scores are neither 0 nor trivial.
    probabilities[np.arange(n), labels] += rng.uniform(0, 0.6, size=n)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return labels, probabilities.astype(np.float32)


def sklearn_balanced_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        return skm.balanced_accuracy_score(labels, probabilities.argmax(axis=1))


# BalancedAccuracy -------------------------------------------------------------------


@pytest.mark.parametrize("absent", [(), (3,), (0, 6)])
def test_streaming_balanced_accuracy_matches_sklearn(absent):
    labels, probabilities = random_predictions(203, seed=len(absent), absent=absent)
    assert set(absent) <= set(probabilities.argmax(axis=1))  # absent classes are still predicted
    metric = BalancedAccuracy(K)
    for start in range(0, len(labels), 17):  # uneven batches, last one short
        metric.update_state(labels[start : start + 17], probabilities[start : start + 17])
    assert float(metric.result()) == pytest.approx(sklearn_balanced_accuracy(labels, probabilities), abs=1e-6)


def test_a_present_class_never_predicted_counts_as_zero_recall():
    labels = np.array([0, 0, 1, 1, 2])
    probabilities = np.eye(K, dtype=np.float32)[[0, 0, 1, 0, 0]]  # class 2 never predicted
    metric = BalancedAccuracy(K)
    metric.update_state(labels[:, None], probabilities)  # column labels as Keras passes them
    assert float(metric.result()) == pytest.approx((1 + 0.5 + 0) / 3)
    assert float(metric.result()) == pytest.approx(sklearn_balanced_accuracy(labels, probabilities))


def test_per_class_sample_weights_do_not_change_balanced_accuracy():
    labels, probabilities = random_predictions(120, seed=5)
    per_class = np.random.default_rng(5).uniform(0.2, 5, size=K)
    metric = BalancedAccuracy(K)
    metric.update_state(labels, probabilities, sample_weight=per_class[labels])
    assert float(metric.result()) == pytest.approx(sklearn_balanced_accuracy(labels, probabilities), abs=1e-6)


def test_reset_and_serialisation():
    labels, probabilities = random_predictions(40, seed=1)
    metric = BalancedAccuracy(K)
    assert float(metric.result()) == 0.0  # nothing seen yet
    metric.update_state(labels, probabilities)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, BalancedAccuracy)
    assert (restored.name, restored.num_classes) == ("balanced_accuracy", K)


def test_target_rows_count_as_their_largest_class():
    """Mixup's training targets: both accuracies read a blend as its dominant label."""
    labels, probabilities = random_predictions(60, seed=7)
    rng = np.random.default_rng(7)
    lam = rng.uniform(0.55, 1.0, size=60)
    rows = lam[:, None] * np.eye(K)[labels] + (1 - lam[:, None]) * np.eye(K)[rng.integers(0, K, size=60)]
    expected = sklearn_balanced_accuracy(labels, probabilities)
    for y_true in (labels, rows.astype(np.float32)):
        balanced, accuracy = BalancedAccuracy(K), LabelAccuracy(K)
        balanced.update_state(y_true, probabilities)
        accuracy.update_state(y_true, probabilities)
        assert float(balanced.result()) == pytest.approx(expected, abs=1e-6)
        assert float(accuracy.result()) == pytest.approx(np.mean(probabilities.argmax(axis=1) == labels), abs=1e-6)
    restored = keras.metrics.deserialize(keras.metrics.serialize(LabelAccuracy(K)))
    assert isinstance(restored, LabelAccuracy) and restored.name == "accuracy"
    restored.update_state(rows.astype(np.float32), probabilities)
    assert float(restored.result()) == pytest.approx(np.mean(probabilities.argmax(axis=1) == labels), abs=1e-6)


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import skincluster
    import tensorflow as tf

    # Two logical CPUs, configured before TensorFlow initialises its devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_keras as keras
    from skincluster.train.metrics import BalancedAccuracy

    data = np.load(sys.argv[1])
    labels, probabilities = data["labels"], data["probabilities"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        # An identity "model": evaluate() then scores the given probabilities.
        model = keras.Sequential([keras.Input(shape=(probabilities.shape[1],)), keras.layers.Activation("linear")])
        model.compile(loss="sparse_categorical_crossentropy", metrics=[BalancedAccuracy(probabilities.shape[1])])
    dataset = tf.data.Dataset.from_tensor_slices((probabilities, labels)).batch(16)
    scores = model.evaluate(dataset, verbose=0, return_dict=True)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "balanced_accuracy": scores["balanced_accuracy"]}))
    """
)


def test_balanced_accuracy_under_mirrored_strategy_matches_sklearn(tmp_path):
    """Run in a subprocess: logical devices must be set before TensorFlow
    initialises, which other tests in this process have already done."""
    labels, probabilities = random_predictions(150, seed=7, absent=(3,))
    np.savez(tmp_path / "data.npz", labels=labels, probabilities=probabilities)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, str(tmp_path / "data.npz")],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["balanced_accuracy"] == pytest.approx(sklearn_balanced_accuracy(labels, probabilities), abs=1e-6)


# evaluate_predictions ----------------------------------------------------------------


def test_evaluate_predictions_matches_sklearn():
    labels, probabilities = random_predictions(300, seed=11)
    report = evaluate_predictions(labels, probabilities, CLASS_NAMES)
    predicted = probabilities.argmax(axis=1)
    assert report["n"] == 300
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert report["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    assert report["roc_auc_ovr"] == pytest.approx(
        skm.roc_auc_score(labels, probabilities.astype(np.float64), multi_class="ovr", average="macro")
    )
    assert report["roc_auc_classes"] == list(CLASS_NAMES) and report["roc_auc_missing"] == []
    assert report["log_loss"] == pytest.approx(skm.log_loss(labels, probabilities), rel=1e-5)
    assert report["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted)
    for c, name in enumerate(CLASS_NAMES):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[c], recall[c], f1[c]))
        assert row["support"] == support[c]
    assert report["melanoma_recall"] == pytest.approx(recall[CLASS_NAMES.index("mel")])
    json.dumps(report, allow_nan=False)


def test_evaluate_predictions_with_absent_classes_is_nan_free():
    mel, df = CLASS_NAMES.index("mel"), CLASS_NAMES.index("df")
    labels, probabilities = random_predictions(120, seed=3, absent=(mel, df))
    report = evaluate_predictions(labels, probabilities, CLASS_NAMES)
    json.dumps(report, allow_nan=False)  # no NaN anywhere
    assert report["melanoma_recall"] is None
    assert report["per_class"]["mel"]["support"] == 0 and report["per_class"]["mel"]["roc_auc"] is None
    assert report["roc_auc_missing"] == ["df", "mel"]
    present = [c for c in range(K) if c not in (mel, df)]
    expected_auc = np.mean([skm.roc_auc_score(labels == c, probabilities[:, c]) for c in present])
    assert report["roc_auc_ovr"] == pytest.approx(expected_auc)
    assert report["balanced_accuracy"] == pytest.approx(sklearn_balanced_accuracy(labels, probabilities))
    assert np.array(report["confusion_matrix"])[[mel, df]].sum() == 0
    assert report["log_loss"] == pytest.approx(skm.log_loss(labels, probabilities, labels=list(range(K))), rel=1e-5)


def test_evaluate_predictions_names_diverged_rows():
    labels, probabilities = random_predictions(10, seed=0)
    probabilities[4] = np.nan
    with pytest.raises(ValueError, match=r"1 of 10 rows .* NaN.*row 4\): the model diverged"):
        evaluate_predictions(labels, probabilities, CLASS_NAMES)


def test_summary_of_a_test_split_without_melanoma_says_n_a():
    mel = CLASS_NAMES.index("mel")
    labels, probabilities = random_predictions(60, seed=5, absent=(mel,))
    evaluation = {**evaluate_predictions(labels, probabilities, CLASS_NAMES),
                  "val": evaluate_predictions(labels, probabilities, CLASS_NAMES)}
    summary = format_summary("nn", evaluation)  # raised TypeError on None, after the run had finished
    assert "MELANOMA RECALL n/a" in summary


def test_evaluate_predictions_rejects_mismatched_shapes():
    labels, probabilities = random_predictions(10, seed=0)
    with pytest.raises(ValueError, match="shape"):
        evaluate_predictions(labels, probabilities[:, :5], CLASS_NAMES)
