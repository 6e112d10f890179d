"""The main job: the smoke comparison of every registered model, report, driver-kill resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from skincluster.cli import main as cli_main
from skincluster.config import Scaling
from skincluster.models import list_models
from skincluster.tune.compare import Comparison, resolve_runs, run_comparison
from skincluster.tune.report import ReportError, build_report, collect

pytestmark = pytest.mark.ray

REPORT_FILES = ["results.csv", "results.md", "report.md", "curves/all_val.png", "best/model.keras", "experiment.json"]


def copy_for_report(experiment, destination, skip=("tune", "*.keras")):
    """A copy of `experiment` to damage, without what the report never reads
    (the runs' checkpoints: gigabytes over the tests) and the `skip` patterns."""
    shutil.copytree(experiment, destination, ignore=shutil.ignore_patterns("checkpoint_*", *skip))


@dataclasses.dataclass
class KilledAndResumed:
    """The smoke experiment's folder, and what its killed driver had left behind."""

    folder: str
    #: Trial -> modification time of its evaluation.json when the driver was killed.
    finished: dict[str, float]
    #: Trials with a checkpoint but no evaluation when the driver was killed.
    interrupted: list[str]


@pytest.fixture(scope="module")
def killed_and_resumed_smoke(synthetic_store, tmp_path_factory, ray_session) -> KilledAndResumed:
    """All seven architectures on a 2-CPU Ray runtime, two trials at a time, run
    as a user runs them: the CLI, in its own process, joining the runtime.

    Its driver is killed once a trial has finished and another is between
    epochs, and the comparison is run again to the end: the issue's restore
    test, on the comparison the other tests read (a separate two-trial
    experiment cost 155 s of the suite). A smoke trial is mostly process
    start-ups, which two trials overlap (274 s instead of 406 s one at a
    time, measured here). Five trials start after others finished: a finished
    trial that kept its workers' CPUs would still leave a later one waiting.
    """
    storage_dir = str(tmp_path_factory.mktemp("exp"))
    args = ["compare", "--data", synthetic_store, "--storage", storage_dir, "--name", "smoke", "--profile", "smoke",
            "--cpus-per-worker", "0.5", "--max-concurrent", "2"]
    runs = os.path.join(storage_dir, "smoke", "runs")
    log_path = os.path.join(storage_dir, "killed-driver.log")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with open(log_path, "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "skincluster", *args], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (_finished_trials(runs) and _trials_between_epochs(runs)):
            if driver.poll() is not None:
                pytest.fail(f"the driver ended before it could be killed: {open(log_path).read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"no trial finished within 600 s: {open(log_path).read()[-3000:]}")
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # The trial actors die with their driver, a moment later: read what they left once they are gone.
    _wait_until_only_this_job_has_actors(ray_session)
    finished = _finished_trials(runs)
    interrupted = [t for t in os.listdir(runs) if t not in finished and _checkpoint_epochs(os.path.join(runs, t))]

    assert cli_main(args) == 0  # the same command again, in this process (on the same runtime)
    return KilledAndResumed(os.path.join(storage_dir, "smoke"), finished, interrupted)


@pytest.fixture(scope="module")
def smoke_experiment(killed_and_resumed_smoke) -> str:
    return killed_and_resumed_smoke.folder


def _finished_trials(runs: str) -> dict[str, float]:
    found = {}
    for trial in os.listdir(runs) if os.path.isdir(runs) else []:
        evaluation = os.path.join(runs, trial, "evaluation.json")
        if os.path.exists(evaluation):
            found[trial] = os.path.getmtime(evaluation)
    return found


def _checkpoint_epochs(run_dir: str) -> list[int]:
    return sorted(int(n.rsplit("_", 1)[1]) for n in os.listdir(run_dir) if n.startswith("checkpoint_epoch_"))


def _trials_between_epochs(runs: str) -> list[str]:
    """Trials whose first checkpoint Ray Train has registered (its snapshot file
    exists) and which have at least one more epoch to go, so a kill lands before
    their evaluation."""
    found = []
    for trial in os.listdir(runs):
        run_dir = os.path.join(runs, trial)
        if not os.path.exists(os.path.join(run_dir, "checkpoint_manager_snapshot.json")):
            continue
        budget = json.load(open(os.path.join(run_dir, "config.json")))["recipe"]["epochs"]
        epochs = _checkpoint_epochs(run_dir)
        if epochs and epochs[-1] < budget:
            found.append(trial)
    return found


def _wait_until_only_this_job_has_actors(ray, timeout: float = 120) -> None:
    from ray.util.state import list_actors

    this_job = ray.get_runtime_context().get_job_id()
    deadline = time.time() + timeout
    while True:
        # Detached actors (Ray Data's AutoscalingCoordinator) outlive their job by design.
        others = [a for a in list_actors(filters=[("state", "!=", "DEAD")], limit=10000, detail=True)
                  if a.job_id != this_job and not a.is_detached]
        if not others:
            return
        assert time.time() < deadline, f"actors of the killed driver still alive after {timeout} s: {others}"
        time.sleep(1)


def test_every_model_has_a_row_with_finite_metrics(smoke_experiment):
    table = pd.read_csv(os.path.join(smoke_experiment, "results.csv"))
    assert sorted(table["model"]) == sorted(list_models())
    for column in ("test_accuracy", "balanced_accuracy", "macro_f1", "melanoma_recall", "roc_auc", "val_loss"):
        assert table[column].map(math.isfinite).all(), column


def test_every_report_file_is_written(smoke_experiment):
    for name in REPORT_FILES:
        assert os.path.exists(os.path.join(smoke_experiment, name)), name
    for model in list_models():
        assert os.path.exists(os.path.join(smoke_experiment, "curves", f"{model}.png")), model
        assert os.path.exists(os.path.join(smoke_experiment, "confusion", f"{model}.png")), model


def test_enhanced_mobilenet_stopped_early(smoke_experiment):
    table = pd.read_csv(os.path.join(smoke_experiment, "results.csv")).set_index("model")
    row = table.loc["mobilenet_enhanced"]
    assert row["status"] == "early stopped"
    assert row["epochs_run"] < row["epoch_budget"]


def test_report_rebuilds_from_storage_alone(smoke_experiment):
    for name in ("results.csv", "report.md", "curves/all_val.png"):
        os.remove(os.path.join(smoke_experiment, name))
    build_report(smoke_experiment)
    for name in ("results.csv", "report.md", "curves/all_val.png"):
        assert os.path.exists(os.path.join(smoke_experiment, name))


def test_a_damaged_experiment_file_is_named_and_nothing_is_rewritten(smoke_experiment, tmp_path, capsys):
    def damaged(name, text):
        copy = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        copy_for_report(smoke_experiment, copy)
        (copy / name).write_text(text)
        return copy

    evaluation = json.loads(open(os.path.join(smoke_experiment, "runs", "nn", "evaluation.json")).read())
    history = json.loads(open(os.path.join(smoke_experiment, "runs", "cnn", "history.json")).read())
    experiment = json.loads(open(os.path.join(smoke_experiment, "experiment.json")).read())
    without_recipe = json.loads(json.dumps(experiment))
    del without_recipe["runs"]["nn"]["recipe"]
    cases = [
        # Parsed, but not what the report can use: named, not a traceback.
        ("runs/nn/evaluation.json", json.dumps({**evaluation, "accuracy": "high"}),
         r"runs/nn/evaluation.json: not what a trial's evaluation holds: accuracy$"),
        ("runs/nn/evaluation.json", json.dumps({**evaluation, "per_class": [1, 2]}), r"evaluation.json: .*per_class"),
        ("runs/nn/evaluation.json", json.dumps({**evaluation, "confusion_matrix": [[1, 2], [3]]}),
         r"evaluation.json: .*confusion_matrix \(7 rows of 7 counts"),
        ("runs/cnn/history.json", json.dumps([history[0], {**history[1], "val_balanced_accuracy": None}]),
         r"runs/cnn/history.json: entry 1 \(epoch 2\): val_balanced_accuracy not a number"),
        ("experiment.json", json.dumps(without_recipe), r"experiment.json: .*runs.nn \(a resolved run"),
        ("experiment.json", json.dumps({**experiment, "runs": {}}), r"runs \(an object of one or more trials\)"),
    ]
    del evaluation["confusion_matrix"]
    cases += [
        ("experiment.json", '{"runs": ', r"experiment.json: not readable JSON"),
        ("experiment.json", "{}", r"experiment.json: not what `skincluster compare` writes"),
        ("runs/nn/evaluation.json", "", r"runs/nn/evaluation.json: not readable JSON"),
        ("runs/nn/evaluation.json", json.dumps(evaluation), r"runs/nn/evaluation.json: .*lacks confusion_matrix"),
        ("runs/cnn/history.json", '{"x": 1}', r"runs/cnn/history.json: not a per-epoch history"),
        ("runs/cnn/history.json", '[{"images_per_second": 5.0}]', r"runs/cnn/history.json: not a per-epoch history"),
        ("runs/nn/evaluation.json", json.dumps({**evaluation, "confusion_matrix": [], "val": None}),
         r"runs/nn/evaluation.json: .*lacks val \(an object\)"),
    ]
    for name, text, message in cases:
        copy = damaged(name, text)
        outputs = ("results.csv", "results.md", "report.md")
        before = [((copy / f).read_bytes(), os.path.getmtime(copy / f)) for f in outputs]
        with pytest.raises(ReportError, match=message):
            build_report(str(copy))
        assert [((copy / f).read_bytes(), os.path.getmtime(copy / f)) for f in outputs] == before, name
    assert cli_main(["report", str(copy)]) == 2
    assert cli_main(["report", str(tmp_path / "no-such-experiment")]) == 2
    assert "no-such-experiment: no such folder" in capsys.readouterr().err


def test_a_torn_last_line_of_tune_results_is_dropped_but_a_torn_middle_line_is_named(smoke_experiment, tmp_path):
    copy = tmp_path / "e"
    copy_for_report(smoke_experiment, copy)
    for name in ("history.json", "evaluation.json"):  # as if nn's node was lost mid-epoch
        os.remove(copy / "runs" / "nn" / name)
    epochs = [json.dumps({"epoch": e, "val_balanced_accuracy": 0.2 + e / 10, "images_per_second": 50.0})
              for e in (1, 2)]
    result = copy / "tune" / "nn" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text("\n".join(epochs) + '\n{"epoch": 3, "val_bal')  # the node died mid-append
    table, _, histories, _ = collect(str(copy))
    assert [h["epoch"] for h in histories["nn"]] == [1, 2]
    assert table.set_index("model").loc["nn", "status"] == "interrupted"
    result.write_text(epochs[0] + '\n{"epoch": 2, "val_bal\n' + epochs[1] + "\n")
    with pytest.raises(ReportError, match=r"tune/nn/result.json, line 2: not readable JSON"):
        collect(str(copy))


def test_a_report_without_the_best_model_file_says_it_was_not_exported(smoke_experiment, tmp_path):
    copy = tmp_path / "e"
    copy_for_report(smoke_experiment, copy)
    summary = build_report(str(copy))
    text = (copy / "report.md").read_text()
    assert f"Not exported: `runs/{summary['best']}/model.keras` is missing" in text
    assert "Exported as" not in text and not (copy / "best" / "model.keras").exists()


def test_a_damaged_best_model_is_not_exported_and_no_older_best_is_left(smoke_experiment, tmp_path):
    copy = tmp_path / "e"
    copy_for_report(smoke_experiment, copy, skip=("tune",))
    best = build_report(str(copy))["best"]
    assert (copy / "best" / "model.keras").read_bytes() == (copy / "runs" / best / "model.keras").read_bytes()
    model = copy / "runs" / best / "model.keras"
    model.write_bytes(model.read_bytes()[:100_000])  # a torn copy, as from a node lost mid-upload
    assert build_report(str(copy))["best"] == best
    text = (copy / "report.md").read_text()
    assert f"Not exported: `runs/{best}/model.keras` is damaged" in text and "Exported as" not in text
    # The previous report's best/ is not left to contradict this one.
    assert not (copy / "best" / "model.keras").exists() and not (copy / "best" / "best.json").exists()


def test_no_ensemble_row_from_a_store_ingested_again_since_the_trials(smoke_experiment, tmp_path):
    def ensemble_rows(folder):  # results.md has the ensemble row; results.csv has the trials only
        return [line for line in (folder / "results.md").read_text().splitlines() if line.startswith("| ensemble (")]

    copy = tmp_path / "e"
    copy_for_report(smoke_experiment, copy, skip=("ensemble", "best"))
    build_report(str(copy))
    assert len(ensemble_rows(copy)) == 1  # evaluated afresh on the real store
    shutil.rmtree(copy / "ensemble")
    experiment = json.loads((copy / "experiment.json").read_text())
    for run in experiment["runs"].values():
        run["data"]["fingerprint"] = "the store the trials were trained on, since ingested again"
    (copy / "experiment.json").write_text(json.dumps(experiment))
    build_report(str(copy))
    assert ensemble_rows(copy) == []
    assert "was ingested again since the members were trained" in (copy / "report.md").read_text()


def test_a_trial_with_epochs_but_no_evaluation_is_interrupted_not_stopped(smoke_experiment, tmp_path):
    copy = tmp_path / "e"
    copy_for_report(smoke_experiment, copy)
    os.remove(copy / "runs" / "nn" / "evaluation.json")  # as if the driver died before nn's evaluation
    table, *_ = collect(str(copy))
    assert table.set_index("model").loc["nn", "status"] == "interrupted"


def test_a_resume_must_keep_what_results_depend_on_and_may_change_the_hardware(synthetic_store, tmp_path):
    from skincluster import storage
    from skincluster.tune.compare import _check_same_trials

    spec = Comparison(data=synthetic_store, storage=str(tmp_path), name="x", models=("nn",), profile="smoke")
    fs, path = storage.resolve(spec.experiment_dir)
    os.makedirs(path)
    with open(os.path.join(path, "experiment.json"), "w") as fh:
        json.dump({"comparison": dataclasses.asdict(spec),
                   "runs": {m: dataclasses.asdict(r) for m, r in resolve_runs(spec).items()}}, fh)

    def check(**changes):
        other = dataclasses.replace(spec, **changes)
        _check_same_trials(fs, path, other, resolve_runs(other), resuming=True)

    check(scaling=Scaling(cpus_per_worker=0.5, max_failures=3))  # a smaller cluster after a preemption
    check(data=synthetic_store + "/")
    with pytest.raises(ValueError, match=r"other settings \(nn recipe.learning_rate 0.00075 -> 0.001\)"):
        check(overrides={"learning_rate": "1e-3"})
    with pytest.raises(ValueError, match=r"other settings \(nn scaling.workers 1 -> 2\)"):
        check(scaling=Scaling(workers=2))  # the global batch grows with the replicas
    with pytest.raises(ValueError, match=r"other settings \(--scheduler plateau -> asha\)"):
        check(scheduler="asha")
    check(trial_scaling={"nn": {"cpus_per_worker": "0.5"}})  # one trial's hardware, likewise
    with pytest.raises(ValueError, match=r"other settings \(nn scaling.workers 1 -> 2\)"):
        check(trial_scaling={"nn": {"workers": "2"}})
    with open(os.path.join(path, "experiment.json"), "w") as fh:
        fh.write('{"runs": [')
    with pytest.raises(ValueError, match=r"x/experiment.json: unreadable"):
        check()
    with open(os.path.join(path, "experiment.json"), "w") as fh:
        fh.write('{"runs": 3}')
    with pytest.raises(ValueError, match=r"x/experiment.json: no \"runs\" object"):
        check()


def test_trial_folders_with_checkpoints_of_other_settings_are_refused_before_ray_starts(synthetic_store, tmp_path):
    """Without Tune's state (deleted, or never saved) the trials' folders may still
    hold checkpoints that their Train runs would resume: checked before anything runs."""
    spec = Comparison(data=synthetic_store, storage=str(tmp_path), name="x", models=("nn",), profile="smoke")
    old = dataclasses.replace(spec, overrides={"learning_rate": "1e-3"})
    run_dir = tmp_path / "x" / "runs" / "nn"
    os.makedirs(run_dir / "checkpoint_epoch_0001")
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(resolve_runs(old)["nn"])))
    with pytest.raises(ValueError, match=r"runs/nn holds a run with other settings \(recipe.learning_rate 0.001 -> "):
        run_comparison(spec)
    assert not (tmp_path / "x" / "experiment.json").exists()


def test_experiment_folder_is_absolute_for_relative_storage(tmp_path, monkeypatch):
    """Seen: `--storage demo/experiments` made Tune fail with "URI has empty scheme"."""
    monkeypatch.chdir(tmp_path)
    spec = Comparison(data="store", storage="demo/experiments", name="x")
    assert spec.experiment_dir == str(tmp_path / "demo" / "experiments" / "x")
    assert Comparison(data="s", storage="s3://bucket/exp", name="x").experiment_dir == "s3://bucket/exp/x"


def test_runs_use_absolute_paths_for_relative_arguments(synthetic_store, monkeypatch):
    """Seen: Tune trials run in their own folder, where `--data demo/store` did not exist."""
    from skincluster.train.launch import resolve_run

    parent, name = os.path.split(synthetic_store)
    monkeypatch.chdir(parent)
    run = resolve_run("nn", name, storage_dir="runs", profile="smoke")
    assert run.data.store == synthetic_store and run.storage == os.path.join(parent, "runs")


def test_bad_patience_is_an_error_before_anything_runs(synthetic_store, tmp_path):
    with pytest.raises(ValueError, match="--patience must be at least 0 epochs, got -3"):
        run_comparison(Comparison(data=synthetic_store, storage=str(tmp_path), name="x", patience=-3, profile="smoke"))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("arguments, message", [
    (["--models", ","], "--models ',' names no architecture"),
    (["--models", "nn", "--patience", "-1"], "--patience must be at least 0"),  # nn has no early stopping
    (["--models", "nn", "--limit", "0"], "--limit must be positive, got 0"),
    (["--models", "nn", "--max-concurrent", "0"], "--max-concurrent must be at least 1"),
    (["--models", "nn", "--workers", ":2"], "--workers ':2': name the trial before ':'"),
    (["--models", "nn", "--workers", "nn:2", "--workers", "nn:3"], "--workers is given twice for nn"),
    (["--models", "nn", "--gpus-per-worker", "1", "--gpus-per-worker", "2"], "given twice for every trial"),
    (["--models", "nn", "--workers", "two"], "hardware for every trial: workers='two': cannot be read"),
    (["--models", "nn", "--workers", "nn:0"], "hardware for nn: workers must be at least 1, got 0"),
    (["--models", "nn", "--cpus-per-worker", "nnn:2"], "hardware for nnn: no model or variant of that name"),
    # A bad value for an architecture this run does not train is still a typo.
    (["--models", "nn", "--gpus-per-worker", "cnn:-1"], "hardware for cnn: gpus_per_worker and cpus_per_worker"),
])
def test_bad_compare_arguments_are_errors_before_anything_runs(synthetic_store, tmp_path, capsys, arguments, message):
    assert cli_main(["compare", "--data", synthetic_store, "--storage", str(tmp_path), "--profile", "smoke",
                     *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_each_trial_may_have_its_own_hardware(synthetic_store, tmp_path):
    """The 500-epoch enhanced MobileNet may take a node's GPUs while a small model takes one or none."""
    spec = Comparison(
        data=synthetic_store, storage=str(tmp_path), name="x", profile="smoke",
        models=("nn", "mobilenet", "mobilenet_enhanced"), variants={"mobilenet_b": "mobilenet"},
        scaling=Scaling(gpus_per_worker=1, cpus_per_worker=4),
        trial_scaling={"mobilenet_enhanced": {"workers": "4"}, "nn": {"gpus_per_worker": "0", "cpus_per_worker": "2"},
                       "mobilenet": {"max_failures": "5"}, "mobilenet_b": {"cpus_per_worker": "8"}},
        overrides={"mobilenet_b:batch_size": "64"},
    )
    scalings = {trial: run.scaling for trial, run in resolve_runs(spec).items()}
    assert scalings == {
        "nn": Scaling(gpus_per_worker=0, cpus_per_worker=2),
        "mobilenet": Scaling(gpus_per_worker=1, cpus_per_worker=4, max_failures=5),
        "mobilenet_enhanced": Scaling(workers=4, gpus_per_worker=1, cpus_per_worker=4),
        # A variant takes its architecture's hardware, then its own.
        "mobilenet_b": Scaling(gpus_per_worker=1, cpus_per_worker=8, max_failures=5),
    }


def test_the_report_names_each_trials_hardware_when_they_differ():
    from skincluster.tune.report import _hardware

    def run(workers, gpus):
        return {"scaling": {"workers": workers, "gpus_per_worker": gpus}}

    assert _hardware({"nn": run(1, 0), "cnn": run(1, 0)}) == "1 worker(s) x 0 GPU per trial"
    assert _hardware({"nn": run(1, 0), "mobilenet_enhanced": run(4, 1)}) == (
        "per trial: nn 1 worker(s) x 0 GPU, mobilenet_enhanced 4 worker(s) x 1 GPU")


def test_a_variant_is_its_architecture_with_its_own_overrides(synthetic_store, tmp_path):
    spec = Comparison(
        data=synthetic_store, storage=str(tmp_path), name="x", profile="cpu", models=("mobilenet",),
        variants={"mobilenet_unweighted": "mobilenet"},
        overrides={"mobilenet:alpha": "0.75", "mobilenet:class_weight": "balanced",
                   "mobilenet_unweighted:class_weight": "none", "batch_size": "16"},
    )
    runs = resolve_runs(spec)
    assert list(runs) == ["mobilenet", "mobilenet_unweighted"]
    base, variant = runs["mobilenet"], runs["mobilenet_unweighted"]
    assert variant.model == "mobilenet" and variant.name == "mobilenet_unweighted"
    assert variant.storage == base.storage  # runs/<trial>/ side by side
    # The profile's, the shared and the architecture's settings, then the variant's own.
    assert (base.recipe.class_weight, variant.recipe.class_weight) == ("balanced", "none")
    assert dataclasses.replace(variant.recipe, class_weight="balanced") == base.recipe
    assert variant.recipe.alpha == 0.75 and variant.recipe.batch_size == 16 and variant.recipe.epochs == 30


def test_patience_gives_way_to_a_variants_own(synthetic_store, tmp_path):
    spec = Comparison(
        data=synthetic_store, storage=str(tmp_path), name="x", profile="cpu", models=("mobilenet_enhanced",),
        variants={"enhanced_p20": "mobilenet_enhanced"}, patience=5,
        overrides={"enhanced_p20:early_stopping_patience": "20"},
    )
    runs = resolve_runs(spec)
    assert runs["mobilenet_enhanced"].recipe.early_stopping_patience == 5
    assert runs["enhanced_p20"].recipe.early_stopping_patience == 20


@pytest.mark.parametrize("variants, overrides, message", [
    ({"mobilenet_x": "mobilnet"}, {"mobilenet_x:epochs": "3"}, "unknown model.*mobilnet"),
    ({"cnn": "mobilenet"}, {"cnn:epochs": "3"}, "variant name.*cnn.*architecture"),
    ({"../x": "mobilenet"}, {}, "variant name"),
    ({"a:b": "mobilenet"}, {}, "variant name 'a:b'"),
    ({"mobilenet_x": "mobilenet"}, {}, "mobilenet_x would train their architecture unchanged"),
    ({}, {"mobilnet:alpha": "0.75"}, "mobilnet:alpha.*no model or variant named 'mobilnet'"),
    # resnet50 is not among --models here, but a bad field for it is still a typo
    ({}, {"resnet50:learning_rat": "0.1"}, "override for resnet50: unknown Recipe field 'learning_rat'"),
    ({"mobilenet_x": "mobilenet"}, {"mobilenet_x:epochs": "many"}, "override for mobilenet_x: epochs='many'"),
])
def test_bad_variants_and_override_prefixes_are_errors_before_anything_runs(
        synthetic_store, tmp_path, variants, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_comparison(Comparison(data=synthetic_store, storage=str(tmp_path), name="x", profile="smoke",
                                  models=("nn",), variants=variants, overrides=overrides))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("arguments, message", [
    (["--variant", "mobilenet_x"], "--variant takes NAME=MODEL"),
    (["--variant", "=mobilenet"], "--variant takes NAME=MODEL"),
    (["--variant", "mobilenet_x="], "--variant takes NAME=MODEL"),
    (["--variant", "v=nn", "--variant", "v=cnn"], "--variant v is given twice"),
])
def test_cli_variant_needs_a_name_and_a_model_once(arguments, message, tmp_path, capsys):
    assert cli_main(["compare", "--data", "nowhere", "--storage", str(tmp_path), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_train_rejects_an_override_prefix_that_names_no_model(synthetic_store, tmp_path, capsys):
    args = ["train", "nn", "--data", synthetic_store, "--storage", str(tmp_path), "--local",
            "--set", "mobilnet:alpha=0.75"]
    assert cli_main(args) == 2
    assert "no model named 'mobilnet'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
    args[-1] = "mobilenet:alpha=wide"  # mobilenet is not trained here, but the typo is still named
    assert cli_main(args) == 2
    assert "override for mobilenet: alpha='wide': cannot be read as" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_asha_compares_variants_of_one_architecture(synthetic_store, tmp_path, ray_session):
    spec = Comparison(
        data=synthetic_store, storage=str(tmp_path), name="asha", profile="smoke", scheduler="asha",
        models=("nn",), variants={"nn_lr3e3": "nn"}, scaling=Scaling(cpus_per_worker=0.5), max_concurrent=2,
        trial_scaling={"nn_lr3e3": {"cpus_per_worker": "0.25"}},
        overrides={"epochs": "3", "nn_lr3e3:learning_rate": "3e-3"},
    )
    experiment = run_comparison(spec, verbose=0)
    table = pd.read_csv(os.path.join(experiment, "results.csv")).set_index("model")
    assert sorted(table.index) == ["nn", "nn_lr3e3"]
    for trial, row in table.iterrows():
        ran_all = row["epochs_run"] == 3
        # ASHA may stop a trial at its rung (epoch 2), never after its last epoch:
        # a trial that ran all its epochs was evaluated.
        assert row["status"] == ("finished" if ran_all else "stopped by scheduler"), trial
        assert os.path.exists(os.path.join(experiment, "runs", trial, "evaluation.json")) == ran_all, trial
        assert os.path.exists(os.path.join(experiment, "curves", f"{trial}.png")), trial
    configs = {t: json.load(open(os.path.join(experiment, "runs", t, "config.json"))) for t in table.index}
    assert configs["nn_lr3e3"]["model"] == "nn"
    assert [configs[t]["recipe"]["learning_rate"] for t in ("nn", "nn_lr3e3")] == [7.5e-4, 3e-3]
    # Each trial's Train run got its own hardware.
    assert [configs[t]["scaling"]["cpus_per_worker"] for t in ("nn", "nn_lr3e3")] == [0.5, 0.25]
    recorded = json.load(open(os.path.join(experiment, "experiment.json")))["comparison"]
    assert recorded["scheduler"] == "asha" and recorded["variants"] == {"nn_lr3e3": "nn"}

    # Tune restores the trials it began with, so the same name with another set is refused.
    more = dataclasses.replace(spec, variants={**spec.variants, "nn_b64": "nn"},
                               overrides={**spec.overrides, "nn_b64:batch_size": "64"})
    with pytest.raises(ValueError, match="other trials \\(new: nn_b64\\).*another --name"):
        run_comparison(more, verbose=0)
    assert json.load(open(os.path.join(experiment, "experiment.json")))["comparison"]["variants"] == spec.variants


def test_asha_judges_a_resumed_trial_by_its_epoch():
    """A trial restarted after the driver died resumes its Train checkpoint at
    epoch 6, while Tune's iteration count starts again at 1: ASHA must see
    that it is past the epoch-5 rung and stop it there when it is worse."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from skincluster.tune.compare import METRIC, _scheduler

    runs = {m: SimpleNamespace(recipe=SimpleNamespace(epochs=10)) for m in ("a", "b")}
    scheduler = _scheduler(SimpleNamespace(scheduler="asha"), runs)
    good, better, resumed = (Trial("__fake", trial_id=t, stub=True) for t in ("good", "better", "resumed"))
    for trial in (good, better, resumed):
        scheduler.on_trial_add(None, trial)
    for trial, score in ((good, 0.8), (better, 0.9)):
        for epoch in range(1, 6):
            scheduler.on_trial_result(None, trial, {"epoch": epoch, "training_iteration": epoch, METRIC: score})
    decision = scheduler.on_trial_result(None, resumed, {"epoch": 6, "training_iteration": 1, METRIC: 0.1})
    assert decision == "STOP"


def test_killed_driver_resumes_without_rerunning_finished_trials(killed_and_resumed_smoke):
    killed = killed_and_resumed_smoke
    runs = os.path.join(killed.folder, "runs")
    assert killed.finished and killed.interrupted, "the driver was not killed between two trials' epochs"
    for trial, evaluated in killed.finished.items():  # not trained again
        assert os.path.getmtime(os.path.join(runs, trial, "evaluation.json")) == evaluated, trial
    table = pd.read_csv(os.path.join(killed.folder, "results.csv")).set_index("model")
    for trial in killed.interrupted:
        assert table.loc[trial, "status"] in ("finished", "early stopped"), trial
        # ... and its Train run continued from its checkpoint instead of starting over.
        last = _checkpoint_epochs(os.path.join(runs, trial))[-1]
        state = json.load(open(os.path.join(runs, trial, f"checkpoint_epoch_{last:04d}", "state.json")))
        assert state["restarts"] == 1, trial
        assert [h["epoch"] for h in state["history"]] == list(range(1, last + 1)), trial


def test_a_resume_with_other_settings_is_refused_and_nothing_is_written(smoke_experiment, tmp_path):
    """Resuming with other settings would mix results of two configurations."""
    copy_for_report(smoke_experiment, tmp_path / "smoke", skip=("*.keras",))  # Tune's state kept: resumable
    experiment_json = tmp_path / "smoke" / "experiment.json"
    written = experiment_json.read_text()
    store = json.loads(written)["comparison"]["data"]
    changed = Comparison(data=store, storage=str(tmp_path), name="smoke", profile="smoke", overrides={"epochs": "4"})
    with pytest.raises(ValueError, match=r"other settings \(nn recipe.epochs 2 -> 4; cnn recipe.epochs 2 -> 4; "):
        run_comparison(changed, verbose=0)
    assert experiment_json.read_text() == written
