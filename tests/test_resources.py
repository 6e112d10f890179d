"""Runs are checked against what the cluster has, or, autoscaling, may have."""

from __future__ import annotations

import json

import pytest
import yaml

import ray
from conftest import REPO
from test_jobs import load_job
from skincluster.cli import _scaling, build_parser
from skincluster.config import Scaling
from skincluster.train.resources import Capacity, ResourceError, check_resources, cluster_capacity
from skincluster.tune.compare import concurrent_trials

#: What the cluster launcher fills in for cluster.yaml's instance types (AWS's vCPU and GPU counts).
AWS_RESOURCES = {"m6i.2xlarge": {"CPU": 8}, "g5.12xlarge": {"CPU": 48, "GPU": 4}, "g5.48xlarge": {"CPU": 192, "GPU": 8}}
HEAD_ONLY = [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 2e10, "node:__internal_head__": 1.0}}]


def _static(*nodes: dict[str, float]) -> Capacity:
    nodes = tuple({"CPU": float(n.get("CPU", 0)), "GPU": float(n.get("GPU", 0))} for n in nodes)
    return Capacity({r: sum(n[r] for n in nodes) for r in ("CPU", "GPU")}, nodes, f"{len(nodes)} node(s)")


def _bootstrapped_cluster_yaml() -> dict:
    """cluster.yaml as the launcher puts it on the head: node types with their resources filled in."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for node_type in config["available_node_types"].values():
        node_type["resources"] = {**AWS_RESOURCES[node_type["node_config"]["InstanceType"]], **node_type["resources"]}
    return config


@pytest.fixture
def head_of(monkeypatch, tmp_path):
    """A head node with `config` as its ~/ray_bootstrap_config.yaml (None: no file), and only itself up."""

    def make(config: dict | str | None, nodes=HEAD_ONLY) -> Capacity:
        monkeypatch.setenv("HOME", str(tmp_path))
        if config is not None:
            text = config if isinstance(config, str) else json.dumps(config)  # JSON, as the launcher writes it
            (tmp_path / "ray_bootstrap_config.yaml").write_text(text)
        monkeypatch.setattr(ray, "nodes", lambda: nodes)
        return cluster_capacity()

    return make


def _job_scaling(args: list[str]) -> Scaling:
    """The hardware jobs/train_enhanced.py asks `skincluster train` for."""
    return _scaling(build_parser().parse_args(load_job("train_enhanced").build_args(["--data", "s3://b/store", *args])))


def test_resource_check_leaves_cpu_for_ray_data():
    check_resources(Scaling(workers=2, cpus_per_worker=0.5), _static({"CPU": 2}))
    with pytest.raises(ResourceError, match="Ray Data"):
        check_resources(Scaling(workers=2, cpus_per_worker=1), _static({"CPU": 2}))
    with pytest.raises(ResourceError, match="2 worker\\(s\\) x 1 GPU = 2 GPUs"):
        check_resources(Scaling(workers=2, gpus_per_worker=1, cpus_per_worker=0.5), _static({"CPU": 8, "GPU": 1}))


def test_a_worker_must_fit_on_one_node():
    two_small = _static({"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1})
    check_resources(Scaling(workers=2, gpus_per_worker=1, cpus_per_worker=2), two_small)
    # Two GPUs in all, but never two on one node: Ray would wait for ever.
    with pytest.raises(ResourceError, match="more than any node has \\(the largest: 4 CPUs, 1 GPUs\\)"):
        check_resources(Scaling(workers=1, gpus_per_worker=2, cpus_per_worker=2), two_small)


def test_a_head_node_alone_is_the_limit_without_an_autoscaler(head_of):
    capacity = head_of(None)
    assert not capacity.autoscaling and capacity.totals == {"CPU": 8, "GPU": 0}
    with pytest.raises(ResourceError, match="0 GPUs .*if it autoscales, run the driver on its head node"):
        check_resources(Scaling(gpus_per_worker=1, cpus_per_worker=4), capacity)


def test_the_readme_cluster_commands_fit_a_cluster_that_has_only_its_head_yet(head_of):
    """cluster.yaml's GPU workers scale from zero: at `ray submit` only the head is up."""
    capacity = head_of(_bootstrapped_cluster_yaml())
    assert capacity.autoscaling and "ray_bootstrap_config.yaml" in capacity.source
    # The head, plus at most four 4-GPU nodes and one 8-GPU node.
    assert capacity.totals == {"CPU": 8 + 4 * 48 + 192, "GPU": 4 * 4 + 8}
    # README: compare --gpus-per-worker 1 --cpus-per-worker 4, seven architectures, all at once.
    trials = {f"model{i}": Scaling(gpus_per_worker=1, cpus_per_worker=4) for i in range(7)}
    assert concurrent_trials(trials, capacity) == 7
    # README: jobs/train_enhanced.py --gpus 8 (one worker over the 8-GPU node), and one per GPU.
    check_resources(_job_scaling(["--gpus", "8"]), capacity)
    check_resources(_job_scaling(["--gpus", "8", "--worker-per-gpu"]), capacity)
    with pytest.raises(ResourceError, match="more than any node has \\(the largest: 192 CPUs, 8 GPUs\\)"):
        check_resources(_job_scaling(["--gpus", "16"]), capacity)


