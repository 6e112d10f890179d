"""`skincluster compare`: one Ray Tune trial per architecture (and per variant), each trial a Ray Train run.

Layout of an experiment folder ``<storage>/<name>/`` (local or a URI)::

    experiment.json          what was asked for, resolved per model
    runs/<trial>/            one Train run each: config, history, model.keras, evaluation.json
    tune/                    Ray Tune's own state (used to restore the experiment)
    results.csv, results.md, report.md, curves/*.png, confusion/*.png, best/model.keras

Each trial is a small Tune function that builds a Ray Train trainer with
TensorFlow's backend and calls `.fit()` (the Train V2 pattern);
`TuneReportCallback` turns each epoch's rank-0 report into a Tune iteration,
which is what schedulers act on. The trial's process never imports
TensorFlow: rank 0 evaluates the final model (train/ray_backend.py says why).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from skincluster import storage
from skincluster.config import (
    Scaling,
    TrainRun,
    changed_settings,
    check_folder_name,
    check_override_prefixes,
    prefixed_overrides,
    replace_fields,
)
from skincluster.data.store import open_store
from skincluster.train.launch import RunFailed, check_resumable, ensure_ray, resolve_run
from skincluster.train.resources import DATA_CPU_RESERVE, Capacity, check_resources, cluster_capacity

#: CPU held by each trial's own process: it only waits on the Train run and then
#: copies its result into the run folder, so a small share is enough.
TRIAL_CPU = 0.25
METRIC = "val_balanced_accuracy"


@dataclass(frozen=True)
class Comparison:
    data: str
    storage: str = "experiments"
    name: str = "compare"
    models: tuple[str, ...] = ()
    #: Further trials of a registered architecture under their own name (name ->
    #: architecture), set apart by ``name:field`` overrides; they take the
    #: architecture's profile settings and ``architecture:field`` overrides first.
    variants: dict[str, str] = field(default_factory=dict)
    profile: str = "full"
    #: Early-stopping patience for recipes that stop early (the enhanced MobileNet).
    patience: int | None = None
    scheduler: str = "plateau"
    #: Hardware of every trial's Train run, then per architecture or variant:
    #: ``{"mobilenet_enhanced": {"workers": 4}}`` (a variant takes its architecture's first).
    scaling: Scaling = Scaling()
    trial_scaling: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    #: None: as many trials at once as the cluster's free CPUs/GPUs fit.
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        check_folder_name(self.name, "experiment name")
        # Checked here too: a model that does not stop early would ignore a bad value.
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"--patience must be at least 0 epochs, got {self.patience}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        for variant in self.variants:
            check_folder_name(variant, "variant name")
            if any(c in variant for c in ":,="):
                raise ValueError(f"variant name {variant!r}: ':', ',' and '=' separate --set and --variant "
                                 "arguments; use letters, digits, '_' and '-'")

    @property
    def experiment_dir(self) -> str:
        # Absolute: Ray Tune reads a relative path as a URI with an empty scheme.
        return storage.join(storage.absolute(self.storage), self.name)


def resolve_runs(spec: Comparison) -> dict[str, TrainRun]:
    """One resolved TrainRun per trial, keyed by trial name: the chosen architectures, then the variants."""
    from skincluster.models import get_recipe, list_models

    models = tuple(dict.fromkeys(spec.models)) or tuple(list_models())  # once each, in the given order
    unknown = [m for m in (*models, *spec.variants.values()) if m not in list_models()]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    clashes = [v for v in spec.variants if v in list_models()]
    if clashes:
        raise ValueError(f"variant name(s) {', '.join(clashes)} are architecture names; name a variant after "
                         "what sets it apart, e.g. mobilenet_unweighted")
    prefixes = {**{m: m for m in list_models()}, **spec.variants}  # every architecture, not only those run
    check_override_prefixes(spec.overrides, {p: get_recipe(m) for p, m in prefixes.items()}, "model or variant")
    unknown = [name for name in spec.trial_scaling if name not in prefixes]
    if unknown:
        raise ValueError(f"hardware for {', '.join(unknown)}: no model or variant of that name; "
                         f"known: {', '.join(prefixes)}")
    scalings = {name: _trial_scaling(spec, name, model) for name, model in prefixes.items()}  # all checked
    alike = [v for v in spec.variants if not prefixed_overrides(spec.overrides, v)]
    if alike:
        raise ValueError(f"variant(s) {', '.join(alike)} would train their architecture unchanged; "
                         f"set them apart with --set {alike[0]}:FIELD=VALUE")
    store = open_store(spec.data)
    trials = {**{m: m for m in models}, **spec.variants}
    runs = {}
    for trial, model in trials.items():
        run = resolve_run(
            model,
            spec.data,
            storage_dir=storage.join(spec.experiment_dir, "runs"),
            name=trial,
            profile=spec.profile,
            overrides=spec.overrides,
            limit=spec.limit,
            seed=spec.seed,
            scaling=scalings[trial],
            store=store,
        )
        recipe = run.recipe
        if spec.patience is not None and recipe.early_stopping_patience is not None:
            recipe = dataclasses.replace(recipe, early_stopping_patience=spec.patience)
        if trial != model:  # a variant's own settings come last, --patience included
            recipe = replace_fields(recipe, prefixed_overrides(spec.overrides, trial))
        runs[trial] = dataclasses.replace(run, recipe=recipe)
    return runs


def _trial_scaling(spec: Comparison, trial: str, model: str) -> Scaling:
    """The comparison's hardware, then the architecture's, then a variant's own."""
    scaling = spec.scaling
    for name in dict.fromkeys((model, trial)):
        try:
            scaling = replace_fields(scaling, spec.trial_scaling.get(name, {}))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"hardware for {name}: {exc}") from None
    return scaling


