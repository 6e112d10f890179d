"""CPU cost per image of each step of turning a HAM10000 JPEG into 125x100 pixels.

The ingest benchmark (``benchmarks/ingest.py``) times the whole job; this one
takes the per-image work apart, one process, CPU time (``time.process_time``)
so that other load on the machine does not count against a step:

* ``study``: the study's loader, ``Image.open(path).resize((125, 100))``
  (full-size decode, bicubic from full size) -- the baseline of the ratios;
* ``full decode``: the same full-size decode without the resize;
* ``draft decode``: libjpeg's scaled decode to the smallest power-of-two scale
  still at least 125x100 (what ``skincluster.data.images.decode_image`` does
  before resizing; at 200x150 that is the full size, as half would be 100x75);
* ``package``: ``decode_image`` itself (draft decode + bicubic);
* draft decode + ``bilinear`` / ``box`` resize: the cheaper filters;
* ``simplejpeg``: libjpeg-turbo's own scaled decode + the same bicubic resize,
  only if ``simplejpeg`` happens to be installed (it is not a dependency);
* ``md5``: the manifest's per-file checksum.

Every resize variant is also compared pixel by pixel with the study's
output (mean absolute difference in grey levels), since a cheaper filter that
changes the pixels changes what the models see.

Every step ends in a numpy array, as the loaders do. Files are read into
memory first, so disk speed is not part of any figure.
The 6x budget line is what the ingest target leaves per image: the study's
CPU per image, divided by 6, times the cores ingest can use.

The default resolution is 600x450, the original's, but the images are the
shared 200x150 copy upscaled (``benchmarks/ingest.py`` makes the copy, with
``--workdir``, or this script does): their decode cost is the original
size's, while the pixel differences are smaller than on real originals, whose
fine detail a filter can treat differently.

Usage (from the repository root)::

    /work/venv/bin/python benchmarks/decode_cost.py --images 1500 --workdir /tmp/bench-ingest
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

from common import load1, machine
from ingest import DEFAULT_SOURCE, METADATA, STUDY_SIZE, make_copy


def _draft(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", STUDY_SIZE)
    img.load()
    return img.convert("RGB")


def _steps() -> dict:
    from skincluster.data.images import decode_image

    steps = {
        "study": lambda d: np.asarray(Image.open(io.BytesIO(d)).resize(STUDY_SIZE)),
        "full decode": lambda d: np.asarray(Image.open(io.BytesIO(d))),
        "draft decode": lambda d: np.asarray(_draft(d)),
        "package (draft + bicubic)": decode_image,
        "draft + bilinear": lambda d: np.asarray(_draft(d).resize(STUDY_SIZE, Image.Resampling.BILINEAR)),
        "draft + box": lambda d: np.asarray(_draft(d).resize(STUDY_SIZE, Image.Resampling.BOX)),
        "md5": lambda d: hashlib.md5(d).digest(),
    }
    try:
        import simplejpeg
    except ImportError:
        return steps

    def simplejpeg_bicubic(data: bytes) -> np.ndarray:
        # min_height/min_width make libjpeg-turbo pick the same power-of-two scale as draft mode.
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=STUDY_SIZE[1], min_width=STUDY_SIZE[0])
        return np.asarray(Image.fromarray(pixels).resize(STUDY_SIZE, Image.Resampling.BICUBIC))

    steps["simplejpeg + bicubic"] = simplejpeg_bicubic
    return steps


def cpu_ms_per_image(fn, files: list[bytes]) -> float:
    started = time.process_time()
    for data in files:
        fn(data)
    return (time.process_time() - started) * 1000 / len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                        help="HAM10000 200x150 in the Kaggle layout (default ../shared/data/ham10000-200x150)")
    parser.add_argument("--resolution", choices=("200x150", "600x450"), default="600x450",
                        help="measure the shared copy as it is or its 600x450 upscale (default: the original size, "
                             "upscaled pixels)")
    parser.add_argument("--workdir", default=None,
                        help="folder holding (or to receive) the 600x450 copy, as benchmarks/ingest.py --workdir")
    parser.add_argument("--images", type=int, default=1500, help="images measured (default 1500)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; figures are medians (default 3)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")

    source = os.path.abspath(args.source)
    if not os.path.isfile(os.path.join(source, METADATA)):
        print(f"SKIPPED: HAM10000 not found at {source} (no {METADATA}). Nothing was measured.")
        return 0
    root = source
    if args.resolution == "600x450":
        if args.workdir is None:
            parser.error("--workdir is needed for 600x450 (the upscaled copy is made there once and reused)")
        root = make_copy(source, os.path.join(args.workdir, "ham10000-600x450-all"), None, upscale=True)
    paths = sorted(glob.glob(os.path.join(root, "*", "*.jpg")))[: args.images]
    files = []
    for path in paths:
        with open(path, "rb") as fh:
            files.append(fh.read())

    info = machine("pillow", "numpy")
    print(f"machine: {info['nproc']} x {info['cpu']}; Python {info['python']}, Pillow {info['pillow']} "
          f"(libjpeg-turbo {info['libjpeg_turbo']}), numpy {info['numpy']}")
    print(f"{len(files):,} images of {root} ({args.resolution}), {args.repeat} repetitions, load {load1():.2f}")

    steps = _steps()
    # Warm every code path once, then interleave the steps within each repetition
    # so that a burst of load elsewhere hits them alike.
    for fn in steps.values():
        cpu_ms_per_image(fn, files[:20])
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeat):
        for name, fn in steps.items():
            runs[name].append(cpu_ms_per_image(fn, files))
    ms = {name: statistics.median(values) for name, values in runs.items()}

    study_pixels = [steps["study"](d).astype(np.int16) for d in files]
    difference = {}
    for name in ("package (draft + bicubic)", "draft + bilinear", "draft + box", "simplejpeg + bicubic"):
        if name in steps:
            diffs = [np.abs(np.asarray(steps[name](d), dtype=np.int16) - ref).mean() for d, ref in zip(files, study_pixels)]
            difference[name] = float(np.mean(diffs))

    budget = ms["study"] / 6 * (os.cpu_count() or 1)
    print(f"\n| step | CPU ms per image | / study | mean abs. difference from the study's pixels |")
    print("|---|---:|---:|---:|")
    for name, value in ms.items():
        diff = f"{difference[name]:.2f}" if name in difference else ("0 (baseline)" if name == "study" else "")
        print(f"| {name} | {value:.3f} | {value / ms['study']:.2f} | {diff} |")
    if "simplejpeg + bicubic" not in steps:
        print("| simplejpeg + bicubic | not installed (pip install simplejpeg to include it) | | |")
    print(f"\n6x budget: the study's {ms['study']:.3f} ms / 6 x {os.cpu_count()} cores = {budget:.3f} ms of CPU per "
          f"image for everything; the package's decode + resize + md5 alone is "
          f"{ms['package (draft + bicubic)'] + ms['md5']:.3f} ms")
    print(f"load after: {load1():.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "images": len(files), "resolution": args.resolution,
                       "ms_per_image": ms, "runs": runs, "pixel_difference": difference, "budget_ms": budget}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
