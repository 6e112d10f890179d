"""Loading a saved model: `skincluster.models.load_model` against tf-keras's own loader.

Every finished run is evaluated from its ``model.keras`` (in the Tune trial
process), and the report's ensemble, `predict`, `explain` and `export` load
model files too. For each architecture the script builds a model as the
smoke profile does (``weights=None``), compiles it with the architecture's
recipe and trains one step on random images, so that, like a finished run's
file, the ``.keras`` file holds the optimizer's state too; it saves it and loads it with ``tf_keras.models.load_model(path,
compile=False)`` (the baseline) and with the package's loader, alternating
which goes first, in the same process; it checks that both give every
variable bit for bit. Figures are medians of --repeat loads.

Usage (from the repository root)::

    /work/venv/bin/python benchmarks/model_load.py [--models densenet121,resnet50,mobilenet] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from common import load1, machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="densenet121,resnet50,mobilenet_enhanced,cnn")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)

    import skincluster  # noqa: F401  (tf-keras before TensorFlow)
    import tf_keras as keras

    from skincluster.models import compile_model, create_model, get_recipe, load_model

    loaders = {"tf-keras": lambda p: keras.models.load_model(p, compile=False), "skincluster": load_model}
    print(json.dumps(machine("tensorflow", "tf_keras")), f"load1 {load1():.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            path = os.path.join(folder, f"{name}.keras")
            recipe = get_recipe(name)
            saved = create_model(name, weights=None)
            compile_model(saved, recipe, 7)
            rng = np.random.default_rng(0)
            saved.fit(rng.integers(0, 256, (8, 100, 125, 3), dtype=np.uint8), rng.integers(0, 7, 8), verbose=0)
            saved.save(path)
            expected = saved.get_weights()
            seconds = {loader: [] for loader in loaders}
            for i in range(args.repeat):
                order = list(loaders) if i % 2 == 0 else list(loaders)[::-1]
                for loader in order:
                    start = time.perf_counter()
                    model = loaders[loader](path)
                    seconds[loader].append(time.perf_counter() - start)
                    if not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), expected, strict=True)):
                        print(f"{name}: {loader} loaded other weights", file=sys.stderr)
                        return 1
                    del model
            row = {"model": name, "megabytes": os.path.getsize(path) / 1e6, "load1": load1(),
                   **{f"{k}_seconds": statistics.median(v) for k, v in seconds.items()}, "samples": seconds}
            row["speed_up"] = row["tf-keras_seconds"] / row["skincluster_seconds"]
            rows.append(row)
            print(f"{name:20s} {row['megabytes']:6.1f} MB  tf-keras {row['tf-keras_seconds']:6.2f} s  "
                  f"skincluster {row['skincluster_seconds']:6.2f} s  {row['speed_up']:.2f}x  (load1 {row['load1']:.2f})",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
