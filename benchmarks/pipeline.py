"""Images/s delivered to TensorFlow per worker from the Parquet store, three ways.

All three read the same train split of the store given with ``--data`` and
hand batches of ``--batch-size`` (32) uint8 images to TensorFlow:

(a) raw read: ``pyarrow.parquet.read_table`` of each train shard file plus
    ``store.images_from_column`` (``np.frombuffer`` on the image column) --
    the rate at which the store can be read at all (page cache warm; a
    fresh allocation, and decompression if the store's pixels are
    compressed, every time; ``--raw-passes`` passes);
(b) local path (``--local`` training): ``pipeline.read_arrays`` once, then
    every epoch ``pipeline.array_batches(..., shuffle_seed=epoch,
    drop_last=True)`` through the same ``tf.data.Dataset.from_generator(...)
    .prefetch(AUTOTUNE)`` that ``train/worker.py`` builds;
(c) Ray Data path as training uses it: ``pipeline.ray_datasets(store,
    ("train",), None, 0)`` (materialized) on the driver, then a one-worker
    ``TensorflowTrainer`` whose train function takes
    ``ray.train.get_dataset_shard("train")`` through ``pipeline.ray_batches``
    and the same tf.data generator, and reports images/s per epoch with
    ``ray.train.report``. The same worker then runs the shard iterator alone
    (no tf.data) to show where the time goes.

The tf.data dataset is drained the way ``model.fit`` drains it: a
``tf.function`` that pulls one element from the iterator per call. Epoch 1
and the steady state (epochs 2..N, images over seconds) are reported apart.

``--variants`` adds Ray-path prototypes of changes to ``pipeline.ray_batches``
and to the tf.data construction (defined here and swapped in inside the
worker; the package is not edited): see ``RAY_VARIANTS``. ``ray_buffer_1024``
is the package until 2026-11-26 (Ray's row-wise ``local_shuffle_buffer_size``
of 1,024 images instead of shuffling whole blocks with numpy); the
``*_shuffle_buffer*``, ``prefetch_*`` and ``numpy_format`` variants are
changes to that design, with a buffer of 4 batches unless named otherwise.
Each variant runs
in its own ``TensorflowTrainer.fit``. ``rebatch_256`` (the generator yields 8
batches at a time and ``tf.data.Dataset.rebatch(32)`` cuts them back) is
measured on the local path too.

Usage (from the repository root; the store comes from ``skincluster ingest``)::

    /work/venv/bin/skincluster ingest ../shared/data/ham10000-200x150 /tmp/bench-store
    /work/venv/bin/python benchmarks/pipeline.py --data /tmp/bench-store
    /work/venv/bin/python benchmarks/pipeline.py --data /tmp/bench-store --variants all --json /tmp/p.json

Figures are medians of ``--repeat`` (3) repetitions; the 1-minute load
average is printed around every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from common import add_measurement_options, load1, machine, wait_for_quiet

import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)

TARGET_RAY_IMAGES_PER_SECOND = 10_000
TARGET_RAY_SHARE_OF_RAW = 0.5


# --------------------------------------------------------------------------- shared helpers


def open_or_exit(path: str):
    from skincluster.data.store import StoreError, open_store

    try:
        return open_store(path)
    except (StoreError, OSError, FileNotFoundError) as exc:
        raise SystemExit(
            f"--data {path}: not a readable skincluster store ({exc}).\n"
            "Create one first, e.g.: /work/venv/bin/skincluster ingest ../shared/data/ham10000-200x150 /tmp/bench-store"
        ) from None


def tf_dataset(generate, rebatch: int | None = None):
    """The construction of `dataset()` in train/worker.py, verbatim (`rebatch`: a prototype, see RAY_VARIANTS)."""
    import tensorflow as tf

    from skincluster.config import IMAGE_SHAPE

    ds = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8),
            tf.TensorSpec((None,), tf.int32),
        ),
    )
    if rebatch:
        ds = ds.rebatch(rebatch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_drain():
    """Count the images of one pass over a dataset, one tf.function call per batch (as model.fit)."""
    import tensorflow as tf

    @tf.function
    def next_size(iterator):
        element = iterator.get_next_as_optional()
        if element.has_value():
            return tf.shape(element.get_value()[0])[0]
        return tf.constant(0, tf.int32)

    def drain(ds) -> int:
        iterator = iter(ds)
        n = 0
        while True:
            k = int(next_size(iterator))
            if k == 0:
                return n
            n += k

    return drain


def epochs_summary(epochs: list[dict]) -> dict:
    """Epoch 1 and steady state (epochs 2..N: their images over their seconds)."""
    rest = epochs[1:]
    steady = sum(e["images"] for e in rest) / sum(e["seconds"] for e in rest) if rest else float("nan")
    return {"epoch1": epochs[0]["images"] / epochs[0]["seconds"], "steady": steady, "epochs": epochs}


# --------------------------------------------------------------------------- (a) raw read


def measure_raw(store, passes: int) -> dict:
    """`passes` reads of every train shard; also how much of it is `read_table` alone."""
    import pyarrow.parquet as pq

    from skincluster.data.store import images_from_column, labels_from_column

    n = 0
    seconds = read_seconds = 0.0
    for _ in range(passes):
        for path in store.split_files("train"):
            t0 = time.perf_counter()
            table = pq.read_table(path, filesystem=store.fs, columns=["image", "label"])
            t1 = time.perf_counter()
            images = images_from_column(table.column("image"))
            labels = labels_from_column(table.column("label"))
            t2 = time.perf_counter()
            assert len(images) == len(labels)
            n += len(images)
            seconds += t2 - t0
            read_seconds += t1 - t0
            del table, images, labels
    return {"images": n, "seconds": seconds, "images_per_second": n / seconds,
            "read_table_share": read_seconds / seconds}


# --------------------------------------------------------------------------- (b) local path


def measure_local(store, epochs: int, batch_size: int, chunk: int = 1) -> dict:
    """`chunk` > 1: the generator yields `chunk` batches at once and tf.data rebatches (a prototype)."""
    from skincluster.data import pipeline

    drain = make_drain()
    started = time.perf_counter()
    images, labels = pipeline.read_arrays(store, "train")
    read_seconds = time.perf_counter() - started
    epoch_box = {"epoch": 0}

    def generate():
        yield from pipeline.array_batches(images, labels, batch_size * chunk, shuffle_seed=epoch_box["epoch"],
                                          drop_last=True)

    ds = tf_dataset(generate, rebatch=batch_size if chunk > 1 else None)
    with_tf = []
    for epoch in range(1, epochs + 1):
        epoch_box["epoch"] = epoch
        t = time.perf_counter()
        n = drain(ds)
        with_tf.append({"epoch": epoch, "images": n, "seconds": time.perf_counter() - t})
    alone = []
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        n = sum(len(b[1]) for b in pipeline.array_batches(images, labels, batch_size * chunk, shuffle_seed=epoch,
                                                          drop_last=True))
        alone.append({"epoch": epoch, "images": n, "seconds": time.perf_counter() - t})
    return {"read_seconds": read_seconds, "read_images": len(labels), "tf": epochs_summary(with_tf),
            "iterator": epochs_summary(alone)}


# --------------------------------------------------------------------------- (c) Ray Data path
#
# Variants of pipeline.ray_batches, prototyped here. Each takes the shard and
# returns the iterator the worker would get. "package" is the code as it is.


def _variant_batches(name: str):
    import numpy as np

    from skincluster.data import pipeline
    from skincluster.data.store import images_from_column, labels_from_column

    def iter_kwargs(batch_size, shuffle_seed, prefetch, buffer):
        kw = {"batch_size": batch_size, "batch_format": "pyarrow", "prefetch_batches": prefetch}
        if shuffle_seed is not None and buffer:
            kw.update(local_shuffle_buffer_size=buffer, local_shuffle_seed=shuffle_seed)
        return kw

    def ray_kwargs(prefetch=4, buffer_batches=4, buffer_images=0):
        def batches(shard, batch_size, *, shuffle_seed=None, drop_last=False):
            kw = iter_kwargs(batch_size, shuffle_seed, prefetch, max(buffer_images, buffer_batches * batch_size))
            for batch in shard.iter_batches(drop_last=drop_last, **kw):
                yield images_from_column(batch.column("image")), labels_from_column(batch.column("label"))
        return batches

    def numpy_format(shard, batch_size, *, shuffle_seed=None, drop_last=False):
        kw = iter_kwargs(batch_size, shuffle_seed, 4, 4 * batch_size)
        kw["batch_format"] = "numpy"
        for batch in shard.iter_batches(drop_last=drop_last, **kw):
            yield np.stack([np.frombuffer(b, np.uint8) for b in batch["image"]]).reshape(-1, 100, 125, 3), \
                batch["label"].astype(np.int32)

    table = {
        "package": pipeline.ray_batches,
        "no_shuffle_buffer": ray_kwargs(buffer_batches=0),
        "prefetch_1": ray_kwargs(prefetch=1),
        "prefetch_16": ray_kwargs(prefetch=16),
        "shuffle_buffer_4x": ray_kwargs(buffer_batches=4),
        "shuffle_buffer_32x": ray_kwargs(buffer_batches=32),
        "numpy_format": numpy_format,
        # The package until 2026-11-26: Ray's row-wise local shuffle buffer.
        "ray_buffer_1024": ray_kwargs(buffer_images=1024),
        "rebatch_256": pipeline.ray_batches,
    }
    return table[name]


RAY_VARIANTS = ("package", "no_shuffle_buffer", "prefetch_1", "prefetch_16", "shuffle_buffer_4x", "shuffle_buffer_32x",
                "numpy_format", "ray_buffer_1024", "rebatch_256")
#: Variants whose generator yields this many batches at once, cut back to the batch size by
#: `tf.data.Dataset.rebatch` (fewer trips through the Python generator).
VARIANT_CHUNK = {"rebatch_256": 8}


def ray_train_func(config: dict) -> None:
    """One Ray Train worker: the tf.data path for N epochs, then the shard iterator alone."""
    import time as _time

    import ray.train

    import skincluster  # noqa: F401

    batches = _variant_batches(config["variant"])
    chunk = VARIANT_CHUNK.get(config["variant"], 1)
    batch_size, epochs = config["batch_size"], config["epochs"]
    drain = make_drain()
    shard = ray.train.get_dataset_shard("train")
    epoch_box = {"epoch": 0}

    def generate():
        yield from batches(shard, batch_size * chunk, shuffle_seed=epoch_box["epoch"], drop_last=True)

    ds = tf_dataset(generate, rebatch=batch_size if chunk > 1 else None)
    history = []
    for mode in ("tf", "iterator"):
        for epoch in range(1, epochs + 1):
            epoch_box["epoch"] = epoch
            t = _time.perf_counter()
            if mode == "tf":
                n = drain(ds)
            else:
                n = sum(len(b[1]) for b in batches(shard, batch_size * chunk, shuffle_seed=epoch, drop_last=True))
            seconds = _time.perf_counter() - t
            history.append({"mode": mode, "epoch": epoch, "images": n, "seconds": seconds})
            ray.train.report({"mode": mode, "epoch": epoch, "images": n, "seconds": seconds,
                              "images_per_second": n / seconds})
    return history  # rank 0's return value is Result.return_value


def measure_ray(store, epochs: int, batch_size: int, variant: str, storage: str, tag: str) -> dict:
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from skincluster.data import pipeline

    started = time.perf_counter()
    ds = pipeline.ray_datasets(store, ("train",), None, 0)["train"]
    materialize_seconds = time.perf_counter() - started
    blocks = [bundle.num_rows() for bundle in ds.iter_internal_ref_bundles()]
    trainer = TensorflowTrainer(
        ray_train_func,
        train_loop_config={"variant": variant, "batch_size": batch_size, "epochs": epochs},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"pipeline-{tag}", storage_path=storage),
        datasets={"train": ds},
    )
    started = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - started
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    history = result.return_value
    del ds
    return {
        "variant": variant,
        "materialize_seconds": materialize_seconds,
        "block_rows": blocks,
        "fit_seconds": fit_seconds,
        "tf": epochs_summary([h for h in history if h["mode"] == "tf"]),
        "iterator": epochs_summary([h for h in history if h["mode"] == "iterator"]),
    }


# --------------------------------------------------------------------------- driver


def med(values) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a skincluster store (from `skincluster ingest`)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (default 3; steady = 2..N)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", default="package",
                        help=f"Ray-path variants, comma-separated or 'all' (default package): {', '.join(RAY_VARIANTS)}")
    parser.add_argument("--raw-passes", type=int, default=3,
                        help="reads of the whole split per repetition of (a) (default 3)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: raw,local,ray")
    add_measurement_options(parser, "repetition")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (steady state is epochs 2..N)")
    variants = list(RAY_VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(RAY_VARIANTS):
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(RAY_VARIANTS)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    store = open_or_exit(args.data)
    info = machine("tensorflow", "ray", "pyarrow", "numpy")
    print(f"machine: {info['nproc']} x {info['cpu']}, {info['ram']} RAM; Python {info['python']}, "
          f"TensorFlow {info['tensorflow']}, Ray {info['ray']}, pyarrow {info['pyarrow']}, numpy {info['numpy']}")
    print(f"store: {args.data}, train split {store.count('train'):,} images in {len(store.split_files('train'))} files")
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)

    # Warm the page cache so that no contender pays for the disk.
    for path in store.split_files("train"):
        with store.fs.open_input_stream(path) as fh:
            while fh.read(1 << 24):
                pass

    storage = tempfile.mkdtemp(prefix="bench-pipeline-")
    if "ray" not in skip:
        from skincluster.train.launch import ensure_ray

        ensure_ray()
    local_modes = {"local": 1, **{f"local:{v}": VARIANT_CHUNK[v] for v in variants if v in VARIANT_CHUNK}}
    runs: dict[str, list] = {"raw": [], **{m: [] for m in local_modes}, **{f"ray:{v}": [] for v in variants}}
    loads: list[float] = []
    for rep in range(1, args.repeat + 1):
        wait_for_quiet(args.max_load, args.max_wait)
        print(f"\n-- repetition {rep}/{args.repeat}", flush=True)
        if "raw" not in skip:
            before = load1()
            r = measure_raw(store, args.raw_passes)
            r["load"] = [before, load1()]
            loads += r["load"]
            runs["raw"].append(r)
            print(f"  (a) raw read_table + frombuffer: {r['images']:,} images in {r['seconds']:.2f} s = "
                  f"{r['images_per_second']:,.0f}/s, read_table {r['read_table_share']:.0%} of it"
                  f"  (load {before:.2f} -> {load1():.2f})", flush=True)
        for mode, chunk in local_modes.items() if "local" not in skip else ():
            before = load1()
            r = measure_local(store, args.epochs, args.batch_size, chunk)
            r["load"] = [before, load1()]
            loads += r["load"]
            runs[mode].append(r)
            print(f"  (b) {mode}: read_arrays {r['read_images']:,} in {r['read_seconds']:.2f} s; "
                  f"tf.data epoch 1 {r['tf']['epoch1']:,.0f}/s, steady {r['tf']['steady']:,.0f}/s; "
                  f"array_batches alone epoch 1 {r['iterator']['epoch1']:,.0f}/s, steady {r['iterator']['steady']:,.0f}/s"
                  f"  (load {before:.2f} -> {load1():.2f})", flush=True)
        if "ray" not in skip:
            for v in variants:
                wait_for_quiet(args.max_load, args.max_wait)
                before = load1()
                r = measure_ray(store, args.epochs, args.batch_size, v, storage, f"{v}-{rep}")
                r["load"] = [before, load1()]
                loads += r["load"]
                runs[f"ray:{v}"].append(r)
                print(f"  (c) ray [{v}]: materialize {r['materialize_seconds']:.1f} s ({len(r['block_rows'])} blocks "
                      f"of {r['block_rows']} rows), fit {r['fit_seconds']:.1f} s; tf.data epoch 1 "
                      f"{r['tf']['epoch1']:,.0f}/s, steady {r['tf']['steady']:,.0f}/s; shard iterator alone "
                      f"epoch 1 {r['iterator']['epoch1']:,.0f}/s, steady {r['iterator']['steady']:,.0f}/s"
                      f"  (load {before:.2f} -> {load1():.2f})", flush=True)

    summary: dict = {}
    if runs["raw"]:
        summary["raw"] = med(r["images_per_second"] for r in runs["raw"])
    for mode in local_modes:
        if runs[mode]:
            summary[mode] = {k: {p: med(r[k][p] for r in runs[mode]) for p in ("epoch1", "steady")}
                             for k in ("tf", "iterator")}
            summary[mode]["read_seconds"] = med(r["read_seconds"] for r in runs[mode])
    for v in variants:
        rr = runs[f"ray:{v}"]
        if rr:
            summary[f"ray:{v}"] = {k: {p: med(r[k][p] for r in rr) for p in ("epoch1", "steady")}
                                   for k in ("tf", "iterator")}
            summary[f"ray:{v}"]["materialize_seconds"] = med(r["materialize_seconds"] for r in rr)

    print(f"\nmedians of {args.repeat} repetitions, images/s, batch {args.batch_size}, "
          f"{store.count('train'):,} train images, load during measurement {min(loads):.2f}-{max(loads):.2f}")
    raw = summary.get("raw")
    ratio = (lambda x: f"{x / raw:.2f}" if raw else "-")
    print("\n| path | epoch 1 | steady (epochs 2-%d) | steady / raw |" % args.epochs)
    print("|---|---:|---:|---:|")
    if raw:
        print(f"| (a) raw read_table + frombuffer | {raw:,.0f} | {raw:,.0f} | 1.00 |")
    for mode in local_modes:
        s = summary.get(mode)
        if s:
            print(f"| (b) {mode}: array_batches -> tf.data (read_arrays {s['read_seconds']:.2f} s before epoch 1) "
                  f"| {s['tf']['epoch1']:,.0f} | {s['tf']['steady']:,.0f} | {ratio(s['tf']['steady'])} |")
            print(f"| (b) {mode}: array_batches alone | {s['iterator']['epoch1']:,.0f} "
                  f"| {s['iterator']['steady']:,.0f} | {ratio(s['iterator']['steady'])} |")
    for v in variants:
        s = summary.get(f"ray:{v}")
        if s:
            print(f"| (c) Ray [{v}]: shard -> ray_batches -> tf.data (materialize {s['materialize_seconds']:.1f} s) "
                  f"| {s['tf']['epoch1']:,.0f} | {s['tf']['steady']:,.0f} | {ratio(s['tf']['steady'])} |")
            print(f"| (c) Ray [{v}]: shard iterator alone | {s['iterator']['epoch1']:,.0f} "
                  f"| {s['iterator']['steady']:,.0f} | {ratio(s['iterator']['steady'])} |")
    if raw and "local" in summary:
        print(f"\n(b)/(a) = {summary['local']['tf']['steady'] / raw:.2f}")
    if raw and "ray:package" in summary:
        c = summary["ray:package"]["tf"]["steady"]
        ok = c >= TARGET_RAY_IMAGES_PER_SECOND and c >= TARGET_RAY_SHARE_OF_RAW * raw
        print(f"(c)/(a) = {c / raw:.2f}")
        print(f"target (Ray Data path >= {TARGET_RAY_IMAGES_PER_SECOND:,} images/s per worker and >= "
              f"{TARGET_RAY_SHARE_OF_RAW:.0%} of raw): {'MET' if ok else 'NOT met'} ({c:,.0f}/s, {c / raw:.2f} of raw)")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
                       "argv": sys.argv, "summary": summary, "runs": runs}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
