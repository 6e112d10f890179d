"""The synthetic HAM10000-shaped demo set: layout, metadata, images, determinism,
learnability, lesion leakage and safe (re)writing."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skincluster.config import CLASS_NAMES
from skincluster.data import synthetic
from skincluster.data.synthetic import (
    CLASS_COUNTS,
    CLASS_PROPORTIONS,
    DEMO_MARKER,
    IMAGE_DIRS,
    LESION_KINDS,
    LOCALIZATIONS,
    METADATA_COLUMNS,
    METADATA_FILE,
    MIN_LESIONS_PER_CLASS,
    DemoSummary,
    allocate_images,
    demo_metadata,
    render_lesion,
    write_demo_dataset,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-200x150"
REAL_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"
SMALL = (200, 150)


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / METADATA_FILE, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def image_files(root: Path) -> dict[str, Path]:
    """image_id -> file, over both part folders (fails on a duplicate id)."""
    files: dict[str, Path] = {}
    for name in IMAGE_DIRS:
        for f in sorted((root / name).iterdir()):
            assert f.suffix == ".jpg", f"unexpected file {f}"
            assert f.stem not in files, f"{f.stem} is in both image folders"
            files[f.stem] = f
    return files


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != DEMO_MARKER
    }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, DemoSummary]:
    root = tmp_path_factory.mktemp("demo300")
    summary = write_demo_dataset(root, n_images=300, image_size=SMALL, seed=0)
    return root, summary


# --------------------------------------------------------------------------- metadata


def test_header_and_value_formats(small_set):
    root, _ = small_set
    header = (root / METADATA_FILE).read_text(encoding="utf-8").splitlines()[0]
    assert header == REAL_HEADER == ",".join(METADATA_COLUMNS)
    rows = read_rows(root)
    assert len(rows) == 300
    dx_types = {t for w in synthetic.DX_TYPE_WEIGHTS.values() for t in w}
    assert dx_types == {"histo", "follow_up", "consensus", "confocal"}
    for row in rows:
        assert re.fullmatch(r"HAM_\d{7}", row["lesion_id"]), row
        assert re.fullmatch(r"ISIC_\d{7}", row["image_id"]), row
        assert row["dx"] in CLASS_NAMES
        assert row["dx_type"] in synthetic.DX_TYPE_WEIGHTS[row["dx"]]
        assert row["age"] == "" or re.fullmatch(r"\d{1,2}\.0", row["age"]), row
        if row["age"]:
            assert float(row["age"]) % 5 == 0 and 0 <= float(row["age"]) <= 85
        assert row["sex"] in {"male", "female", "unknown", ""}
        assert row["localization"] in LOCALIZATIONS
    assert len({r["image_id"] for r in rows}) == len(rows)
    # A lesion is one patient's lesion: one diagnosis and the same metadata on every image.
    per_lesion: dict[str, set] = {}
    for row in rows:
        per_lesion.setdefault(row["lesion_id"], set()).add(
            (row["dx"], row["dx_type"], row["age"], row["sex"], row["localization"])
        )
    assert all(len(v) == 1 for v in per_lesion.values())
    # Rows are grouped by lesion, as in the release.
    seen, previous = set(), None
    for row in rows:
        if row["lesion_id"] != previous:
            assert row["lesion_id"] not in seen, "a lesion's rows are not contiguous"
            seen.add(row["lesion_id"])
            previous = row["lesion_id"]


def test_missing_and_odd_values_like_the_release():
    rows = demo_metadata(2000, seed=0)
    ages = Counter(r["age"] for r in rows)
    sexes = Counter(r["sex"] for r in rows)
    assert ages[""] >= 1 and ages["0.0"] >= 1
    assert sexes[""] >= 1 and sexes["male"] > sexes["female"] > sexes["unknown"] >= 0
    assert ages[""] + ages["0.0"] < 0.05 * len(rows)
    assert "unknown" in {r["localization"] for r in rows}


@pytest.mark.realdata
def test_vocabulary_matches_the_real_metadata():
    meta = REAL_DATA / METADATA_FILE
    if not meta.exists():
        pytest.skip(f"real HAM10000 metadata not found at {meta}")
    real = read_rows(REAL_DATA)
    assert meta.read_text(encoding="utf-8").splitlines()[0] == REAL_HEADER
    ours = demo_metadata(2000, seed=0)
    for column in ("dx", "dx_type", "sex", "localization"):
        real_values = {r[column] for r in real} | ({""} if column == "sex" else set())
        assert {r[column] for r in ours} <= real_values, column
    assert set(LOCALIZATIONS) == {r["localization"] for r in real}
    assert Counter(r["dx"] for r in real) == CLASS_COUNTS
    # Synthetic ids never collide with real ones.
    assert not {r["image_id"] for r in ours} & {r["image_id"] for r in real}
    assert not {r["lesion_id"] for r in ours} & {r["lesion_id"] for r in real}


def test_class_proportions_match_the_release():
    rows = demo_metadata(2000, seed=0)
    counts = Counter(r["dx"] for r in rows)
    assert sum(counts.values()) == 2000
    for dx in CLASS_NAMES:
        expected = 2000 * CLASS_PROPORTIONS[dx]
        assert abs(counts[dx] - expected) <= max(2, 0.02 * expected), (dx, counts[dx], expected)
    assert counts.most_common(1)[0][0] == "nv"
    assert allocate_images(10015) == CLASS_COUNTS
    assert abs(sum(CLASS_PROPORTIONS.values()) - 1) < 1e-12


@pytest.mark.parametrize("n", [42, 100, 300, 700, 2000])
def test_every_class_has_enough_lesions(n):
    rows = demo_metadata(n, seed=3)
    assert len(rows) == n
    lesions = {(r["dx"], r["lesion_id"]) for r in rows}
    per_class = Counter(dx for dx, _ in lesions)
    assert set(per_class) == set(CLASS_NAMES)
    assert min(per_class.values()) >= MIN_LESIONS_PER_CLASS, per_class


def test_too_few_or_too_small_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 42"):
        demo_metadata(41)
    with pytest.raises(ValueError, match="at least 42"):
        write_demo_dataset(tmp_path / "x", n_images=10)
    with pytest.raises(ValueError, match="16x16"):
        write_demo_dataset(tmp_path / "x", n_images=100, image_size=(8, 6))
    assert not (tmp_path / "x").exists()


def test_several_images_per_lesion():
    rows = demo_metadata(2000, seed=0)
    sizes = Counter(r["lesion_id"] for r in rows)
    multi = sum(1 for k in sizes.values() if k > 1) / len(sizes)
    assert 0.2 <= multi <= 0.6, multi  # most lesions one image, many 2-6 (release: 26 %)
    assert max(sizes.values()) <= 6
    assert Counter(sizes.values())[1] > Counter(sizes.values())[2] > Counter(sizes.values())[4]


# --------------------------------------------------------------------------- files


def test_every_row_has_exactly_one_image_and_vice_versa(small_set):
    root, summary = small_set
    rows = read_rows(root)
    files = image_files(root)
    assert set(files) == {r["image_id"] for r in rows}
    part_1 = [f for f in files.values() if f.parent.name == IMAGE_DIRS[0]]
    assert len(part_1) == 150  # lower half of the ids, like the release's 5,000 / 5,015
    assert max(f.stem for f in part_1) < min(f.stem for f in files.values() if f.parent.name == IMAGE_DIRS[1])
    assert sorted(p.name for p in root.iterdir()) == sorted([DEMO_MARKER, METADATA_FILE, *IMAGE_DIRS])
    assert summary.n_images == 300
    assert summary.counts == dict(Counter(r["dx"] for r in rows))
    assert list(summary.counts) == list(CLASS_NAMES)
    assert summary.n_lesions == len({r["lesion_id"] for r in rows}) == sum(summary.lesions.values())


def test_images_decode_as_rgb_of_the_requested_size(small_set):
    root, _ = small_set
    for f in list(image_files(root).values())[::15]:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == SMALL


def test_default_size_is_600x450():
    im = render_lesion("mel", seed=0)
    assert im.mode == "RGB" and im.size == (600, 450)


def test_deterministic_for_a_seed(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_images=60, image_size=SMALL, seed=7)
    b = write_demo_dataset(tmp_path / "b", n_images=60, image_size=SMALL, seed=7)
    c = write_demo_dataset(tmp_path / "c", n_images=60, image_size=SMALL, seed=8)
    da, db, dc = (tree_digest(s.path) for s in (a, b, c))
    assert da == db
    assert (tmp_path / "a" / METADATA_FILE).read_bytes() != (tmp_path / "c" / METADATA_FILE).read_bytes()
    assert set(da.values()).isdisjoint(dc.values())


def test_views_of_a_lesion_share_the_lesion_not_the_pixels():
    a = np.asarray(render_lesion("nv", seed=1, lesion=4, view=0, image_size=SMALL), np.float32)
    b = np.asarray(render_lesion("nv", seed=1, lesion=4, view=1, image_size=SMALL), np.float32)
    other = np.asarray(render_lesion("nv", seed=1, lesion=5, view=0, image_size=SMALL), np.float32)
    assert np.abs(a - b).mean() > 1.0  # another photo, not a copy
    hist = lambda x: np.histogramdd(x.reshape(-1, 3), bins=4, range=[(0, 256)] * 3)[0].ravel() / x.size  # noqa: E731
    assert np.abs(hist(a) - hist(b)).sum() < np.abs(hist(a) - hist(other)).sum()


def test_class_table_covers_every_class_once():
    assert list(LESION_KINDS) == list(CLASS_NAMES)
    for attribute in ("shape", "colour", "texture"):
        values = [getattr(k, attribute) for k in LESION_KINDS.values()]
        assert len(set(values)) == len(values), attribute


# --------------------------------------------------------------------------- learnability


def _colour_features(root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    """sqrt of a 4x4x4 colour histogram of the whole image and of its centre, at 125x100."""
    files = image_files(root)
    feats = []
    for row in rows:
        with Image.open(files[row["image_id"]]) as im:
            x = np.asarray(im.convert("RGB").resize((125, 100)))
        code = (x[..., 0] // 64) * 16 + (x[..., 1] // 64) * 4 + x[..., 2] // 64
        whole = np.bincount(code.ravel(), minlength=64) / code.size
        centre = np.bincount(code[25:75, 31:94].ravel(), minlength=64) / (50 * 63)
        feats.append(np.sqrt(np.concatenate([whole, centre])))
    return np.asarray(feats)


@pytest.fixture(scope="module")
def learn_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo800")
    write_demo_dataset(root, n_images=800, image_size=SMALL, seed=1)
    rows = read_rows(root)
    return (
        _colour_features(root, rows),
        np.array([r["dx"] for r in rows]),
        np.array([r["lesion_id"] for r in rows]),
    )


def test_classes_are_learnable_on_a_lesion_grouped_split(learn_set):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features, labels, lesions = learn_set
    train, test = next(StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=0).split(features, labels, lesions))
    assert not set(lesions[train]) & set(lesions[test])
    assert set(labels[test]) == set(CLASS_NAMES)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, class_weight="balanced", C=0.5))
    with threadpool_limits(1):  # BLAS threads thrash on a busy 2-core box
        model.fit(features[train], labels[train])
        predicted = model.predict(features[test])
    balanced = balanced_accuracy_score(labels[test], predicted)
    # Always answering "nv" scores 1/7 = 0.14 balanced accuracy.
    assert balanced > 0.45, balanced


def test_siblings_are_each_others_nearest_neighbours(learn_set):
    """Images of one lesion look alike, so an image-level split leaks."""
    features, _, lesions = learn_set
    z = (features - features.mean(0)) / (features.std(0) + 1e-6)
    sq = (z * z).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * z @ z.T
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(1)
    sizes = Counter(lesions)
    has_sibling = np.array([sizes[g] > 1 for g in lesions])
    rate = (lesions[nearest] == lesions)[has_sibling].mean()
    assert rate > 0.4, rate  # by chance it would be ~0.001


# --------------------------------------------------------------------------- (re)writing


def test_refuses_to_overwrite_unless_asked(tmp_path):
    first = write_demo_dataset(tmp_path, n_images=60, image_size=(64, 48), seed=0)
    before = tree_digest(tmp_path)
    # The same arguments again (the README's command run twice): nothing to do.
    again = write_demo_dataset(tmp_path, n_images=60, image_size=(64, 48), seed=0)
    assert (again.written, again.n_images, again.counts) == (False, 60, first.counts) and first.written
    assert tree_digest(tmp_path) == before
    with pytest.raises(FileExistsError, match=r"use --overwrite \(overwrite=True\)"):
        write_demo_dataset(tmp_path, n_images=42, image_size=(64, 48), seed=1)
    assert tree_digest(tmp_path) == before
    second = write_demo_dataset(tmp_path, n_images=42, image_size=(64, 48), seed=1, overwrite=True)
    assert (first.n_images, second.n_images) == (60, 42)
    assert set(image_files(tmp_path)) == {r["image_id"] for r in read_rows(tmp_path)}
    assert len(image_files(tmp_path)) == 42


def test_refuses_to_delete_images_it_did_not_write(tmp_path):
    (tmp_path / IMAGE_DIRS[0]).mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / IMAGE_DIRS[0] / "ISIC_0024306.jpg")
    with pytest.raises(FileExistsError, match="not from an interrupted demo run"):
        write_demo_dataset(tmp_path, n_images=42, image_size=(64, 48))
    assert (tmp_path / IMAGE_DIRS[0] / "ISIC_0024306.jpg").exists()


def test_an_interrupted_run_never_looks_complete(tmp_path):
    class Stop(Exception):
        pass

    def stop_halfway(done, total):
        if done == total // 2:
            raise Stop

    with pytest.raises(Stop):
        write_demo_dataset(tmp_path, n_images=60, image_size=(64, 48), progress=stop_halfway)
    assert not (tmp_path / METADATA_FILE).exists()
    assert len(image_files(tmp_path)) == 30
    # Running again (no overwrite needed: nothing complete was there) cleans up.
    write_demo_dataset(tmp_path, n_images=42, image_size=(64, 48))
    assert set(image_files(tmp_path)) == {r["image_id"] for r in read_rows(tmp_path)}
    assert not list(tmp_path.glob("*.tmp"))
