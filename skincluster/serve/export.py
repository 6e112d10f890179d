"""`skincluster export MODEL... --out DIR`: the trained model in the formats that serve it.

DIR receives:

- ``model.keras``: the Keras model (several MODELs: their ensemble, below);
- ``saved_model/``: a TensorFlow SavedModel whose ``serving_default`` signature
  takes ``image``: uint8 (None, 100, 125, 3) and returns ``probabilities``:
  float32 (None, 7). Our models scale pixels inside the graph, so a server
  sends raw decoded pixels and nothing else;
- ``model_float32.tflite``, ``model_float16.tflite`` (float16 weights, float32
  compute), ``model_int8.tflite`` (full-integer quantisation: int8 weights and
  activations calibrated on a representative set of train-split images; the
  input stays uint8 pixels and the output float32 probabilities);
- ``export.json``: sizes and, with a store, test-split accuracy and balanced
  accuracy of every format next to the Keras model's, and how often each
  format's top class agrees with Keras.

Several MODELs are exported as one ensemble: a Keras model that feeds the same
uint8 input to every member and averages their probabilities, the same average
`skincluster predict` computes.

The int8 file needs calibration images, so it is written only when a store is
given (``--data``); without one the report says it was skipped and why.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from skincluster import storage
from skincluster.config import CLASS_NAMES, IMAGE_SHAPE

#: Quantisation that costs more balanced accuracy than this (1 point) is called out.
MAX_BALANCED_ACCURACY_COST = 0.01
#: ... or more melanoma recall than this. Measured: an int8 MobileNet kept its
#: balanced accuracy (+0.4 points) but lost 10 points of melanoma recall. 2
#: points, since one melanoma is 0.4 points of recall on the real test split.
MAX_MELANOMA_RECALL_COST = 0.02
#: Train-split images the int8 converter calibrates activation ranges on.
REPRESENTATIVE_IMAGES = 200
#: Images per TFLite invoke while evaluating (bounds the interpreter's memory).
EVAL_BATCH = 32

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILES = {
    "tflite_float32": "model_float32.tflite",
    "tflite_float16": "model_float16.tflite",
    "tflite_int8": "model_int8.tflite",
}
REPORT_FILE = "export.json"


def ensemble_model(models: list, name: str = "ensemble"):
    """One Keras model averaging the members' probabilities on one uint8 input.

    Members are renamed ``member_<i>_<name>``: Keras refuses two layers of one
    name in a model, and two runs of one architecture share theirs.
    """
    import tf_keras as keras

    if len(models) == 1:
        return models[0]
    inputs = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")
    outputs = []
    for i, member in enumerate(models):
        member._name = f"member_{i}_{member.name}"
        # training=False: members keep dropout off and BatchNorm in inference mode.
        outputs.append(member(inputs, training=False))
    probabilities = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(inputs, probabilities, name=name)


def load_models(paths: list[str]) -> list:
    """Load each model, checking it takes one uint8 100x125x3 image and gives 7 probabilities."""
    import skincluster  # noqa: F401  (tf-keras before TensorFlow)
    import tensorflow as tf

    from skincluster.models import load_model

    models = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such model file or SavedModel folder")
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "keras_metadata.pb")) \
                and os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path}: a serving SavedModel (as `skincluster export` writes) holds no Keras "
                             f"layers to load; give the {KERAS_FILE} exported beside it")
        try:
            model = load_model(path)
        except (ValueError, OSError, TypeError, KeyError, IndexError, zipfile.BadZipFile, tf.errors.OpError) as exc:
            # TensorFlow's own errors (a file it may not read, a truncated
            # variables file) are not OSErrors, and a torn file can fail anywhere
            # in the loader; each is a bad model file, not a bug here.
            raise ValueError(f"{path}: cannot load as a Keras model: {exc}") from exc
        if tuple(model.input_shape) != (None, *IMAGE_SHAPE) or tuple(model.output_shape) != (None, len(CLASS_NAMES)):
            raise ValueError(
                f"{path}: expected input (None, {', '.join(map(str, IMAGE_SHAPE))}) and output (None, {len(CLASS_NAMES)}); "
                f"got {model.input_shape} -> {model.output_shape}"
            )
        _check_probabilities(model, path)
        models.append(model)
    return models


def _check_probabilities(model, path: str) -> None:
    """A model ending in logits (no softmax) has the right shapes but would be
    averaged and ranked as if its scores were probabilities: refuse it."""
    probe = np.stack([np.zeros(IMAGE_SHAPE, np.uint8), np.full(IMAGE_SHAPE, 160, np.uint8)])
    out = np.asarray(model(probe, training=False), dtype=np.float64)
    if not np.all(np.isfinite(out)) or out.min() < -1e-6 or np.abs(out.sum(axis=1) - 1).max() > 1e-2:
        raise ValueError(f"{path}: its outputs are not class probabilities (a row of 7 non-negative numbers "
                         f"summing to 1; got {np.round(out[0], 3).tolist()}): end the model in a softmax")


def serving_function(model):
    """The SavedModel/TFLite entry point: uint8 pixels in, float32 probabilities out."""
    import skincluster  # noqa: F401
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name="image")])
    def serve(image):
        return {"probabilities": tf.cast(model(image, training=False), tf.float32)}

    return serve


def save_saved_model(model, path: str) -> None:
    import tensorflow as tf

    tf.saved_model.save(model, path, signatures={"serving_default": serving_function(model)})


def convert_tflite(model, kind: str, representative: np.ndarray | None = None) -> bytes:
    """TFLite flatbuffer of `model`; kind is float32, float16 or int8."""
    import tensorflow as tf

    concrete = serving_function(model).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 quantisation needs representative images (give --data STORE)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def samples():
            for image in representative:
                yield [image[None]]

        converter.representative_dataset = samples
        # Full-integer: every op int8, or the conversion fails (no silent float fallback).
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # The graph's input is already uint8 pixels (the model casts and scales
        # them itself), so clients keep sending raw pixels; the softmax is
        # dequantised to float32 so every format returns the same thing.
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
    elif kind != "float32":
        raise ValueError(f"unknown TFLite kind {kind!r}")
    return converter.convert()


def tflite_interpreter(path: str, num_threads: int | None = None):
    import tensorflow as tf

    with warnings.catch_warnings():
        # TF 2.21 warns that tf.lite.Interpreter moves to the ai_edge_litert
        # package; it still works, and that package is not a dependency.
        warnings.simplefilter("ignore", UserWarning)
        return tf.lite.Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())


def tflite_predict(interpreter, images: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Probabilities from a TFLite interpreter, in fixed-size batches (the last one padded)."""
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], [batch_size, *IMAGE_SHAPE])
    interpreter.allocate_tensors()
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *IMAGE_SHAPE), chunk.dtype)])
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(chunk, dtype=inp["dtype"]))
        interpreter.invoke()
        probs = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:  # a quantised output: map back to probabilities
            scale, zero = out["quantization"]
            probs = (probs.astype(np.float32) - zero) * scale
        results.append(np.array(probs[:n], dtype=np.float64))
    return np.concatenate(results) if results else np.zeros((0, len(CLASS_NAMES)))


