"""HAM10000 as users download it: where the metadata and images are, and which rows are usable.

Two layouts are recognised, on a local disk or any pyarrow filesystem:

* Kaggle: ``HAM10000_metadata.csv`` beside ``HAM10000_images_part_1/`` and
  ``HAM10000_images_part_2/`` (or the same inside one downloaded ``.zip``);
* Harvard Dataverse: ``HAM10000_metadata`` (a CSV or a tab-separated ``.tab``)
  beside ``HAM10000_images_part1.zip`` and ``HAM10000_images_part2.zip``,
  read straight from the zips without extracting.

Rather than hard-coding folder names, the source is walked: every image file
(``.jpg``, ``.jpeg``, ``.png``), also inside any ``.zip``, is indexed by its
file stem, which is the ``image_id`` of its metadata row. Copies of one image
(Kaggle's download holds two identical sets) are ignored; two different files
for one image_id are an error, since either could be the wrong one.
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
#: What a metadata table can be called after the prefix: not the checksum,
#: spreadsheet or description files that download pages put beside it.
METADATA_EXTENSIONS = ("", ".csv", ".tab", ".tsv", ".txt")
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
    #: Copies (same size) of an image file already indexed: kept out, reported.
    duplicate_files: list[str] = field(default_factory=list)


def _is_junk(name: str) -> bool:
    # macOS zips carry "__MACOSX/._ISIC_x.jpg" resource forks that are not images.
    base = posixpath.basename(name)
    return base.startswith(".") or "__MACOSX" in name


def _image_id(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def _is_metadata(name: str) -> bool:
    stem, extension = posixpath.splitext(posixpath.basename(name).lower())
    return stem.startswith(METADATA_PREFIX.lower()) and extension in METADATA_EXTENSIONS


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
    sizes: dict[str, int] = {}
    containers: list[str] = []
    duplicates: list[str] = []
    conflicts: list[str] = []
    nested_zips: list[str] = []

    def add_image(loc: ImageLocation, name: str, size: int, container: str) -> None:
        image_id = _image_id(name)
        if image_id in images:
            # Kaggle's download holds every image twice (byte-identical folders);
            # a file of another size under the same name is a different image
            # (a mask, a resized copy), and guessing which one to train on is
            # how a store silently fills with the wrong pixels.
            where = f"{loc.describe()} (image_id {image_id} already at {images[image_id].describe()})"
            (duplicates if size == sizes[image_id] else conflicts).append(where)
            return
        images[image_id] = loc
        sizes[image_id] = size
        if container not in containers:
            containers.append(container)

    for f in files:
        if _is_junk(f.path):
            continue
        lower = f.base_name.lower()
        if _is_metadata(lower):
            metadata.append(ImageLocation(f.path))
        elif lower.endswith(IMAGE_EXTENSIONS):
            add_image(ImageLocation(f.path), f.path, f.size, posixpath.dirname(f.path))
        elif lower.endswith(".zip"):
            with fs.open_input_file(f.path) as fh:
                try:
                    members = zipfile.ZipFile(fh).infolist()
                except zipfile.BadZipFile as exc:
                    raise SourceError(f"{f.path}: not a readable zip file ({exc})") from None
            for member in sorted(members, key=lambda m: m.filename):
                name = member.filename
                if name.endswith("/") or _is_junk(name):
                    continue
                base = posixpath.basename(name).lower()
                if _is_metadata(base):
                    metadata.append(ImageLocation(f.path, name))
                elif base.endswith(IMAGE_EXTENSIONS):
                    add_image(ImageLocation(f.path, name), name, member.file_size, f.path)
                elif base.endswith(".zip"):
                    nested_zips.append(f"{f.path}!{name}")

    if conflicts:
        raise SourceError(
            f"{root}: {len(conflicts)} image file(s) share an image_id with a different file, e.g. "
            f"{'; '.join(conflicts[:3])}; keep one copy of the images in the source and move the "
            "other files (masks, resized copies) out of it"
        )
    if not images and nested_zips:
        raise SourceError(
            f"{root}: the images are in zip files inside a zip ({', '.join(nested_zips[:3])}), "
            "which are not read; extract the outer zip and ingest the folder"
        )
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
        # Compared without the line numbers: a blank line more is the same table.
        first = read_metadata(fs, shallowest[0]).drop(columns="row")
        differing = [m for m in shallowest[1:] if not read_metadata(fs, m).drop(columns="row").equals(first)]
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

    Comma-, tab- (Dataverse serves a ``.tab``) or semicolon-separated (a
    spreadsheet's export in many locales). Each row keeps the line it starts
    on, as an editor numbers it (blank lines and multi-line quoted fields
    included), so quarantine reports point at the right line. Raises
    SourceError naming the file (and line) before anything is written.
    """
    raw = read_location(fs, loc)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{loc.describe()}: not UTF-8 text ({exc})") from None
    header, records, lines = _parse_table(text, loc)
    if not records:
        raise SourceError(f"{loc.describe()}: no data rows after the header; nothing was written")
    columns = [c.strip().strip('"').lower() for c in header]
    used = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *extra_required)
    repeated = sorted({c for c in columns if c in used and columns.count(c) > 1})
    if repeated:
        raise SourceError(
            f"{loc.describe()}: column(s) {', '.join(repeated)} appear more than once in the header "
            "(names are compared without case); keep one of each"
        )
    missing = [c for c in (*REQUIRED_COLUMNS, *extra_required) if c not in columns]
    if missing:
        raise SourceError(
            f"{loc.describe()}: missing required column(s) {', '.join(missing)}; "
            f"found {', '.join(c for c in columns if c) or 'no columns'}"
        )
    data = {}
    for column in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        i = columns.index(column) if column in columns else None
        data[column] = [("" if i is None else r[i]).strip().strip('"') for r in records]
    return pd.DataFrame({"row": np.asarray(lines, dtype=np.int64), **data})


