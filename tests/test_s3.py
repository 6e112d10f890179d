"""Cloud storage: ingest, local training and a Ray comparison on s3:// paths.

Everything runs against moto's S3 server on loopback (the `s3_server` fixture),
reached the way a user reaches MinIO or any S3-compatible store: the AWS SDK's
environment (AWS_ENDPOINT_URL, a credentials file), never a real cloud.
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skincluster import storage
from skincluster.cli import main
from skincluster.data.store import StoreError, images_from_column, open_store


def storage_selector(path):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)


@pytest.fixture(scope="module")
def s3_module_env(s3_server):
    """This module's process pointed at the loopback server, as a user's shell would be."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def s3_store(synthetic_store, s3_module_env):
    """`skincluster ingest` of the demo source straight into a bucket."""
    bucket = s3_module_env.new_bucket("store")
    source = str(Path(synthetic_store).parent / "source")
    assert main(["ingest", source, f"s3://{bucket}/store"]) == 0
    return f"s3://{bucket}/store"


def test_ingest_to_s3_matches_the_local_store(s3_store, synthetic_store):
    remote, local = open_store(s3_store), open_store(synthetic_store)
    assert remote.fs.type_name == "s3"
    assert remote.manifest["counts"] == local.manifest["counts"]
    assert remote.manifest["fingerprint"] == local.manifest["fingerprint"]
    assert remote.channel_mean == local.channel_mean
    for split in ("train", "test"):
        a, b = remote.read_split(split), local.read_split(split)
        assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
        assert np.array_equal(images_from_column(a.column("image")), images_from_column(b.column("image")))


