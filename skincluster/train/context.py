"""Where the worker gets its data and sends its reports: Ray Train, or this process.

The worker loop (`worker.run_worker`) only talks to a `RunContext`, which is
what lets the very same loop run under Ray Train and in local debug mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pyarrow.fs as pafs

from skincluster import storage
from skincluster.data import pipeline
from skincluster.data.store import Store

#: In the final checkpoint of a run: the model to keep and its evaluation.
FINAL_MODEL = "model.keras"
FINAL_EVALUATION = "evaluation.json"

#: A local run's checkpoint folder, under its run folder.
CHECKPOINTS = "checkpoints"
#: The worker's record of a checkpoint (epoch, history, callback state, the run's settings).
STATE_FILE = "state.json"

Batches = Iterator[tuple[np.ndarray, np.ndarray]]


class RunContext(Protocol):
    world_rank: int
    world_size: int
    #: Where the checkpoint latest_checkpoint() yielded is kept, for messages
    #: (the folder it yields may be a temporary copy of it).
    checkpoint_name: str | None

    def batches(self, split: str, batch_size: int, *, shuffle_seed: int | None, drop_last: bool) -> Batches: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...


class RayContext:
    """Inside a Ray Train worker: dataset shards, ray.train.report, ray.train.get_checkpoint."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.checkpoint_name: str | None = None

    def batches(self, split: str, batch_size: int, *, shuffle_seed: int | None, drop_last: bool) -> Batches:
        shard = self._train.get_dataset_shard(split)
        return pipeline.ray_batches(shard, batch_size, shuffle_seed=shuffle_seed, drop_last=drop_last)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
        else:
            fs = checkpoint.filesystem
            scheme = "" if fs is None or fs.type_name == "local" else f"{fs.type_name}://"
            self.checkpoint_name = f"{scheme}{checkpoint.path}"
            with checkpoint.as_directory() as path:
                yield path

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        epoch = metrics.get("epoch", 0)
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}" if checkpoint else None)