def tensor_types(interpreter) -> dict[str, int]:
    """How many tensors of each dtype the flatbuffer holds (shows what was quantised)."""
    counts: dict[str, int] = {}
    for detail in interpreter.get_tensor_details():
        name = np.dtype(detail["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def keras_predict(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    out = [np.asarray(model(images[i : i + batch_size], training=False), dtype=np.float64)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)))


def saved_model_predict(path: str, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities through the reloaded SavedModel's serving signature, as a server would call it."""
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = [np.asarray(serve(image=tf.constant(images[i : i + batch_size]))["probabilities"], dtype=np.float64)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)))


def evaluation_split(store, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The store's test split, or a seeded random `limit` images of it (in store order)."""
    from skincluster.data.pipeline import read_arrays

    images, labels = read_arrays(store, "test")
    if limit is not None and limit < len(labels):
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))
        images, labels = images[rows], labels[rows]
    return images, labels


@dataclass
class ExportReport:
    out_dir: str
    models: list[str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: format -> test metrics, agreement with Keras; empty without a store.
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    #: Things the reader must see: quantisation that cost accuracy, skipped files.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "models": self.models, "ensemble": len(self.models) > 1,
                "files": self.files, "data": self.data, "evaluation": self.evaluation, "warnings": self.warnings}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


#: Files a training run folder holds (skincluster train): export must not write into one.
RUN_FOLDER_MARKERS = ("history.json", "metrics.jsonl", "checkpoints")


def _check_out_dir(out_dir: str, model_paths: list[str]) -> None:
    """Refuse an --out that would overwrite an input model or a training run's files."""
    if not out_dir.strip():
        raise ValueError("--out is empty; name the folder to export into")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    targets = {os.path.realpath(os.path.join(out_dir, name)) for name in (KERAS_FILE, SAVED_MODEL_DIR)}
    for path in model_paths:
        if os.path.realpath(path) in targets:
            raise ValueError(f"--out {out_dir}: the export would overwrite the input model {path}; "
                             "export into a folder of its own")
    found = [name for name in RUN_FOLDER_MARKERS if os.path.exists(os.path.join(out_dir, name))]
    if found:
        raise ValueError(f"--out {out_dir}: is a training run folder (it holds {', '.join(found)}); "
                         "export into a folder of its own")


#: The hidden folder inside --out that an export is built in before it is moved into place.
STAGING_PREFIX = ".export-staging-"


