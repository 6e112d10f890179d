"""What flip test-time augmentation would add to a trained model, on validation and test.

For each model file, the class probabilities of every image are computed as
the package's evaluation computes them (``model(batch, training=False)`` on
batches of ``EVAL_BATCH`` uint8 images) and as the mean over the four flips
(none, horizontal, vertical, both), and both are scored with
``skincluster.train.metrics.evaluate_predictions``. What matters is the
difference, on the same images in the same run, in accuracy and balanced
accuracy; the cost is 4x the inference.

Usage (from the repository root)::

    /work/venv/bin/python benchmarks/tta.py --data /tmp/store-real3 RUN/model.keras [MORE.keras ...]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from common import machine

SPLITS = ("val", "test")
FIGURES = ("accuracy", "balanced_accuracy", "melanoma_recall", "roc_auc_ovr")


def flipped_probabilities(model, store, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, plain probabilities, mean over the four flips) of one split."""
    from skincluster.data import pipeline
    from skincluster.train.evaluate import EVAL_BATCH

    images, labels = pipeline.read_arrays(store, split)
    plain, flipped = [], []
    for batch, _ in pipeline.array_batches(images, labels, EVAL_BATCH):
        # (n, height, width, 3): axis 2 flips left-right, axis 1 top-bottom.
        views = (batch, batch[:, :, ::-1], batch[:, ::-1, :], batch[:, ::-1, ::-1])
        probs = [np.asarray(model(np.ascontiguousarray(v), training=False), np.float64) for v in views]
        plain.append(probs[0])
        flipped.append(np.mean(probs, axis=0))
    return labels, np.concatenate(plain), np.concatenate(flipped)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model.keras files of finished runs")
    parser.add_argument("--data", required=True, help="the store the models were trained on")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from skincluster.data.store import open_store
    from skincluster.models import load_model
    from skincluster.train.metrics import evaluate_predictions

    info = machine("tensorflow")
    print(f"machine: {info['nproc']} x {info['cpu']}; TensorFlow {info['tensorflow']}")
    store = open_store(args.data)
    results = {}
    print("| model | split | figure | plain | 4-flip mean | difference |")
    print("|---|---|---|---:|---:|---:|")
    for path in args.models:
        model = load_model(path)
        for split in SPLITS:
            labels, plain, flipped = flipped_probabilities(model, store, split)
            scores = {name: evaluate_predictions(labels, probs, store.class_names)
                      for name, probs in (("plain", plain), ("flips", flipped))}
            results[f"{path}:{split}"] = scores
            for figure in FIGURES:
                a, b = scores["plain"][figure], scores["flips"][figure]
                diff = "–" if a is None or b is None else f"{b - a:+.3f}"
                print(f"| {path} | {split} | {figure} | {_fmt(a)} | {_fmt(b)} | {diff} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "results": results}, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
