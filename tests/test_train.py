"""Training runs: local debug mode, a two-worker Ray Train run, kill-and-resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from skincluster.config import Scaling
from skincluster.train.launch import _write_config, resolve_run, run_local, run_ray

EPOCH_KEYS = {"loss", "accuracy", "balanced_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy", "epoch"}


def _run(store, tmp_path, name, **kw):
    return resolve_run("cnn", store, storage_dir=str(tmp_path), name=name, profile="smoke", **kw)


@pytest.fixture(scope="module")
def local_result(synthetic_store, tmp_path_factory):
    run = _run(synthetic_store, tmp_path_factory.mktemp("local"), "local", overrides={"epochs": 3})
    return run_local(run, verbose=0)


def test_local_run_writes_model_evaluation_and_config(local_result):
    run_dir = local_result.run_dir
    for name in ("model.keras", "evaluation.json", "history.json", "config.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    evaluation = json.load(open(os.path.join(run_dir, "evaluation.json")))
    assert 0.0 <= evaluation["balanced_accuracy"] <= 1.0
    assert "melanoma_recall" in evaluation and "val" in evaluation
    assert [h["epoch"] for h in local_result.history] == [1, 2, 3]
    assert EPOCH_KEYS <= set(local_result.history[0])
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["recipe"]["epochs"] == 3 and config["profile"] == "smoke"


def test_same_command_again_reuses_the_finished_run(local_result):
    again = run_local(local_result.run, verbose=0)
    assert again.reused and again.evaluation == local_result.evaluation


def test_a_finished_run_with_other_settings_is_not_reused(local_result):
    changed = dataclasses.replace(local_result.run, recipe=dataclasses.replace(local_result.run.recipe, epochs=4))
    with pytest.raises(ValueError, match=r"finished run with other settings \(recipe.epochs 3 -> 4\)"):
        run_local(changed, verbose=0)
    # Hardware is not a result setting: the finished run is returned as it is.
    more_cpus = dataclasses.replace(local_result.run, scaling=Scaling(cpus_per_worker=2))
    assert run_local(more_cpus, verbose=0).reused



def test_a_damaged_finished_run_is_named(local_result, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(local_result.run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    run = dataclasses.replace(local_result.run, storage=str(tmp_path), name="copy")
    (copy / "evaluation.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"copy/evaluation.json: expected a JSON object, found list"):
        run_local(run, verbose=0)
    (copy / "history.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"copy/history.json: unreadable"):
        run_local(run, verbose=0)


def test_an_unfinished_run_is_resumed_only_with_its_own_settings(synthetic_store, tmp_path):
    """Its checkpoints would otherwise be resumed under a config.json that claims other settings."""
    run = _run(synthetic_store, tmp_path, "unfinished", overrides={"epochs": 3})
    _write_config(run, resumes=False)
    os.makedirs(tmp_path / "unfinished" / "checkpoints" / "epoch_0001")  # what a killed run leaves
    other = _run(synthetic_store, tmp_path, "unfinished", overrides={"epochs": 3, "ema_decay": 0.99})
    with pytest.raises(ValueError, match=r"holds a run with other settings \(recipe.ema_decay None -> 0.99\) and checkpoints"):
        run_local(other, verbose=0)
    _write_config(dataclasses.replace(run, scaling=Scaling(cpus_per_worker=0.5)), resumes=True)  # hardware may change
    config = tmp_path / "unfinished" / "config.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match=r"unfinished/config.json: unreadable"):
        run_local(run, verbose=0)
    config.write_text("[]")
    with pytest.raises(ValueError, match=r"unfinished/config.json: expected a JSON object, found list"):
        run_local(run, verbose=0)
    config.write_text('{"model": "nn"}')
    with pytest.raises(ValueError, match=r"unfinished/config.json: not a run's config.json"):
        run_local(run, verbose=0)
    # Without checkpoints (a run that failed before its first epoch ended) a corrected command starts afresh.
    os.rmdir(tmp_path / "unfinished" / "checkpoints" / "epoch_0001")
    _write_config(other, resumes=False)
    assert json.loads(config.read_text())["recipe"]["ema_decay"] == 0.99


def test_a_half_copied_checkpoint_is_not_one(synthetic_store, tmp_path):
    """A run killed while copying its first checkpoint leaves only ``epoch_0001.tmp``:
    nothing would be resumed, so a corrected command starts afresh."""
    run = _run(synthetic_store, tmp_path, "half", overrides={"epochs": 1})
    _write_config(run, resumes=False)
    os.makedirs(tmp_path / "half" / "checkpoints" / "epoch_0001.tmp")
    corrected = _run(synthetic_store, tmp_path, "half", overrides={"epochs": 1, "learning_rate": 0.01})
    result = run_local(corrected, verbose=0)
    assert [h["epoch"] for h in result.history] == [1]
    assert json.loads((tmp_path / "half" / "config.json").read_text())["recipe"]["learning_rate"] == 0.01


def test_checkpoints_of_the_other_mode_guard_the_settings_too(synthetic_store, tmp_path, local_result):
    """A Ray run's checkpoints in the folder: a --local run with other settings
    must not replace config.json, or the Ray run resumed later would mix them."""
    run = _run(synthetic_store, tmp_path, "mixed", overrides={"epochs": 3})
    _write_config(run, resumes=False)
    os.makedirs(tmp_path / "mixed" / "checkpoint_epoch_0001")  # what a killed Ray Train run leaves
    other = _run(synthetic_store, tmp_path, "mixed", overrides={"epochs": 3, "learning_rate": 0.01})
    with pytest.raises(ValueError, match=r"holds a run with other settings \(recipe.learning_rate .* -> 0.01\)"):
        run_local(other, verbose=0)
    assert json.loads((tmp_path / "mixed" / "config.json").read_text())["recipe"]["epochs"] == 3


def test_the_worker_refuses_a_checkpoint_of_other_settings(local_result, tmp_path):
    """The last guard, whatever config.json says: state.json records the run that wrote it."""
    from skincluster.data.store import open_store
    from skincluster.train.context import LocalContext
    from skincluster.train.worker import run_worker

    shutil.copytree(os.path.join(local_result.run_dir, "checkpoints"), tmp_path / "checkpoints")
    run = local_result.run
    other = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, batch_size=8))
    ctx = LocalContext(str(tmp_path), open_store(run.data.store), run.data.limit, run.data.seed)
    with pytest.raises(RuntimeError, match=r"epoch_0003 was written by a run with other settings "
                                           r"\(recipe.batch_size 16 -> 8\)"):
        run_worker(other, ctx, verbose=0)


def test_the_final_evaluation_refuses_a_store_ingested_again_during_the_run(local_result, tmp_path):
    """Rank 0 evaluates the final model on the store as the run's start found it,
    or not at all (the driver evaluated on a checked store before workers did)."""
    from skincluster.data.store import StoreError, open_store
    from skincluster.train.context import LocalContext
    from skincluster.train.worker import run_worker

    run = local_result.run
    # As if the store had been ingested again after the run's start checked it.
    moved = dataclasses.replace(run, data=dataclasses.replace(run.data, fingerprint="the store the run began on"))
    ctx = LocalContext(str(tmp_path), open_store(run.data.store), run.data.limit, run.data.seed)
    with pytest.raises(StoreError, match=r"has changed since run 'local' was set up from it \(fingerprint differs\)"):
        run_worker(moved, ctx, verbose=0)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if (p / "evaluation.json").exists()]


def test_a_store_ingested_again_since_the_run_was_set_up_is_refused(synthetic_store, tmp_path):
    """A comparison resolves its trials at the start; a re-ingest with other
    splits, or other test images under the same splits, before a later trial
    starts would give it another test set."""
    from PIL import Image

    from skincluster.data.ingest import IngestOptions, ingest
    from skincluster.data.store import StoreError, open_store

    source, store = tmp_path / "source", str(tmp_path / "store")
    shutil.copytree(os.path.join(os.path.dirname(synthetic_store), "source"), source)
    ingest(str(source), store, IngestOptions(), log=lambda *_: None)

    def run_now():
        return resolve_run("nn", store, storage_dir=str(tmp_path / "runs"), name="moved", profile="smoke",
                           overrides={"epochs": 1})

    run = run_now()
    ingest(str(source), store, IngestOptions(seed=1), log=lambda *_: None)
    with pytest.raises(StoreError, match=r"store has changed since run 'moved' was set up from it \(fingerprint, "
                                         r"channel_mean, channel_std, train_class_counts differ\)"):
        run_local(run, verbose=0)
    assert not os.path.exists(tmp_path / "runs" / "moved")  # refused before anything was written

    # The same splits and training images, one test image changed: only the fingerprint tells.
    run = run_now()
    test_image = open_store(store).read_split("test", ["image_id"])["image_id"][0].as_py()
    (path,) = source.glob(f"*/{test_image}.jpg")
    Image.eval(Image.open(path), lambda v: 255 - v).save(path)
    ingest(str(source), store, IngestOptions(seed=1), log=lambda *_: None)
    with pytest.raises(StoreError, match=r"since run 'moved' was set up from it \(fingerprint differs\)"):
        run_local(run, verbose=0)


def test_local_mode_is_deterministic_for_a_seed(local_result, tmp_path):
    run = dataclasses.replace(local_result.run, storage=str(tmp_path))
    twin = run_local(run, verbose=0)
    assert [h["loss"] for h in twin.history] == pytest.approx([h["loss"] for h in local_result.history], rel=1e-5)


def _killable_script(store, tmp_path, name, overrides):
    """Python code training `name` locally; it dies at the start of epoch 3 once (a marker file remembers)."""
    marker = tmp_path / f"{name}-fail-once.marker"
    return textwrap.dedent(
        f"""
        import dataclasses, sys
        from skincluster.train.launch import resolve_run, run_local
        run = resolve_run("nn", {store!r}, storage_dir={str(tmp_path)!r}, name={name!r},
                          profile="smoke", overrides={overrides!r})
        run = dataclasses.replace(run, fail_at_epoch=3, fail_marker={str(marker)!r})
        run_local(run, verbose=0)
        """
    )


def _kill_at_epoch_3(store, tmp_path, name, overrides):
    """Train `name` in a subprocess that dies at the start of epoch 3; check it
    reported epochs 1-2; return the script, which a rerun continues with."""
    script = _killable_script(store, tmp_path, name, overrides)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert first.returncode == 17, first.stderr[-2000:]
    assert (tmp_path / f"{name}-fail-once.marker").exists()
    reported = [json.loads(line)["epoch"] for line in open(tmp_path / name / "metrics.jsonl")]
    assert reported == [1, 2]
    return script


def _kill_at_epoch_3_and_rerun(store, tmp_path, name, overrides):
    """Train `name` in a subprocess that dies at the start of epoch 3, check
    it reported epochs 1-2, run the same command again; return the rerun's
    reported epochs and history."""
    script = _kill_at_epoch_3(store, tmp_path, name, overrides)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    reported = [json.loads(line)["epoch"] for line in open(tmp_path / name / "metrics.jsonl")]
    return reported, json.load(open(tmp_path / name / "history.json"))


def test_local_run_resumes_after_being_killed(synthetic_store, tmp_path):
    """The process dies at the start of epoch 3; the same command continues from epoch 2's checkpoint."""
    reported, history = _kill_at_epoch_3_and_rerun(synthetic_store, tmp_path, "killed", {"epochs": 4})
    assert reported == [1, 2, 3, 4]  # epochs 1-2 not redone
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(synthetic_store, tmp_path):
    """Power lost just after a checkpoint was renamed into place can leave its
    files empty; the run resumes from the previous kept checkpoint instead, and
    a half-copied ``.tmp`` folder is never taken for a checkpoint."""
    name = "torn"
    script = _kill_at_epoch_3(synthetic_store, tmp_path, name, {"epochs": 4})
    checkpoints = tmp_path / name / "checkpoints"
    (checkpoints / "epoch_0002" / "state.json").write_text("")
    os.makedirs(checkpoints / "epoch_0003.tmp")
    rerun = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"not resuming from {checkpoints / 'epoch_0002'}: state.json is unreadable" in rerun.stderr
    reported = [json.loads(line)["epoch"] for line in open(tmp_path / name / "metrics.jsonl")]
    assert reported == [1, 2, 2, 3, 4]  # epoch 2 redone from epoch 1's checkpoint
    assert [h["epoch"] for h in json.load(open(tmp_path / name / "history.json"))] == [1, 2, 3, 4]


