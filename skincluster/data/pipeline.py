"""From the store to batches of uint8 images and integer labels.

Two sources feed the same worker code:

* the local reader (debug mode, evaluation): pyarrow reads the split's shards
  straight into one numpy array (one copy, no per-row Python);
* Ray Data: the driver builds a dataset per split (`ray_datasets`), Ray Train
  hands each worker its shard, and `ray_batches` turns Arrow batches into
  numpy with a zero-copy view of the image buffer.

Images stay uint8 all the way to the device: scaling happens inside the model,
which also quarters the bytes moved per image.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa

from skincluster.data.store import Store, images_from_column, labels_from_column

TRAINING_COLUMNS = ["image", "label"]


def split_limit(store: Store, split: str, limit: int | None) -> int | None:
    """Rows of `split` to use when training on `limit` images.

    Validation and test shrink in proportion, so a smoke run stays small end to
    end while every split keeps its share.
    """
    if limit is None:
        return None
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    if split == "train":
        return min(limit, store.count("train"))
    share = store.count(split) / max(store.count("train"), 1)
    return min(store.count(split), max(1, math.ceil(limit * share)))


def read_table(store: Store, split: str, limit: int | None = None, seed: int = 0,
               columns: list[str] | None = None) -> pa.Table:
    """One split (or a seeded random subset of `limit` rows of it) as an Arrow table."""
    table = store.read_split(split, columns)
    n = split_limit(store, split, limit)
    if n is not None and n < table.num_rows:
        rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
        table = table.take(np.sort(rng.choice(table.num_rows, size=n, replace=False)))
    return table


def read_arrays(store: Store, split: str, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 100, 125, 3), labels int32 (n,)) of a split."""
    table = read_table(store, split, limit, seed, TRAINING_COLUMNS).combine_chunks()
    return images_from_column(table.column("image")), labels_from_column(table.column("label"))