def _publish(staging: str, out_dir: str, names: list[str]) -> None:
    """Move the export's files from `staging` into `out_dir`, replacing an earlier export's.

    Called only once every format is written and evaluated, so a failed
    export leaves the previous one whole. The moves themselves are several:
    the earlier export.json goes first and the new one last, so a folder
    caught between the two (a kill mid-way) has none and is not taken for a
    whole export of either model.
    """
    def remove(target: str) -> None:
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)

    remove(os.path.join(out_dir, REPORT_FILE))
    for name in [*TFLITE_FILES.values(), KERAS_FILE, SAVED_MODEL_DIR, REPORT_FILE]:
        target = os.path.join(out_dir, name)
        if name in names:
            remove(target)  # also a file where a folder goes, or the other way round
            os.replace(os.path.join(staging, name), target)
        elif name in TFLITE_FILES.values():
            remove(target)  # a stale int8 file from an earlier export would not match this model


def _remove_stale_staging(out_dir: str) -> None:
    """Staging folders of exports killed outright (kill -9, a lost machine)."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path) \
                and time.time() - os.path.getmtime(path) > storage.STALE_AFTER_SECONDS:
            shutil.rmtree(path, ignore_errors=True)


def export(
    model_paths: list[str],
    out_dir: str,
    *,
    store_uri: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    representative_images: int = REPRESENTATIVE_IMAGES,
    log: Callable[[str], None] = print,
) -> ExportReport:
    """Write every format into `out_dir` (a local folder), evaluate them on the store's test split."""
    import skincluster  # noqa: F401  (tf-keras before TensorFlow)

    from skincluster.data.store import open_store

    if not model_paths:
        raise ValueError("give at least one model (.keras file or SavedModel folder)")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    if limit is not None and not store_uri:
        raise ValueError("--limit sets how many test images of --data to evaluate on; without --data it does nothing")
    _check_out_dir(out_dir, model_paths)
    store = open_store(store_uri) if store_uri else None
    models = load_models(model_paths)
    model = ensemble_model(models)
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_staging(out_dir)
    report = ExportReport(out_dir=os.path.abspath(out_dir), models=[os.path.abspath(p) for p in model_paths])
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir)
    try:
        _export_into(staging, model, report, store, store_uri, limit, seed, representative_images, log)
        _publish(staging, out_dir, [*(entry["path"] for entry in report.files.values()), REPORT_FILE])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _export_into(out_dir, model, report, store, store_uri, limit, seed, representative_images, log) -> None:
    """Write and evaluate every format in `out_dir` (export's staging folder), filling `report`."""
    from skincluster.data.pipeline import read_arrays
    from skincluster.train.metrics import evaluate_predictions


    keras_path = os.path.join(out_dir, KERAS_FILE)
    model.save(keras_path)
    report.files["keras"] = {"path": KERAS_FILE}
    saved_path = os.path.join(out_dir, SAVED_MODEL_DIR)
    save_saved_model(model, saved_path)
    report.files["saved_model"] = {"path": SAVED_MODEL_DIR, "signature": "serving_default",
                                   "input": {"name": "image", "dtype": "uint8", "shape": [None, *IMAGE_SHAPE]},
                                   "output": {"name": "probabilities", "dtype": "float32",
                                              "shape": [None, len(CLASS_NAMES)]}}

    representative = None
    if store is not None:
        # A seeded random sample of the train split: calibration must never see test images.
        representative, _ = read_arrays(store, "train", representative_images, seed)
    for fmt, filename in TFLITE_FILES.items():
        kind = fmt.removeprefix("tflite_")
        path = os.path.join(out_dir, filename)
        if kind == "int8" and representative is None:
            report.warnings.append("int8 TFLite not written: it is calibrated on train-split images; give --data STORE")
            continue
        started = time.perf_counter()
        data = convert_tflite(model, kind, representative)
        with open(path, "wb") as fh:
            fh.write(data)
        report.files[fmt] = {"path": filename, "convert_seconds": round(time.perf_counter() - started, 2),
                             "tensor_types": tensor_types(tflite_interpreter(path))}
        if kind == "int8":
            report.files[fmt]["representative_images"] = int(len(representative))
            report.files[fmt]["input"] = "uint8 pixels (not quantised: the model's own input)"
    for entry in report.files.values():
        entry["bytes"] = _size(os.path.join(out_dir, entry["path"]))

    if store is not None:
        images, labels = evaluation_split(store, limit, seed)
        if not len(labels):
            raise ValueError(f"{store_uri}: the test split is empty")
        report.data = {"store": store_uri, "split": "test", "images": int(len(labels)), "limit": limit, "seed": seed}
        log(f"evaluating on {len(labels)} test images of {store_uri}")
        predictors: dict[str, Callable[[], np.ndarray]] = {
            "keras": lambda: keras_predict(model, images),
            "saved_model": lambda: saved_model_predict(saved_path, images),
        }
        for fmt, filename in TFLITE_FILES.items():
            if fmt in report.files:
                predictors[fmt] = lambda f=filename: tflite_predict(tflite_interpreter(os.path.join(out_dir, f)), images)
        reference = None
        for fmt, run in predictors.items():
            started = time.perf_counter()
            probs = run()
            seconds = time.perf_counter() - started
            metrics = evaluate_predictions(labels, probs, CLASS_NAMES)
            row = {
                "accuracy": metrics["accuracy"],
                "balanced_accuracy": metrics["balanced_accuracy"],
                "melanoma_recall": metrics["melanoma_recall"],
                "images_per_second": round(len(labels) / seconds, 1) if seconds > 0 else None,
            }
            if reference is None:
                reference = probs
            else:
                row["agreement_with_keras"] = float(np.mean(probs.argmax(1) == reference.argmax(1)))
                row["max_probability_difference"] = float(np.max(np.abs(probs - reference)))
            report.evaluation[fmt] = row
        report.warnings[:0] = quantisation_costs(report.evaluation, len(labels))
    with open(os.path.join(out_dir, REPORT_FILE), "w", encoding="utf-8") as fh:
        json.dump(report.to_dict(), fh, indent=2)
        fh.write("\n")


