"""What Ray Train costs: one Ray Train worker against ``--local``, same model and data.

The run is resolved the way the CLI resolves it::

    resolve_run(MODEL, store, profile="cpu", overrides={"epochs": EPOCHS}, limit=LIMIT, storage_dir=<tmp>)

and trained once with ``launch.run_local(run)`` (this process, pyarrow reader)
and once with ``launch.run_ray(run)`` (a one-worker Ray Train run, 1
CPU, Ray Data shards), under different names in a temporary storage folder.

Figures, per mode:

* steady-state epoch time, epochs 2..N, two ways: the worker's own
  ``epoch_seconds`` from the returned history (train + validation, what
  ``images_per_second`` is computed from; the target is judged on this), and
  the wall time between consecutive epoch reports (adds the checkpoint write
  and the report: the per-epoch cost Ray could add outside Keras), over
  epochs 2..N-1 because the last epoch also saves ``model.keras``;
* steady-state CPU seconds per epoch (report to report) of this script's
  whole process tree -- the driver and, for Ray, every process of the Ray
  cluster it started: the extra work Ray does, nearly independent of what
  other jobs do to the wall clock on a shared machine;
* start-up: wall time from calling ``run_local``/``run_ray`` to the end of
  the first epoch's report, minus that epoch's own ``epoch_seconds``
  (``ray.init`` is timed apart: a process pays it once), and for Ray its
  parts: ``ray_datasets``, trainer start to the train function, the
  worker's imports, model build to epoch 1;
* the total wall time of the call (including the final test evaluation).

The report timestamps come from a wrapper around ``RunContext.report`` (the
Ray one is installed inside the worker by a wrapper train function): nothing
in the package is edited.

Usage (from the repository root)::

    /work/venv/bin/python benchmarks/overhead.py --data /tmp/bench-store
    /work/venv/bin/python benchmarks/overhead.py --data /tmp/bench-store --model nn --limit 6757 --epochs 3

Diagnostics: ``--modes local,ray,ray_arrays`` adds a Ray Train worker fed
from in-memory arrays instead of Ray Data (what the Ray Data path costs, as
opposed to the Ray process); ``--ray-niceness 0`` starts the Ray cluster
with ``RAY_worker_niceness=0`` (Ray runs its workers at nice 15, which only
matters when other jobs compete for the CPUs).

Figures are medians of ``--repeat`` (3) repetitions; within a repetition the
order of the modes alternates, and the 1-minute load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from common import add_measurement_options, load1, machine, wait_for_quiet

import skincluster  # noqa: F401  (pins tf-keras before TensorFlow is imported)

TIMES_ENV = "SKINCLUSTER_BENCH_REPORT_TIMES"
ROOT_ENV = "SKINCLUSTER_BENCH_ROOT_PID"
TARGET_OVERHEAD = 0.10


# --------------------------------------------------------------------------- report timestamps


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system, including reaped children) of process `root` and all its descendants.

    This script's process is the root of its own Ray cluster (ray.init starts
    the GCS and raylet as its children), so the tree holds the driver, the
    Ray Train controller and worker, the Ray Data actors and Ray's daemons --
    and no other job's processes.
    """
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based overall
        stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def _event(path: str, name: str, event: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"name": name, "event": event, "time": time.time(), "pid": os.getpid()}) + "\n")


def _append_time(path: str, name: str, metrics: dict, started: float) -> None:
    ended = time.time()
    root = int(os.environ.get(ROOT_ENV, os.getpid()))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"name": name, "epoch": metrics.get("epoch"), "report_start": started,
                             "report_end": ended, "pid": os.getpid(), "process_cpu": time.process_time(),
                             "tree_cpu": tree_cpu_seconds(root)}) + "\n")


def patch_report(cls, path: str, name: str) -> None:
    """Wrap `cls.report` so that every epoch report appends its wall-clock times to `path`."""
    original = cls.report
    if getattr(original, "_bench_wrapped", False):
        original = original._bench_original

    def report(self, metrics, checkpoint_dir):
        started = time.time()
        original(self, metrics, checkpoint_dir)
        _append_time(path, name, metrics, started)

    report._bench_wrapped = True
    report._bench_original = original
    cls.report = report


