"""Ingest's decoding worker: what each spawned process runs.

Kept apart from `ingest` so that a spawned worker imports only numpy and
Pillow (plus pyarrow.fs for a remote source), not pandas and pyarrow.parquet:
on a 2-core machine that start-up was a second or more of every ingest.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from typing import Any

import numpy as np
from PIL import Image

from skincluster.data.images import ImageDecodeError, decode_image

_LEVELS = np.arange(256, dtype=np.int64)
_LEVELS_SQ = _LEVELS * _LEVELS

_fs = None
#: Open zip archives by path, with the file each reads from.
_zips: dict[str, tuple[zipfile.ZipFile, Any]] = {}
#: (n, h, w, 3) uint8 array the decoded images are written into, by index:
#: under a pool, a memory-mapped file shared with the parent, so pixels never
#: go through a pipe.
_out: np.ndarray | None = None
#: The (path, shape) `_out` maps, so a new file or shape is mapped afresh.
_out_key: tuple[str, tuple[int, ...]] | None = None

#: Where a chunk's pixels go: the array itself (in-process) or, from a pool,
#: (memory-mapped file path, shape).
Output = np.ndarray | tuple[str, tuple[int, ...]]


def init(source_root: str) -> None:
    """Open the source's filesystem: None (plain `open`) for a local source.

    Runs when a pool worker starts, before the parent knows how many images
    there are, so that the start-up overlaps the parent's reading of the metadata.
    """
    global _fs
    if "://" in str(source_root):
        from skincluster import storage

        _fs, _ = storage.resolve(source_root)
    else:
        _fs = None


def _attach(out: Output) -> None:
    global _out, _out_key
    if isinstance(out, np.ndarray):
        _out, _out_key = out, None
    elif out != _out_key:
        path, shape = out
        _out, _out_key = np.memmap(path, dtype=np.uint8, mode="r+", shape=shape), out


def close() -> None:
    global _out, _out_key
    # A ZipFile given an open file does not close it: close both.
    for archive, fh in _zips.values():
        archive.close()
        fh.close()
    _zips.clear()
    _out = _out_key = None


def _read(path: str, member: str | None) -> bytes:
    # Each process keeps its zip files open: re-reading the central directory
    # of a 2.6 GB zip for every member would dominate the decode time.
    if member is None:
        if _fs is None:
            with open(path, "rb") as fh:
                return fh.read()
        with _fs.open_input_stream(path) as fh:
            return fh.read()
    if path not in _zips:
        fh = open(path, "rb") if _fs is None else _fs.open_input_file(path)
        _zips[path] = (zipfile.ZipFile(fh), fh)
    return _zips[path][0].read(member)


def channel_sums(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel sums and sums of squares of an (h, w, 3) uint8 image, from its histogram.

    Pillow's histogram is one C pass; summing int64 copies along the strided axis
    cost more than decoding the JPEG.
    """
    hist = np.asarray(Image.fromarray(pixels).histogram(), dtype=np.int64).reshape(3, 256)
    return hist @ _LEVELS, hist @ _LEVELS_SQ


def decode_chunk(job: tuple[Output, list[tuple[int, str, str | None]]]) -> list[tuple]:
    """Decode `job` = (output, [(index, path, zip member | None), ...]); pixels go to `output[index]`.

    Returns (index, error | None, md5, channel sums, channel sums of squares) per image.
    """
    target, chunk = job
    _attach(target)
    out = []
    for index, path, member in chunk:
        where = f"{path}!{member}" if member else path
        try:
            data = _read(path, member)
        except (OSError, KeyError) as exc:
            out.append((index, f"cannot read {where}: {exc}", "", None, None))
            continue
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a damaged member, not the whole zip
            out.append((index, f"{where}: corrupt zip member ({exc})", "", None, None))
            continue
        except (NotImplementedError, RuntimeError) as exc:  # Deflate64, an encrypted member
            out.append((index, f"{where}: unreadable zip member ({exc})", "", None, None))
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