def test_ingest_again_to_s3_writes_nothing(s3_store, synthetic_store, capsys):
    fs, path = storage.resolve(s3_store)
    before = fs.get_file_info(f"{path}/manifest.json").mtime
    assert main(["ingest", str(Path(synthetic_store).parent / "source"), s3_store]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert fs.get_file_info(f"{path}/manifest.json").mtime == before


def test_store_without_manifest_on_s3_is_refused_with_its_path(s3_store, s3_module_env):
    """What an ingest killed before its commit point leaves: shards, no manifest."""
    fs, path = storage.resolve(s3_store)
    half = f"s3://{s3_module_env.new_bucket('half')}/store"
    half_fs, half_path = storage.resolve(half)
    half_fs.create_dir(f"{half_path}/shards/abc")
    shard = next(f for f in fs.get_file_info(storage_selector(f"{path}/shards")) if f.path.endswith(".parquet"))
    fs.copy_file(shard.path, f"{half_path}/shards/abc/train-00000.parquet")
    with pytest.raises(StoreError, match=rf"{half}: not a skincluster store.*an ingest did not finish"):
        open_store(half)


def test_missing_bucket_error_names_the_path(s3_module_env, tmp_path):
    missing = "s3://no-such-bucket-skincluster/store"
    with pytest.raises(StoreError, match="no-such-bucket-skincluster/store"):
        open_store(missing)


def test_killed_upload_leaves_no_object_under_the_final_name(s3_module_env, tmp_path):
    """storage.write_bytes_atomic on S3: a writer killed mid-upload leaves nothing readable.

    The upload goes to a temporary key as a multipart upload, which S3 shows
    only once completed; the final key appears through a server-side copy.
    """
    import boto3

    bucket = s3_module_env.new_bucket("kill")
    code = textwrap.dedent(f"""
        import os
        from skincluster import storage
        fs, path = storage.resolve("s3://{bucket}/run/model.keras")
        storage.write_bytes_atomic(fs, path, os.urandom(300 * 1024 * 1024))
        print("finished", flush=True)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    client = boto3.client("s3", endpoint_url=s3_module_env.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        deadline = time.time() + 120
        while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert writer.poll() is None, "the writer ended before any upload was in progress"
            assert time.time() < deadline, "no multipart upload started"
            time.sleep(0.02)
        os.killpg(writer.pid, signal.SIGKILL)
    finally:
        writer.wait()
    assert writer.stdout.read() == "", "the write completed before the kill: the test proved nothing"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [k for k in keys if not k.endswith("/")] == []  # "run/" is create_dir's folder marker
    fs, path = storage.resolve(f"s3://{bucket}/run/model.keras")
    assert not storage.exists(fs, path)


def test_local_training_reads_and_writes_s3(s3_store, s3_module_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = f"s3://{s3_module_env.new_bucket('runs')}/runs"
    assert main(["train", "nn", "--data", s3_store, "--storage", runs, "--name", "nn-s3", "--local",
                 "--profile", "smoke"]) == 0
    fs, path = storage.resolve(f"{runs}/nn-s3")
    evaluation = storage.read_json(fs, f"{path}/evaluation.json")
    assert evaluation["model"] == "nn" and 0 <= evaluation["balanced_accuracy"] <= 1
    assert storage.read_json(fs, f"{path}/config.json")["data"]["store"] == s3_store
    assert fs.get_file_info(f"{path}/model.keras").size > 100_000
    assert os.listdir(tmp_path) == []  # nothing landed in the working folder instead
    leftovers = [f.path for f in fs.get_file_info(storage_selector(path)) if ".tmp" in f.path]
    assert leftovers == []
    # The local checkpoint folder of a run to a URI is gone once the run is in the bucket
    # (left behind, a later run of the same name to another bucket resumed from it).
    import glob
    import tempfile

    assert glob.glob(os.path.join(tempfile.gettempdir(), "skincluster-local", "nn-s3*")) == []


def test_local_run_to_s3_resumes_on_a_new_node(s3_store, s3_module_env, tmp_path):
    """A --local run to a bucket keeps its checkpoints on the node but mirrors
    them to the bucket: killed at epoch 3 and restarted where the node's
    folder is gone (another node), it resumes from epoch 2's checkpoint."""
    import glob
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    name = s3_module_env.new_bucket("resume")  # unique: the node folder is found by its name
    runs = f"s3://{name}/runs"
    marker = tmp_path / "fail-once.marker"
    script = textwrap.dedent(
        f"""
        import dataclasses
        from skincluster.train.launch import resolve_run, run_local
        run = resolve_run("nn", {s3_store!r}, storage_dir={runs!r}, name={name!r}, profile="smoke",
                          overrides={{"epochs": 4}})
        run_local(dataclasses.replace(run, fail_at_epoch=3, fail_marker={str(marker)!r}), verbose=0)
        """
    )
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert first.returncode == 17, first.stderr[-2000:]
    fs, path = storage.resolve(f"{runs}/{name}")
    mirrored = fs.get_file_info(storage_selector(f"{path}/checkpoints"))
    folders = {posixpath.basename(posixpath.dirname(f.path)) for f in mirrored if f.type == pafs.FileType.File}
    assert sorted(folders) == ["epoch_0001", "epoch_0002"]
    before = storage.read_json(fs, f"{path}/checkpoints/epoch_0002/state.json")["history"]
    node_folders = glob.glob(os.path.join(tempfile.gettempdir(), "skincluster-local", f"{name}-*"))
    assert len(node_folders) == 1
    shutil.rmtree(node_folders[0])  # the node is gone, and its /tmp with it

    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"fetched checkpoint {runs}/{name}/checkpoints/epoch_0002" in second.stderr
    history = storage.read_json(fs, f"{path}/history.json")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == before  # epochs 1-2 as first trained (their timings too): not redone


def test_a_node_fetches_only_newer_complete_checkpoints_from_the_mirror(s3_store, s3_module_env, tmp_path):
    """An old node whose folder holds epoch 2 and a torn epoch 3, after the run
    went on elsewhere to epoch 3 (and was cut off uploading epoch 4), resumes
    from the mirror's epoch 3; its next checkpoint prunes the mirror to the two
    newest although the node never had the mirror's older ones."""
    import pyarrow.fs as pafs

    from skincluster.train.context import LocalContext

    mirror = f"s3://{s3_module_env.new_bucket('mirror')}/run"
    fs, path = storage.resolve(mirror)
    for epoch, files in ((1, ("weights", "state.json")), (3, ("weights", "state.json")), (4, ("weights",))):
        for name in files:
            body = json.dumps({"epoch": epoch}) if name == "state.json" else f"weights of epoch {epoch}"
            storage.write_bytes_atomic(fs, f"{path}/checkpoints/epoch_{epoch:04d}/{name}", body.encode())
    node = tmp_path / "node" / "checkpoints"
    for epoch, state in ((2, json.dumps({"epoch": 2})), (3, "")):
        (node / f"epoch_{epoch:04d}").mkdir(parents=True)
        (node / f"epoch_{epoch:04d}" / "state.json").write_text(state)
    ctx = LocalContext(str(tmp_path / "node"), open_store(s3_store), limit=8, seed=0, mirror=mirror)
    assert sorted(os.listdir(node)) == ["epoch_0002", "epoch_0003"]
    with ctx.latest_checkpoint() as newest:
        assert open(os.path.join(newest, "weights")).read() == "weights of epoch 3"

    (tmp_path / "epoch4").mkdir()
    (tmp_path / "epoch4" / "state.json").write_text(json.dumps({"epoch": 4}))
    ctx.report({"epoch": 4}, str(tmp_path / "epoch4"))
    assert sorted(os.listdir(node)) == ["epoch_0003", "epoch_0004"]
    folders = fs.get_file_info(pafs.FileSelector(f"{path}/checkpoints"))
    assert sorted(f.base_name for f in folders) == ["epoch_0003", "epoch_0004"]
    assert storage.read_json(fs, f"{path}/checkpoints/epoch_0004/state.json") == {"epoch": 4}
    assert not storage.exists(fs, f"{path}/checkpoints/epoch_0004/weights")  # the cut-off upload's leftover


@pytest.mark.ray
def test_ray_comparison_writes_its_experiment_to_s3(s3_store, s3_module_env, ray_session, tmp_path):
    """A driver joins the running Ray runtime (RAY_ADDRESS); its S3 endpoint reaches the trials.

    The runtime may have been started before this module pointed the
    environment at the loopback server: the trials and Train workers then see
    the endpoint only because the driver forwards it (storage.worker_env).
    """
    experiments = f"s3://{s3_module_env.new_bucket('exp')}/experiments"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "skincluster", "compare", "--data", s3_store, "--storage", experiments,
         "--name", "s3", "--models", "nn", "--profile", "smoke"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fs, path = storage.resolve(f"{experiments}/s3")
    table = pd.read_csv(fs.open_input_stream(f"{path}/results.csv"))
    assert list(table["model"]) == ["nn"] and table.loc[0, "status"] == "finished"
    for name in ("report.md", "best/model.keras", "runs/nn/evaluation.json", "curves/all_val.png"):
        assert storage.exists(fs, f"{path}/{name}"), name
    # Ray Train's own checkpoints and Tune's experiment state went to the bucket too.
    names = [f.path for f in fs.get_file_info(storage_selector(path))]
    assert any("/runs/nn/checkpoint_epoch_" in n for n in names)
    assert any(n.startswith(f"{path}/tune/") for n in names)
    assert json.loads(fs.open_input_stream(f"{path}/runs/nn/evaluation.json").read())["epochs_run"] >= 1
    assert os.listdir(tmp_path) == []


def test_workers_get_the_s3_settings_but_never_the_keys(monkeypatch):
    """What a driver hands its Ray workers (runtime_env, visible in the dashboard)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session")
    env = storage.worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