def _parse_table(text: str, loc: ImageLocation) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data records padded to the header's width, and the line each record starts on."""
    first_line = text.lstrip("\r\n").splitlines()[0] if text.strip() else ""
    counts = {sep: first_line.count(sep) for sep in (",", "\t", ";")}
    sep = max(counts, key=lambda k: (counts[k], k == ","))  # ties (a one-column file) read as CSV
    # strict: an unclosed quote is an error, not the rest of the file read as one field.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    header: list[str] | None = None
    records: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            if not any(field.strip() for field in record):
                continue  # blank line
            if header is None:
                header = record
                continue
            if len(record) > len(header):
                if any(field.strip() for field in record[len(header):]):
                    raise SourceError(
                        f"{loc.describe()}: line {start} has {len(record)} fields, the header has "
                        f"{len(header)}; quote fields that contain {sep!r}"
                    )
                record = record[: len(header)]  # a trailing separator: nothing lost
            records.append(record + [""] * (len(header) - len(record)))
            lines.append(start)
    except csv.Error as exc:
        raise SourceError(f"{loc.describe()}: cannot parse as CSV in the row starting on line {start} ({exc})") from None
    if header is None:
        raise SourceError(f"{loc.describe()}: the file is empty (no header line)")
    return header, records, lines


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
    usable occurrence is kept). Missing age, sex, localization and dx_type are kept as
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
    # "45,0": a decimal comma, as spreadsheets in many locales write it (in a
    # comma-separated file such a field has to be quoted, so nothing else looks like it).
    age = pd.to_numeric(age_text.str.replace(r"^\s*(\d+),(\d+)\s*$", r"\1.\2", regex=True), errors="coerce")
    bad_age = age_text.notna() & (age.isna() | (age < 0) | (age > 120))
    for idx in frame.index[bad_age & (reasons == "")]:
        reasons[idx] = f"age {frame.at[idx, 'age']!r} is not a number between 0 and 120"
    frame["age"] = age.astype("float32")

    # The first usable row of an image_id is kept: an earlier row already
    # quarantined for another reason must not take its image with it.
    usable = reasons == ""
    first_row = frame.loc[usable].groupby("image_id")["row"].transform("min")
    dup = usable & (frame["row"] != first_row.reindex(frame.index)) & ~_missing(frame["image_id"])
    kept = frame.loc[usable & ~dup].set_index("image_id")
    for idx in frame.index[dup]:
        image_id = frame.at[idx, "image_id"]
        # Which of two differing labels is right, nothing here can tell: say they differ.
        differ = [f"{c} {frame.at[idx, c]!r} there {kept.at[image_id, c]!r}" for c in ("dx", "lesion_id")
                  if frame.at[idx, c] != kept.at[image_id, c]]
        reasons[idx] = (f"duplicate image_id {image_id} (first seen at row {first_row[idx]}"
                        + (f", which is kept; this row has {', '.join(differ)}" if differ else "") + ")")

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
