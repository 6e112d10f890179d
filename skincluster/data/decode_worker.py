"""Ingest's decoding worker: what each spawned process runs.

Kept apart from `ingest` so that a spawned worker imports only numpy and
Pillow (plus pyarrow.fs for a remote source), not pandas and pyarrow.parquet:
on a 2-core machine that start-up was a second or more of every ingest.
"""

from __future__ import annotations

import hashlib
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from skincluster.data.images import ImageDecodeError, decode_image

_LEVELS = np.arange(256, dtype=np.int64)
_LEVELS_SQ = _LEVELS * _LEVELS

_fs = None
_zips: dict[str, Any] = {}
#: (n, h, w, 3) uint8 array the decoded images are written into, by index:
#: under a pool, a memory-mapped file shared with the parent, so pixels never
#: go through a pipe.
_out: np.ndarray | None = None


def init(source_root: str, out: np.ndarray | tuple[str, tuple[int, ...]]) -> None:
    """Open the source's filesystem (None, plain `open`, for a local source) and the output array.

    `out` is the array itself, or (memory-mapped file path, shape) in a pool worker.
    """
    global _fs, _out
    if isinstance(out, np.ndarray):
        _out = out
    else:
        path, shape = out
        _out = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    if "://" in str(source_root):
        from skincluster import storage

        _fs, _ = storage.resolve(source_root)
    else:
        _fs = None


def close() -> None:
    global _out
    _zips.clear()
    _out = None


def _read(path: str, member: str | None) -> bytes:
    # Each process keeps its zip files open: re-reading the central directory
    # of a 2.6 GB zip for every member would dominate the decode time.
    if member is None:
        if _fs is None:
            with open(path, "rb") as fh:
                return fh.read()
        with _fs.open_input_stream(path) as fh:
            return fh.read()
    archive = _zips.get(path)
    if archive is None:
        archive = _zips[path] = zipfile.ZipFile(open(path, "rb") if _fs is None else _fs.open_input_file(path))
    return archive.read(member)


def channel_sums(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel sums and sums of squares of an (h, w, 3) uint8 image, from its histogram.

    Pillow's histogram is one C pass; summing int64 copies along the strided axis
    cost more than decoding the JPEG.
    """
    hist = np.asarray(Image.fromarray(pixels).histogram(), dtype=np.int64).reshape(3, 256)
    return hist @ _LEVELS, hist @ _LEVELS_SQ


def decode_chunk(chunk: list[tuple[int, str, str | None]]) -> list[tuple]:
    """(index, error | None, md5, channel sums, channel sums of squares); pixels go to `_out[index]`."""
    out = []
    for index, path, member in chunk:
        where = f"{path}!{member}" if member else path
        try:
            data = _read(path, member)
        except (OSError, KeyError) as exc:
            out.append((index, f"cannot read {where}: {exc}", "", None, None))
            continue
        md5 = hashlib.md5(data).hexdigest()
        try:
            pixels = decode_image(data)
        except ImageDecodeError as exc:
            out.append((index, f"{where}: {exc}", md5, None, None))
            continue
        _out[index] = pixels
        sums, sums_sq = channel_sums(pixels)
        out.append((index, None, md5, sums, sums_sq))
    return out
