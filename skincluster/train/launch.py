"""Launch one training run: resolve its config, then run it locally or as a Ray Train run.

Driver-side code only; the per-worker loop is in `worker.py`. A run's folder
``<storage>/<name>/`` ends up holding ``config.json``, ``history.json``,
``model.keras`` and ``evaluation.json``, whichever way it ran, beside its two
newest checkpoints (Ray Train's ``checkpoint_epoch_NNNN/`` or a local run's
``checkpoints/epoch_NNNN/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

import skincluster
from skincluster import storage
from skincluster.config import (
    PROFILES,
    DataConfig,
    Scaling,
    TrainRun,
    as_stored,
    changed_settings,
    overrides_for_model,
    replace_fields,
    result_settings,
)
from skincluster.data.splits import SPLITS
from skincluster.data.store import Store, StoreError, open_store
from skincluster.train.context import CHECKPOINTS, FINAL_EVALUATION, FINAL_MODEL, checkpoint_epoch
from skincluster.train.resources import check_resources, cluster_capacity

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
EVALUATION_FILE = "evaluation.json"
MODEL_FILE = "model.keras"


class RunFailed(RuntimeError):
    """Training failed more often than FailureConfig allows."""


def resolve_run(
    model: str,
    store_uri: str,
    *,
    storage_dir: str = "runs",
    name: str | None = None,
    profile: str = "full",
    overrides: dict[str, Any] | None = None,
    limit: int | None = None,
    seed: int = 0,
    scaling: Scaling = Scaling(),
    store: Store | None = None,
) -> TrainRun:
    """The fully resolved run: registry recipe, then profile, then user overrides."""
    from skincluster.models import get_recipe

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    store = store or open_store(store_uri)
    empty = [split for split in SPLITS if store.count(split) == 0]
    if empty:
        # Found after training, an empty test split would cost the whole run.
        raise StoreError(f"{store_uri}: the {' and '.join(empty)} split(s) hold no image; a run trains on train, "
                         "stops early on val and is scored on test: ingest again with other --fractions")
    recipe = get_recipe(model)
    recipe = replace_fields(recipe, prof.recipe_overrides)
    if prof.max_epochs is not None and recipe.epochs > prof.max_epochs:
        recipe = dataclasses.replace(recipe, epochs=prof.max_epochs)
    recipe = replace_fields(recipe, prof.model_overrides.get(model, {}))
    recipe = replace_fields(recipe, overrides_for_model(overrides or {}, model))
    limit = limit if limit is not None else prof.limit
    # Absolute, so the run reads and writes the same folders from any process.
    store_uri, storage_dir = storage.absolute(store_uri), storage.absolute(storage_dir)
    return TrainRun(
        model=model,
        recipe=recipe,
        data=DataConfig(store=store_uri, limit=limit, seed=seed, fingerprint=store.manifest.get("fingerprint")),
        scaling=scaling,
        profile=profile,
        storage=storage_dir,
        name=name if name is not None else f"{model}-{profile}",  # "" is an error, not the default
        **_store_facts(store),
    )


def _store_facts(store: Store) -> dict[str, tuple]:
    """What a run takes from its store's manifest (TrainRun fields)."""
    counts = store.manifest["counts"]["train"]
    return {
        "class_names": tuple(store.class_names),
        "channel_mean": tuple(store.channel_mean),
        "channel_std": tuple(store.channel_std),
        "train_class_counts": tuple(int(counts[c]) for c in store.class_names),
    }


def open_run_store(run: TrainRun) -> Store:
    """The run's store, refused if it is no longer the store the run was set up
    from: a comparison resolves every trial at its start, and a store ingested
    again since (other splits or images) would give later trials other training
    and test sets than earlier ones, or a resumed run other data than its first
    epochs saw."""
    store = open_store(run.data.store)
    now = _store_facts(store)
    if not run.train_class_counts:  # a config.json written before the counts were recorded
        now.pop("train_class_counts")
    changed = [key for key, value in now.items() if getattr(run, key) != value]
    if run.data.fingerprint is not None and run.data.fingerprint != store.manifest.get("fingerprint"):
        changed.insert(0, "fingerprint")
    if changed:
        verb = "differ" if len(changed) > 1 else "differs"
        raise StoreError(f"{run.data.store} has changed since run {run.name!r} was set up from it ({', '.join(changed)} "
                         f"{verb}): it was ingested again with other images or splits; start the run (or comparison) "
                         "again, under another --name")
    return store


@dataclass
class RunResult:
    run: TrainRun
    run_dir: str
    history: list[dict[str, Any]]
    evaluation: dict[str, Any]
    #: True when the run folder already held a finished run and nothing was trained.
    reused: bool = False


def run_dir_of(run: TrainRun) -> str:
    return storage.join(run.storage, run.name)


