"""What a Ray cluster can give a run: the CPUs and GPUs it has, or, if an
autoscaler may add nodes, the most it can have.

Checked before a run starts because Ray waits rather than fails: workers
that take every CPU leave Ray Data none (seen here: the run hung for ever), and
a worker asking for more than any one node has is never placed. On a cluster
that scales from zero (`cluster.yaml`: GPU workers with ``min_workers: 0``)
the nodes the driver sees at the start are not the limit: the autoscaler
starts GPU nodes when a run asks for GPUs. Its node types are read from

- the cluster launcher's config on the head node, ``~/ray_bootstrap_config.yaml``
  (the file Ray Tune also takes as the sign of an autoscaling cluster), whose
  node types carry the CPUs and GPUs the launcher filled in for their
  instance types; or
- the cluster config an autoscaler v2 (KubeRay) reports to the GCS, which Ray
  Train reads for its own check.

Driver-side only; Ray is imported when asked.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from skincluster.config import Scaling

#: CPU left free for Ray Data on top of the training workers (its read tasks ask for 0.25 each).
DATA_CPU_RESERVE = 0.5
#: Where the cluster launcher puts its config on the head node (also inside its container).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
_EPSILON = 1e-9


class ResourceError(RuntimeError):
    """The cluster cannot fit the requested workers plus Ray Data."""


@dataclass(frozen=True)
class Capacity:
    """CPUs and GPUs a run may count on."""

    #: Summed over every node the cluster has or, autoscaling, may start (math.inf: no limit).
    totals: dict[str, float]
    #: CPUs and GPUs of each kind of node: one worker must fit on one of them.
    nodes: tuple[dict[str, float], ...]
    #: Where the figures come from, for messages: "2 nodes", "the autoscaler's node types (...)".
    source: str
    autoscaling: bool = False

    def describe(self) -> str:
        cpus, gpus = (_fmt(self.totals.get(r, 0)) for r in ("CPU", "GPU"))
        return f"{'at most ' if self.autoscaling else ''}{cpus} CPUs and {gpus} GPUs ({self.source})"


def _fmt(value: float) -> str:
    return "unlimited" if value == math.inf else f"{value:g}"


def _cpu_gpu(resources: Mapping[str, Any]) -> dict[str, float]:
    return {r: float(resources.get(r, 0) or 0) for r in ("CPU", "GPU")}


def _summed(groups: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    totals = {"CPU": 0.0, "GPU": 0.0}
    for resources, count in groups:
        for r in totals:
            if resources[r]:
                totals[r] += math.inf if count == math.inf else resources[r] * count
    return totals


def cluster_capacity() -> Capacity:
    """The capacity of the cluster this process has joined (ray.init done)."""
    import ray

    current = [_cpu_gpu(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    static = Capacity(_summed([(n, 1) for n in current]), tuple(current), f"its {len(current)} node(s) now")
    node_types = _bootstrap_node_types(os.path.expanduser(BOOTSTRAP_CONFIG))
    if node_types is not None:
        source = f"the autoscaler's node types in {BOOTSTRAP_CONFIG}"
    else:
        node_types, source = _reported_node_types(), "the autoscaler's reported node groups"
    if not node_types:
        return static
    totals = _summed(node_types)
    # Never less than what is up now (a node started by hand joins outside the config).
    totals = {r: max(totals[r], static.totals[r]) for r in totals}
    return Capacity(totals, tuple(current) + tuple(n for n, _ in node_types), source, autoscaling=True)


def _bootstrap_node_types(path: str) -> list[tuple[dict[str, float], float]] | None:
    """(CPUs and GPUs, most nodes) per node type of a cluster launcher config; None without one.

    The head's type counts its one head node plus the workers it may add.
    A config that cannot be read is an error, not a reason to guess.
    """
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        config = json.loads(text)  # what the launcher writes
    except json.JSONDecodeError:
        import yaml  # a Ray dependency

        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ResourceError(f"{path}: the autoscaler's config cannot be read ({exc})") from None
    node_types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(node_types, dict) or not node_types:
        return None  # a legacy single-node-type config: nothing to count on beyond the nodes up now
    overall = config.get("max_workers", math.inf)
    groups = []
    for name, node_type in node_types.items():
        resources = (node_type or {}).get("resources") or {}
        if "CPU" not in resources and "GPU" not in resources:
            raise ResourceError(
                f"{path}: node type {name!r} names no CPU or GPU resources (the launcher fills them in for "
                "the instance types it knows); set `resources: {CPU: N, GPU: M}` for it in the cluster config"
            )
        if name == config.get("head_node_type"):  # the head, and any workers of its type
            count = 1 + min(float(node_type.get("max_workers", 0)), float(overall))
        else:
            count = min(float(node_type.get("max_workers", overall)), float(overall))
        groups.append((_cpu_gpu(resources), count))
    return groups


def _reported_node_types() -> list[tuple[dict[str, float], float]]:
    """Node groups of the cluster config an autoscaler v2 reported to the GCS; [] if none."""
    from ray._private.state import state  # what Ray Train reads for the same purpose

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 (a private API: without it the nodes up now are the limit)
        return []
    if config is None:
        return []
    return [(_cpu_gpu(dict(group.resources)), math.inf if group.max_count == -1 else float(group.max_count))
            for group in config.node_group_configs if group.max_count != 0]


def check_resources(scaling: Scaling, capacity: Capacity, what: str = "this run") -> None:
    """Refuse, with the numbers, a run that would wait for ever: a worker no node
    can hold, or workers that leave Ray Data without CPU."""
    need_cpu = scaling.workers * scaling.cpus_per_worker + DATA_CPU_RESERVE
    need_gpu = scaling.workers * scaling.gpus_per_worker
    cpus, gpus = capacity.totals.get("CPU", 0), capacity.totals.get("GPU", 0)
    problems = []
    fits_a_node = any(scaling.cpus_per_worker <= n["CPU"] + _EPSILON and scaling.gpus_per_worker <= n["GPU"] + _EPSILON
                      for n in capacity.nodes)
    if not fits_a_node:
        largest = max(capacity.nodes, key=lambda n: (n["GPU"], n["CPU"]), default={"CPU": 0, "GPU": 0})
        problems.append(
            f"one worker asks for {scaling.cpus_per_worker:g} CPUs and {scaling.gpus_per_worker:g} GPUs, more than "
            f"any node has (the largest: {largest['CPU']:g} CPUs, {largest['GPU']:g} GPUs); "
            "use more workers with fewer GPUs or CPUs each"
        )
    if need_cpu > cpus + _EPSILON:
        fit = max((cpus - DATA_CPU_RESERVE) / scaling.workers, 0)
        problems.append(
            f"{scaling.workers} worker(s) x {scaling.cpus_per_worker:g} CPU + {DATA_CPU_RESERVE} CPU for Ray Data "
            f"= {need_cpu:g} CPUs; use --cpus-per-worker {fit:.2g} or fewer workers"
        )
    if need_gpu > gpus + _EPSILON:
        problems.append(f"{scaling.workers} worker(s) x {scaling.gpus_per_worker:g} GPU = {need_gpu:g} GPUs")
    if problems:
        raise ResourceError(
            f"the cluster cannot fit {what}: {'; '.join(problems)}. The cluster has {capacity.describe()}"
            + ("" if capacity.autoscaling else
               "; if it autoscales, run the driver on its head node (`ray submit`, `ray job submit`), "
               "where the autoscaler's config is")
        )