def test_the_overall_worker_limit_caps_every_node_type(head_of):
    config = _bootstrapped_cluster_yaml()
    config["max_workers"] = 2
    assert head_of(config).totals == {"CPU": 8 + 2 * 48 + 192, "GPU": 2 * 4 + 8}


def test_a_yaml_bootstrap_config_is_read_too(head_of):
    capacity = head_of(yaml.safe_dump(_bootstrapped_cluster_yaml()))
    assert capacity.autoscaling and capacity.totals["GPU"] == 24


def test_a_node_type_without_resources_is_named(head_of):
    config = _bootstrapped_cluster_yaml()
    config["available_node_types"]["gpu.8x"]["resources"] = {}
    with pytest.raises(ResourceError, match="ray_bootstrap_config.yaml: node type 'gpu.8x' names no CPU or GPU"):
        head_of(config)


def test_an_unreadable_bootstrap_config_is_named(head_of):
    with pytest.raises(ResourceError, match="ray_bootstrap_config.yaml: the autoscaler's config cannot be read"):
        head_of("available_node_types: [unclosed")


def test_the_node_groups_an_autoscaler_v2_reports_count(head_of, monkeypatch):
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    reported = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 8}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 16, "GPU": 2}, max_count=3),
        autoscaler_pb2.NodeGroupConfig(name="unused", resources={"CPU": 64}, max_count=0),
    ])
    monkeypatch.setattr(state, "get_cluster_config", lambda: reported)
    capacity = head_of(None)
    assert capacity.autoscaling and capacity.totals == {"CPU": 8 + 3 * 16, "GPU": 6}
    check_resources(Scaling(workers=3, gpus_per_worker=2, cpus_per_worker=8), capacity)


def test_concurrency_follows_the_cluster():
    one = Scaling(workers=1, cpus_per_worker=1)
    seven = {f"m{i}": one for i in range(7)}
    assert concurrent_trials(seven, _static({"CPU": 2})) == 1
    assert concurrent_trials(seven, _static({"CPU": 5.25})) == 3  # 1 + 0.25 for the trial + 0.5 for Ray Data each
    assert concurrent_trials(seven, _static({"CPU": 64})) == 7  # never more than there are trials
    gpu = Scaling(workers=1, cpus_per_worker=4, gpus_per_worker=1)
    assert concurrent_trials({f"m{i}": gpu for i in range(7)}, _static({"CPU": 64, "GPU": 4})) == 4
    with pytest.raises(ResourceError, match="trial big: .*Ray Data"):
        concurrent_trials({"small": one, "big": Scaling(workers=2, cpus_per_worker=1)}, _static({"CPU": 2}))
    # Workers and Ray Data's reserve fit, the trial's own share only just not: one at a time
    # (the two-node test's comparison, two workers of 0.75 CPU on two 1-CPU nodes).
    assert concurrent_trials({"nn": Scaling(workers=2, cpus_per_worker=0.75)}, _static({"CPU": 1}, {"CPU": 1})) == 1


def test_concurrency_of_trials_of_different_sizes_holds_for_the_largest_together():
    """Tune starts the next trial whichever it is: any `fit` trials must fit side by side."""
    capacity = _static({"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4})
    big = Scaling(workers=4, cpus_per_worker=4, gpus_per_worker=1)  # a whole node
    small = Scaling(workers=1, cpus_per_worker=2, gpus_per_worker=1)
    assert concurrent_trials({"big": big, "a": small, "b": small, "c": small}, capacity) == 4  # 4+1+1+1 GPUs
    assert concurrent_trials({"big1": big, "big2": big, "a": small}, capacity) == 2  # big1 + big2 fill the GPUs
