"""Ingest of the real HAM10000 (200x150 copy in ../shared/data); skipped when it is absent."""

import numpy as np
import pytest

from conftest import REAL_DATA
from skincluster.data.ingest import IngestOptions, ingest
from skincluster.data.store import images_from_column, open_store

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real HAM10000 not found at {REAL_DATA}"),
]

REAL_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    dest = tmp_path_factory.mktemp("real") / "store"
    ingest(str(REAL_DATA), str(dest), IngestOptions(), log=lambda *_: None)
    return open_store(str(dest))


def test_every_row_accounted_for(real_store):
    m = real_store.manifest
    assert m["rows"] == {"in": 10015, "written": 10015, "quarantined": 0, "dropped_by_cleaning": 0}
    assert m["orphans"] == []
    assert m["source_checksums"]["metadata"]["md5"] == "70bb67f71bd23dde0bd2eda4bdcc98e5"


def test_class_counts(real_store):
    counts = real_store.manifest["counts"]
    for dx, n in REAL_COUNTS.items():
        assert sum(counts[s][dx] for s in ("train", "val", "test")) == n


def test_no_lesion_crosses_splits(real_store):
    lesions = {s: set(real_store.read_split(s, ["lesion_id"]).column(0).to_pylist()) for s in ("train", "val", "test")}
    assert sum(len(v) for v in lesions.values()) == 7470
    assert not (lesions["train"] & lesions["val"] or lesions["train"] & lesions["test"] or lesions["val"] & lesions["test"])


def test_stats_from_train_only(real_store):
    train = images_from_column(real_store.read_split("train", ["image"]).column("image"))
    assert len(train) == real_store.count("train")
    mean = np.zeros(3)
    for chunk in np.array_split(train, 8):  # float64 in pieces: the whole split is 250 MB of uint8
        mean += chunk.reshape(-1, 3).sum(axis=0, dtype=np.float64)
    np.testing.assert_allclose(real_store.channel_mean, mean / (len(train) * 100 * 125), rtol=1e-9)
    assert real_store.manifest["stats"]["images"] == real_store.count("train")
