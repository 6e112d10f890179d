"""HAM10000 as users download it: where the metadata and images are, and which rows are usable.

Two layouts are recognised, on a local disk or any pyarrow filesystem:

* Kaggle: ``HAM10000_metadata.csv`` beside ``HAM10000_images_part_1/`` and
  ``HAM10000_images_part_2/`` (or the same inside one downloaded ``.zip``);
* Harvard Dataverse: ``HAM10000_metadata`` (a CSV or a tab-separated ``.tab``)
  beside ``HAM10000_images_part1.zip`` and ``HAM10000_images_part2.zip``,
  read straight from the zips without extracting.

Rather than hard-coding folder names, the source is walked: every image file
(``.jpg``, ``.jpeg``, ``.png``), also inside any ``.zip``, is indexed by its
file stem, which is the ``image_id`` of its metadata row.
"""

from __future__ import annotations

import csv
import io
import posixpath
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from skincluster.config import CLASS_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
METADATA_PREFIX = "HAM10000_metadata"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
#: Present in the real file; a CSV without them still ingests, with nulls.
OPTIONAL_COLUMNS = ("dx_type", "age", "sex", "localization")
#: The columns the study's cleaning looks at.
STUDY_CLEANING_COLUMNS = ("age", "sex", "localization")
MISSING_MARKERS = {"", "na", "nan", "null", "none"}


class SourceError(ValueError):
    """The source cannot be ingested at all (nothing is written)."""