def timed_train_loop(config: dict) -> None:
    """Ray Train entry point: the package's own, with RayContext.report timed."""
    import os as _os

    _event(_os.environ[TIMES_ENV], config["name"], "train_fn_start")
    from skincluster.train import context
    from skincluster.train.ray_backend import train_loop_per_worker
    from skincluster.train.worker import run_worker  # noqa: F401  (imported here to be timed)

    _event(_os.environ[TIMES_ENV], config["name"], "worker_imported")
    patch_report(context.RayContext, _os.environ[TIMES_ENV], config["name"])
    train_loop_per_worker(config)


def timed_train_loop_arrays(config: dict) -> None:
    """Diagnostic: the same Ray Train worker, but fed from in-memory arrays instead of Ray Data.

    The worker reads the store with pyarrow (as --local does) and serves
    `array_batches`; everything else (process, reports, checkpoints) is Ray's.
    """
    import os as _os

    _event(_os.environ[TIMES_ENV], config["name"], "train_fn_start")
    from skincluster.data import pipeline
    from skincluster.data.store import open_store
    from skincluster.train import context
    from skincluster.train.ray_backend import train_loop_per_worker
    from skincluster.train.worker import run_worker  # noqa: F401  (imported here to be timed)

    _event(_os.environ[TIMES_ENV], config["name"], "worker_imported")
    data = config["data"]
    store = open_store(data["store"])
    arrays = {s: pipeline.read_arrays(store, s, data["limit"], data["seed"]) for s in ("train", "val")}

    def batches(self, split, batch_size, *, shuffle_seed, drop_last):
        return pipeline.array_batches(*arrays[split], batch_size, shuffle_seed=shuffle_seed, drop_last=drop_last)

    context.RayContext.batches = batches
    patch_report(context.RayContext, _os.environ[TIMES_ENV], config["name"])
    train_loop_per_worker(config)


MODES = {"local": None, "ray": timed_train_loop, "ray_arrays": timed_train_loop_arrays}


def read_times(path: str, name: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return sorted((r for r in rows if r["name"] == name and "event" not in r), key=lambda r: r["epoch"])


def read_events(path: str, name: str) -> dict[str, float]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["event"]: r["time"] for r in rows if r["name"] == name and "event" in r}


# --------------------------------------------------------------------------- one measurement


