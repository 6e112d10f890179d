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


class _BlockShard:
    """A stand-in for a Ray Train shard: `iter_batches(batch_size=None)` yields its blocks."""

    def __init__(self, labels: np.ndarray, block_rows: list[int]):
        import pyarrow as pa

        from skincluster.data.store import image_column

        assert sum(block_rows) == len(labels)
        # Each image carries its own row number in its first two bytes, so tests can
        # check that pixels travel with their labels.
        images = np.zeros((len(labels), 100, 125, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(len(labels)) % 256
        images[:, 0, 0, 1] = np.arange(len(labels)) // 256
        self.blocks = [
            pa.table({"image": image_column(images[start:start + rows]), "label": pa.array(labels[start:start + rows])})
            for start, rows in zip(np.cumsum([0] + block_rows[:-1]), block_rows)
        ]

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches, **kwargs):
        assert batch_size is None and batch_format == "pyarrow" and not kwargs
        yield from self.blocks


def _row_ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


@pytest.mark.parametrize("rows, batch_size, block_rows", [
    (3000, 64, [3000]),
    (3000, 64, [700, 700, 700, 900]),
    (3000, 64, [1] * 40 + [2960]),
    (3000, 64, [2999, 1]),
    (3000, 64, [0, 1500, 0, 1500, 0]),  # empty blocks
    (3008, 64, [1000, 1000, 1008]),  # a whole number of batches
    (3000, 400, [500] * 6),  # 4 batches are more than SHUFFLE_WINDOW_IMAGES
])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ray_batches_shuffle_windows_deliver_every_row_once(rows, batch_size, block_rows, drop_last):
    labels = (np.arange(rows) * 7 // rows).astype(np.int8)  # sorted by class, like a store
    shard = _BlockShard(labels, block_rows)
    batches = list(pipeline.ray_batches(shard, batch_size, shuffle_seed=3, drop_last=drop_last))
    full, rest = divmod(rows, batch_size)
    assert [len(b[1]) for b in batches] == [batch_size] * full + ([rest] if rest and not drop_last else [])
    delivered = np.concatenate([_row_ids(b[0]) for b in batches])
    assert len(np.unique(delivered)) == len(delivered) == (full * batch_size if drop_last else rows)
    # Pixels travel with their labels.
    assert all(np.array_equal(labels[_row_ids(i)], l) for i, l in batches)
    # Blocks smaller than a window are shuffled together, not one by one.
    window = max(pipeline.SHUFFLE_WINDOW_IMAGES, 4 * batch_size)
    block_of_row = np.repeat(np.arange(len(block_rows)), block_rows)
    first_blocks = [r for r in block_rows if r][:2]
    if max(first_blocks) < window <= sum(first_blocks):
        assert len(np.unique(block_of_row[_row_ids(batches[0][0])])) > 1
    # Seeded: the same seed repeats the order, another seed changes it.
    def order(seed):
        return np.concatenate([_row_ids(b[0]) for b in pipeline.ray_batches(shard, batch_size, shuffle_seed=seed,
                                                                             drop_last=drop_last)])
    assert np.array_equal(delivered, order(3)) and not np.array_equal(delivered, order(4))


def test_mixup_blends_each_image_and_its_weighted_target_with_one_partner():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4], np.int32)
    images = rng.integers(0, 256, size=(len(labels), 4, 5, 3), dtype=np.uint8)
    class_weights = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], np.float32)
    batches = [(images[:7], labels[:7]), (images[7:], labels[7:])]
    mixed = list(pipeline.mixup_batches(iter(batches), 1.0, 7, np.random.default_rng(5), class_weights))
    assert len(mixed) == 2
    blended = 0
    for (source, source_labels), (out, targets) in zip(batches, mixed):
        assert out.dtype == np.uint8 and out.shape == source.shape
        assert targets.dtype == np.float32 and targets.shape == (len(source_labels), 7)
        for i, label in enumerate(source_labels):
            # A batch's labels are distinct here, so the target names the partner.
            lam = targets[i, label] / class_weights[label]
            rest = targets[i].copy()
            rest[label] = 0
            assert np.count_nonzero(rest > 1e-6) <= 1
            j = int(np.flatnonzero(source_labels == np.argmax(rest))[0]) if rest.max() > 1e-6 else i
            expected = lam * source[i].astype(float) + (1 - lam) * source[j]
            assert np.abs(expected - out[i]).max() <= 0.5 + 1e-3
            # Each image's share of the target carries its own class's weight.
            if j != i:
                assert rest[source_labels[j]] == pytest.approx((1 - lam) * class_weights[source_labels[j]], rel=1e-5)
            blended += j != i and 0.05 < lam < 0.95
    # lam ~ Beta(1, 1), uniform, and random partners: most images are real blends.
    assert blended >= 6
    # Seeded: the same generator state repeats the batches.
    again = list(pipeline.mixup_batches(iter(batches), 1.0, 7, np.random.default_rng(5), class_weights))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(mixed, again))


def test_mixup_without_class_weights_blends_rows_summing_to_one_and_checks_its_arguments():
    rng = np.random.default_rng(1)
    batch = (rng.integers(0, 256, size=(8, 2, 2, 3), dtype=np.uint8), rng.integers(0, 3, size=8).astype(np.int32))
    _, targets = next(pipeline.mixup_batches(iter([batch]), 0.2, 3, np.random.default_rng(0)))
    assert np.allclose(targets.sum(axis=1), 1)
    for alpha in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            next(pipeline.mixup_batches(iter([batch]), alpha, 3, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="one weight per class"):
        next(pipeline.mixup_batches(iter([batch]), 0.2, 3, np.random.default_rng(0), np.ones(2)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        next(pipeline.mixup_batches(iter([batch]), 0.2, 1, np.random.default_rng(0)))