def quantisation_costs(evaluation: dict[str, dict[str, Any]], n_images: int) -> list[str]:
    """Set each format's ``balanced_accuracy_cost`` (points lost against Keras); warn when it
    loses more than 1 point of balanced accuracy or 2 points of melanoma recall."""
    keras_bal = evaluation["keras"]["balanced_accuracy"]
    keras_mel = evaluation["keras"].get("melanoma_recall")
    warnings_ = []
    for fmt, row in evaluation.items():
        cost = keras_bal - row["balanced_accuracy"]
        row["balanced_accuracy_cost"] = cost
        if fmt == "keras":
            continue
        if cost > MAX_BALANCED_ACCURACY_COST:
            warnings_.append(f"QUANTISATION COST: {fmt} loses {100 * cost:.1f} points of balanced accuracy "
                             f"(Keras {keras_bal:.3f} -> {row['balanced_accuracy']:.3f}) on {n_images} test images")
        mel = row.get("melanoma_recall")
        if keras_mel is not None and mel is not None and keras_mel - mel > MAX_MELANOMA_RECALL_COST:
            warnings_.append(f"QUANTISATION COST: {fmt} loses {100 * (keras_mel - mel):.1f} points of melanoma "
                             f"recall (Keras {keras_mel:.3f} -> {mel:.3f}) on {n_images} test images")
    return warnings_


def format_report(report: ExportReport) -> str:
    """The console table: one line per format, size and (with a store) test metrics."""
    lines = []
    costly = [w for w in report.warnings if w.startswith("QUANTISATION COST")]
    if costly:
        bar = "!" * 78
        lines += [bar, *costly, bar, ""]
    what = f"ensemble of {len(report.models)} models" if len(report.models) > 1 else report.models[0]
    lines.append(f"exported {what} to {report.out_dir}")
    header = f"{'format':<16} {'file':<22} {'MB':>8}"
    if report.evaluation:
        header += f" {'acc':>6} {'bal.acc':>7} {'lost':>6} {'mel.rec':>7} {'agree':>6} {'max|dp|':>8} {'img/s':>7}"
    lines += [header, "-" * len(header)]
    for fmt, entry in report.files.items():
        line = f"{fmt:<16} {entry['path']:<22} {entry['bytes'] / 1e6:8.2f}"
        row = report.evaluation.get(fmt)
        if row:
            agree = row.get("agreement_with_keras")
            diff = row.get("max_probability_difference")
            mel = row.get("melanoma_recall")
            line += (f" {row['accuracy']:6.3f} {row['balanced_accuracy']:7.3f} {100 * row['balanced_accuracy_cost']:6.1f}"
                     f" {'–' if mel is None else f'{mel:.3f}':>7}"
                     f" {'' if agree is None else f'{agree:6.3f}':>6} {'' if diff is None else f'{diff:8.2g}':>8}"
                     f" {row['images_per_second'] or 0:7.0f}")
        lines.append(line)
    if report.evaluation:
        d = report.data
        lines.append(f"test split of {d['store']}: {d['images']} images; lost = points of balanced accuracy lost "
                     "against Keras; agree = share of images whose top class matches Keras")
    for warning in report.warnings:
        if not warning.startswith("QUANTISATION COST"):
            lines.append(f"note: {warning}")
    lines.append(f"report: {os.path.join(report.out_dir, REPORT_FILE)}")
    return "\n".join(lines)