@dataclass(frozen=True)
class ImageLocation:
    """Where one image's bytes are: a plain file, or a member of a zip file."""

    path: str
    member: str | None = None

    def describe(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path


@dataclass
class SourceListing:
    root: str
    metadata: ImageLocation
    images: dict[str, ImageLocation]
    #: Containers (folders or zips) holding images, for the manifest's checksums.
    containers: list[str]
    #: Files sharing an image_id with an earlier file: kept out, reported.
    duplicate_files: list[str] = field(default_factory=list)


def _is_junk(name: str) -> bool:
    # macOS zips carry "__MACOSX/._ISIC_x.jpg" resource forks that are not images.
    base = posixpath.basename(name)
    return base.startswith(".") or "__MACOSX" in name


def _image_id(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def discover(fs: pafs.FileSystem, root: str) -> SourceListing:
    """Index the metadata file and every image under `root` (a folder or a .zip)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{root}: no such file or folder")
    if info.type == pafs.FileType.File:
        if not root.lower().endswith(".zip"):
            raise SourceError(f"{root}: expected a folder or a .zip holding HAM10000")
        files = [info]
    else:
        files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted((f for f in files if f.type == pafs.FileType.File), key=lambda f: f.path)

    metadata: list[ImageLocation] = []
    images: dict[str, ImageLocation] = {}
    containers: list[str] = []
    duplicates: list[str] = []

    def add_image(loc: ImageLocation, name: str, container: str) -> None:
        image_id = _image_id(name)
        if image_id in images:
            duplicates.append(f"{loc.describe()} (image_id {image_id} already at {images[image_id].describe()})")
            return
        images[image_id] = loc
        if container not in containers:
            containers.append(container)

    for f in files:
        if _is_junk(f.path):
            continue
        lower = f.base_name.lower()
        if lower.startswith(METADATA_PREFIX.lower()):
            metadata.append(ImageLocation(f.path))
        elif lower.endswith(IMAGE_EXTENSIONS):
            add_image(ImageLocation(f.path), f.path, posixpath.dirname(f.path))
        elif lower.endswith(".zip"):
            with fs.open_input_file(f.path) as fh:
                try:
                    names = zipfile.ZipFile(fh).namelist()
                except zipfile.BadZipFile as exc:
                    raise SourceError(f"{f.path}: not a readable zip file ({exc})") from None
            for name in sorted(names):
                if name.endswith("/") or _is_junk(name):
                    continue
                base = posixpath.basename(name).lower()
                if base.startswith(METADATA_PREFIX.lower()):
                    metadata.append(ImageLocation(f.path, name))
                elif base.endswith(IMAGE_EXTENSIONS):
                    add_image(ImageLocation(f.path, name), name, f.path)

    if not metadata:
        raise SourceError(f"{root}: no {METADATA_PREFIX}.csv (or .tab) found")
    # The shallowest one wins: a copy nested deeper is usually a stale extract.
    # Two tables at that depth that differ (a re-download "HAM10000_metadata (1).csv")
    # are ambiguous; the same table twice (an extract beside its zip, a .tab
    # beside its .csv) is not.
    metadata.sort(key=lambda m: (m.describe().count("/"), not _canonical_metadata_name(m), m.describe()))
    depth = metadata[0].describe().count("/")
    shallowest = [m for m in metadata if m.describe().count("/") == depth]
    if len(shallowest) > 1:
        first = read_metadata(fs, shallowest[0])
        differing = [m for m in shallowest[1:] if not read_metadata(fs, m).equals(first)]
        if differing:
            raise SourceError(
                f"{root}: metadata files side by side hold different tables ({shallowest[0].describe()} and "
                f"{', '.join(m.describe() for m in differing)}); keep the one to ingest and move the others away"
            )
    return SourceListing(root, metadata[0], images, containers, duplicates)


def _canonical_metadata_name(loc: ImageLocation) -> bool:
    """HAM10000_metadata, .csv or .tab: not "HAM10000_metadata (1).csv" or a backup."""
    stem = posixpath.splitext(posixpath.basename(loc.member or loc.path))[0]
    return stem.lower() == METADATA_PREFIX.lower()


def read_location(fs: pafs.FileSystem, loc: ImageLocation) -> bytes:
    with fs.open_input_file(loc.path) as fh:
        if loc.member is None:
            return fh.read()
        with zipfile.ZipFile(fh) as zf:
            return zf.read(loc.member)


def read_metadata(fs: pafs.FileSystem, loc: ImageLocation, *, extra_required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read the metadata table as strings, checking the required columns first.

    Comma- or tab-separated (Dataverse serves a ``.tab``). Raises SourceError
    naming the file and the missing columns, before anything is written.
    """
    raw = read_location(fs, loc)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{loc.describe()}: not UTF-8 text ({exc})") from None
    first_line = text.split("\n", 1)[0]
    sep = "\t" if first_line.count("\t") > first_line.count(",") else ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"{loc.describe()}: cannot parse as CSV ({exc})") from None
    frame.columns = [c.strip().strip('"').lower() for c in frame.columns]
    missing = [c for c in (*REQUIRED_COLUMNS, *extra_required) if c not in frame.columns]
    if missing:
        raise SourceError(
            f"{loc.describe()}: missing required column(s) {', '.join(missing)}; "
            f"found {', '.join(frame.columns) or 'no columns'}"
        )
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    frame = frame[[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS]].apply(lambda col: col.str.strip().str.strip('"'))
    # Line numbers as a user sees them in an editor: the header is line 1.
    frame.insert(0, "row", np.arange(2, len(frame) + 2))
    return frame


@dataclass
class CheckedMetadata:
    rows: pd.DataFrame
    #: {"row", "image_id", "reason"} for every row that cannot be used.
    quarantine: list[dict]
    #: Rows removed on purpose by `--clean study` (not errors).
    dropped: list[dict]


def _missing(series: pd.Series) -> pd.Series:
    return series.str.lower().isin(MISSING_MARKERS)


def check_rows(frame: pd.DataFrame, clean: str = "none") -> CheckedMetadata:
    """Quarantine unusable rows, optionally apply the study's cleaning, type the columns.

    Quarantined: empty image_id or lesion_id, a dx outside the seven classes,
    an age that is not a number in [0, 120], a repeated image_id (the first
    occurrence is kept). Missing age, sex, localization and dx_type are kept as
    nulls unless `clean == "study"`, which drops rows with missing or zero age
    and 'unknown' sex or localization, as the study did.
    """
    if clean not in ("none", "study"):
        raise ValueError(f"unknown cleaning {clean!r}: expected 'none' or 'study'")
    frame = frame.copy()
    reasons = pd.Series("", index=frame.index, dtype=object)

    def flag(mask: pd.Series, reason: str) -> None:
        reasons[mask & (reasons == "")] = reason

    flag(_missing(frame["image_id"]), "missing image_id")
    flag(_missing(frame["lesion_id"]), "missing lesion_id")
    frame["dx"] = frame["dx"].str.lower()
    unknown_dx = ~frame["dx"].isin(CLASS_NAMES)
    for idx in frame.index[unknown_dx & (reasons == "")]:
        reasons[idx] = f"unknown dx {frame.at[idx, 'dx']!r} (expected one of {', '.join(CLASS_NAMES)})"

    age_text = frame["age"].where(~_missing(frame["age"]), None)
    age = pd.to_numeric(age_text, errors="coerce")
    bad_age = age_text.notna() & (age.isna() | (age < 0) | (age > 120))
    for idx in frame.index[bad_age & (reasons == "")]:
        reasons[idx] = f"age {frame.at[idx, 'age']!r} is not a number between 0 and 120"
    frame["age"] = age.astype("float32")

    first_row = frame.groupby("image_id")["row"].transform("min")
    dup = (frame["row"] != first_row) & ~_missing(frame["image_id"])
    for idx in frame.index[dup & (reasons == "")]:
        reasons[idx] = f"duplicate image_id {frame.at[idx, 'image_id']} (first seen at row {first_row[idx]})"

    for column in ("sex", "localization", "dx_type"):
        frame[column] = frame[column].where(~_missing(frame[column]), None)
        frame[column] = frame[column].str.lower()

    bad = reasons != ""
    quarantine = [
        {"row": int(r), "image_id": i, "reason": why}
        for r, i, why in zip(frame.loc[bad, "row"], frame.loc[bad, "image_id"], reasons[bad])
    ]
    frame = frame.loc[~bad]

    dropped: list[dict] = []
    if clean == "study":
        why = pd.Series("", index=frame.index, dtype=object)
        why[frame["age"].isna() | (frame["age"] == 0)] = "age missing or zero"
        why[(why == "") & (frame["sex"].isna() | (frame["sex"] == "unknown"))] = "sex unknown"
        why[(why == "") & (frame["localization"].isna() | (frame["localization"] == "unknown"))] = (
            "localization unknown"
        )
        drop = why != ""
        dropped = [
            {"row": int(r), "image_id": i, "reason": w}
            for r, i, w in zip(frame.loc[drop, "row"], frame.loc[drop, "image_id"], why[drop])
        ]
        frame = frame.loc[~drop]

    frame = frame.reset_index(drop=True)
    frame["label"] = frame["dx"].map({name: i for i, name in enumerate(CLASS_NAMES)}).astype("int8")
    return CheckedMetadata(frame, quarantine, dropped)
