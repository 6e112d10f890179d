"""The per-worker training loop, shared by Ray Train workers and local debug mode.

Every epoch every worker reports the same metrics (a barrier in Ray Train);
rank 0 attaches a checkpoint holding the model and optimizer state, the
epoch, the learning history and the state of the LR-plateau,
early-stopping and weight-average callbacks (with Recipe.ema_decay the
model holds the average, and the weights training goes on from are kept
beside it). A restarted worker continues from the newest
checkpoint, so a preempted node costs at most the epoch in progress.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from skincluster.config import IMAGE_SHAPE, TrainRun, changed_settings
from skincluster.data.pipeline import mixup_batches
from skincluster.models.training import WeightAverage
from skincluster.train.context import (
    FINAL_EVALUATION,
    FINAL_MODEL,
    STATE_FILE,
    RunContext,
    read_checkpoint_state,
    scratch_dir,
)
from skincluster.train.evaluate import evaluate_model
from skincluster.train.strategy import any_replica, choose_strategy

WEIGHTS_PREFIX = "tf_ckpt"
BEST_WEIGHTS = "best_weights.npz"
#: With Recipe.ema_decay, the checkpointed model holds the weight average (it
#: was validated with it) and this file the trainable weights training goes on from.
TRAINING_WEIGHTS = "training_weights.npz"
#: Callback attributes that must survive a restart for LR plateau, early
#: stopping and the weight average to behave as if training had never stopped.
RESUMABLE_ATTRIBUTES = ("wait", "best", "cooldown_counter", "best_epoch", "stopped_epoch", "updates")


def run_worker(run: TrainRun, ctx: RunContext, verbose: int = 0) -> list[dict[str, Any]]:
    """Train `run` to its epoch budget (or early stop); return the per-epoch history."""
    from skincluster.models import compile_model, create_model, set_precision
    from skincluster.models.training import build_callbacks, class_weights

    strategy = choose_strategy(ctx.world_size)
    set_precision(run.recipe)
    keras.utils.set_random_seed(run.data.seed)
    num_classes = len(run.class_names)
    with strategy.scope():
        model = create_model(
            run.model,
            num_classes=num_classes,
            recipe=run.recipe,
            channel_mean=run.channel_mean,
            channel_std=run.channel_std,
        )
        compile_model(model, run.recipe, num_classes)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    callbacks = build_callbacks(run.recipe)
    averager = _callback_of(callbacks, WeightAverage)

    state: dict[str, Any] = {"epoch": 0, "history": [], "callbacks": {}, "finished": False, "restarts": 0}
    best_weights = None
    with ctx.latest_checkpoint() as path:
        if path:
            state = _read_state(path, ctx.checkpoint_name or path, run)
            state["restarts"] += 1
            checkpoint.read(os.path.join(path, WEIGHTS_PREFIX)).expect_partial()
            if os.path.exists(os.path.join(path, BEST_WEIGHTS)):
                with np.load(os.path.join(path, BEST_WEIGHTS)) as npz:
                    best_weights = [npz[f"w{i}"] for i in range(len(npz.files))]
            averaged = os.path.exists(os.path.join(path, TRAINING_WEIGHTS))
            if averaged != (averager is not None):
                # launch refuses to resume a run with other settings; this is the last guard.
                raise RuntimeError(f"{path} was written {'with' if averaged else 'without'} a weight average, but "
                                   f"this run has ema_decay={run.recipe.ema_decay}")
            if averager is not None:
                averager.average = keras.backend.batch_get_value(model.trainable_weights)
                with np.load(os.path.join(path, TRAINING_WEIGHTS)) as npz:
                    averager.training_weights = [npz[f"w{i}"] for i in range(len(npz.files))]
    if state["finished"]:
        return state["history"]

    replicas = strategy.num_replicas_in_sync
    # tf.distribute treats a dataset's batch as the global batch and splits it
    # across replicas, so every worker feeds batches of per-replica x replicas.
    global_batch = run.recipe.batch_size * replicas
    # The 0-based epoch whose shuffle the next training iterator draws. fit()
    # creates an epoch's iterator before calling on_epoch_begin, so whether the
    # generator saw the new epoch would depend on when tf.data first pulls from
    # it; the box moves on at the end of the epoch before instead
    # (EpochReporter.on_epoch_end).
    epoch_box = {"epoch": state["epoch"]}

    weights = None
    if run.recipe.class_weight != "none" and run.train_class_counts:
        counts = np.asarray(run.train_class_counts)
        weights = class_weights(np.repeat(np.arange(num_classes), counts), num_classes, run.recipe.class_weight)
    mixup = run.recipe.mixup_alpha
    mixup_weights = None if weights is None else [weights[k] for k in range(num_classes)]

    def dataset(split: str, train: bool) -> tf.data.Dataset:
        def generate():
            seed = run.data.seed * 100_003 + epoch_box["epoch"] if train else None
            batches = ctx.batches(split, global_batch, shuffle_seed=seed, drop_last=train)
            if train and mixup:
                # Seeded by epoch and worker, apart from the shuffle's stream: a
                # resumed epoch mixes the same pairs.
                rng = np.random.default_rng([seed, ctx.world_rank, 1])
                batches = mixup_batches(batches, mixup, num_classes, rng, mixup_weights)
            yield from batches

        return tf_dataset(generate, target_rows=num_classes if train and mixup else None)

    reporter = EpochReporter(run, ctx, checkpoint, callbacks, state, best_weights, epoch_box, global_batch)
    epochs = run.recipe.epochs
    model.fit(
        dataset("train", train=True),
        validation_data=dataset("val", train=False),
        epochs=epochs,
        initial_epoch=state["epoch"],
        callbacks=[*callbacks, reporter],
        # With mixup the class weights are already in the target rows; Keras would
        # multiply the loss by them a second time, not refuse both.
        class_weight=None if mixup else weights,
        verbose=verbose,
    )
    return reporter.state["history"]


def tf_dataset(generate, target_rows: int | None = None) -> tf.data.Dataset:
    """uint8 image batches from a generator function, prefetched, not re-sharded.

    `generate` is called afresh for every epoch and yields (images, labels),
    or with `target_rows` (images, float target rows of that many classes) as
    pipeline.mixup_batches does. Auto-sharding is off because Ray Data
    already gave each worker its own shard.
    """
    targets = tf.TensorSpec((None, target_rows), tf.float32) if target_rows else tf.TensorSpec((None,), tf.int32)
    signature = (tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8), targets)
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class EpochReporter(keras.callbacks.Callback):
    """Keras callback: after each epoch, checkpoint (rank 0 keeps it) and report.

    Runs after the LR-plateau and early-stopping callbacks, so it sees their
    decision for this epoch. On the last epoch, or when early stopping fires,
    it restores the best weights and adds the final ``model.keras`` to the
    checkpoint, so the run's result is in its newest checkpoint. Rank 0 adds
    that model's evaluation on the test and val splits as well.
    """

    def __init__(self, run, ctx, checkpoint, callbacks, state, best_weights, epoch_box, global_batch):
        super().__init__()
        self.run = run
        self.ctx = ctx
        self.checkpoint = checkpoint
        self.callbacks = callbacks
        self.state = state
        self.best_weights = best_weights
        self.epoch_box = epoch_box
        self.global_batch = global_batch
        self._epoch_start = 0.0
        self._steps = 0

    def _early_stopping(self):
        return _callback_of(self.callbacks, keras.callbacks.EarlyStopping)

    def on_train_begin(self, logs=None):
        # The other callbacks reset themselves in their own on_train_begin,
        # which ran before this one: put back what the checkpoint remembered.
        for cb in self.callbacks:
            saved = self.state["callbacks"].get(type(cb).__name__, {})
            for name, value in saved.items():
                setattr(cb, name, value)
        stopper = self._early_stopping()
        if stopper is not None and self.best_weights is not None:
            stopper.best_weights = self.best_weights

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._steps = 0
        run = self.run
        if run.fail_at_epoch is not None and epoch + 1 == run.fail_at_epoch and self.ctx.world_rank == run.fail_rank:
            if run.fail_marker and not os.path.exists(run.fail_marker):
                with open(run.fail_marker, "w") as fh:
                    fh.write(f"worker rank {self.ctx.world_rank} killed at the start of epoch {epoch + 1}\n")
                os._exit(17)  # an abrupt death, as a preempted node: no cleanup, no exception

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._epoch_start
        images = self._steps * self.global_batch
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics.update(
            epoch=epoch + 1,
            epoch_budget=self.run.recipe.epochs,
            lr=float(keras.backend.get_value(self.model.optimizer.learning_rate)),
            epoch_seconds=seconds,
            images_per_second=images / max(seconds, 1e-9),
            steps=self._steps,
        )
        stopper = self._early_stopping()
        metrics["stopped_early"] = bool(self.model.stop_training)
        metrics["stopped_by_time_budget"] = False
        budget = self.run.recipe.time_budget_minutes
        if budget is not None:
            spent = sum(h["epoch_seconds"] for h in self.state["history"]) + seconds
            # Stop when another epoch like this one would overrun the budget. Each
            # worker times itself, so the workers vote: all stop if any would.
            overrun = not self.model.stop_training and spent + seconds > budget * 60
            if any_replica(self.model.distribute_strategy, overrun):
                self.model.stop_training = True
                metrics["stopped_by_time_budget"] = True
        final = bool(self.model.stop_training) or epoch + 1 >= self.run.recipe.epochs
        if final and stopper is not None and stopper.best_weights is not None:
            self.model.set_weights(stopper.best_weights)
            metrics["best_epoch"] = int(stopper.best_epoch) + 1

        self.state["epoch"] = epoch + 1
        self.epoch_box["epoch"] = epoch + 1
        self.state["history"].append(metrics)
        # The first epoch of every fit() over a dataset of unknown length counts
        # one step too many (the call that finds the data exhausted), so a resumed
        # run's Adam bias correction would drift by one step per restart: set the
        # counter to the updates really made before it is checkpointed.
        self.model.optimizer.iterations.assign(sum(h["steps"] for h in self.state["history"]))
        self.state["finished"] = final
        self.state["callbacks"] = {
            type(cb).__name__: {a: _jsonable(getattr(cb, a)) for a in RESUMABLE_ATTRIBUTES if hasattr(cb, a)}
            for cb in self.callbacks
        }
        # Every worker writes (saving can involve collectives under
        # MultiWorkerMirroredStrategy); only rank 0's copy is kept.
        with scratch_dir() as folder:
            self.checkpoint.write(os.path.join(folder, WEIGHTS_PREFIX))
            if stopper is not None and stopper.best_weights is not None:
                np.savez(os.path.join(folder, BEST_WEIGHTS), **{f"w{i}": w for i, w in enumerate(stopper.best_weights)})
            averager = _callback_of(self.callbacks, WeightAverage)
            if averager is not None:
                weights = averager.training_weights
                if weights is None:  # no training step yet: the model holds its own weights
                    weights = keras.backend.batch_get_value(self.model.trainable_weights)
                np.savez(os.path.join(folder, TRAINING_WEIGHTS), **{f"w{i}": w for i, w in enumerate(weights)})
            if final:
                self.model.save(os.path.join(folder, FINAL_MODEL))
                if self.ctx.world_rank == 0:
                    # Here rather than in the trial's process, which then never imports TensorFlow.
                    # Inference only: no collective, so the other workers simply wait in report().
                    # The store is checked again, as at the run's start: one ingested again
                    # since would give the model another test set (launch.open_run_store).
                    from skincluster.train.launch import open_run_store

                    data = self.run.data
                    evaluation = evaluate_model(self.model, open_run_store(self.run), data.limit, data.seed)
                    with open(os.path.join(folder, FINAL_EVALUATION), "w", encoding="utf-8") as fh:
                        json.dump(evaluation, fh)
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump({**self.state, "run": dataclasses.asdict(self.run)}, fh, indent=1)
            self.ctx.report(metrics, folder if self.ctx.world_rank == 0 else None)


def _callback_of(callbacks: list[keras.callbacks.Callback], kind: type) -> Any:
    return next((c for c in callbacks if isinstance(c, kind)), None)


def _read_state(path: str, shown: str, run: TrainRun) -> dict[str, Any]:
    """The state of the checkpoint in folder `path` (kept at `shown`), refused if
    it was written by a run with other result settings (launch checks
    config.json first; this is the last guard, for a folder whose config.json
    was rewritten by a run of another mode)."""
    try:
        state = read_checkpoint_state(path)
    except ValueError as exc:
        raise RuntimeError(f"cannot resume from the checkpoint {shown}: {exc}") from None
    written_by = state.pop("run", None)
    changed = changed_settings(written_by, run) if isinstance(written_by, dict) else []
    if changed:
        raise RuntimeError(f"the checkpoint {shown} was written by a run with other settings ({'; '.join(changed)}); "
                           "run the same command as before to resume it, or use another --name or --storage")
    return state


def _jsonable(value: Any) -> Any:
    # numpy scalars to Python; an infinite "best" is written as Infinity, which json reads back.
    return value.item() if isinstance(value, (np.floating, np.integer)) else value
