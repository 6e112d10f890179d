"""Local paths and remote URIs (s3://, gs://, ...) behind one pyarrow filesystem API.

Everything that reads or writes a store or an experiment goes through here, so
a path can always be swapped for a bucket. Which S3 endpoint, region and
credentials a ``s3://`` URI means comes from the AWS SDK's usual settings
(``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for MinIO or a test server,
``AWS_REGION``, an instance profile or a credentials file), not from the URI:
paths are joined under a store or experiment root, and a ``?endpoint_override=``
query on the root would end up in the middle of every joined path.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs


#: S3 settings that the driver hands to every Ray worker it starts (see `worker_env`).
#: Deliberately no secrets: a job's runtime_env is shown in the Ray dashboard, so keys
#: travel as a credentials *file* path or come from each node's own instance profile.
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
)


def worker_env() -> dict[str, str]:
    """The S3 settings of this process, for Ray workers (runtime_env env_vars).

    A Ray job's workers inherit the environment of the raylet on their node,
    not the driver's: without this, a driver pointed at an S3-compatible
    endpoint would start Tune trials and Train workers that look for the
    bucket on AWS.
    """
    return {k: os.environ[k] for k in S3_ENV_VARS if k in os.environ}


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        if path.startswith("file://"):
            return pafs.LocalFileSystem(), os.path.abspath(path[len("file://"):])
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def absolute(path: str) -> str:
    """A local path made absolute (Ray processes run in other folders); URIs unchanged."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(base: str, *parts: str) -> str:
    """Join path parts the way the base's filesystem expects (URIs use '/')."""
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


#: What write_bytes_atomic puts between a file's name and a random suffix while writing it.
TEMPORARY_MARK = ".tmp-"
#: Temporary files and folders older than this are left from a process killed
#: outright (kill -9, a lost node); a live writer's are younger.
STALE_AFTER_SECONDS = 3600


def is_temporary(name: str) -> bool:
    """Whether a file name is write_bytes_atomic's name for a file still being written."""
    return TEMPORARY_MARK in name


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: readers see all or nothing.

    On object stores the rename is a copy, but the final key still appears
    only once its content is complete.
    """
    parent = posixpath.dirname(path) if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    return json.loads(read_bytes(fs, path))


def read_json_checked(fs: pafs.FileSystem, path: str, shown: str, hint: str, kind: type = dict) -> Any:
    """A JSON file holding a `kind` (an object by default); a ValueError naming
    `shown` (its URI) and ending in `hint` (what to do) when it is not valid
    JSON or holds something else."""
    try:
        data = read_json(fs, path)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{shown}: unreadable ({exc}); {hint}") from exc
    if not isinstance(data, kind):
        expected = "a JSON object" if kind is dict else f"a JSON {kind.__name__}"
        raise ValueError(f"{shown}: expected {expected}, found {type(data).__name__}; {hint}")
    return data


def check_local_output(path: str, inputs: list[str], option: str) -> None:
    """Refuse, before any work, a local output file that would replace one of
    the command's inputs (a model, an image), is a folder, or has no folder."""
    real = os.path.realpath(path)
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(real)):
        raise ValueError(f"{option} {path}: folder {os.path.dirname(os.path.abspath(path))} does not exist")
    for item in inputs:
        if os.path.realpath(item) == real:
            raise ValueError(f"{option} {path}: is one of the inputs ({item}); nothing was written")


def write_local_atomic(path: str, data: bytes) -> None:
    """Replace a local file whole: a run killed mid-write leaves the previous file."""
    fs, local = resolve(os.path.abspath(path))
    write_bytes_atomic(fs, local, data)


def remove_stale_temporaries(fs: pafs.FileSystem, folder: str) -> None:
    """Remove what write_bytes_atomic left in `folder` when its process was killed outright."""
    import time

    if not exists(fs, folder):
        return
    for info in fs.get_file_info(pafs.FileSelector(folder)):
        if (info.type == pafs.FileType.File and is_temporary(info.base_name) and info.mtime is not None
                and time.time() - info.mtime.timestamp() > STALE_AFTER_SECONDS):
            fs.delete_file(info.path)
