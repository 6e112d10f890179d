"""HAM10000 -> Parquet store: layouts, splits, stats, bad input, atomicity, idempotency."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skincluster.cli import main as cli_main
from skincluster.config import CLASS_NAMES, IMAGE_SHAPE
from skincluster.data import store as store_mod
from skincluster.data.ham10000 import SourceError
from skincluster.data.images import ImageDecodeError, decode_image
from skincluster.data.ingest import MIN_IMAGES_FOR_POOL, IngestError, IngestOptions, _reason_kind, ingest
from skincluster.data.store import StoreError, damaged_shards, images_from_column, open_store

from helpers import HEADER, color_of, csv_text, default_images, jpeg_bytes, make_rows, write_dataverse, write_kaggle

QUIET = dict(log=lambda *_: None)


def _ingest(src, dest, **opts):
    return ingest(str(src), str(dest), IngestOptions(workers=1, **opts), **QUIET)


def _all_rows(store):
    return {s: store.read_split(s).to_pandas() for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- decoding


def test_decode_resizes_to_store_shape_and_converts_modes():
    for mode, fmt in [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")]:
        data = jpeg_bytes((200, 120, 90), size=(600, 450), mode=mode, fmt=fmt)
        pixels = decode_image(data)
        assert pixels.shape == IMAGE_SHAPE and pixels.dtype == np.uint8, (mode, fmt)


def test_decode_keeps_colour():
    pixels = decode_image(jpeg_bytes((200, 60, 30), size=(600, 450)))
    mean = pixels.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, (200, 60, 30), atol=6)


@pytest.mark.parametrize(
    "data",
    [b"", os.urandom(2048), jpeg_bytes((1, 2, 3), size=(600, 450))[:1500]],
    ids=["zero-bytes", "random-bytes", "truncated-jpeg"],
)
def test_decode_rejects_bad_bytes(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_decode_scales_16_bit_grayscale_instead_of_clipping_it():
    from PIL import Image

    gray = np.linspace(7, 243, 100 * 125).reshape(100, 125).round().astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray * 257).save(buf, "PNG")  # 16-bit PNG: Pillow opens it as "I;16"
    pixels = decode_image(buf.getvalue())
    np.testing.assert_array_equal(pixels[..., 0], gray)
    np.testing.assert_array_equal(pixels[..., 2], gray)


def test_decode_says_an_image_is_too_large_rather_than_corrupt(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600 * 450 // 2 - 1)  # warns above this, fails at twice it
    with pytest.raises(ImageDecodeError, match="image too large to decode safely"):
        decode_image(jpeg_bytes((9, 9, 9), size=(600, 450)))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def good_source(tmp_path_factory):
    return write_kaggle(tmp_path_factory.mktemp("kaggle"), make_rows())


@pytest.fixture(scope="module")
def good_store(good_source, tmp_path_factory):
    dest = tmp_path_factory.mktemp("store") / "s"
    result = _ingest(good_source, dest)
    return result, open_store(str(dest))


def test_store_counts_and_manifest(good_store):
    result, store = good_store
    rows = make_rows()
    m = store.manifest
    assert m["schema_version"] == store_mod.SCHEMA_VERSION
    assert m["classes"] == list(CLASS_NAMES)
    assert m["rows"] == {"in": len(rows), "written": len(rows), "quarantined": 0, "dropped_by_cleaning": 0}
    assert sum(m["counts"][s]["total"] for s in ("train", "val", "test")) == len(rows)
    assert m["quarantine"] == [] and m["orphans"] == []
    assert m["source_checksums"]["metadata"]["md5"]
    assert set(m["source_checksums"]["containers"]) == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    for split in ("train", "val", "test"):
        for name in CLASS_NAMES:  # six lesions per class: every class in every split
            assert m["counts"][split][name] > 0, (split, name)


def test_no_lesion_in_two_splits(good_store):
    _, store = good_store
    frames = _all_rows(store)
    lesions = {s: set(f["lesion_id"]) for s, f in frames.items()}
    assert not lesions["train"] & lesions["test"]
    assert not lesions["train"] & lesions["val"]
    assert not lesions["val"] & lesions["test"]


def test_stats_come_from_train_only(good_store):
    _, store = good_store
    train = images_from_column(store.read_split("train", ["image"]).column("image"))
    everything = np.concatenate(
        [images_from_column(store.read_split(s, ["image"]).column("image")) for s in ("train", "val", "test")]
    )
    flat = train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(store.channel_mean, flat.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(store.channel_std, flat.std(axis=0), rtol=1e-9)
    assert not np.allclose(store.channel_mean, everything.reshape(-1, 3).mean(axis=0), rtol=1e-6)


def test_images_roundtrip_and_reader_is_zero_copy(good_store, good_source):
    _, store = good_store
    table = store_mod.pq.read_table(store.split_files("train")[0], filesystem=store.fs)
    column = table.column("image")
    images = images_from_column(column)
    assert images.shape[1:] == IMAGE_SHAPE
    if column.num_chunks == 1:
        assert not images.flags.owndata  # a view of the Arrow buffer, not a copy
    image_id = table.column("image_id")[0].as_py()
    folder = next(Path(good_source).glob(f"*/{image_id}.jpg"))
    np.testing.assert_array_equal(images[0], decode_image(folder.read_bytes()))
    labels = table.column("label").to_numpy()
    assert [CLASS_NAMES[i] for i in labels] == table.column("dx").to_pylist()


def test_rerun_is_idempotent(good_source, good_store):
    result, store = good_store
    before = {p: os.path.getmtime(p) for p in Path(store.path).rglob("*") if p.is_file()}
    again = _ingest(good_source, store.path)
    assert again.written is False
    after = {p: os.path.getmtime(p) for p in Path(store.path).rglob("*") if p.is_file()}
    assert before == after


def test_same_seed_same_split_other_seed_differs(good_source, tmp_path):
    a = _ingest(good_source, tmp_path / "a", seed=0).manifest
    b = _ingest(good_source, tmp_path / "b", seed=0).manifest
    c = _ingest(good_source, tmp_path / "c", seed=1).manifest
    split_of = lambda d: {  # noqa: E731
        r: s for s in ("train", "val", "test") for r in open_store(str(d)).read_split(s, ["image_id"]).column(0).to_pylist()
    }
    assert a["fingerprint"] == b["fingerprint"]
    assert split_of(tmp_path / "a") == split_of(tmp_path / "b")
    assert split_of(tmp_path / "a") != split_of(tmp_path / "c")
    assert c["fingerprint"] != a["fingerprint"]


def test_dataverse_zips_read_without_extracting(tmp_path, good_store):
    rows = make_rows()
    src = write_dataverse(tmp_path / "dv", rows)
    result = _ingest(src, tmp_path / "store")
    assert result.manifest["rows"]["written"] == len(rows)
    assert not list(src.glob("*.jpg"))  # nothing was extracted
    # Same images and split as from the Kaggle folders: the content is what counts.
    _, kaggle_store = good_store
    dv_store = open_store(str(tmp_path / "store"))
    for split in ("train", "test"):
        a = kaggle_store.read_split(split).sort_by("image_id")
        b = dv_store.read_split(split).sort_by("image_id")
        assert a.column("image_id").equals(b.column("image_id"))
        assert a.column("image").equals(b.column("image"))


def test_parallel_decoding_matches_single_process(tmp_path):
    rows = make_rows(n_lesions_per_class=12)
    src = write_kaggle(tmp_path / "src", rows)
    one = ingest(str(src), str(tmp_path / "one"), IngestOptions(workers=1), **QUIET)
    two = ingest(str(src), str(tmp_path / "two"), IngestOptions(workers=2), **QUIET)
    assert one.manifest["fingerprint"] == two.manifest["fingerprint"]
    a = open_store(str(tmp_path / "one")).read_split("train").sort_by("image_id")
    b = open_store(str(tmp_path / "two")).read_split("train").sort_by("image_id")
    assert a.column("image").equals(b.column("image"))


def test_parallel_decoding_with_failures_keeps_every_image_with_its_row(tmp_path):
    """Corrupt images inside a split make its pixels non-contiguous in the decoded
    array: every stored image must still be the one its image_id names."""
    rows = make_rows(n_lesions_per_class=12)
    assert len(rows) >= MIN_IMAGES_FOR_POOL  # or the pool would not be used
    images = {r["image_id"]: jpeg_bytes(color_of(r["dx"]), seed=i) for i, r in enumerate(rows)}
    for r in rows[5::17]:
        images[r["image_id"]] = b"not a jpeg"
    src = write_kaggle(tmp_path / "src", rows, images)
    one = ingest(str(src), str(tmp_path / "one"), IngestOptions(workers=1), **QUIET)
    two = ingest(str(src), str(tmp_path / "two"), IngestOptions(workers=2), **QUIET)
    assert one.quarantine == two.quarantine and len(two.quarantine) == len(rows[5::17])
    assert one.manifest["counts"] == two.manifest["counts"]
    for split, table in _all_rows(open_store(str(tmp_path / "two"))).items():
        for image_id, stored in zip(table["image_id"], table["image"]):
            expected = decode_image(images[image_id])
            assert np.frombuffer(stored, np.uint8).reshape(IMAGE_SHAPE).tobytes() == expected.tobytes(), (split, image_id)


def test_no_usable_row_is_a_clear_error_with_the_pool_too(tmp_path):
    rows = make_rows(n_lesions_per_class=12)
    assert len(rows) >= MIN_IMAGES_FOR_POOL  # enough image files to start the pool
    images = {r["image_id"]: jpeg_bytes(color_of(r["dx"]), seed=i) for i, r in enumerate(rows)}
    for r in rows:
        r["dx"] = "unknown"
    src = write_kaggle(tmp_path / "src", rows, images)
    with pytest.raises(IngestError, match="no usable rows"):
        ingest(str(src), str(tmp_path / "s"), IngestOptions(workers=2), **QUIET)
    assert not (tmp_path / "s").exists()


def test_image_split_is_leaky_and_says_so(good_source, tmp_path):
    messages = []
    result = ingest(str(good_source), str(tmp_path / "s"), IngestOptions(workers=1, split="image"), log=messages.append)
    assert result.manifest["options"]["leaky_split"] is True
    assert any("LEAKY" in m for m in messages)
    frames = _all_rows(open_store(str(tmp_path / "s")))
    assert set(frames["train"]["lesion_id"]) & set(frames["test"]["lesion_id"])


def test_clean_study_drops_rows_and_accounts_for_them(tmp_path):
    rows = make_rows()
    rows[0]["age"] = ""
    rows[1]["age"] = "0.0"
    rows[2]["sex"] = "unknown"
    rows[3]["localization"] = "unknown"
    rows[4]["age"] = ""  # kept by default as a null
    rows[5]["sex"] = ""
    rows[6]["localization"] = "nan"
    rows[7]["dx_type"] = ""
    src = write_kaggle(tmp_path / "src", rows)
    kept = _ingest(src, tmp_path / "all").manifest
    assert kept["rows"]["written"] == len(rows)
    cleaned = _ingest(src, tmp_path / "clean", clean="study").manifest
    assert cleaned["rows"]["dropped_by_cleaning"] == 7
    assert cleaned["rows"]["written"] == len(rows) - 7
    kept_store = open_store(str(tmp_path / "all"))
    nulls = {c: sum(kept_store.read_split(s, [c]).column(c).null_count for s in ("train", "val", "test"))
             for c in ("age", "sex", "localization", "dx_type")}
    assert nulls == {"age": 2, "sex": 1, "localization": 1, "dx_type": 1}


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory):
    """Every kind of bad input at once, beside valid unusual images."""
    rows = make_rows()
    images = {r["image_id"]: jpeg_bytes(color_of(r["dx"]), seed=i) for i, r in enumerate(rows)}
    # valid though unusual: grayscale, CMYK, and a PNG named .jpg
    images[rows[0]["image_id"]] = jpeg_bytes((120, 120, 120), mode="L")
    images[rows[1]["image_id"]] = jpeg_bytes((200, 100, 50), mode="CMYK")
    images[rows[2]["image_id"]] = jpeg_bytes((10, 200, 10), fmt="PNG")
    # broken
    images[rows[3]["image_id"]] = jpeg_bytes((1, 2, 3), size=(600, 450))[:2000]
    images[rows[4]["image_id"]] = b""
    images[rows[5]["image_id"]] = os.urandom(5000)
    del images[rows[6]["image_id"]]
    rows[7]["dx"] = "melanoma?"
    rows.append(dict(rows[8]))  # duplicate image_id
    images["ISIC_9999999"] = jpeg_bytes((5, 5, 5))  # orphan: no metadata row
    return write_kaggle(tmp_path_factory.mktemp("bad"), rows, images), rows


@pytest.fixture(scope="module")
def bad_result(bad_source, tmp_path_factory):
    src, _ = bad_source
    return _ingest(src, tmp_path_factory.mktemp("badstore") / "s")


def test_unusual_but_valid_images_are_ingested(bad_result, bad_source):
    _, rows = bad_source
    ids = {q["image_id"] for q in bad_result.quarantine}
    for row in rows[:3]:
        assert row["image_id"] not in ids


@pytest.mark.parametrize(
    "index,reason",
    [
        (3, "corrupt or truncated"),
        (4, "empty file"),
        (5, "not a readable image"),
        (6, "image file not found"),
        (7, "unknown dx 'melanoma?'"),
        (-1, "duplicate image_id"),
    ],
    ids=["truncated", "zero-byte", "random-bytes", "missing-image", "unknown-dx", "duplicate-id"],
)
def test_bad_rows_are_quarantined_with_reason(bad_result, bad_source, index, reason):
    _, rows = bad_source
    row_number = (index if index >= 0 else len(rows) - 1) + 2
    entry = next(q for q in bad_result.quarantine if q["row"] == row_number)
    assert reason in entry["reason"]
    assert entry["image_id"] == rows[index]["image_id"]
    if reason in ("corrupt or truncated", "empty file", "not a readable image"):
        assert f"{rows[index]['image_id']}.jpg" in entry["reason"]  # names the file


def test_bad_input_accounting_and_orphans(bad_result, bad_source):
    _, rows = bad_source
    m = bad_result.manifest
    assert m["rows"]["in"] == len(rows)
    assert m["rows"]["quarantined"] == 6
    assert m["rows"]["written"] + m["rows"]["quarantined"] == m["rows"]["in"]
    assert m["quarantine"] == bad_result.quarantine
    assert m["orphans"] == ["ISIC_9999999"]


def test_strict_exits_nonzero_and_writes_nothing(bad_source, tmp_path):
    src, _ = bad_source
    with pytest.raises(IngestError):
        ingest(str(src), str(tmp_path / "s"), IngestOptions(workers=1, strict=True), **QUIET)
    assert not (tmp_path / "s").exists()
    assert cli_main(["ingest", "--strict", "--workers", "1", str(src), str(tmp_path / "s")]) != 0


def test_missing_required_column_stops_before_writing(tmp_path, capsys):
    rows = make_rows()
    header = ["lesion_id", "image_id", "dx_type", "age", "sex", "localization"]  # no dx
    src = write_kaggle(tmp_path / "src", rows, header=header)
    with pytest.raises(SourceError, match=r"HAM10000_metadata.csv: missing required column\(s\) dx"):
        _ingest(src, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    assert cli_main(["ingest", str(src), str(tmp_path / "s")]) == 2
    assert "missing required column" in capsys.readouterr().err


def test_two_different_metadata_files_side_by_side_are_an_error(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    metadata = (src / "HAM10000_metadata.csv").read_text()
    (src / "HAM10000_metadata (1).csv").write_text(metadata)  # an identical re-download is harmless
    assert _ingest(src, tmp_path / "s").manifest["rows"]["in"] == len(rows)
    (src / "HAM10000_metadata (1).csv").write_text("\n".join(metadata.splitlines()[:5]))
    with pytest.raises(SourceError, match=r"side by side hold different tables \(.*metadata.csv and .*metadata \(1\).csv"):
        _ingest(src, tmp_path / "s2")
    assert not (tmp_path / "s2").exists()
    # Dataverse's .tab beside the original CSV is the same table in another format.
    rows = make_rows()
    dataverse = write_dataverse(tmp_path / "dv", rows)
    (dataverse / "HAM10000_metadata.csv").write_text(csv_text(rows))
    assert _ingest(dataverse, tmp_path / "s3").manifest["rows"]["in"] == len(rows)


def test_a_store_with_an_empty_split_is_refused_before_training(tmp_path, capsys):
    src = write_kaggle(tmp_path / "src", make_rows())
    logged = []
    ingest(str(src), str(tmp_path / "s"), IngestOptions(workers=1, fractions=(0.9, 0.1, 0.0)), log=logged.append)
    assert any("the test split(s) hold no image" in line for line in logged)
    assert cli_main(["train", "nn", "--local", "--data", str(tmp_path / "s"), "--storage", str(tmp_path / "runs"),
                     "--profile", "smoke"]) == 2
    assert "the test split(s) hold no image" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--workers", "0"], "--workers must be at least 1"), (["--seed", "-1"], "--seed must be at least 0, got -1"),
])
def test_bad_ingest_options_name_the_option(good_source, tmp_path, capsys, arguments, message):
    assert cli_main(["ingest", str(good_source), str(tmp_path / "s"), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_lesion_with_two_diagnoses_is_named(tmp_path):
    rows = make_rows()
    lesion = rows[1]["lesion_id"]  # the first lesion with two images, both akiec
    assert rows[2]["lesion_id"] == lesion
    rows[2]["dx"] = "mel"
    logged = []
    result = ingest(str(write_kaggle(tmp_path / "src", rows)), str(tmp_path / "s"), IngestOptions(workers=1),
                    log=logged.append)
    assert any(f"1 lesion(s) have images with different dx ({lesion}: akiec, mel)" in line for line in logged)
    assert result.manifest["rows"]["written"] == len(rows)


def test_image_ids_with_a_file_extension_get_a_hint_and_no_promise_of_a_manifest(tmp_path):
    src = write_kaggle(tmp_path / "src", make_rows())
    metadata = src / "HAM10000_metadata.csv"
    metadata.write_text(re.sub(r"(ISIC_\d+)", r"\1.jpg", metadata.read_text()))
    logged = []
    with pytest.raises(IngestError, match="no usable rows; nothing was written"):
        ingest(str(src), str(tmp_path / "s"), IngestOptions(workers=1), log=logged.append)
    text = "\n".join(logged)
    assert f"image_id carries a file extension; {src / 'HAM10000_images_part_1' / 'ISIC_0000001.jpg'} exists" in text
    assert "no manifest is written" in text and "listed in manifest.json" not in text


def test_an_image_id_differing_from_its_file_in_case_gets_a_hint(tmp_path):
    rows = make_rows()
    images = default_images(rows)
    rows[3]["image_id"] = rows[3]["image_id"].lower()
    result = _ingest(write_kaggle(tmp_path / "src", rows, images), tmp_path / "s")
    [entry] = result.quarantine
    assert entry["image_id"] == rows[3]["image_id"]
    assert "image file not found in the source (a file differing only in case exists: " in entry["reason"]
    assert entry["reason"].endswith(f"{rows[3]['image_id'].upper()}.jpg)")


def test_source_without_metadata_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no HAM10000_metadata"):
        _ingest(tmp_path / "empty", tmp_path / "s")


# --------------------------------------------------------------------------- source variants


def _ids_and_lines(result):
    return {q["image_id"]: (q["row"], q["reason"]) for q in result.quarantine}


def test_trailing_separators_blank_lines_and_quoted_newlines_keep_editor_line_numbers(tmp_path):
    rows = make_rows()
    images = default_images(rows)
    rows[4]["dx"] = "melanoma?"
    lines = csv_text(rows).splitlines()
    # Every data line ends with a comma (a spreadsheet's export), two blank
    # lines follow data line 3, and row 2's localization spans two lines.
    lines = [lines[0]] + [line + "," for line in lines[1:]]
    lines[2] = lines[2].replace(rows[1]["localization"], '"lower\nback"')
    lines[3:3] = ["", "   "]
    src = write_kaggle(tmp_path / "src", rows, images)
    (src / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    result = _ingest(src, tmp_path / "s")
    assert result.manifest["rows"]["in"] == len(rows)
    # header, rows 0-1 (row 1 on two lines), two blank lines, rows 2-3: row 4 starts on line 9
    assert _ids_and_lines(result) == {rows[4]["image_id"]: (9, "unknown dx 'melanoma?' (expected one of "
                                                             + ", ".join(CLASS_NAMES) + ")")}
    assert "\n".join(lines).splitlines()[8].startswith(rows[4]["lesion_id"])
    written = _all_rows(open_store(str(tmp_path / "s")))
    localization = {r.image_id: r.localization for df in written.values() for r in df.itertuples()}
    assert localization[rows[1]["image_id"]] == "lower\nback"


def test_a_field_too_many_that_is_not_empty_names_the_line(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    lines = (src / "HAM10000_metadata.csv").read_text().splitlines()
    lines[3] += ",left"  # what an unquoted comma inside the last field leaves
    (src / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"HAM10000_metadata.csv: line 4 has 8 fields, the header has 7"):
        _ingest(src, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_an_unclosed_quote_names_the_line_it_opens_on(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    lines = (src / "HAM10000_metadata.csv").read_text().splitlines()
    lines[5] = lines[5].replace(",histo,", ',"histo,')
    (src / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"HAM10000_metadata.csv: cannot parse as CSV in the row starting on line 6 "
                                          r"\(unexpected end of data\)"):
        _ingest(src, tmp_path / "s")


def test_semicolon_separated_metadata_ingests(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    (src / "HAM10000_metadata.csv").write_text(csv_text(rows, sep=";"))
    assert _ingest(src, tmp_path / "s").manifest["rows"]["written"] == len(rows)


def test_semicolon_separated_metadata_with_decimal_comma_ages_ingests(tmp_path):
    """A spreadsheet's export in many locales: ';' between fields, ',' before decimals."""
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    (src / "HAM10000_metadata.csv").write_text(csv_text([{**r, "age": r["age"].replace(".", ",")} for r in rows], sep=";"))
    result = _ingest(src, tmp_path / "s")
    assert result.manifest["rows"]["written"] == len(rows) and not result.quarantine
    ages = pd.concat(_all_rows(open_store(str(tmp_path / "s"))).values()).set_index("image_id")["age"]
    assert {r["image_id"]: float(r["age"]) for r in rows} == ages.to_dict()