def array_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches from in-memory arrays, in a fresh seeded order when `shuffle_seed` is set."""
    order = np.random.default_rng(shuffle_seed).permutation(len(labels)) if shuffle_seed is not None else None
    n_batches = len(labels) // batch_size if drop_last else math.ceil(len(labels) / batch_size)
    for b in range(n_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        if order is None:
            yield images[sl], labels[sl]
        else:
            idx = np.sort(order[sl])  # sorted gathers are kinder to the cache
            yield images[idx], labels[idx]


def ray_datasets(store: Store, splits: tuple[str, ...], limit: int | None, seed: int, materialize: bool = True):
    """Ray Datasets of image+label per split, read once into the object store.

    Re-reading Parquet every epoch measured ~1,700 images/s here; a
    materialized dataset serves later epochs from memory at 68k-97k images/s.
    HAM10000 at 125x100 is ~375 MB, well within a node's object store.
    Read tasks ask for a quarter CPU so that data never waits behind training
    workers that hold whole CPUs.

    The train split is shuffled once, globally and seeded, before it is
    materialized: a store keeps its source's row order, and HAM10000's
    metadata is sorted by diagnosis, so a stream with only a local shuffle
    buffer fed MobileNet one class after another and every epoch ended on
    nevi (validation balanced accuracy 0.25 where the same run in the
    array path reached 0.60). `ray_batches` then varies the order from
    epoch to epoch.
    """
    import ray.data

    out = {}
    for split in splits:
        if limit is None:
            ds = ray.data.read_parquet(
                store.split_uris(split),
                columns=TRAINING_COLUMNS,
                filesystem=None if _is_local(store) else store.fs,
                ray_remote_args={"num_cpus": 0.25},
            )
        else:
            ds = ray.data.from_arrow(read_table(store, split, limit, seed, TRAINING_COLUMNS))
        if split == "train":
            ds = ds.random_shuffle(seed=seed)
        out[split] = ds.materialize() if materialize else ds
    return out


def _is_local(store: Store) -> bool:
    return store.fs.type_name == "local"


def mixup_batches(
    batches: Iterator[tuple[np.ndarray, np.ndarray]],
    alpha: float,
    num_classes: int,
    rng: np.random.Generator,
    class_weights: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mixup (Zhang et al., 2018) on training batches of (images, labels).

    Each image is blended with a random partner from its batch,
    lam * image + (1 - lam) * partner with lam ~ Beta(alpha, alpha) drawn per
    image, and its target row is the same blend of the two one-hot rows.
    Yields (images, targets): images stay uint8 (rounded; the error is at most
    half a grey level, far below the pixel noise), targets are float32
    (batch, num_classes). With `class_weights` each one-hot row is scaled by
    its class's weight before blending, so the loss is
    lam * w_a * CE(a) + (1 - lam) * w_b * CE(b): each image's part carries its
    own class's weight, as fit(class_weight=...) gives an unblended image
    (one weight per blended image would let a rare class's weight spill onto
    the common image's part). Such rows sum to lam * w_a + (1 - lam) * w_b,
    not 1. `rng` makes the draws repeatable: the worker seeds it per epoch and
    worker, so a resumed run blends the same pairs.
    """
    if not 0 < alpha < math.inf:
        raise ValueError(f"mixup alpha must be positive and finite, got {alpha}")
    if num_classes < 2:
        raise ValueError(f"mixup needs at least 2 classes, got {num_classes}")
    per_class = np.ones(num_classes, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
    if per_class.shape != (num_classes,):
        raise ValueError(f"class_weights needs one weight per class ({num_classes}), got shape {per_class.shape}")
    weighted_rows = np.diag(per_class)
    for images, labels in batches:
        lam = rng.beta(alpha, alpha, size=len(labels)).astype(np.float32)
        partner = rng.permutation(len(labels))
        pixel_lam = lam.reshape((-1,) + (1,) * (images.ndim - 1))
        mixed = pixel_lam * images + (1 - pixel_lam) * images[partner]
        targets = lam[:, None] * weighted_rows[labels] + (1 - lam[:, None]) * weighted_rows[labels[partner]]
        yield np.rint(mixed).astype(np.uint8), targets


#: Fewest images each Ray Train worker shuffles together per epoch (see ray_batches).
SHUFFLE_WINDOW_IMAGES = 1024


def ray_batches(
    shard,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Numpy batches from a Ray Train dataset shard (`ray.train.get_dataset_shard`).

    With `shuffle_seed`, the per-epoch shuffle on top of ray_datasets' one
    global shuffle (a global shuffle every epoch would move all data): Ray
    hands over whole blocks, which are gathered into windows of at least
    max(`SHUFFLE_WINDOW_IMAGES`, 4 batches) images, and each window is
    permuted with numpy; the partial batch at its end is carried into the
    next. A window holds at most one block more than that (HAM10000's blocks
    are about 1,000 images, 38 MB) and is never copied as a whole: each batch
    gathers its rows from the blocks' zero-copy views. Ray's own
    `local_shuffle_buffer_size` does the same job row by row through Arrow
    and capped the Ray Data path at 0.47 of a raw Parquet read
    (BENCHMARKS.md). The rows of a worker's last window, which may be
    smaller than the others, come at the end of every epoch, shuffled among
    themselves; after the global shuffle they are a random sample like any.
    """
    if shuffle_seed is None:
        for batch in shard.iter_batches(
            batch_size=batch_size, batch_format="pyarrow", prefetch_batches=4, drop_last=drop_last
        ):
            yield images_from_column(batch.column("image")), labels_from_column(batch.column("label"))
        return
    rng = np.random.default_rng(shuffle_seed)
    window = max(SHUFFLE_WINDOW_IMAGES, 4 * batch_size)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_rows = 0
    for block in shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        if block.num_rows == 0:
            continue
        pending.append((images_from_column(block.column("image")), labels_from_column(block.column("label"))))
        pending_rows += block.num_rows
        if pending_rows >= window:
            carry = yield from _shuffled_batches(pending, batch_size, rng)
            pending, pending_rows = [carry], len(carry[1])
    if pending_rows:
        carry = yield from _shuffled_batches(pending, batch_size, rng)
        if len(carry[1]) and not drop_last:
            yield carry


def _shuffled_batches(chunks: list[tuple[np.ndarray, np.ndarray]], batch_size: int, rng: np.random.Generator):
    """Yield the full batches of `chunks` (images, labels) in a random order; return the rows left over."""
    starts = np.cumsum([0] + [len(labels) for _, labels in chunks])
    order = rng.permutation(starts[-1])
    full = len(order) - len(order) % batch_size
    for first in range(0, full, batch_size):
        yield _gather(chunks, starts, order[first:first + batch_size])
    return _gather(chunks, starts, order[full:])


def _gather(chunks, starts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (window positions) of `chunks` as one (images, labels) copy. The rows are
    gathered in sorted order, which is kinder to the cache; the order inside a batch
    does not matter to a gradient step."""
    rows = np.sort(rows)
    cuts = np.searchsorted(rows, starts)
    pieces = [(images[rows[a:b] - start], labels[rows[a:b] - start])
              for (images, labels), start, a, b in zip(chunks, starts, cuts[:-1], cuts[1:]) if b > a]
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        images, labels = chunks[0]
        return images[:0].copy(), labels[:0].copy()
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])
