"""Pick the tf.distribute strategy for this worker; must run before TensorFlow touches a GPU."""

from __future__ import annotations

import json
import os

import tensorflow as tf


def enable_gpu_memory_growth() -> list:
    """Let TensorFlow grow GPU memory on demand instead of grabbing it all.

    Several Ray workers (or a worker and a Ray Data task) can then share a GPU
    node without one of them failing with out-of-memory at start-up.
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # devices already initialised in this process
            pass
    return gpus


def choose_strategy(world_size: int) -> tf.distribute.Strategy:
    """MultiWorkerMirrored across workers, Mirrored over a worker's GPUs, else the default.

    Ray Train's TensorflowConfig writes TF_CONFIG for every worker before the
    train function starts, which is what MultiWorkerMirroredStrategy reads.
    """
    gpus = enable_gpu_memory_growth()
    if world_size > 1:
        if "TF_CONFIG" not in os.environ:
            raise RuntimeError("world size > 1 but TF_CONFIG is not set: multi-worker runs must start through Ray Train")
        json.loads(os.environ["TF_CONFIG"])  # fail here, clearly, on a malformed value
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def any_replica(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """Whether `flag` is True on any replica of any worker; the same answer on all.

    A collective: every worker must call it, at the same point of training.
    It is how workers agree on a decision taken from their own clocks (the
    time budget): one that stopped while another went on would leave the other
    waiting for ever in the next epoch's all-reduce.
    """
    if strategy.num_replicas_in_sync == 1:
        return flag

    def vote():
        context = tf.distribute.get_replica_context()
        return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(1.0 if flag else 0.0))

    votes = strategy.experimental_local_results(tf.function(lambda: strategy.run(vote))())
    return float(votes[0]) > 0
