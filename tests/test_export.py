"""`skincluster export` (Keras, SavedModel, TFLite float32/float16/int8) and the report's ensemble row.

Both use one small experiment folder laid out exactly as `skincluster compare`
leaves it (experiment.json + runs/<model>/), trained with the local runner
(no Ray): nn and cnn, smoke-sized, on the synthetic store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skincluster import storage
from skincluster.cli import main as cli_main
from skincluster.config import CLASS_NAMES, IMAGE_SHAPE
from skincluster.data.pipeline import read_arrays
from skincluster.data.store import open_store
from skincluster.serve import export as ex
from skincluster.train.metrics import evaluate_predictions
from skincluster.tune.report import build_report


@pytest.fixture(scope="module")
def local_experiment(synthetic_store, tmp_path_factory):
    """What `compare --models nn,cnn --profile smoke` writes, minus Tune: experiment.json and two finished runs."""
    from skincluster.train.launch import run_local
    from skincluster.tune.compare import Comparison, resolve_runs

    spec = Comparison(data=synthetic_store, storage=str(tmp_path_factory.mktemp("exp")), name="local",
                      models=("nn", "cnn"), profile="smoke")
    runs = resolve_runs(spec)
    fs, path = storage.resolve(spec.experiment_dir)
    fs.create_dir(path, recursive=True)
    storage.write_json_atomic(fs, f"{path}/experiment.json", {
        "comparison": dataclasses.asdict(spec), "runs": {m: dataclasses.asdict(r) for m, r in runs.items()}})
    for run in runs.values():
        run_local(run, verbose=0)
    return spec.experiment_dir


def _model(experiment: str, name: str) -> str:
    return os.path.join(experiment, "runs", name, "model.keras")


@pytest.fixture(scope="module")
def cnn_export(local_experiment, synthetic_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "cnn")
    return ex.export([_model(local_experiment, "cnn")], out, store_uri=synthetic_store, log=lambda *_: None)


def test_every_format_is_written_and_sized(cnn_export):
    names = {"keras", "saved_model", "tflite_float32", "tflite_float16", "tflite_int8"}
    assert set(cnn_export.files) == names
    for entry in cnn_export.files.values():
        assert os.path.exists(os.path.join(cnn_export.out_dir, entry["path"]))
        assert entry["bytes"] > 100_000
    files = cnn_export.files
    # float16 halves the weights, int8 quarters them (the cnn is 1.5 M float32 parameters, ~6 MB).
    assert files["tflite_float16"]["bytes"] < 0.6 * files["tflite_float32"]["bytes"]
    assert files["tflite_int8"]["bytes"] < 0.35 * files["tflite_float32"]["bytes"]
    assert files["tflite_int8"]["tensor_types"].get("int8", 0) > 10  # really quantised, not a float model
    saved = json.load(open(os.path.join(cnn_export.out_dir, ex.REPORT_FILE)))
    assert saved["files"]["tflite_int8"]["bytes"] == files["tflite_int8"]["bytes"]


def test_tflite_and_saved_model_agree_with_keras(cnn_export, local_experiment, synthetic_store):
    """Checked here independently of export's own evaluation: reload every file and predict the test split."""
    import tensorflow as tf

    from skincluster.models import load_model

    images, labels = read_arrays(open_store(synthetic_store), "test")
    keras_probs = ex.keras_predict(load_model(_model(local_experiment, "cnn")), images)
    out = cnn_export.out_dir

    serve = tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, *IMAGE_SHAPE]
    np.testing.assert_allclose(np.asarray(serve(image=tf.constant(images))["probabilities"]), keras_probs, atol=1e-5)

    probs = {}
    for fmt, filename in ex.TFLITE_FILES.items():
        interpreter = ex.tflite_interpreter(os.path.join(out, filename))
        detail = interpreter.get_input_details()[0]
        assert detail["dtype"] == np.uint8 and list(detail["shape_signature"]) == [-1, *IMAGE_SHAPE], fmt
        probs[fmt] = ex.tflite_predict(interpreter, images, batch_size=16)
    np.testing.assert_allclose(probs["tflite_float32"], keras_probs, atol=1e-4)
    assert np.mean(probs["tflite_float16"].argmax(1) == keras_probs.argmax(1)) >= 0.97
    np.testing.assert_allclose(probs["tflite_float16"], keras_probs, atol=0.02)
    assert np.mean(probs["tflite_int8"].argmax(1) == keras_probs.argmax(1)) >= 0.8

    # export's own report says the same, for every format.
    report = cnn_export.evaluation
    assert report["tflite_float32"]["agreement_with_keras"] == 1.0
    keras_metrics = evaluate_predictions(labels, keras_probs, CLASS_NAMES)
    assert report["keras"]["balanced_accuracy"] == pytest.approx(keras_metrics["balanced_accuracy"])
    int8 = report["tflite_int8"]
    int8_metrics = evaluate_predictions(labels, probs["tflite_int8"], CLASS_NAMES)
    assert int8["balanced_accuracy"] == pytest.approx(int8_metrics["balanced_accuracy"])
    assert int8["accuracy"] == pytest.approx(int8_metrics["accuracy"])
    assert int8["balanced_accuracy_cost"] == pytest.approx(keras_metrics["balanced_accuracy"] - int8["balanced_accuracy"])
    assert cnn_export.data["images"] == len(labels)


