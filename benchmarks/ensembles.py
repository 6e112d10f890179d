"""What averaging trained models would score: every single model and every combination, val and test.

Each model's class probabilities are computed once per split as the package's
evaluation computes them (``skincluster.train.evaluate.predict_split``); a
combination averages its members' probabilities, as the report's ensemble row
and ``skincluster export`` with several models do, and is scored with
``skincluster.train.metrics.evaluate_predictions``.

Rows are sorted by validation balanced accuracy, the figure the comparison
selects its best model by; the test columns are what that choice would
report. Picking a row by its test figures would be selecting on the test
split. Inference costs as many forward passes as the combination has members.

Usage (from the repository root; a model is named after its run folder)::

    /work/venv/bin/python benchmarks/ensembles.py --data /tmp/store-real3 --sizes 1,2,3 \\
        RUN_A/model.keras RUN_B/model.keras [MORE.keras ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from common import machine

SPLITS = ("val", "test")


def model_names(paths: list[str]) -> list[str]:
    """The run folder of each model file (``runs/x/model.keras`` -> ``x``); the path where that is ambiguous."""
    names = [Path(p).parent.name or p for p in paths]
    return [name if names.count(name) == 1 else path for name, path in zip(names, paths)]


def score_combinations(
    probabilities: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    class_names: list[str],
    sizes: list[int],
) -> list[dict]:
    """One row per combination of `sizes` members: its members and val/test figures."""
    from skincluster.train.metrics import evaluate_predictions

    rows = []
    for size in sizes:
        for members in itertools.combinations(probabilities, size):
            row = {"members": list(members)}
            for split in SPLITS:
                mean = np.mean([probabilities[m][split] for m in members], axis=0)
                row[split] = evaluate_predictions(labels[split], mean, class_names)
            rows.append(row)
    rows.sort(key=lambda row: -row["val"]["balanced_accuracy"])
    return rows


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| members | val acc | val bal. acc | test acc | test bal. acc | test mel recall | test ROC AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        v, t = row["val"], row["test"]
        figures = (v["accuracy"], v["balanced_accuracy"], t["accuracy"], t["balanced_accuracy"],
                   t["melanoma_recall"], t["roc_auc_ovr"])
        lines.append(f"| {' + '.join(row['members'])} | {' | '.join(map(_fmt, figures))} |")
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes whole numbers like 1,2,3, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--sizes must be at least 1, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model.keras files of finished runs on the same store")
    parser.add_argument("--data", required=True, help="the store the models were trained on")
    parser.add_argument("--sizes", type=_sizes, default=[1, 2], help="members per combination (default 1,2)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if max(args.sizes) > len(args.models):
        parser.error(f"--sizes asks for {max(args.sizes)} members but {len(args.models)} model(s) were given")

    from skincluster.data.store import open_store
    from skincluster.models import load_model
    from skincluster.train.evaluate import predict_split

    info = machine("tensorflow")
    print(f"machine: {info['nproc']} x {info['cpu']}; TensorFlow {info['tensorflow']}")
    store = open_store(args.data)
    paths = dict(zip(model_names(args.models), args.models))
    probabilities: dict[str, dict[str, np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    for name, path in paths.items():
        model = load_model(path)
        probabilities[name] = {}
        for split in SPLITS:
            labels[split], probabilities[name][split] = predict_split(model, store, split, limit=None, seed=0)
        print(f"  predicted {name}", flush=True)
    rows = score_combinations(probabilities, labels, store.class_names, args.sizes)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "models": paths, "rows": rows}, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