def test_local_checkpoints_are_ordered_by_epoch_number(tmp_path):
    from skincluster.train.context import local_checkpoint_dirs

    for name in ("epoch_10000", "epoch_9999", "epoch_10001.tmp", "notes"):
        os.makedirs(tmp_path / "checkpoints" / name)
    assert [os.path.basename(d) for d in local_checkpoint_dirs(str(tmp_path))] == ["epoch_9999", "epoch_10000"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_cannot_be_fsynced_does_not_stop_a_checkpoint(tmp_path):
    """Some mounts (FUSE, SMB; /proc here) refuse fsync on a folder with EINVAL."""
    from skincluster.train.context import _fsync

    (tmp_path / "weights").write_bytes(b"w")
    _fsync(str(tmp_path / "weights"))
    _fsync("/proc/self")


def test_no_readable_checkpoint_is_an_error_naming_the_folder(local_result, tmp_path):
    from skincluster.data.store import open_store
    from skincluster.train.context import LocalContext

    shutil.copytree(os.path.join(local_result.run_dir, "checkpoints"), tmp_path / "checkpoints")
    for state in (tmp_path / "checkpoints").glob("epoch_*/state.json"):
        state.write_text('{"history": []}')
    run = local_result.run
    ctx = LocalContext(str(tmp_path), open_store(run.data.store), run.data.limit, run.data.seed)
    with pytest.raises(RuntimeError, match=r"no checkpoint in .*checkpoints can be resumed"):
        with ctx.latest_checkpoint():
            pass


def _resumed_equals_whole(store, tmp_path, name, overrides):
    """Kill `name` at epoch 3 and rerun it, train the same settings unbroken;
    check both report the same per-epoch figures and return the unbroken run's history."""
    reported, resumed = _kill_at_epoch_3_and_rerun(store, tmp_path, f"killed-{name}", overrides)
    assert reported == list(range(1, overrides["epochs"] + 1))
    whole = _smoke_run(store, tmp_path, f"whole-{name}", overrides)
    for key in ("loss", "val_loss", "val_accuracy"):
        assert [h[key] for h in resumed] == pytest.approx([h[key] for h in whole], rel=1e-6), key
    return whole


def _smoke_run(store, tmp_path, name, overrides):
    run = resolve_run("nn", store, storage_dir=str(tmp_path), name=name, profile="smoke", overrides=overrides)
    return run_local(run, verbose=0).history


def test_weight_average_resumes_as_if_never_killed(synthetic_store, tmp_path):
    """With Recipe.ema_decay the checkpointed model holds the average; a resumed
    run must train on from the training weights, with the average it had, to
    validate exactly as a run that was never killed (nn has no dropout or
    augmentation, and each epoch's shuffle is seeded, so the two must agree)."""
    whole = _resumed_equals_whole(synthetic_store, tmp_path, "ema", {"epochs": 4, "ema_decay": 0.9})
    # The average really is what was validated: it differs from the training weights' figures.
    plain = _smoke_run(synthetic_store, tmp_path, "plain", {"epochs": 4})
    assert [h["loss"] for h in plain] == pytest.approx([h["loss"] for h in whole], rel=1e-5)
    assert [h["val_loss"] for h in plain] != pytest.approx([h["val_loss"] for h in whole], rel=1e-3)


def test_mixup_resumes_as_if_never_killed(synthetic_store, tmp_path):
    """Mixup draws its pairs from a generator seeded per epoch, so a resumed run
    trains on the same blends as one never killed."""
    overrides = {"epochs": 4, "mixup_alpha": 0.4, "class_weight": "balanced"}
    whole = _resumed_equals_whole(synthetic_store, tmp_path, "mixup", overrides)
    assert all(math.isfinite(h["val_balanced_accuracy"]) for h in whole)
    # The class weights reach the loss (inside the target rows; fit()'s class_weight
    # is not passed as well): without them the same blends give other losses.
    unweighted = _smoke_run(synthetic_store, tmp_path, "mixup-unweighted", {"epochs": 4, "mixup_alpha": 0.4})
    assert unweighted[0]["loss"] != pytest.approx(whole[0]["loss"], rel=1e-3)


def test_a_trials_process_and_the_train_controller_never_import_tensorflow():
    """Only the workers use TensorFlow. A trial's process (its function, the
    trainer it builds, the summary it prints) and the Train controller (which
    unpickles the backend config) would each pay 7-9 s of CPU on a 2-core
    machine for an import they never use (train/ray_backend.py)."""
    code = textwrap.dedent(
        """
        import sys
        import ray.cloudpickle
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
        from ray.tune.integration.ray_train import TuneReportCallback
        from skincluster.data.pipeline import ray_datasets
        from skincluster.train import context, launch, ray_backend
        from skincluster.train.evaluate import format_summary
        from skincluster.tune import compare
        shipped = (compare._trial, ray_backend.TensorflowBackendConfig(), ray_backend.train_loop_per_worker)
        ray.cloudpickle.loads(ray.cloudpickle.dumps(shipped))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.ray
def test_two_worker_run_survives_a_killed_worker(synthetic_store, tmp_path, ray_session, local_result):
    """MultiWorkerMirroredStrategy over two Ray Train workers; rank 1 dies once at epoch 2."""
    marker = tmp_path / "fail-once.marker"
    run = _run(
        synthetic_store,
        tmp_path,
        "two-workers",
        # A budget that is never reached: the workers still vote on it every epoch.
        overrides={"epochs": 3, "time_budget_minutes": 60},
        scaling=Scaling(workers=2, cpus_per_worker=0.5, max_failures=1),
    )
    run = dataclasses.replace(run, fail_at_epoch=2, fail_rank=1, fail_marker=str(marker))
    result = run_ray(run)
    assert marker.exists()  # the failure really happened
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # each epoch once, epoch 1 not redone
    assert 0.0 <= result.evaluation["balanced_accuracy"] <= 1.0
    # Rank 0 evaluated its in-memory model under MultiWorkerMirroredStrategy: the
    # model as saved, loaded here, scores the same.
    from skincluster.data.store import open_store
    from skincluster.models import load_model
    from skincluster.train.evaluate import evaluate_model

    again = evaluate_model(load_model(os.path.join(result.run_dir, "model.keras")), open_store(synthetic_store),
                           run.data.limit, run.data.seed)
    for key in ("accuracy", "balanced_accuracy", "log_loss", "roc_auc_ovr"):
        assert result.evaluation[key] == pytest.approx(again[key], rel=1e-5), key
    assert result.evaluation["confusion_matrix"] == again["confusion_matrix"]
    assert set(result.history[0]) == set(local_result.history[0])  # local mode reports the same keys
    # 96 images over 2 workers = 48 each; each worker feeds global batches of
    # 2 replicas x 16 = 32 (one full batch, the rest dropped), which tf.distribute
    # splits into per-replica batches of 16: two steps of 16 per worker.
    assert result.history[0]["steps"] == 2


def test_workers_agree_on_a_decision_taken_from_their_own_clocks(tmp_path):
    """any_replica under MultiWorkerMirroredStrategy in two processes (as Ray
    Train starts them): a time-budget stop wanted by one worker only stops
    both, or the other would wait for ever in its next all-reduce."""
    import socket

    script = textwrap.dedent(
        """
        import json, os, sys
        rank, ports = int(sys.argv[1]), sys.argv[2].split(",")
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                              "task": {"type": "worker", "index": rank}})
        from skincluster.train.strategy import any_replica, choose_strategy
        strategy = choose_strategy(world_size=2)
        print(json.dumps([any_replica(strategy, rank == 1), any_replica(strategy, False), any_replica(strategy, True)]))
        """
    )
    sockets = [socket.socket() for _ in range(2)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = ",".join(str(sock.getsockname()[1]) for sock in sockets)
    for sock in sockets:
        sock.close()
    workers = [subprocess.Popen([sys.executable, "-c", script, str(rank), ports], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [worker.communicate(timeout=180) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == [True, False, True]


def test_time_budget_stops_after_the_epoch_that_would_overrun_it(synthetic_store, tmp_path):
    run = resolve_run("nn", synthetic_store, storage_dir=str(tmp_path), name="budget", profile="smoke",
                      overrides={"epochs": 5, "time_budget_minutes": 1e-6})
    result = run_local(run, verbose=0)
    assert len(result.history) == 1
    assert result.history[-1]["stopped_by_time_budget"] is True
    assert os.path.exists(os.path.join(result.run_dir, "model.keras"))