def test_quantisation_cost_above_one_point_is_called_out():
    evaluation = {"keras": {"balanced_accuracy": 0.50}, "tflite_float16": {"balanced_accuracy": 0.495},
                  "tflite_int8": {"balanced_accuracy": 0.46}}
    warnings = ex.quantisation_costs(evaluation, 123)
    assert len(warnings) == 1 and "tflite_int8 loses 4.0 points" in warnings[0] and "123 test images" in warnings[0]
    report = ex.ExportReport(out_dir="/x", models=["/m.keras"], warnings=warnings)
    assert ex.format_report(report).splitlines()[1].startswith("QUANTISATION COST")  # first thing printed


def test_melanoma_recall_lost_to_quantisation_is_called_out_even_when_balanced_accuracy_holds():
    # The shape measured on the real data: int8 gained balanced accuracy, lost 10 points of melanoma recall.
    evaluation = {"keras": {"balanced_accuracy": 0.622, "melanoma_recall": 0.486},
                  "tflite_float16": {"balanced_accuracy": 0.623, "melanoma_recall": 0.480},
                  "tflite_int8": {"balanced_accuracy": 0.626, "melanoma_recall": 0.385}}
    warnings = ex.quantisation_costs(evaluation, 2508)
    assert len(warnings) == 1
    assert "tflite_int8 loses 10.1 points of melanoma recall" in warnings[0]


def test_cli_exports_the_average_of_two_models(local_experiment, synthetic_store, tmp_path, capsys):
    from skincluster.models import load_model

    members = [_model(local_experiment, "nn"), _model(local_experiment, "cnn")]
    out = tmp_path / "ens"
    assert cli_main(["export", *members, "--out", str(out), "--data", synthetic_store, "--limit", "40"]) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 2 models" in printed and "tflite_int8" in printed
    report = json.load(open(out / ex.REPORT_FILE))
    assert report["ensemble"] and report["data"]["images"] == 40
    for fmt in ("keras", "saved_model", "tflite_float32", "tflite_float16", "tflite_int8"):
        assert 0 <= report["evaluation"][fmt]["balanced_accuracy"] <= 1, fmt
    images, _ = ex.evaluation_split(open_store(synthetic_store), 40)
    expected = np.mean([ex.keras_predict(load_model(p), images) for p in members], axis=0)
    np.testing.assert_allclose(ex.keras_predict(load_model(str(out / "model.keras")), images), expected, atol=1e-5)