def concurrent_trials(scalings: Mapping[str, Scaling], capacity: Capacity) -> int:
    """How many trials may run at once: as many as fit together even when the
    largest of them run side by side, each with its workers, its own small
    share and Ray Data's reserve; at least one. A trial that can never run
    (check_resources) is an error naming it.
    """
    cpus, gpus = [], []
    for trial, scaling in scalings.items():
        check_resources(scaling, capacity, f"trial {trial}")
        cpus.append(scaling.workers * scaling.cpus_per_worker + TRIAL_CPU + DATA_CPU_RESERVE)
        gpus.append(scaling.workers * scaling.gpus_per_worker)
    cpus.sort(reverse=True)
    gpus.sort(reverse=True)
    fit = 1
    while (fit < len(cpus) and sum(cpus[:fit + 1]) <= capacity.totals.get("CPU", 0) + 1e-9
           and sum(gpus[:fit + 1]) <= capacity.totals.get("GPU", 0) + 1e-9):
        fit += 1
    return fit


def _trial(config: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    """One Tune trial: the Train run of one architecture (or variant), with its test evaluation."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from skincluster.train.evaluate import format_summary
    from skincluster.train.launch import run_ray

    run = TrainRun.from_dict(runs[config["model"]])
    # The driver checked every trial against the cluster (run_comparison).
    result = run_ray(run, run_config_callbacks=[TuneReportCallback()], check_capacity=False)
    print(format_summary(run.name, result.evaluation), flush=True)


def run_comparison(spec: Comparison, *, verbose: int = 1) -> str:
    """Run (or resume) the comparison; build the report; return the experiment folder."""
    from ray import tune

    from skincluster.tune.report import build_report

    runs = resolve_runs(spec)
    fs, path = storage.resolve(spec.experiment_dir)
    tune_path = storage.join(spec.experiment_dir, "tune")
    resuming = tune.Tuner.can_restore(tune_path)
    _check_same_trials(fs, path, spec, runs, resuming)
    for run in runs.values():  # also without Tune's state: the trials' own folders may hold checkpoints
        check_resumable(run)
    ensure_ray()
    capacity = cluster_capacity()
    fit = concurrent_trials({trial: run.scaling for trial, run in runs.items()}, capacity)
    max_concurrent = spec.max_concurrent or fit
    print(f"{len(runs)} trial(s), {max_concurrent} at a time; the cluster has {capacity.describe()}", flush=True)
    fs.create_dir(path, recursive=True)
    storage.write_json_atomic(
        fs,
        f"{path}/experiment.json",
        {"comparison": dataclasses.asdict(spec), "runs": {m: dataclasses.asdict(r) for m, r in runs.items()}},
    )

    trainable = tune.with_resources(
        tune.with_parameters(_trial, runs={m: dataclasses.asdict(r) for m, r in runs.items()}),
        _trial_resources(max_concurrent),
    )
    if resuming:
        # The driver died: finished trials stay finished, the others start again
        # and their Train runs resume from their own checkpoints.
        tuner = tune.Tuner.restore(tune_path, trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"model": tune.grid_search(list(runs))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                scheduler=_scheduler(spec, runs),
                trial_name_creator=lambda trial: trial.config["model"],
                trial_dirname_creator=lambda trial: trial.config["model"],
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=spec.experiment_dir,
                verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
    results = tuner.fit()
    build_report(spec.experiment_dir)
    failed = [(r.config or {}).get("model", str(r.path)) for r in results if r.error is not None]
    if failed:
        raise RunFailed(
            f"{len(failed)} trial(s) failed: {', '.join(failed)}; the report in {spec.experiment_dir} "
            "shows the others. Tune's error files are listed above; run the same command again to retry."
        )
    return spec.experiment_dir


#: A resource every Ray head node has one of (Ray Train and Serve pin their own actors with it).
HEAD_NODE = "node:__internal_head__"


def _trial_resources(max_concurrent: int):
    """Each trial's share of a CPU, on the head node when it has the CPUs for them.

    Ray Train puts a run's controller on its trial's node. On a spot node, a
    preemption would kill both and end the trial (Tune retries it once); on
    the on-demand head (cluster.yaml) a preemption only takes workers, which
    Train restarts from the last checkpoint. A head with too few CPUs (one
    started with none, as KubeRay advises) leaves the trials to Ray.
    """
    import ray
    from ray import tune

    head_cpus = sum(float(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                    if n.get("Alive") and HEAD_NODE in n["Resources"])
    if head_cpus + 1e-9 < TRIAL_CPU * max_concurrent:
        print(f"note: the head node has {head_cpus:g} CPUs, too few for {max_concurrent} trial(s) of {TRIAL_CPU} "
              "CPU each; trials may run on any node", flush=True)
        return tune.PlacementGroupFactory([{"CPU": TRIAL_CPU}])
    return tune.PlacementGroupFactory([{"CPU": TRIAL_CPU, HEAD_NODE: 0.001}])


def _check_same_trials(fs, path: str, spec: Comparison, runs: dict[str, TrainRun], resuming: bool) -> None:
    """Tune restores the trials it started with: a resumed experiment cannot gain or lose one,
    nor change what a trial's results depend on (its finished epochs were made with the old settings)."""
    if not resuming or not storage.exists(fs, f"{path}/experiment.json"):
        return
    shown, hint = storage.join(spec.experiment_dir, "experiment.json"), "move the experiment folder away or use another --name"
    experiment = storage.read_json_checked(fs, f"{path}/experiment.json", shown, hint)
    previous = experiment.get("runs")
    if not isinstance(previous, dict) or not all(isinstance(r, dict) for r in previous.values()):
        raise ValueError(f'{shown}: no "runs" object of trials; {hint}')
    before = set(previous)
    if before != set(runs):
        changes = [f"{what}: {', '.join(sorted(names))}"
                   for what, names in (("new", set(runs) - before), ("missing", before - set(runs))) if names]
        raise ValueError(f"{path} holds an experiment of other trials ({'; '.join(changes)}); "
                         "ask for the same --models and --variant to resume it, or use another --name")
    changed = []
    scheduler = experiment.get("comparison", {}).get("scheduler", spec.scheduler)
    if scheduler != spec.scheduler:  # Tune keeps the scheduler it started with
        changed.append(f"--scheduler {scheduler} -> {spec.scheduler}")
    for trial, run in runs.items():
        changed += [f"{trial} {change}" for change in changed_settings(previous[trial], run)]
    if changed:
        raise ValueError(f"{path} holds an experiment run with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); run the same command as before to resume it, "
                         "or use another --name")


def _scheduler(spec: Comparison, runs: dict[str, TrainRun]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "plateau":
        # Early stopping lives in each recipe (patience on val balanced accuracy),
        # where it also restores the best weights; Tune just runs the trials.
        return FIFOScheduler()
    if spec.scheduler == "asha":
        return ASHAScheduler(
            # The epoch, not Tune's training_iteration: a trial restarted after the
            # driver died resumes its Train checkpoint at epoch k+1, but its
            # iteration count starts again at 1, so ASHA would judge it at the
            # wrong rungs.
            time_attr="epoch",
            metric=METRIC,
            mode="max",
            # One past the longest budget: a trial that completes its epochs must end
            # by itself (and be evaluated), not be stopped by ASHA at max_t.
            max_t=max(r.recipe.epochs for r in runs.values()) + 1,
            # Below the shortest budget, so ASHA can stop a trial before its last
            # epoch (a stop at the last report would only skip its evaluation).
            grace_period=max(1, min(5, min(r.recipe.epochs for r in runs.values()) - 1)),
        )
    raise ValueError(f"unknown scheduler {spec.scheduler!r}: expected plateau or asha")