def measure(mode: str, store_uri: str, store, args, storage: str, times_path: str, rep: int) -> dict:
    from skincluster.data import pipeline
    from skincluster.train import context, launch, ray_backend

    name = f"overhead-{mode}-{rep}"
    run = launch.resolve_run(args.model, store_uri, profile="cpu", overrides={"epochs": args.epochs},
                             limit=args.limit, storage_dir=storage, name=name, store=store)
    before = load1()
    started = time.time()
    if mode == "local":
        patch_report(context.LocalContext, times_path, name)
        result = launch.run_local(run, verbose=0)
    else:
        original, original_datasets = ray_backend.train_loop_per_worker, pipeline.ray_datasets

        def timed_datasets(*a, **k):
            _event(times_path, name, "datasets_start")
            out = original_datasets(*a, **k)
            _event(times_path, name, "datasets_ready")
            return out

        # run_ray imports both at call time
        ray_backend.train_loop_per_worker, pipeline.ray_datasets = MODES[mode], timed_datasets
        try:
            result = launch.run_ray(run)
        finally:
            ray_backend.train_loop_per_worker, pipeline.ray_datasets = original, original_datasets
    total = time.time() - started
    after = load1()
    history = result.history
    times = read_times(times_path, name)
    if len(times) != len(history):
        raise RuntimeError(f"{name}: {len(times)} report timestamps for {len(history)} epochs")
    steady = history[1:]
    steady_images = sum(h["steps"] for h in steady) * run.recipe.batch_size
    epoch_seconds = sum(h["epoch_seconds"] for h in steady) / len(steady)
    wall = [b["report_end"] - a["report_end"] for a, b in zip(times, times[1:])]
    cpu = [b["tree_cpu"] - a["tree_cpu"] for a, b in zip(times, times[1:])]
    # The last epoch also writes model.keras before its report: leave it out of the
    # report-to-report figures when there is another steady epoch.
    n_wall = len(wall) - 1 if len(wall) > 1 else len(wall)
    events = read_events(times_path, name)
    # When epoch 1 began, near enough: its report started after the epoch and the checkpoint write.
    first_epoch_start = times[0]["report_start"] - history[0]["epoch_seconds"]
    startup = {}
    if events:
        startup = {
            "materialize_datasets": events["datasets_ready"] - events["datasets_start"],
            "call_to_datasets": events["datasets_start"] - started,
            "trainer_to_train_fn": events["train_fn_start"] - events["datasets_ready"],
            "worker_imports": events["worker_imported"] - events["train_fn_start"],
            "model_build_to_epoch1": first_epoch_start - events["worker_imported"],
        }
    return {
        "mode": mode,
        "name": name,
        "load": [before, after],
        "total_seconds": total,
        "first_report_seconds": times[0]["report_end"] - started,
        "startup_seconds": times[0]["report_end"] - started - history[0]["epoch_seconds"],
        "epoch1_seconds": history[0]["epoch_seconds"],
        "steady_epoch_seconds": epoch_seconds,
        "steady_images_per_second": steady_images / sum(h["epoch_seconds"] for h in steady),
        "steady_wall_epoch_seconds": sum(wall[:n_wall]) / n_wall,
        "steady_cpu_epoch_seconds": sum(cpu[:n_wall]) / n_wall,
        "wall_intervals": wall,
        "cpu_intervals": cpu,
        "startup_breakdown": startup,
        "report_seconds": [t["report_end"] - t["report_start"] for t in times],
        "history": [{k: h[k] for k in ("epoch", "epoch_seconds", "images_per_second", "steps")} for h in history],
        "test_balanced_accuracy": result.evaluation.get("balanced_accuracy"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a skincluster store (from `skincluster ingest`)")
    parser.add_argument("--model", default="cnn", help="registry model (default cnn)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3; steady = 2..N)")
    parser.add_argument("--limit", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--modes", default="local,ray",
                        help="comma-separated: local, ray, ray_arrays (diagnostic: Ray Train worker fed from "
                             "in-memory arrays, no Ray Data); default local,ray")
    parser.add_argument("--ray-niceness", type=int, default=None,
                        help="diagnostic: RAY_worker_niceness for the Ray cluster this script starts "
                             "(Ray's default runs workers at nice 15)")
    add_measurement_options(parser, "run")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (steady state is epochs 2..N)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    if "local" not in modes or len(modes) < 2:
        parser.error("--modes needs local and at least one Ray mode")

    from skincluster.data.store import StoreError, open_store

    try:
        store = open_store(args.data)
    except (StoreError, OSError) as exc:
        raise SystemExit(
            f"--data {args.data}: not a readable skincluster store ({exc}).\n"
            "Create one first, e.g.: /work/venv/bin/skincluster ingest ../shared/data/ham10000-200x150 /tmp/bench-store"
        ) from None
    store_uri = os.path.abspath(args.data)
    info = machine("tensorflow", "ray", "pyarrow", "numpy")
    print(f"machine: {info['nproc']} x {info['cpu']}, {info['ram']} RAM; Python {info['python']}, "
          f"TensorFlow {info['tensorflow']}, Ray {info['ray']}, pyarrow {info['pyarrow']}, numpy {info['numpy']}")
    print(f"run: {args.model}, profile cpu, {args.epochs} epochs, limit {args.limit} training images")
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)

    storage = tempfile.mkdtemp(prefix="bench-overhead-")
    times_path = os.path.join(storage, "report-times.jsonl")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        import ray

        if args.ray_niceness is not None:
            os.environ["RAY_worker_niceness"] = str(args.ray_niceness)
        started = time.time()
        ray.init(runtime_env={"env_vars": {**skincluster.RAY_RUNTIME_ENV["env_vars"], TIMES_ENV: times_path,
                                           ROOT_ENV: str(os.getpid())}})
        ray_init_seconds = time.time() - started
        print(f"ray.init: {ray_init_seconds:.1f} s")
        for rep in range(1, args.repeat + 1):
            order = modes if rep % 2 else modes[::-1]
            for mode in order:
                wait_for_quiet(args.max_load, args.max_wait)
                r = measure(mode, store_uri, store, args, storage, times_path, rep)
                runs[mode].append(r)
                print(f"  rep {rep}/{args.repeat} {mode:<5}: start-up {r['startup_seconds']:.1f} s, epoch 1 "
                      f"{r['epoch1_seconds']:.1f} s, steady epoch {r['steady_epoch_seconds']:.2f} s "
                      f"({r['steady_images_per_second']:.0f} images/s), report-to-report {r['steady_wall_epoch_seconds']:.2f} s "
                      f"({r['steady_cpu_epoch_seconds']:.2f} CPU s), "
                      f"total {r['total_seconds']:.1f} s  (load {r['load'][0]:.2f} -> {r['load'][1]:.2f})", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    keys = ("startup_seconds", "first_report_seconds", "epoch1_seconds", "steady_epoch_seconds",
            "steady_images_per_second", "steady_wall_epoch_seconds", "steady_cpu_epoch_seconds", "total_seconds")
    summary = {m: {k: statistics.median(r[k] for r in rr) for k in keys} for m, rr in runs.items()}
    loads = [x for rr in runs.values() for r in rr for x in r["load"]]
    lo = summary["local"]
    others = [m for m in modes if m != "local"]
    print(f"\nmedians of {args.repeat} repetitions; {args.model}, {args.epochs} epochs, {args.limit} training images, "
          f"batch 32; load during measurement {min(loads):.2f}-{max(loads):.2f}"
          + (f"; Ray workers at nice {args.ray_niceness}" if args.ray_niceness is not None else ""))
    print("\n| figure | --local | " + " | ".join(f"{m} | {m} / local" for m in others) + " |")
    print("|---|---:|" + "---:|---:|" * len(others))
    rows = [
        ("steady epoch, epoch_seconds (s)", "steady_epoch_seconds", "{:.2f}"),
        ("steady images/s", "steady_images_per_second", "{:.0f}"),
        ("steady epoch, report to report, last epoch left out (s)", "steady_wall_epoch_seconds", "{:.2f}"),
        ("same interval, CPU seconds of this script's process tree", "steady_cpu_epoch_seconds", "{:.2f}"),
        ("epoch 1 (s)", "epoch1_seconds", "{:.2f}"),
        ("start-up: call to first report minus epoch 1 (s)", "startup_seconds", "{:.1f}"),
        ("call to first epoch report (s)", "first_report_seconds", "{:.1f}"),
        ("whole call incl. test evaluation (s)", "total_seconds", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        cells = " | ".join(f"{fmt.format(summary[m][key])} | {summary[m][key] / lo[key]:.2f}" for m in others)
        print(f"| {label} | {fmt.format(lo[key])} | {cells} |")
    print("| ray.init (once per process, s) | - | " + " | ".join(f"{ray_init_seconds:.1f} | -" for _ in others) + " |")
    parts = [("materialize_datasets", "ray_datasets (materialize)"), ("trainer_to_train_fn", "trainer start to train func"),
             ("worker_imports", "train func imports skincluster.train.worker"), ("model_build_to_epoch1", "model build etc. to epoch 1")]
    for key, label in parts:
        cells = []
        for m in others:
            values = [r["startup_breakdown"][key] for r in runs[m] if r["startup_breakdown"]]
            summary[m][f"startup_{key}"] = statistics.median(values) if values else float("nan")
            cells.append(f"{summary[m][f'startup_{key}']:.1f} | -")
        print(f"| start-up part: {label} (s) | - | " + " | ".join(cells) + " |")
    for m in others:
        over = summary[m]["steady_epoch_seconds"] / lo["steady_epoch_seconds"] - 1
        over_wall = summary[m]["steady_wall_epoch_seconds"] / lo["steady_wall_epoch_seconds"] - 1
        summary[m]["cost_epoch_seconds"], summary[m]["cost_report_to_report"] = over, over_wall
        print(f"\n{m}: cost in steady state {over:+.1%} of epoch_seconds ({over_wall:+.1%} report to report)")
        if m == "ray":
            print(f"target (Ray costs under {TARGET_OVERHEAD:.0%} of steady-state epoch time, epoch_seconds): "
                  f"{'MET' if over < TARGET_OVERHEAD else 'NOT met'}")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
                       "argv": sys.argv, "ray_init_seconds": ray_init_seconds, "summary": summary, "runs": runs},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