def finished_result(run: TrainRun) -> RunResult | None:
    """The stored result if this exact run already finished, else None."""
    fs, path = storage.resolve(run_dir_of(run))
    files = [f"{path}/{n}" for n in (CONFIG_FILE, HISTORY_FILE, EVALUATION_FILE, MODEL_FILE)]
    if not all(storage.exists(fs, f) for f in files):
        return None
    changed = changed_settings(_stored_config(run), run)
    if changed:
        raise ValueError(f"{run_dir_of(run)} holds a finished run with other settings ({'; '.join(changed)}); "
                         "use another --name or --storage")
    history = _read_run_file(run, HISTORY_FILE, kind=object)  # any JSON, as before
    return RunResult(run, run_dir_of(run), history, _read_run_file(run, EVALUATION_FILE), True)


def run_local(run: TrainRun, verbose: int = 1) -> RunResult:
    """Run the worker loop in this process, without Ray (debug mode: breakpoints work)."""
    from skincluster.train.context import LocalContext
    from skincluster.train.worker import run_worker

    done = finished_result(run)
    if done:
        return done
    store = open_run_store(run)
    run_dir = run_dir_of(run)
    if storage.is_uri(run_dir):
        # Checkpoints need a local folder; results are copied to the URI at the end. The
        # folder is named after the whole URI: keyed by the run name alone, a run to another
        # bucket with the same name resumed from this one's checkpoints (seen in the S3 tests).
        # The result settings are in the key too: a run with other settings must not
        # resume these checkpoints even when the URI's config.json is gone.
        key = hashlib.sha256((run_dir + json.dumps(result_settings(as_stored(run)), sort_keys=True)).encode())
        key = key.hexdigest()[:16]
        work_dir = os.path.join(tempfile.gettempdir(), "skincluster-local", f"{run.name}-{key}")
    else:
        work_dir = run_dir
    os.makedirs(work_dir, exist_ok=True)
    # Checkpoints of either mode count: Ray's would be resumed by a later run
    # without --local under the config.json written here.
    _write_config(run, resumes=any(_has_checkpoints(folder) for folder in {run_dir, work_dir}))
    ctx = LocalContext(work_dir, store, run.data.limit, run.data.seed,
                       mirror=run_dir if work_dir != run_dir else None)
    history = run_worker(run, ctx, verbose=verbose)
    with ctx.latest_checkpoint() as checkpoint:
        result = _finish(run, history, checkpoint)
    if work_dir != run_dir:
        # The run is finished in the URI (evaluation.json): its local checkpoints are no longer needed.
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def run_ray(run: TrainRun, *, run_config_callbacks: list | None = None, check_capacity: bool = True) -> RunResult:
    """Run as a Ray Train run (TensorFlow's backend); resumes if `name` already has checkpoints.

    `check_capacity=False` when the caller has checked the run against the
    cluster already: a comparison's driver does, on the head node, for every
    trial; a trial may run on a node without the autoscaler's config.
    """
    import ray
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from skincluster.data.pipeline import ray_datasets
    from skincluster.train.context import STATE_FILE
    from skincluster.train.ray_backend import TensorflowBackendConfig, train_loop_per_worker

    done = finished_result(run)
    if done:
        return done
    ensure_ray()
    if check_capacity:
        check_resources(run.scaling, cluster_capacity(), run.name)
    store = open_run_store(run)
    _write_config(run, resumes=_has_checkpoints(run_dir_of(run)))
    datasets = ray_datasets(store, ("train", "val"), run.data.limit, run.data.seed)
    scaling = run.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = DataParallelTrainer(
        train_loop_per_worker,
        backend_config=TensorflowBackendConfig(),  # ray_backend.py: why not TensorflowTrainer
        train_loop_config=dataclasses.asdict(run),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage.absolute(run.storage),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=run_config_callbacks or [],
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error is not None:
        raise RunFailed(f"{run.name}: training failed after {scaling.max_failures} retries: {result.error}")
    if result.checkpoint is None:
        raise RunFailed(f"{run.name}: training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as fh:
            history = json.load(fh)["history"]
        return _finish(run, history, folder)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (or `ray start`), else start a local one.

    A local cluster gets its dashboard on a free port, and every Ray process
    is told where it is (RAY_API_SERVER_ADDRESS). Ray Train's
    PlacementGroupCleaner looks the Train controller up through that API; when
    Tune stops a trial (ASHA, a failed trial actor) the controller dies with
    it, and the cleaner must remove the workers' placement group. Without an
    address it searches the host, fails with "Found multiple active Ray
    instances" whenever another Ray runs on the machine, and each stopped
    trial then keeps its workers' CPUs for ever, until a later trial waits
    for ever for them.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        runtime_env = skincluster.RAY_RUNTIME_ENV
        # The driver's S3 endpoint/region reach every worker of this job (storage.worker_env).
        env_vars = {**storage.worker_env(), **runtime_env["env_vars"]}
        # Under `ray job submit`, Ray refuses a driver runtime_env that names a variable the
        # job's own runtime_env (--runtime-env-json) already sets; those reach the workers anyway.
        job_env = _submitted_job_env_vars()
        runtime_env = {**runtime_env, "env_vars": {k: v for k, v in env_vars.items() if k not in job_env}}
        if "RAY_ADDRESS" in os.environ:
            ray.init(runtime_env=runtime_env)
        else:
            port = _free_port()
            api = f"http://127.0.0.1:{port}"
            os.environ["RAY_API_SERVER_ADDRESS"] = api
            env_vars = {**runtime_env["env_vars"], "RAY_API_SERVER_ADDRESS": api}
            ray.init(
                runtime_env={**runtime_env, "env_vars": env_vars},
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
            )
    # Per-block progress bars from every dataset shard drown the epoch lines.
    ray.data.DataContext.get_current().enable_progress_bars = False


def _submitted_job_env_vars() -> dict[str, str]:
    """env_vars of this driver's job as submitted (`ray job submit --runtime-env-json`), else {}."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for job drivers
    if not raw:
        return {}
    return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RUN_FOLDER_HINT = "move the run folder away or use another --name"


def _read_run_file(run: TrainRun, name: str, kind: type = dict) -> Any:
    """A JSON file of the run folder, named by its URI when damaged."""
    fs, path = storage.resolve(run_dir_of(run))
    return storage.read_json_checked(fs, f"{path}/{name}", storage.join(run_dir_of(run), name), RUN_FOLDER_HINT, kind)


def _stored_config(run: TrainRun) -> dict[str, Any]:
    """The config.json already in the run's folder."""
    stored = _read_run_file(run, CONFIG_FILE)
    if not isinstance(stored.get("recipe"), dict):
        raise ValueError(f"{storage.join(run_dir_of(run), CONFIG_FILE)}: not a run's config.json; {RUN_FOLDER_HINT}")
    return stored


def _has_checkpoints(run_dir: str) -> bool:
    """Whether `run_dir` holds checkpoints a run would resume: Ray Train's
    (``checkpoint_*``) or a local run's (``checkpoints/epoch_*``, also the
    mirror of a local run to a URI)."""
    fs, path = storage.resolve(run_dir)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if any(e.base_name.startswith("checkpoint_") for e in entries):
        return True
    local = fs.get_file_info(pafs.FileSelector(f"{path}/{CHECKPOINTS}", allow_not_found=True))
    return any(checkpoint_epoch(e.base_name) is not None for e in local)


def check_resumable(run: TrainRun) -> None:
    """Refuse `run` before anything starts if its folder holds checkpoints of
    a run with other result settings (compare checks every trial with it, so a
    refusal does not come one failed trial at a time)."""
    if _has_checkpoints(run_dir_of(run)):
        _check_same_settings(run)


def _check_same_settings(run: TrainRun) -> None:
    fs, path = storage.resolve(run_dir_of(run))
    if not storage.exists(fs, f"{path}/{CONFIG_FILE}"):
        return
    changed = changed_settings(_stored_config(run), run)
    if changed:
        raise ValueError(f"{run_dir_of(run)} holds a run with other settings ({'; '.join(changed)}) "
                         "and checkpoints it would resume; run the same command as before to resume it, "
                         "or use another --name or --storage")


def _write_config(run: TrainRun, resumes: bool) -> None:
    """Write config.json. When the folder holds checkpoints the run would resume
    (`resumes`), first check that the run which wrote them had the same result
    settings: its epochs would otherwise be mixed into a run that claims others.
    Without checkpoints (a run that failed before its first epoch ended, say
    for a wrong --set), the new settings simply replace the old."""
    fs, path = storage.resolve(run_dir_of(run))
    if resumes:
        _check_same_settings(run)
    fs.create_dir(path, recursive=True)
    storage.write_json_atomic(fs, f"{path}/{CONFIG_FILE}", dataclasses.asdict(run))


def _finish(run: TrainRun, history: list[dict[str, Any]], checkpoint: str) -> RunResult:
    """Write the final checkpoint's model, the history and the model's evaluation into the run folder."""
    model_path = os.path.join(checkpoint, FINAL_MODEL)
    evaluation_path = os.path.join(checkpoint, FINAL_EVALUATION)
    if os.path.exists(evaluation_path):  # the worker evaluated it (rank 0)
        with open(evaluation_path, encoding="utf-8") as fh:
            evaluation = json.load(fh)
    else:  # a final checkpoint from before workers evaluated, resumed
        from skincluster.models import load_model
        from skincluster.train.evaluate import evaluate_model

        evaluation = evaluate_model(load_model(model_path), open_run_store(run), run.data.limit, run.data.seed)
    evaluation.update(model=run.model, epochs_run=len(history), epoch_budget=run.recipe.epochs)
    fs, path = storage.resolve(run_dir_of(run))
    with open(model_path, "rb") as fh:
        storage.write_bytes_atomic(fs, f"{path}/{MODEL_FILE}", fh.read())
    storage.write_json_atomic(fs, f"{path}/{HISTORY_FILE}", history)
    # Written last: its presence marks the run as finished.
    storage.write_json_atomic(fs, f"{path}/{EVALUATION_FILE}", evaluation)
    return RunResult(run, run_dir_of(run), history, evaluation)

