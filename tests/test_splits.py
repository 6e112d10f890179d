"""Lesion-grouped, class-stratified, deterministic splits."""

import numpy as np
import pandas as pd
import pytest

from skincluster.data.splits import SPLITS, assign_splits

REAL_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


def _rows(seed=0):
    """A HAM10000-sized table: lesions with 1-6 images, the real class counts."""
    rng = np.random.default_rng(seed)
    records, lesion = [], 0
    for dx, count in REAL_COUNTS.items():
        left = count
        while left:
            lesion += 1
            k = min(left, int(rng.choice([1, 1, 1, 2, 2, 3, 4, 6])))
            records += [{"lesion_id": f"L{lesion}", "dx": dx} for _ in range(k)]
            left -= k
    frame = pd.DataFrame(records)
    frame["image_id"] = [f"I{i}" for i in range(len(frame))]
    return frame


def test_lesions_never_cross_splits():
    rows = _rows()
    rows["split"] = assign_splits(rows)
    assert (rows.groupby("lesion_id")["split"].nunique() == 1).all()


def test_fractions_and_stratification():
    rows = _rows()
    rows["split"] = assign_splits(rows)
    share = rows["split"].value_counts(normalize=True)
    np.testing.assert_allclose([share[s] for s in SPLITS], [0.675, 0.075, 0.25], atol=0.01)
    for dx, group in rows.groupby("dx"):
        per_class = group["split"].value_counts(normalize=True)
        assert set(per_class.index) == set(SPLITS), dx
        np.testing.assert_allclose([per_class[s] for s in SPLITS], [0.675, 0.075, 0.25], atol=0.06, err_msg=dx)


def test_deterministic_for_a_seed_and_independent_of_row_order():
    rows = _rows()
    a = assign_splits(rows, seed=3)
    shuffled = rows.sample(frac=1.0, random_state=1)
    b = assign_splits(shuffled, seed=3).reindex(rows.index)
    pd.testing.assert_series_equal(a, b)
    assert not a.equals(assign_splits(rows, seed=4))


def test_image_split_puts_one_lesion_on_both_sides():
    rows = _rows()
    rows["split"] = assign_splits(rows, by="image")
    assert (rows.groupby("lesion_id")["split"].nunique() > 1).any()


def test_rare_class_reaches_every_split():
    rows = pd.DataFrame({"lesion_id": [f"L{i}" for i in range(3)], "image_id": ["a", "b", "c"], "dx": ["df"] * 3})
    assert set(assign_splits(rows)) == set(SPLITS)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_rejected(fractions):
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(_rows(), fractions=fractions)
