"""Honest evaluation of a finished run on the lesion-grouped test split (and val)."""

from __future__ import annotations

from typing import Any

import numpy as np

from skincluster.data import pipeline
from skincluster.data.store import Store

EVAL_BATCH = 64


def predict_split(model, store: Store, split: str, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) of every image of `split`, in batches."""
    images, labels = pipeline.read_arrays(store, split, limit, seed)
    probabilities = [
        np.asarray(model(batch, training=False), dtype=np.float64)
        for batch, _ in pipeline.array_batches(images, labels, EVAL_BATCH)
    ]
    probs = np.concatenate(probabilities) if probabilities else np.zeros((0, len(store.class_names)))
    return labels, probs


def evaluate_model(model, store: Store, limit: int | None, seed: int) -> dict[str, Any]:
    """Test metrics at the top level (``balanced_accuracy``, ``melanoma_recall``, ...), val under ``val``."""
    # Imported here: the metrics module imports TensorFlow, and format_summary is
    # used by each trial's process, which does not otherwise import it.
    from skincluster.train.metrics import evaluate_predictions

    labels, probs = predict_split(model, store, "test", limit, seed)
    result = evaluate_predictions(labels, probs, store.class_names)
    val_labels, val_probs = predict_split(model, store, "val", limit, seed)
    result["val"] = evaluate_predictions(val_labels, val_probs, store.class_names)
    result["split"] = "test"
    result["leaky_split"] = bool(store.manifest["options"].get("leaky_split", False))
    return result


def _score(value: float | None) -> str:
    """None where a test split cannot define the metric (no melanoma image: no recall)."""
    return "n/a" if value is None else f"{value:.3f}"


def format_summary(name: str, evaluation: dict[str, Any]) -> str:
    """A few lines for the console; melanoma recall is called out on its own line."""
    e = evaluation
    lines = [
        f"{name}: test accuracy {e['accuracy']:.3f}  balanced accuracy {e['balanced_accuracy']:.3f}  "
        f"macro-F1 {e['macro_f1']:.3f}  ROC AUC {_score(e['roc_auc_ovr'])}  (n={e['n']})",
        f"{name}: MELANOMA RECALL {_score(e['melanoma_recall'])}  "
        f"(val balanced accuracy {e['val']['balanced_accuracy']:.3f})",
    ]
    if e.get("leaky_split"):
        lines.append(f"{name}: WARNING these numbers come from the leaky image-level split")
    return "\n".join(lines)
