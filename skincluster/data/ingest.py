"""`skincluster ingest SOURCE DEST`: HAM10000 to a Parquet store, once.

Order of work, so that bad input never damages a store that already exists:

1. find the metadata and images, check the CSV's columns (stop here on error);
   the decoding processes start meanwhile;
2. quarantine unusable rows, split the others by lesion;
3. decode every image in parallel (draft JPEG decoding, all cores), in split
   order, quarantine the ones that fail; compute train-only channel statistics;
4. write the shards under temporary names into a folder named after the
   content, then ``manifest.json`` last; only then delete older shards.

The same source and options give the same content fingerprint, so a re-run
finds the store up to date and writes nothing.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import posixpath
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

import skincluster
from skincluster import storage
from skincluster.config import CLASS_NAMES, IMAGE_SHAPE
from skincluster.data import decode_worker, ham10000, store
from skincluster.data.images import RESAMPLE
from skincluster.data.splits import DEFAULT_FRACTIONS, SPLITS, assign_splits
from skincluster.progress import Progress


class IngestError(RuntimeError):
    """Ingest stopped; `exit_code` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class IngestOptions:
    split: str = "lesion"
    clean: str = "none"
    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    strict: bool = False
    #: Decoding processes; None uses every core.
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be at least 1 (or left out for every core), got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"--seed must be at least 0, got {self.seed}")


@dataclass
class IngestResult:
    dest: str
    manifest: dict[str, Any]
    #: False when the store was already up to date and nothing was written.
    written: bool
    seconds: float
    images_per_second: float
    quarantine: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- decoding

#: Images per task sent to a worker.
CHUNK_IMAGES = 32
#: Below this many images, spawning worker processes costs more than it saves.
MIN_IMAGES_FOR_POOL = 4 * CHUNK_IMAGES


