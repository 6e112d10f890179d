"""Images/s of `skincluster ingest` against the study's loader, on the same images.

The study's loader is the original Kaggle notebook's, one process::

    df['image'] = df['path'].map(lambda x: np.asarray(Image.open(x).resize((125, 100))))

`skincluster ingest` is measured as the real thing:
``skincluster.data.ingest.ingest(source, dest, IngestOptions(...))``, timed
wall-clock end to end (discovery, decoding, md5, channel sums, split, Parquet
shards and manifest), once with every core and once with ``workers=1``, so the
ratio splits into what draft decoding buys (1 process vs the study) and what
the second core buys (all cores vs 1 process). The decode phase alone
(``IngestResult.images_per_second``) is reported as well.

Two resolutions:

* 200x150: the shared copy of HAM10000 (``../shared/data/ham10000-200x150``
  from the repository root, or the SOURCE argument);
* 600x450: the original resolution, made by this script from the 200x150 copy
  (PIL bicubic upscale, JPEG quality 90, same Kaggle layout and metadata CSV)
  into ``--workdir`` (reused when it is already complete) or a temporary folder.

Usage (from the repository root)::

    /work/venv/bin/python benchmarks/ingest.py                    # all 10,015 images, 3 repetitions
    /work/venv/bin/python benchmarks/ingest.py --subset 1000 --repeat 1   # quick
    /work/venv/bin/python benchmarks/ingest.py --workdir /tmp/ham600 --resolutions 600x450

Each figure is the median of ``--repeat`` repetitions; the three loaders are
interleaved within a repetition so that a burst of load from another process
hits them alike. The 1-minute load average is printed before and after each
measurement: numbers taken on a busy machine are not worth recording.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from common import load1, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(REPO, "..", "shared", "data", "ham10000-200x150")
METADATA = "HAM10000_metadata.csv"
PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
STUDY_SIZE = (125, 100)  # PIL (width, height), as the notebook passed it
BIG = (600, 450)
JPEG_QUALITY = 90


# --------------------------------------------------------------------------- data sets


def _kaggle_images(root: str) -> dict[str, str]:
    """image_id -> path, found the way the notebook did (``glob(base/*/*.jpg)``)."""
    return {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(root, "*", "*.jpg"))}


def _metadata_lines(root: str, subset: int | None) -> list[str]:
    with open(os.path.join(root, METADATA), encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    return lines if subset is None else lines[: subset + 1]


def _image_ids(lines: list[str]) -> list[str]:
    header = lines[0].strip().split(",")
    col = header.index("image_id")
    return [line.strip().split(",")[col] for line in lines[1:] if line.strip()]


def _upscale_one(job: tuple[str, str]) -> None:
    from PIL import Image

    src, dst = job
    with Image.open(src) as im:
        im.convert("RGB").resize(BIG, Image.Resampling.BICUBIC).save(dst, "JPEG", quality=JPEG_QUALITY)


def _copy_one(job: tuple[str, str]) -> None:
    shutil.copyfile(*job)


def make_copy(source: str, dest: str, subset: int | None, upscale: bool) -> str:
    """A Kaggle-layout copy of the first `subset` rows of `source` (upscaled to 600x450 if asked).

    A complete copy made earlier with the same settings (``.benchmark.json``) is reused.
    """
    stamp = {"source": os.path.abspath(source), "subset": subset, "upscale": upscale,
             "size": list(BIG) if upscale else None, "quality": JPEG_QUALITY if upscale else None}
    stamp_path = os.path.join(dest, ".benchmark.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as fh:
            if json.load(fh) == stamp:
                print(f"  reusing {dest}")
                return dest
        raise SystemExit(f"{dest} holds a different benchmark copy; remove it or choose another --workdir")
    if os.path.exists(dest) and os.listdir(dest):
        raise SystemExit(f"{dest} exists and is not empty; remove it or choose another --workdir")
    lines = _metadata_lines(source, subset)
    wanted = set(_image_ids(lines))
    found = _kaggle_images(source)
    missing = wanted - found.keys()
    if missing:
        raise SystemExit(f"{source}: {len(missing)} metadata rows have no image, e.g. {sorted(missing)[:3]}")
    jobs = []
    for image_id in sorted(wanted):
        src = found[image_id]
        part = os.path.basename(os.path.dirname(src))
        os.makedirs(os.path.join(dest, part), exist_ok=True)
        jobs.append((src, os.path.join(dest, part, os.path.basename(src))))
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        for _ in pool.imap_unordered(_upscale_one if upscale else _copy_one, jobs, chunksize=64):
            pass
    with open(os.path.join(dest, METADATA), "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    with open(stamp_path, "w") as fh:
        json.dump(stamp, fh)
    what = f"upscaled to {BIG[0]}x{BIG[1]} (bicubic, JPEG q{JPEG_QUALITY})" if upscale else "copied"
    print(f"  {len(jobs):,} images {what} into {dest} in {time.perf_counter() - started:.0f} s")
    return dest


def warm_cache(root: str) -> int:
    """Read every file once so that no contender pays for a cold page cache."""
    total = 0
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                total += len(fh.read())
    return total


# --------------------------------------------------------------------------- contenders


def study_loader(root: str) -> dict:
    """The Kaggle notebook's loading, timed from reading the CSV to the filled column."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    started = time.perf_counter()
    imageid_path_dict = _kaggle_images(root)
    df = pd.read_csv(os.path.join(root, METADATA))
    df["path"] = df["image_id"].map(imageid_path_dict.get)
    df["image"] = df["path"].map(lambda x: np.asarray(Image.open(x).resize(STUDY_SIZE)))
    seconds = time.perf_counter() - started
    assert df["image"].iloc[0].shape == (100, 125, 3)
    return {"images": len(df), "seconds": seconds}


def skincluster_ingest(root: str, workers: int | None) -> dict:
    """`ingest(source, dest, IngestOptions(workers=...))` into a fresh folder, wall-clock."""
    from skincluster.data.ingest import IngestOptions, ingest

    dest = tempfile.mkdtemp(prefix="bench-store-")
    try:
        quiet = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stderr(quiet):  # the progress line
            result = ingest(root, dest, IngestOptions(workers=workers), log=lambda *a, **k: None)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    rows = result.manifest["rows"]
    if not result.written or rows["written"] != rows["in"]:
        raise SystemExit(f"ingest of {root} did not write every row: {rows}")
    return {"images": rows["in"], "seconds": seconds, "decode_images_per_second": result.images_per_second}


# --------------------------------------------------------------------------- reporting


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process and its reaped children)."""
    import resource

    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    machine_busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, not guest
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return machine_busy, own


def wait_quiet(limit: float, threshold: float = 0.1, window: float = 2.0, needed: int = 3) -> float:
    """Wait (at most `limit` s) until other processes use < `threshold` cores for `needed` windows in a row."""
    waited = time.perf_counter()
    quiet = 0
    while time.perf_counter() - waited < limit:
        m0, o0 = _cpu_seconds()
        time.sleep(window)
        m1, o1 = _cpu_seconds()
        quiet = quiet + 1 if (m1 - m0 - (o1 - o0)) / window < threshold else 0
        if quiet >= needed:
            break
    return time.perf_counter() - waited


def measure(fn, wait: float, max_other: float, retries: int) -> dict:
    """Run `fn`, noting how many cores other processes used meanwhile; retry if that was too many."""
    for attempt in range(retries + 1):
        waited = wait_quiet(wait) if wait > 0 else 0.0
        before = load1()
        m0, o0 = _cpu_seconds()
        r = fn()
        m1, o1 = _cpu_seconds()
        r["load_before"], r["load_after"] = before, load1()
        r["waited_for_quiet"] = waited
        r["own_cpu_seconds"] = o1 - o0
        # Busy CPU time of the whole machine that was not ours, as cores on average.
        r["other_cores"] = max(0.0, (m1 - m0) - (o1 - o0)) / r["seconds"]
        r["attempts"] = attempt + 1
        if r["other_cores"] <= max_other:
            break
    return r


def run_resolution(name: str, root: str, repeat: int, wait: float = 0.0, max_other: float = float("inf"),
                   retries: int = 0) -> dict:
    n_bytes = warm_cache(root)
    print(f"\n== {name}: {root} ({n_bytes / 1e6:,.0f} MB of files, page cache warmed)")
    contenders = {
        "study": lambda: study_loader(root),
        "ingest_1": lambda: skincluster_ingest(root, workers=1),
        "ingest_all": lambda: skincluster_ingest(root, workers=None),
    }
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for rep in range(repeat):
        for key, fn in contenders.items():
            r = measure(fn, wait, max_other, retries)
            r["images_per_second"] = r["images"] / r["seconds"]
            r["cpu_ms_per_image"] = 1000 * r["own_cpu_seconds"] / r["images"]
            runs[key].append(r)
            extra = f", decode phase {r['decode_images_per_second']:,.0f}/s" if "decode_images_per_second" in r else ""
            print(f"  rep {rep + 1}/{repeat} {key:<10} {r['images']:,} images in {r['seconds']:6.2f} s = "
                  f"{r['images_per_second']:7,.0f} images/s{extra}, CPU {r['cpu_ms_per_image']:.2f} ms/image   (other processes {r['other_cores']:.2f} cores, "
                  f"load {r['load_before']:.2f} -> {r['load_after']:.2f}"
                  + (f", attempt {r['attempts']}" if r["attempts"] > 1 else "") + ")")
    med = {k: statistics.median(r["images_per_second"] for r in v) for k, v in runs.items()}
    dec = {k: statistics.median(r["decode_images_per_second"] for r in v) for k, v in runs.items() if k != "study"}
    summary = {
        "images": runs["study"][0]["images"],
        "study": med["study"],
        "ingest_1": med["ingest_1"],
        "ingest_all": med["ingest_all"],
        "decode_1": dec["ingest_1"],
        "decode_all": dec["ingest_all"],
        "ratio_1": med["ingest_1"] / med["study"],
        "ratio_all": med["ingest_all"] / med["study"],
        "parallel": med["ingest_all"] / med["ingest_1"],
        "decode_ratio_1": dec["ingest_1"] / med["study"],
        "decode_ratio_all": dec["ingest_all"] / med["study"],
        "cpu_ms_per_image": {k: statistics.median(r["cpu_ms_per_image"] for r in v) for k, v in runs.items()},
        "other_cores_max": max(r["other_cores"] for v in runs.values() for r in v),
        "load_range": [min(r[k] for v in runs.values() for r in v for k in ("load_before", "load_after")),
                       max(r[k] for v in runs.values() for r in v for k in ("load_before", "load_after"))],
        "runs": runs,
    }
    print(f"  median images/s: study {summary['study']:,.0f}, ingest 1 process {summary['ingest_1']:,.0f} "
          f"(decode {summary['decode_1']:,.0f}), ingest all cores {summary['ingest_all']:,.0f} "
          f"(decode {summary['decode_all']:,.0f})")
    print("  median CPU time (this process and its workers) per image: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in summary["cpu_ms_per_image"].items()))
    print(f"  other processes used at most {summary['other_cores_max']:.2f} cores during these measurements")
    print(f"  ratio vs study: ingest all cores {summary['ratio_all']:.2f}x end to end "
          f"= {summary['ratio_1']:.2f}x (draft decoding, 1 process) x {summary['parallel']:.2f}x (parallelism); "
          f"decode phase {summary['decode_ratio_all']:.2f}x")
    return summary


def print_table(results: dict[str, dict]) -> None:
    print("\n| resolution | images | study loader | ingest 1 process | ingest all cores "
          "| ingest 1 proc / study | ingest all / study | all / 1 proc |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s['images']:,} | {s['study']:,.0f} | {s['ingest_1']:,.0f} (decode {s['decode_1']:,.0f}) "
              f"| {s['ingest_all']:,.0f} (decode {s['decode_all']:,.0f}) | {s['ratio_1']:.2f}x "
              f"| {s['ratio_all']:.2f}x (decode {s['decode_ratio_all']:.2f}x) | {s['parallel']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                        help="HAM10000 200x150 in the Kaggle layout (default ../shared/data/ham10000-200x150)")
    parser.add_argument("--subset", type=int, default=None, help="use only the first N metadata rows (default all)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the generated copies (reused across runs); default a temporary folder")
    parser.add_argument("--resolutions", default="200x150,600x450", help="which to run (default both)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; figures are medians (default 3)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each measurement wait up to this long for other processes to go idle")
    parser.add_argument("--max-other", type=float, default=0.15, metavar="CORES",
                        help="a measurement during which other processes used more cores than this on average "
                             "is repeated (with --retries; default 0.15)")
    parser.add_argument("--retries", type=int, default=0, help="repeats of a measurement disturbed by other load")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)

    source = os.path.abspath(args.source)
    if not os.path.isfile(os.path.join(source, METADATA)):
        print(f"SKIPPED: HAM10000 not found at {source} (no {METADATA}); pass the 200x150 Kaggle-layout "
              "folder as SOURCE. Nothing was measured.")
        return 0
    resolutions = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    if unknown := set(resolutions) - {"200x150", "600x450"}:
        parser.error(f"unknown resolution(s) {', '.join(sorted(unknown))}")
    if args.subset is not None and args.subset < 1:
        parser.error("--subset must be at least 1")

    info = machine("pillow", "pyarrow", "numpy")
    import skincluster.data.ingest as ingest_module

    info["skincluster_ingest"] = ingest_module.__file__
    print(f"measuring {info['skincluster_ingest']}")
    print(f"machine: {info['nproc']} x {info['cpu']}, {info['ram']} RAM; Python {info['python']}, "
          f"Pillow {info['pillow']} (libjpeg-turbo {info['libjpeg_turbo']}), pyarrow {info['pyarrow']}, "
          f"numpy {info['numpy']}")
    print(f"uptime: {os.popen('uptime').read().strip()}")

    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = workdir = tempfile.mkdtemp(prefix="bench-ingest-")
    tag = "all" if args.subset is None else f"first{args.subset}"
    results: dict[str, dict] = {}
    try:
        for res in resolutions:
            print(f"\npreparing {res} ({'all rows' if args.subset is None else f'first {args.subset} rows'})")
            if res == "200x150":
                root = source if args.subset is None else make_copy(
                    source, os.path.join(workdir, f"ham10000-200x150-{tag}"), args.subset, upscale=False)
            else:
                root = make_copy(source, os.path.join(workdir, f"ham10000-600x450-{tag}"), args.subset, upscale=True)
            results[res] = run_resolution(res, root, args.repeat, args.wait_quiet, args.max_other, args.retries)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(results)
    print(f"\nuptime: {os.popen('uptime').read().strip()}")
    if "600x450" in results:
        r = results["600x450"]["ratio_all"]
        print(f"600x450 target (ingest all cores >= 6x the study's loader, end to end): "
              f"{'REACHED' if r >= 6 else 'NOT reached'} ({r:.2f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
                       "argv": sys.argv, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
