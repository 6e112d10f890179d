"""Train/val/test assignment: grouped by lesion, stratified by class, deterministic.

HAM10000 has 10,015 images of 7,470 lesions; many lesions were photographed
two to six times. Splitting by image (as the study did) puts views of the same
lesion on both sides, and the test score then partly measures memory. Here
every lesion goes wholly to one split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
#: The study's fractions: test 25 %, then 10 % of the rest for validation.
DEFAULT_FRACTIONS = (0.675, 0.075, 0.25)


def _check_fractions(fractions: tuple[float, ...]) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (len(SPLITS),) or (f < 0).any() or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    return f


def _assign_groups(sizes: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Give each group (in the given order) to the split furthest below its target.

    When a class has at least one group per split, each split first gets one
    (smallest splits first), so a rare class like dermatofibroma is present in
    validation and test, not only in training.
    """
    total = sizes.sum()
    target = fractions * total
    filled = np.zeros(len(fractions))
    out = np.empty(len(sizes), dtype=np.int8)
    start = 0
    active = np.flatnonzero(fractions > 0)
    if len(sizes) >= len(active):
        for i, split in enumerate(sorted(active, key=lambda s: fractions[s])):
            out[i] = split
            filled[split] += sizes[i]
        start = len(active)
    for i in range(start, len(sizes)):
        split = int(np.argmax(np.where(fractions > 0, target - filled, -np.inf)))
        out[i] = split
        filled[split] += sizes[i]
    return out


def assign_splits(
    rows: pd.DataFrame,
    *,
    by: str = "lesion",
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> pd.Series:
    """Return the split name of every row of `rows` (needs lesion_id, image_id, dx).

    ``by="lesion"`` keeps each lesion in one split, stratified by the lesion's
    diagnosis; ``by="image"`` reproduces the study's leaky per-image split.
    The same rows and seed always give the same assignment.
    """
    if by not in ("lesion", "image"):
        raise ValueError(f"unknown split {by!r}: expected 'lesion' or 'image'")
    f = _check_fractions(fractions)
    group_key = "lesion_id" if by == "lesion" else "image_id"
    groups = rows.groupby(group_key, sort=True).agg(dx=("dx", "first"), size=("dx", "size"))
    rng = np.random.default_rng(seed)
    split_of_group = pd.Series(index=groups.index, dtype=object)
    for dx in sorted(groups["dx"].unique()):
        members = groups[groups["dx"] == dx]
        order = rng.permutation(len(members))
        chosen = _assign_groups(members["size"].to_numpy()[order], f)
        split_of_group[members.index[order]] = np.asarray(SPLITS, dtype=object)[chosen]
    return rows[group_key].map(split_of_group).rename("split")