def test_a_metadata_file_with_a_header_and_no_rows_is_an_error(tmp_path, capsys):
    src = write_kaggle(tmp_path / "src", make_rows())
    (src / "HAM10000_metadata.csv").write_text(",".join(HEADER) + "\n\n")
    with pytest.raises(SourceError, match=r"HAM10000_metadata.csv: no data rows after the header; nothing was written"):
        _ingest(src, tmp_path / "s")
    assert cli_main(["ingest", "--workers", "1", str(src), str(tmp_path / "s")]) == 2
    assert "no data rows" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_header_names_repeated_up_to_case_are_an_error(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    text = (src / "HAM10000_metadata.csv").read_text().splitlines()
    text = [text[0] + ",Age"] + [line + ",61" for line in text[1:]]
    (src / "HAM10000_metadata.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(SourceError, match=r"HAM10000_metadata.csv: column\(s\) age appear more than once"):
        _ingest(src, tmp_path / "s")


def test_checksums_and_descriptions_beside_the_metadata_are_not_metadata(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    (src / "HAM10000_metadata.csv.md5").write_text("4326e23c  HAM10000_metadata.csv\n")
    (src / "HAM10000_metadata_description.pdf").write_bytes(b"%PDF-1.4 \xff\xfe")
    result = _ingest(src, tmp_path / "s")
    assert result.manifest["rows"]["written"] == len(rows)
    assert result.manifest["source_checksums"]["metadata"]["path"] == "HAM10000_metadata.csv"


def test_a_usable_row_is_kept_when_an_earlier_row_of_its_image_id_is_quarantined(tmp_path):
    rows = make_rows()
    images = default_images(rows)
    rows.insert(5, dict(rows[5], dx="unknown-thing"))  # line 7 is bad, line 8 repeats its image_id and is fine
    result = _ingest(write_kaggle(tmp_path / "src", rows, images), tmp_path / "s")
    assert [(q["row"], q["reason"][:10]) for q in result.quarantine] == [(7, "unknown dx")]
    assert result.manifest["rows"]["written"] == len(rows) - 1


def test_copies_of_an_image_are_ignored_but_a_different_file_under_its_name_is_an_error(tmp_path):
    rows = make_rows()
    src = write_kaggle(tmp_path / "src", rows)
    # Kaggle's download holds every image twice, byte for byte.
    shutil.copytree(src / "HAM10000_images_part_1", src / "ham10000_images_part_1")
    result = _ingest(src, tmp_path / "s")
    assert result.manifest["rows"]["written"] == len(rows)
    assert len(result.manifest["duplicate_files"]) == len(list((src / "ham10000_images_part_1").iterdir()))
    # A mask under the same name sorts before the real image: it must not replace it.
    masks = src / "HAM10000_images_part_1" / "masks"
    masks.mkdir()
    (masks / f"{rows[1]['image_id']}.png").write_bytes(jpeg_bytes((0, 0, 0), fmt="PNG"))
    with pytest.raises(SourceError, match=rf"1 image file\(s\) share an image_id with a different file, e.g. "
                                          rf".*{rows[1]['image_id']}"):
        _ingest(src, tmp_path / "s2")
    assert not (tmp_path / "s2").exists()


def test_images_in_zips_inside_a_zip_get_a_clear_error(tmp_path):
    rows = make_rows()
    dataverse = write_dataverse(tmp_path / "dv", rows)
    outer = tmp_path / "dataverse_files.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        for path in dataverse.iterdir():
            zf.write(path, path.name)
    with pytest.raises(SourceError, match=r"the images are in zip files inside a zip .*HAM10000_images_part1.zip"):
        _ingest(outer, tmp_path / "s")


def test_sigterm_during_ingest_is_an_interrupt_that_cleans_up(good_source, tmp_path, monkeypatch, capsys):
    import signal

    import skincluster.data.ingest as ingest_mod

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the ingest")

    monkeypatch.setattr(ingest_mod, "ingest", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert cli_main(["ingest", str(good_source), str(tmp_path / "s")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- atomicity


def test_killed_ingest_keeps_the_previous_store(good_source, tmp_path, monkeypatch):
    dest = tmp_path / "s"
    first = _ingest(good_source, dest, seed=0)
    old_files = sorted(p.name for p in dest.rglob("*.parquet"))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr("skincluster.storage.write_json_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        _ingest(good_source, dest, seed=1)
    monkeypatch.undo()

    store = open_store(str(dest))  # still the complete first store
    assert store.manifest["fingerprint"] == first.manifest["fingerprint"]
    for f in store.manifest["files"]:
        assert (dest / f["path"]).exists()
    assert sorted(p.name for p in (dest / "shards" / first.manifest["ingest_id"]).glob("*.parquet")) == old_files

    # The re-run completes and removes the orphaned shard folder of the killed run.
    done = _ingest(good_source, dest, seed=1)
    assert [p.name for p in (dest / "shards").iterdir()] == [done.manifest["ingest_id"]]


def test_half_written_store_is_not_a_store(good_source, tmp_path, monkeypatch):
    dest = tmp_path / "s"
    calls = {"n": 0}
    real = store_mod.write_shards

    def die_after_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("killed mid-write")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "write_shards", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        _ingest(good_source, dest)
    with pytest.raises(StoreError, match="an ingest did not finish"):
        open_store(str(dest))


def test_reingest_repairs_a_truncated_shard(good_source, good_store, tmp_path):
    dest = tmp_path / "s"
    shutil.copytree(good_store[1].path, dest)
    shard = dest / good_store[0].manifest["files"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:1000])  # present, but its footer is gone
    logged = []
    again = ingest(str(good_source), str(dest), IngestOptions(workers=1), log=logged.append)
    assert again.written is True
    assert any("is damaged" in line and shard.name in line for line in logged)
    assert len(_all_rows(open_store(str(dest)))["train"]) == good_store[0].manifest["counts"]["train"]["total"]


def test_ingest_never_replaces_or_deletes_what_it_did_not_write(good_source, tmp_path):
    dest = tmp_path / "mine"
    (dest / "shards" / "mystuff").mkdir(parents=True)
    (dest / "shards" / "mystuff" / "a.txt").write_text("keep")
    (dest / "manifest.json").write_text('{"x": 1}')
    with pytest.raises(IngestError, match="manifest.json is not a skincluster store manifest.*nothing was written"):
        _ingest(good_source, dest)
    (dest / "manifest.json").write_text('{"ingest_id": ')
    with pytest.raises(IngestError, match="manifest.json is not readable JSON.*delete its manifest.json"):
        _ingest(good_source, dest)
    assert not any(dest.rglob("*.parquet"))
    # Without a manifest the folder takes a store beside the user's files, and only
    # shard folders named like an ingest id are ingest's to remove.
    (dest / "manifest.json").unlink()
    (dest / "notes.txt").write_text("keep")
    _ingest(good_source, dest)
    _ingest(good_source, dest, seed=1)
    assert (dest / "shards" / "mystuff" / "a.txt").read_text() == "keep"
    assert (dest / "notes.txt").read_text() == "keep"
    assert len(list((dest / "shards").iterdir())) == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(IngestError, match="file is a file"):
        _ingest(good_source, tmp_path / "file")


def test_a_corrupt_zip_member_is_quarantined_and_the_rest_ingested(tmp_path):
    rows = make_rows()
    images = default_images(rows)
    src = write_dataverse(tmp_path / "dv", rows, images)
    victim = rows[3]["image_id"]
    for archive in src.glob("*.zip"):
        data = archive.read_bytes()
        at = data.find(images[victim])
        if at >= 0:  # stored, not deflated: flip bytes inside the member so its CRC fails
            middle = at + len(images[victim]) // 2
            archive.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 4]) + data[middle + 4:])
    result = _ingest(src, tmp_path / "s")
    (bad,) = result.quarantine
    assert bad["image_id"] == victim and "corrupt zip member" in bad["reason"] and victim in bad["reason"]
    assert result.manifest["rows"]["written"] == len(rows) - 1
    # The summary counts reasons by kind, without each row's details.
    assert _reason_kind(bad["reason"]) == "corrupt zip member"


def test_a_damaged_store_is_an_error_naming_the_manifest_or_shard(good_store, tmp_path):
    def damaged(edit):
        dest = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good_store[1].path, dest)
        edit(dest)
        return str(dest)

    manifest = good_store[0].manifest
    with pytest.raises(StoreError, match=r"manifest.json: not a readable store manifest"):
        open_store(damaged(lambda d: (d / "manifest.json").write_text('{"schema_version": ')))
    with pytest.raises(StoreError, match=r"manifest.json: not a store manifest \(a JSON list"):
        open_store(damaged(lambda d: (d / "manifest.json").write_text("[]")))
    without_counts = {k: v for k, v in manifest.items() if k != "counts"}
    with pytest.raises(StoreError, match=r"manifest.json: the manifest lacks counts"):
        open_store(damaged(lambda d: (d / "manifest.json").write_text(json.dumps(without_counts))))
    shard = manifest["files"][-1]["path"]
    with pytest.raises(StoreError, match=rf"1 shard\(s\) listed in manifest.json are missing or damaged \(.*{shard}\)"):
        open_store(damaged(lambda d: (d / shard).unlink()))

    def truncate(d):
        data = (d / shard).read_bytes()
        (d / shard).write_bytes(data[: len(data) // 2])

    with pytest.raises(StoreError, match=rf"1 shard\(s\) listed in manifest.json are missing or damaged \(.*{shard}\)"):
        open_store(damaged(truncate))


def _edited(manifest: dict, edit) -> dict:
    manifest = json.loads(json.dumps(manifest))
    edit(manifest)
    return manifest


#: Hand edits of a manifest that would otherwise train on what it claims.
MANIFEST_EDITS = {
    "a split's total": (lambda m: m["counts"]["test"].update(total=1), r"counts of test do not match its shards'"),
    "a class count": (lambda m: m["counts"]["train"].update(mel=m["counts"]["train"]["mel"] + 1),
                      r"counts of train do not match"),
    "a split's counts removed": (lambda m: m["counts"].pop("val"), r"counts of val do not match"),
    "two class names swapped": (lambda m: m["classes"].reverse(), r"classes \['vasc', .*expected \['akiec'"),
    "a zero standard deviation": (lambda m: m["stats"]["std"].__setitem__(0, 0), r"stats are not 3 finite"),
    "a missing mean": (lambda m: m["stats"]["mean"].pop(), r"stats are not 3 finite"),
    "a file's rows removed": (lambda m: m["files"][0].pop("rows"), r"files is not a list of \{path, split"),
    "a split named otherwise": (lambda m: m["files"][0].update(split="training"), r"files is not a list of"),
}


@pytest.mark.parametrize("edit, message", MANIFEST_EDITS.values(), ids=MANIFEST_EDITS.keys())
def test_a_hand_edited_manifest_is_named_and_ingest_repairs_it(good_source, good_store, tmp_path, edit, message):
    dest = tmp_path / "s"
    shutil.copytree(good_store[1].path, dest)
    (dest / "manifest.json").write_text(json.dumps(_edited(good_store[0].manifest, edit)))
    with pytest.raises(StoreError, match=rf"manifest.json: .*{message}.*; ingest the data again"):
        open_store(str(dest))
    # The same ingest command writes the store again, rather than calling it up to date.
    assert _ingest(good_source, dest).written
    assert open_store(str(dest)).manifest["counts"] == good_store[0].manifest["counts"]


def test_a_shard_listed_under_another_split_is_damaged(good_store):
    """Shards' footers say which split their rows are in: a manifest that swaps two is caught
    without reading any image."""
    _, store = good_store
    assert damaged_shards(store.fs, store.path, store.manifest) == []
    first_test = next(i for i, f in enumerate(store.manifest["files"]) if f["split"] == "test")
    swapped = _edited(store.manifest, lambda m: m["files"][first_test].update(split="train"))
    assert damaged_shards(store.fs, store.path, swapped) == [store.manifest["files"][first_test]["path"]]


def test_manifest_is_plain_json(good_store):
    _, store = good_store
    text = (Path(store.path) / "manifest.json").read_text()
    assert json.loads(text)["quarantine"] == []


def test_a_duplicate_row_with_another_diagnosis_says_they_differ():
    from skincluster.data.ham10000 import check_rows

    def row(line, image_id, dx, lesion_id="HAM_0000001"):
        return {"row": line, "lesion_id": lesion_id, "image_id": image_id, "dx": dx, "dx_type": "histo",
                "age": "45.0", "sex": "male", "localization": "back"}

    frame = pd.DataFrame([row(2, "ISIC_0000001", "bkl"), row(3, "ISIC_0000002", "nv"),
                          row(4, "ISIC_0000001", "mel"), row(5, "ISIC_0000002", "nv")])
    checked = check_rows(frame)
    assert list(checked.rows["dx"]) == ["bkl", "nv"]  # the first rows are kept
    reasons = {q["row"]: q["reason"] for q in checked.quarantine}
    assert reasons[4] == ("duplicate image_id ISIC_0000001 (first seen at row 2, which is kept; "
                          "this row has dx 'mel' there 'bkl')")
    assert reasons[5] == "duplicate image_id ISIC_0000002 (first seen at row 3)"  # the same row again
