"""The input pipeline: what reaches training, in what order."""

from __future__ import annotations

import numpy as np
import pytest

from skincluster.data import pipeline
from skincluster.data.store import open_store


def _label_changes(labels: np.ndarray) -> int:
    return int(np.count_nonzero(labels[1:] != labels[:-1]))


def test_stored_train_split_is_grouped_by_class(synthetic_store):
    """The premise of the test below: a store keeps its source's row order, sorted by dx."""
    _, labels = pipeline.read_arrays(open_store(synthetic_store), "train")
    assert _label_changes(labels) <= 2 * len(np.unique(labels))


@pytest.mark.ray
def test_ray_train_split_is_shuffled_globally_and_per_epoch(synthetic_store, ray_session):
    store = open_store(synthetic_store)
    images, labels = pipeline.read_arrays(store, "train")
    train = pipeline.ray_datasets(store, ("train",), None, seed=0)["train"]

    # The materialized order itself (no shuffle buffer) must already be mixed: a class
    # sorted stream with only a local buffer trained the model one class at a time.
    batches = list(pipeline.ray_batches(train, 32, shuffle_seed=None))
    got_images = np.concatenate([b[0] for b in batches])
    got_labels = np.concatenate([b[1] for b in batches])
    assert sorted(got_labels.tolist()) == sorted(labels.tolist())
    p = np.bincount(labels) / len(labels)
    expected_changes = (len(labels) - 1) * (1 - np.sum(p**2))
    assert _label_changes(got_labels) > 0.6 * expected_changes
    # Images travel with their labels: every delivered image is the stored image of that label.
    stored = {img.tobytes(): lab for img, lab in zip(images, labels)}
    assert all(stored[img.tobytes()] == lab for img, lab in zip(got_images, got_labels))

    # The same seed gives the same dataset; epochs (shuffle seeds) give different orders.
    again = pipeline.ray_datasets(store, ("train",), None, seed=0)["train"]
    assert np.array_equal(np.concatenate([b[1] for b in pipeline.ray_batches(again, 32)]), got_labels)
    epoch1 = np.concatenate([b[1] for b in pipeline.ray_batches(train, 32, shuffle_seed=1)])
    epoch2 = np.concatenate([b[1] for b in pipeline.ray_batches(train, 32, shuffle_seed=2)])
    assert not np.array_equal(epoch1, epoch2)