class _Decoder:
    """Decodes images into one (n, h, w, 3) uint8 array, in this process or in a pool.

    The pool is spawned on entry, so its workers import numpy and Pillow while
    the parent reads the metadata and splits the rows. Pool workers write pixels
    straight into a memory-mapped file in a scratch folder: pickling 37.5 kB per
    image through the pool's pipe was serial work in the parent. A file in the
    temp folder rather than /dev/shm, which containers often cap at 64 MB. The
    returned array is that file mapped into memory, valid until exit.
    """

    def __init__(self, source_root: str, workers: int):
        self.source_root = source_root
        self.workers = workers
        self._pool = None
        self._scratch: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "_Decoder":
        if self.workers > 1:
            # ignore_cleanup_errors: on Windows a mapped file cannot be deleted while an
            # exception's traceback still holds the array; the error must not hide it.
            self._scratch = tempfile.TemporaryDirectory(prefix="skincluster-ingest-", ignore_cleanup_errors=True)
            # spawn, not fork: the parent may hold pyarrow/Ray threads, which fork can deadlock.
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=decode_worker.init, initargs=(self.source_root,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        decode_worker.close()
        if self._scratch is not None:
            self._scratch.cleanup()

    def decode(self, locations: list[ham10000.ImageLocation], progress: Progress) -> tuple[list[tuple], np.ndarray]:
        """Per-image (index, error | None, md5, sums, sums of squares), and the images in `locations` order."""
        tasks = [(i, loc.path, loc.member) for i, loc in enumerate(locations)]
        shape = (len(tasks), *IMAGE_SHAPE)
        chunks = [tasks[i : i + CHUNK_IMAGES] for i in range(0, len(tasks), CHUNK_IMAGES)]
        results: list[tuple] = [None] * len(tasks)  # type: ignore[list-item]
        if self._pool is None or not tasks:  # (an empty file cannot be memory-mapped)
            images = np.empty(shape, dtype=np.uint8)
            decode_worker.init(self.source_root)
            for chunk in chunks:
                for item in decode_worker.decode_chunk((images, chunk)):
                    results[item[0]] = item
                progress.advance(len(chunk))
            return results, images
        path = os.path.join(self._scratch.name, "pixels.u8")
        np.memmap(path, dtype=np.uint8, mode="w+", shape=shape).flush()
        target = (path, shape)
        for batch in self._pool.imap_unordered(decode_worker.decode_chunk, [(target, c) for c in chunks]):
            for item in batch:
                results[item[0]] = item
            progress.advance(len(batch))
        return results, np.memmap(path, dtype=np.uint8, mode="r", shape=shape)


# --------------------------------------------------------------------------- ingest


def ingest(source: str, dest: str, options: IngestOptions = IngestOptions(), *, log=print) -> IngestResult:
    started = time.perf_counter()
    if options.split == "image":
        _shout(log, "--split image reproduces the study's LEAKY split: images of one lesion land in "
                    "train and test, so test scores are inflated. Use it only to reproduce the study.")
    src_fs, src_root = storage.resolve(source)
    listing = ham10000.discover(src_fs, src_root)
    existing = _existing_manifest(dest)  # before the decoding, which takes minutes
    workers = options.workers or os.cpu_count() or 1
    if len(listing.images) < MIN_IMAGES_FOR_POOL:
        workers = 1
    with _Decoder(source, workers) as decoder:
        return _ingest(source, dest, options, listing, src_fs, decoder, existing, started, log)


def _existing_manifest(dest: str) -> dict[str, Any] | None:
    """The store manifest already at `dest`, or None where there is none.

    Ingest writes only ``manifest.json`` and ``shards/<ingest id>/`` (and deletes
    only such shard folders), so other files in the folder are safe; a
    manifest.json that is not a store's is not replaced.
    """
    fs, root = storage.resolve(dest)
    manifest_path = posixpath.join(root, store.MANIFEST_NAME)
    where = storage.join(dest, store.MANIFEST_NAME)
    if fs.get_file_info(root).type == pafs.FileType.File:
        raise IngestError(f"{dest} is a file; ingest writes a store into a folder; nothing was written")
    if fs.get_file_info(posixpath.join(root, store.SHARDS_DIR)).type == pafs.FileType.File:
        raise IngestError(f"{storage.join(dest, store.SHARDS_DIR)} is a file, where the store's shard folders go; "
                          "nothing was written")
    if not storage.exists(fs, manifest_path):
        return None
    try:
        manifest = storage.read_json(fs, manifest_path)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise IngestError(
            f"{where} is not readable JSON ({exc}); if {dest} is a damaged skincluster store, delete its "
            f"{store.MANIFEST_NAME} and ingest again; nothing was written"
        ) from None
    # Recognised by what only an ingest writes; the rest may be damaged (the up-to-date check looks).
    if not (isinstance(manifest, dict) and ("ingest_id" in manifest or "fingerprint" in manifest)):
        raise IngestError(f"{where} is not a skincluster store manifest; refusing to write a store "
                          f"over {dest}; nothing was written")
    return manifest


def _ingest(
    source, dest, options, listing, src_fs, decoder: _Decoder, existing: dict | None, started: float, log
) -> IngestResult:
    extra = ham10000.STUDY_CLEANING_COLUMNS if options.clean == "study" else ()
    frame = ham10000.read_metadata(src_fs, listing.metadata, extra_required=extra)
    rows_in = len(frame)
    checked = ham10000.check_rows(frame, options.clean)
    quarantine = list(checked.quarantine)
    rows = checked.rows

    all_ids = set(frame["image_id"])
    orphans = sorted(i for i in listing.images if i not in all_ids)
    has_file = rows["image_id"].isin(listing.images.keys())
    by_lower_case = {} if has_file.all() else {i.lower(): loc for i, loc in listing.images.items()}
    for r, i in zip(rows.loc[~has_file, "row"], rows.loc[~has_file, "image_id"]):
        reason = "image file not found in the source"
        stem, extension = posixpath.splitext(i)
        if extension.lower() in ham10000.IMAGE_EXTENSIONS and stem in listing.images:
            reason += f" (image_id carries a file extension; {listing.images[stem].describe()} exists)"
        elif i.lower() in by_lower_case:  # file names are matched with their case
            reason += f" (a file differing only in case exists: {by_lower_case[i.lower()].describe()})"
        quarantine.append({"row": int(r), "image_id": i, "reason": reason})
    rows = rows.loc[has_file].reset_index(drop=True)

    # Split before decoding (it needs the metadata only) and decode in split
    # order, so that each split's pixels are one contiguous slice of the decoded
    # array and the shards are written from it without a copy. An image that
    # then fails to decode only leaves its split.
    rows["split"] = assign_splits(rows, by=options.split, fractions=options.fractions, seed=options.seed).to_numpy()
    split_index = rows["split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy()
    rows = rows.iloc[np.argsort(split_index, kind="stable")].reset_index(drop=True)

    progress = Progress("decoding", total=len(rows), unit="images")
    decoded, images = decoder.decode([listing.images[i] for i in rows["image_id"]], progress)
    progress.close()
    decode_seconds = progress.elapsed

    ok = np.array([d[1] is None for d in decoded], dtype=bool)
    for r, i, d in zip(rows["row"], rows["image_id"], decoded):
        if d[1] is not None:
            quarantine.append({"row": int(r), "image_id": i, "reason": d[1]})
    rows["source_md5"] = [d[2] for d in decoded]
    sums = np.array([d[3] for d in decoded if d[1] is None]).reshape(-1, 3)
    sums_sq = np.array([d[4] for d in decoded if d[1] is None]).reshape(-1, 3)
    good = rows.loc[ok].reset_index(drop=True)
    good_positions = np.flatnonzero(ok)
    quarantine.sort(key=lambda q: q["row"])

    rows_written = len(good)
    accounted = rows_written + len(quarantine) + len(checked.dropped)
    if accounted != rows_in:  # a bug, not bad input: never write a store that lost rows
        raise IngestError(f"internal error: {rows_in} rows in but {accounted} accounted for", exit_code=3)

    if quarantine:
        _print_quarantine(log, quarantine, listed=rows_written > 0 and not options.strict)
    if options.strict and quarantine:
        raise IngestError(f"--strict: {len(quarantine)} row(s) quarantined; nothing was written to {dest}")
    if rows_written == 0:
        raise IngestError(f"{source}: no usable rows; nothing was written to {dest}")
    _warn_mixed_lesions(log, good)

    train = (good["split"] == "train").to_numpy()
    mean, std = store.channel_stats(sums[train], sums_sq[train], IMAGE_SHAPE[0] * IMAGE_SHAPE[1])

    metadata_bytes = ham10000.read_location(src_fs, listing.metadata)
    fingerprint = _fingerprint(metadata_bytes, good, options)
    ingest_id = fingerprint[:16]

    dest_fs, dest_root = storage.resolve(dest)
    manifest_path = posixpath.join(dest_root, store.MANIFEST_NAME)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        damaged = store.manifest_problems(existing) or store.damaged_shards(dest_fs, dest_root, existing)
        if not damaged:
            log(f"{dest} is already up to date (same source and options); nothing written.")
            seconds = time.perf_counter() - started
            return IngestResult(dest, existing, False, seconds, rows_in / max(decode_seconds, 1e-9), quarantine)
        log(f"{dest} is damaged ({damaged[0]}{', ...' if len(damaged) > 1 else ''}); writing the store again")

    folder = posixpath.join(dest_root, store.SHARDS_DIR, ingest_id)
    files = []
    for split in SPLITS:
        sel = np.flatnonzero((good["split"] == split).to_numpy())
        part = good.iloc[sel]
        # Missing values are NaN in pandas and must be nulls in Parquet.
        columns = {c: [None if pd.isna(v) else v for v in part[c].tolist()] for c in store.METADATA_COLUMNS}
        positions = good_positions[sel]
        contiguous = len(positions) > 0 and positions[-1] - positions[0] + 1 == len(positions)
        pixels = images[positions[0] : positions[-1] + 1] if contiguous else images[positions]
        table = store.shard_table(columns, pixels)
        for f in store.write_shards(dest_fs, folder, split, table):
            files.append({"path": f"{store.SHARDS_DIR}/{ingest_id}/{f['name']}", "split": split, "rows": f["rows"]})

    labels = good["label"].to_numpy()
    splits_arr = good["split"].to_numpy()
    manifest = {
        "schema_version": store.SCHEMA_VERSION,
        "skincluster_version": skincluster.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ingest_id": ingest_id,
        "fingerprint": fingerprint,
        "source": str(source),
        "source_checksums": _source_checksums(metadata_bytes, listing, good, rows),
        "options": {
            "split": options.split,
            "leaky_split": options.split == "image",
            "clean": options.clean,
            "seed": options.seed,
            "fractions": dict(zip(SPLITS, options.fractions)),
        },
        "image": {
            "height": IMAGE_SHAPE[0],
            "width": IMAGE_SHAPE[1],
            "channels": IMAGE_SHAPE[2],
            "dtype": "uint8",
            "layout": "HWC RGB, raw bytes in the binary column 'image'",
            "resize": f"JPEG draft decoding, then Pillow {RESAMPLE.name.lower()}",
        },
        "classes": list(CLASS_NAMES),
        "counts": store.class_counts(labels, splits_arr),
        "lesions": {s: int(good.loc[good["split"] == s, "lesion_id"].nunique()) for s in SPLITS},
        "stats": {"mean": mean, "std": std, "computed_on": "train", "images": int(train.sum())},
        "rows": {
            "in": rows_in,
            "written": rows_written,
            "quarantined": len(quarantine),
            "dropped_by_cleaning": len(checked.dropped),
        },
        "files": files,
        "quarantine": quarantine,
        "dropped": checked.dropped,
        "orphans": orphans,
        "duplicate_files": listing.duplicate_files,
    }
    storage.write_json_atomic(dest_fs, manifest_path, manifest)
    store.remove_unreferenced_shards(dest_fs, dest_root, keep={ingest_id})

    seconds = time.perf_counter() - started
    result = IngestResult(dest, manifest, True, seconds, len(rows) / max(decode_seconds, 1e-9), quarantine)
    _print_summary(log, result, orphans)
    if options.split == "image":
        _shout(log, "This store uses the LEAKY image-level split (--split image).")
    return result


def _fingerprint(metadata_bytes: bytes, good: pd.DataFrame, options: IngestOptions) -> str:
    h = hashlib.sha256()
    # "split=before-decode": since the split is assigned before decoding, a source with
    # undecodable images may split differently from a store made by an older version.
    h.update(f"schema={store.SCHEMA_VERSION};shape={IMAGE_SHAPE};resample={RESAMPLE.name};".encode())
    h.update(b"split=before-decode\n")
    h.update(f"split={options.split};clean={options.clean};seed={options.seed};fractions={options.fractions}\n".encode())
    h.update(hashlib.sha256(metadata_bytes).digest())
    for image_id, md5 in sorted(zip(good["image_id"], good["source_md5"])):
        h.update(f"{image_id}:{md5}\n".encode())
    return h.hexdigest()


def _source_checksums(metadata_bytes: bytes, listing, good: pd.DataFrame, rows: pd.DataFrame) -> dict:
    """md5/sha256 of the metadata file and, per image folder or zip, a digest of its images.

    The per-container digest is the sha256 of the sorted ``image_id:md5`` lines of
    the images read from it, so it identifies the image content without hashing
    multi-GB zips a second time.
    """
    md5_of = dict(zip(rows["image_id"], rows["source_md5"]))
    per_container: dict[str, list[str]] = {}
    for image_id, loc in listing.images.items():
        if image_id in md5_of and md5_of[image_id]:
            container = loc.path if loc.member is not None else posixpath.dirname(loc.path)
            per_container.setdefault(container, []).append(f"{image_id}:{md5_of[image_id]}\n")
    containers = {}
    for container, lines in sorted(per_container.items()):
        digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
        containers[_relative(container, listing.root)] = {"images": len(lines), "images_sha256": digest}
    return {
        "metadata": {
            "path": _relative(listing.metadata.describe(), listing.root),
            "md5": hashlib.md5(metadata_bytes).hexdigest(),
            "sha256": hashlib.sha256(metadata_bytes).hexdigest(),
        },
        "containers": containers,
    }


def _relative(path: str, root: str) -> str:
    rel = posixpath.relpath(path, root) if path.startswith(root) else path
    return "." if rel == "" else rel


# --------------------------------------------------------------------------- console


def _shout(log, message: str) -> None:
    bar = "!" * 78
    log(f"{bar}\n!! WARNING: {message}\n{bar}")


def _warn_mixed_lesions(log, good: pd.DataFrame) -> None:
    """All images of a lesion show one lesion, so they should share one diagnosis: say where they do not."""
    per_lesion = good.groupby("lesion_id")["label"].unique()
    mixed = per_lesion[per_lesion.map(len) > 1]
    if len(mixed):
        examples = "; ".join(f"{lesion}: {', '.join(CLASS_NAMES[i] for i in sorted(labels))}"
                             for lesion, labels in mixed.head(5).items())
        _shout(log, f"{len(mixed)} lesion(s) have images with different dx ({examples}"
                    f"{'; ...' if len(mixed) > 5 else ''}); they are kept as labelled, but check the metadata.")


def _print_quarantine(log, quarantine: list[dict], *, listed: bool, limit: int = 20) -> None:
    """`listed`: a manifest will be written, and will list every quarantined row."""
    log(f"quarantined {len(quarantine)} row(s):")
    for q in quarantine[:limit]:
        log(f"  row {q['row']:>6}  {q['image_id'] or '<no image_id>'}: {q['reason']}")
    if len(quarantine) > limit:
        where = "all listed in manifest.json under 'quarantine'" if listed else "no manifest is written"
        log(f"  ... and {len(quarantine) - limit} more ({where})")
    reasons = Counter(_reason_kind(q["reason"]) for q in quarantine)
    if len(reasons) > 1:
        for reason, n in reasons.most_common(5):
            log(f"  {n:>6} x {reason}")


def _reason_kind(reason: str) -> str:
    """"path: corrupt zip member (Bad CRC-32 ...)" -> "corrupt zip member": the reason without the row's details."""
    return re.sub(r"\s*\([^()]*\)$", "", reason).split(":")[-1].strip()


def _print_summary(log, result: IngestResult, orphans: list[str]) -> None:
    m = result.manifest
    counts = m["counts"]
    header = f"{'class':<8}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'all':>8}"
    lines = [header, "-" * len(header)]
    for name in [*CLASS_NAMES, "total"]:
        per = [counts[s][name] for s in SPLITS]
        lines.append(f"{name:<8}" + "".join(f"{n:>8}" for n in per) + f"{sum(per):>8}")
    lines.append(f"{'lesions':<8}" + "".join(f"{m['lesions'][s]:>8}" for s in SPLITS) + f"{sum(m['lesions'].values()):>8}")
    rows = m["rows"]
    lines.append("")
    lines.append(
        f"rows in {rows['in']} = written {rows['written']} + quarantined {rows['quarantined']}"
        + (f" + dropped by cleaning {rows['dropped_by_cleaning']}" if rows["dropped_by_cleaning"] else "")
        + "  (checked)"
    )
    if orphans:
        lines.append(f"orphan image files (no metadata row): {len(orphans)}, e.g. {', '.join(orphans[:5])}")
    if m["duplicate_files"]:
        lines.append(f"copies of image files ignored: {len(m['duplicate_files'])}")
    stats = m["stats"]
    lines.append("train mean/std (RGB): " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(stats["mean"], stats["std"])))
    lines.append(f"decoded at {result.images_per_second:,.0f} images/s; total {result.seconds:.1f} s")
    lines.append(f"store: {result.dest}")
    log("\n".join(lines))
    empty = [s for s in SPLITS if counts[s]["total"] == 0]
    if empty:
        _shout(log, f"the {' and '.join(empty)} split(s) hold no image: train and compare refuse this store; "
                    "ingest again with more images or other --fractions.")

