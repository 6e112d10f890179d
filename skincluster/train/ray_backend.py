"""What Ray Train runs: the TensorFlow backend and the per-worker entry point, free of TensorFlow imports.

Ray's own ``TensorflowTrainer`` takes its backend, ``TensorflowConfig``, from
the ``ray.train.tensorflow`` package, whose ``__init__`` imports TensorFlow.
So every process that built or unpickled it imported TensorFlow without using
it: each trial's process (which only waits for its Train run) and each
Train controller. On the 2-core test machines that is 7-9 s of CPU per
process, two per trial, on top of the workers' own import. The backend here
does what ``TensorflowConfig`` does (each worker gets ``TF_CONFIG`` naming
every worker and its own rank, which MultiWorkerMirroredStrategy reads) for a
``DataParallelTrainer``, and the worker module, which needs TensorFlow, is
imported only in the workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig


@dataclass
class TensorflowBackendConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _TensorflowBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW  # how Ray's dashboard labels the run


def _worker_address() -> str:
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    tf_config = {"cluster": {"worker": worker_addresses}, "task": {"type": "worker", "index": index}}
    os.environ["TF_CONFIG"] = json.dumps(tf_config)


class _TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: TensorflowBackendConfig) -> None:
        addresses = worker_group.execute(_worker_address)
        # One call per worker, each with its own rank; ray.get raises a worker's error.
        ray.get([worker_group.execute_single_async(i, _set_tf_config, addresses, i) for i in range(len(worker_group))])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: the worker loop of `config` (a TrainRun as a dict)."""
    from skincluster.config import TrainRun
    from skincluster.train.context import RayContext
    from skincluster.train.worker import run_worker

    run_worker(TrainRun.from_dict(config), RayContext())