def test_cli_names_bad_inputs(local_experiment, tmp_path, capsys):
    not_a_model = tmp_path / "notes.keras"
    not_a_model.write_text("not a model")
    cases = [
        ([str(tmp_path / "missing.keras")], "missing.keras"),
        ([str(not_a_model)], "notes.keras"),
        ([_model(local_experiment, "cnn"), "--data", str(tmp_path / "nostore")], "nostore"),
        ([_model(local_experiment, "cnn"), "--limit", "5"], "--limit sets how many test images of --data"),
    ]
    for args, expected in cases:
        assert cli_main(["export", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
    assert cli_main(["export", _model(local_experiment, "cnn"), "--out", ""]) == 2
    assert "error: --out is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _digests(folder) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_models_that_cannot_be_loaded_are_named_not_tracebacks(cnn_export, tmp_path):
    import zipfile

    with pytest.raises(ValueError, match=r"saved_model: a serving SavedModel .* give the model.keras exported beside it"):
        ex.load_models([os.path.join(cnn_export.out_dir, "saved_model")])
    empty = tmp_path / "empty.keras"
    zipfile.ZipFile(empty, "w").close()  # TensorFlow raises its own InvalidArgumentError on it
    with pytest.raises(ValueError, match=r"empty.keras: cannot load as a Keras model"):
        ex.load_models([str(empty)])


def test_export_refuses_to_overwrite_its_input_model_or_a_run_folder(local_experiment, tmp_path, capsys):
    run = os.path.join(local_experiment, "runs", "nn")
    before = _digests(Path(run))
    assert cli_main(["export", _model(local_experiment, "cnn"), "--out", run]) == 2
    assert "is a training run folder" in capsys.readouterr().err
    copy = tmp_path / "mine"
    copy.mkdir()
    shutil.copy(_model(local_experiment, "nn"), copy / "model.keras")
    assert cli_main(["export", str(copy / "model.keras"), "--out", str(copy)]) == 2
    assert f"would overwrite the input model {copy / 'model.keras'}" in capsys.readouterr().err
    assert _digests(Path(run)) == before


def test_a_failed_export_leaves_the_previous_export_whole(local_experiment, tmp_path, monkeypatch):
    out = tmp_path / "served"
    ex.export([_model(local_experiment, "nn")], str(out), log=lambda *_: None)
    before = _digests(out)
    real_convert = ex.convert_tflite

    def failing(model, kind, representative=None):
        if kind == "float16":
            raise RuntimeError("converter failed")
        return real_convert(model, kind, representative)

    monkeypatch.setattr(ex, "convert_tflite", failing)
    with pytest.raises(RuntimeError, match="converter failed"):
        ex.export([_model(local_experiment, "cnn")], str(out), log=lambda *_: None)
    assert _digests(out) == before  # no file of the cnn export, none of the nn export lost
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.keras", "saved_model", "model_float32.tflite", "model_float16.tflite", "export.json"])


def test_an_export_stopped_while_moving_into_place_leaves_no_export_json(local_experiment, tmp_path, monkeypatch):
    """The moves into --out are several: a folder caught between them must not pass for a whole export."""
    out = tmp_path / "served"
    ex.export([_model(local_experiment, "nn")], str(out), log=lambda *_: None)
    stale, live = out / f"{ex.STAGING_PREFIX}killed", out / f"{ex.STAGING_PREFIX}running"
    stale.mkdir()
    live.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # an export killed outright two hours ago
    real_replace, moved = os.replace, []

    def killed_after_two(source, target):
        if ex.STAGING_PREFIX in str(source):
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(target)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ex.export([_model(local_experiment, "cnn")], str(out), log=lambda *_: None)
    monkeypatch.undo()
    assert not (out / "export.json").exists()  # half nn, half cnn: no report says otherwise
    # A file where the SavedModel folder goes (a hand-made mess) is replaced too.
    shutil.rmtree(out / "saved_model")
    (out / "saved_model").write_text("x")
    report = ex.export([_model(local_experiment, "cnn")], str(out), log=lambda *_: None)
    assert json.loads((out / "export.json").read_text())["models"] == report.models
    assert (out / "saved_model" / "saved_model.pb").exists()
    assert not stale.exists() and live.exists()  # a younger staging folder may be another export's


def test_without_a_store_int8_is_skipped_and_said(local_experiment, tmp_path):
    report = ex.export([_model(local_experiment, "nn")], str(tmp_path / "nn"), log=lambda *_: None)
    assert "tflite_int8" not in report.files and not report.evaluation
    assert not (tmp_path / "nn" / "model_int8.tflite").exists()
    assert any("int8" in w and "--data" in w for w in report.warnings)
    assert "note: int8 TFLite not written" in ex.format_report(report)


# The report's ensemble row ---------------------------------------------------------------


def test_report_removes_what_a_killed_report_left_but_not_a_live_one(local_experiment, tmp_path):
    copy = tmp_path / "e"
    shutil.copytree(local_experiment, copy)
    (copy / "best").mkdir(exist_ok=True)
    stale, live = copy / "best" / "best.json.tmp-76802d33", copy / "results.md.tmp-0123abcd"
    for path in (stale, live):
        path.write_text("half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # a report killed two hours ago
    build_report(str(copy))
    assert not stale.exists() and live.exists()  # the younger may be another report's, still writing


def test_report_has_an_ensemble_row_of_the_best_two(local_experiment, synthetic_store):
    from skincluster.models import load_model
    from skincluster.train.evaluate import predict_split

    summary = build_report(local_experiment)
    results_md = open(os.path.join(local_experiment, "results.md")).read()
    rows = [line for line in results_md.splitlines() if line.startswith("| ensemble (")]
    assert len(rows) == 1 and "| ensemble |" in rows[0]
    assert "ensemble row averages" in open(os.path.join(local_experiment, "report.md")).read()
    assert "ensemble row averages" in summary["ensemble"]
    # results.csv stays one row per trial.
    assert sorted(pd.read_csv(os.path.join(local_experiment, "results.csv"))["model"]) == ["cnn", "nn"]

    cached = json.load(open(os.path.join(local_experiment, "ensemble", "evaluation.json")))
    assert sorted(cached["members"]) == ["cnn", "nn"]
    # Recomputed independently: average the members' test probabilities.
    store = open_store(synthetic_store)
    limit = json.load(open(os.path.join(local_experiment, "experiment.json")))["runs"]["nn"]["data"]["limit"]
    per_model = [predict_split(load_model(_model(local_experiment, m)), store, "test", limit, 0) for m in ("nn", "cnn")]
    labels = per_model[0][0]
    expected = evaluate_predictions(labels, (per_model[0][1] + per_model[1][1]) / 2, CLASS_NAMES)
    assert cached["evaluation"]["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert f"{expected['balanced_accuracy']:.3f}" in rows[0]

    # Rebuilding the report reuses the cached evaluation instead of loading the models again.
    stamp = os.path.getmtime(os.path.join(local_experiment, "ensemble", "evaluation.json"))
    build_report(local_experiment)
    assert os.path.getmtime(os.path.join(local_experiment, "ensemble", "evaluation.json")) == stamp


def test_report_with_one_finished_model_says_why_there_is_no_ensemble(local_experiment, tmp_path):
    copy = tmp_path / "one"
    shutil.copytree(local_experiment, copy, ignore=shutil.ignore_patterns("checkpoint*", "ensemble"))
    os.remove(copy / "runs" / "cnn" / "evaluation.json")  # cnn "did not finish"
    summary = build_report(str(copy))
    assert "| ensemble (" not in (copy / "results.md").read_text()
    assert "No ensemble row: 1 trial(s) finished" in (copy / "report.md").read_text()
    assert summary["ensemble"].startswith("No ensemble row")
    assert not (copy / "ensemble").exists()


def test_report_ensemble_on_s3(local_experiment, s3_env):
    bucket = s3_env.new_bucket("exp")
    fs = s3_env.filesystem()
    for root, _, files in os.walk(local_experiment):
        for name in files:
            local = os.path.join(root, name)
            rel = os.path.relpath(local, local_experiment)
            if rel.startswith(("ensemble", "checkpoint")) or "checkpoint" in rel:
                continue
            with open(local, "rb") as fh:
                storage.write_bytes_atomic(fs, f"{bucket}/exp/{rel}", fh.read())
    build_report(f"s3://{bucket}/exp")
    cached = storage.read_json(fs, f"{bucket}/exp/ensemble/evaluation.json")
    assert sorted(cached["members"]) == ["cnn", "nn"] and math.isfinite(cached["evaluation"]["balanced_accuracy"])
    assert "| ensemble (" in storage.read_bytes(fs, f"{bucket}/exp/results.md").decode()


def test_a_torn_ensemble_cache_is_recomputed(local_experiment, tmp_path):
    copy = tmp_path / "torn"
    shutil.copytree(local_experiment, copy)
    (copy / "ensemble" / "evaluation.json").write_text('{"members": ["nn", ')  # killed mid-write elsewhere
    build_report(str(copy))
    assert "| ensemble (" in (copy / "results.md").read_text()
    assert sorted(json.loads((copy / "ensemble" / "evaluation.json").read_text())["members"]) == ["cnn", "nn"]


def test_report_survives_an_ensemble_that_cannot_be_evaluated(local_experiment, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(local_experiment, copy, ignore=shutil.ignore_patterns("checkpoint*", "ensemble"))
    experiment = json.loads((copy / "experiment.json").read_text())
    for run in experiment["runs"].values():
        run["data"]["store"] = str(tmp_path / "store-that-moved")
    (copy / "experiment.json").write_text(json.dumps(experiment))
    build_report(str(copy))
    report = (copy / "report.md").read_text()
    assert "No ensemble row: evaluating" in report and "store-that-moved" in report
    assert "| nn |" in (copy / "results.md").read_text()  # the trials' rows are all there
