"""Regression: a trial that Tune stops must give its Train workers' CPUs back.

Tune stops a trial (ASHA, a stop rule) by killing the trial actor; the Ray
Train controller dies with it, and Train's PlacementGroupCleaner must remove
the workers' placement group. Seen here: with a second Ray instance on the
host the cleaner could not find its cluster ("Found multiple active Ray
instances"), every stopped trial kept one CPU, and on 2 CPUs the third trial
waited for ever. `ensure_ray` points every process at its own dashboard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture
def second_ray_instance():
    code = "import ray, time; ray.init(num_cpus=1, include_dashboard=False); print('ready', flush=True); time.sleep(900)"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env, start_new_session=True)
    assert other.stdout.readline().strip() == "ready"
    yield
    os.killpg(other.pid, signal.SIGTERM)
    other.wait(timeout=60)


def _train_func():
    import ray.train

    for step in range(30):
        time.sleep(0.3)
        ray.train.report({"step": step})


def _trial(config, storage):
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    DataParallelTrainer(
        _train_func,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"run{config['i']}", storage_path=storage, callbacks=[TuneReportCallback()]),
    ).fit()


def test_trials_stopped_by_tune_release_their_workers(ray_session, second_ray_instance, tmp_path):
    import ray.cloudpickle
    from ray import tune

    # The workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, storage=str(tmp_path)), {"cpu": 0.25}),
        param_space={"i": tune.grid_search([0, 1, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="stopped", storage_path=str(tmp_path), verbose=0,
                                  stop={"training_iteration": 2}),
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("results", tuner.fit()), daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "a trial waited for CPUs that stopped trials never gave back"
    assert all(r.error is None for r in outcome["results"])
    deadline = time.time() + 60
    while time.time() < deadline:
        held = [p for p in ray_session.util.placement_group_table().values()
                if p["state"] == "CREATED" and any(b.get("CPU") == 1.0 for b in p["bundles"].values())]
        if not held:
            break
        time.sleep(1)
    assert not held, f"placement groups of stopped trials still hold CPUs: {held}"


def test_a_local_runtime_is_its_one_node(ray_session):
    from skincluster.train.resources import cluster_capacity

    capacity = cluster_capacity()
    assert not capacity.autoscaling and capacity.source == "its 1 node(s) now"
    assert capacity.totals == {"CPU": ray_session.cluster_resources()["CPU"], "GPU": 0}
    assert capacity.nodes == ({"CPU": capacity.totals["CPU"], "GPU": 0},)


def test_trials_are_placed_on_the_head_when_it_has_the_cpus(ray_session, monkeypatch, capsys):
    """Beside the head, a spot node's preemption takes a trial's workers but never the trial
    and its Train controller (which Ray Train puts on the trial's node)."""
    from skincluster.tune.compare import HEAD_NODE, TRIAL_CPU, _trial_resources

    assert _trial_resources(2).bundles == [{"CPU": TRIAL_CPU, HEAD_NODE: 0.001}]
    head_without_cpus = [{**n, "Resources": {**n["Resources"], "CPU": 0.0}} for n in ray_session.nodes()]
    monkeypatch.setattr(ray_session, "nodes", lambda: head_without_cpus)
    assert _trial_resources(2).bundles == [{"CPU": TRIAL_CPU}]
    assert "the head node has 0 CPUs, too few for 2 trial(s)" in capsys.readouterr().out