class LocalContext:
    """This process, no Ray: the store read with pyarrow, checkpoints in the run folder.

    Checkpoints are copied to ``<run>/checkpoints/epoch_NNNN`` through a
    temporary name, and the two newest are kept, as the Ray run does. A run
    whose folder is a URI trains in a local `run_dir` and names its URI as
    `mirror`: every checkpoint is also uploaded to ``<mirror>/checkpoints/``,
    ``state.json`` last, and the mirror's checkpoints newer than `run_dir`'s
    are fetched first (a new node after the old one was lost, or an old node
    after the run went on elsewhere).
    """

    world_rank = 0
    world_size = 1
    keep_checkpoints = 2
    checkpoint_name: str | None = None

    def __init__(self, run_dir: str, store: Store, limit: int | None, seed: int, mirror: str | None = None) -> None:
        self.run_dir = run_dir
        self.checkpoints = os.path.join(run_dir, CHECKPOINTS)
        os.makedirs(self.checkpoints, exist_ok=True)
        self.mirror = storage.join(mirror, CHECKPOINTS) if mirror else None
        if self.mirror:
            self._download_mirror()
        self._arrays = {s: pipeline.read_arrays(store, s, limit, seed) for s in ("train", "val")}
        self.reports: list[dict[str, Any]] = []

    def batches(self, split: str, batch_size: int, *, shuffle_seed: int | None, drop_last: bool) -> Batches:
        images, labels = self._arrays[split]
        return pipeline.array_batches(images, labels, batch_size, shuffle_seed=shuffle_seed, drop_last=drop_last)

    def _checkpoint_dirs(self) -> list[str]:
        return local_checkpoint_dirs(self.run_dir)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        """The newest checkpoint whose state is readable.

        Checkpoints are made durable before they are renamed into place, but a
        disk can still lose a file; the one before (two are kept) is then the
        place to resume from.
        """
        dirs = self._checkpoint_dirs()
        for path in reversed(dirs):
            problem = checkpoint_problem(path)
            if problem is None:
                self.checkpoint_name = path
                yield path
                return
            print(f"skincluster: not resuming from {path}: {problem}", file=sys.stderr, flush=True)
        if dirs:
            where = f"{self.checkpoints} or {self.mirror}" if self.mirror else self.checkpoints
            raise RuntimeError(f"no checkpoint in {where} can be resumed (see above); "
                               "move the checkpoints away to start the run afresh")
        yield None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if checkpoint_dir:
            final = self._install(f"epoch_{metrics['epoch']:04d}", lambda tmp: shutil.copytree(checkpoint_dir, tmp))
            if self.mirror:
                self._upload(final)
            dirs = self._checkpoint_dirs()
            for old in dirs[: -self.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            if self.mirror:
                self._prune_mirror(oldest_kept=checkpoint_epoch(os.path.basename(dirs[-self.keep_checkpoints :][0])))

    def _install(self, name: str, fill: Callable[[str], Any]) -> str:
        """Build checkpoint `name` in a ``.tmp`` folder with `fill`, make its files
        durable, then rename it into place: after a crash or power loss a
        checkpoint folder is either absent or complete."""
        final = os.path.join(self.checkpoints, name)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fill(tmp)
        for folder, _, files in os.walk(tmp):
            for file in files:
                _fsync(os.path.join(folder, file))
            _fsync(folder)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(self.checkpoints)
        return final

    def _upload(self, checkpoint: str) -> None:
        """Copy a checkpoint folder to the mirror; state.json, which marks it complete, goes last."""
        fs, path = storage.resolve(storage.join(self.mirror, os.path.basename(checkpoint)))
        fs.create_dir(path, recursive=True)
        # What an upload cut short left is cleared, its state.json first: clearing
        # is not atomic on an object store, and a folder with a state.json is complete.
        if storage.exists(fs, f"{path}/{STATE_FILE}"):
            fs.delete_file(f"{path}/{STATE_FILE}")
        fs.delete_dir_contents(path)
        for name in sorted(os.listdir(checkpoint), key=lambda n: n == STATE_FILE):
            with open(os.path.join(checkpoint, name), "rb") as fh:
                storage.write_bytes_atomic(fs, f"{path}/{name}", fh.read())

    def _prune_mirror(self, oldest_kept: int) -> None:
        """Delete the mirror's checkpoints older than this node's oldest kept one
        (by listing the mirror: it may hold ones this node never had)."""
        fs, path = storage.resolve(self.mirror)
        for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            epoch = checkpoint_epoch(entry.base_name)
            if entry.type == pafs.FileType.Directory and epoch is not None and epoch < oldest_kept:
                fs.delete_dir(entry.path)

    def _download_mirror(self) -> None:
        """Fetch the mirror's complete checkpoints (those with a state.json) that
        are newer than this node's newest readable one: the run may have gone on
        elsewhere, or this node's copy may be damaged."""
        readable = [checkpoint_epoch(os.path.basename(d)) for d in self._checkpoint_dirs() if not checkpoint_problem(d)]
        fs, path = storage.resolve(self.mirror)
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        folders = [e.base_name for e in entries
                   if e.type == pafs.FileType.Directory and checkpoint_epoch(e.base_name) is not None]
        for folder in sorted(folders, key=checkpoint_epoch):
            if readable and checkpoint_epoch(folder) <= readable[-1]:
                continue
            if not storage.exists(fs, f"{path}/{folder}/{STATE_FILE}"):
                continue

            def fetch(tmp: str, folder: str = folder) -> None:
                os.makedirs(tmp)
                for entry in fs.get_file_info(pafs.FileSelector(f"{path}/{folder}")):
                    if entry.type == pafs.FileType.File and not storage.is_temporary(entry.base_name):
                        with open(os.path.join(tmp, entry.base_name), "wb") as fh:
                            fh.write(storage.read_bytes(fs, entry.path))

            self._install(folder, fetch)
            print(f"skincluster: fetched checkpoint {storage.join(self.mirror, folder)}", file=sys.stderr, flush=True)


#: fsync errors that mean "not supported here" (folders on some FUSE, SMB or
#: Windows mounts), not "not written": durability is then the filesystem's.
_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP)


def _fsync(path: str) -> None:
    """Flush a file or folder to disk, where the filesystem can."""
    folder = os.path.isdir(path)
    try:
        # Windows flushes only handles opened for writing, and opens no folders.
        fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR)
    except PermissionError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def local_checkpoint_dirs(run_dir: str) -> list[str]:
    """A local run's finished checkpoints, oldest first (not the ``.tmp`` copy of one being written)."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    names = sorted((n for n in os.listdir(folder) if checkpoint_epoch(n) is not None), key=checkpoint_epoch)
    return [os.path.join(folder, n) for n in names]


def checkpoint_epoch(name: str) -> int | None:
    """The epoch of a local checkpoint folder named ``epoch_NNNN``, else None
    (a ``.tmp`` copy, anything else). Compared as numbers: epoch_10000 comes
    after epoch_9999."""
    match = re.fullmatch(r"epoch_(\d+)", name)
    return int(match.group(1)) if match else None


def read_checkpoint_state(path: str) -> dict[str, Any]:
    """The state of the checkpoint folder `path`; a ValueError says why it cannot be resumed from."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{STATE_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{STATE_FILE} is unreadable ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise ValueError(f"{STATE_FILE} holds no epoch")
    return state


def checkpoint_problem(path: str) -> str | None:
    """Why the worker could not resume from the checkpoint folder `path`, or None."""
    try:
        read_checkpoint_state(path)
    except ValueError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="skincluster-ckpt-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
