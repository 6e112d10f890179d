"""Build the comparison report from an experiment folder alone (`skincluster report`).

Reads ``experiment.json`` and each ``runs/<trial>/`` (history, evaluation;
a trial is an architecture or a ``--variant`` of one);
a trial stopped by the scheduler before it finished has no evaluation, and its
curves come from the metrics Tune recorded. Writes results.csv, results.md,
report.md, curves/*.png, confusion/*.png and best/model.keras.

The leaderboard (results.md, report.md) also has an **ensemble** row: the two
trials with the best validation balanced accuracy among the trials
that saved a final model, their probabilities averaged, evaluated on the same
test split. It is cached in ``ensemble/evaluation.json`` (recomputed only when
a member's evaluation changes). results.csv keeps one row per trial.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import statistics
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from skincluster import storage

#: What the study's own write-up reports, as far as our copy of it goes. Only
#: the enhanced MobileNet's figure is known to us; the others are left empty
#: rather than guessed. Its split is by image (leaky), so it is not comparable
#: with ours, which is the point of showing it.
STUDY_REPORTED = {
    "mobilenet_enhanced": {"test_accuracy": 0.83, "epochs": 500, "hours": 18.0},
}

#: Members of the ensemble row: the best trials by validation balanced accuracy.
ENSEMBLE_SIZE = 2
ENSEMBLE_STATUS = "ensemble"

COLUMNS = [
    "model", "status", "epochs_run", "epoch_budget", "train_minutes", "images_per_second",
    "test_accuracy", "test_loss", "val_accuracy", "val_loss",
    "balanced_accuracy", "macro_f1", "melanoma_recall", "roc_auc", "best_val_balanced_accuracy",
    "study_test_accuracy",
]


#: What the report reads from a trial's evaluation.json (and its "val" part).
EVALUATION_KEYS = ("accuracy", "log_loss", "balanced_accuracy", "macro_f1", "melanoma_recall", "roc_auc_ovr",
                   "confusion_matrix", "per_class", "val")
VAL_KEYS = ("accuracy", "log_loss", "balanced_accuracy")


class ReportError(ValueError):
    """A file in the experiment folder is not what `skincluster compare` writes."""


def _read_json(fs, path: str) -> Any | None:
    if not storage.exists(fs, path):
        return None
    try:
        return storage.read_json(fs, path)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ReportError(f"{path}: not readable JSON ({exc})") from None


def _tune_history(fs, root: str, model: str) -> list[dict[str, Any]]:
    """Per-epoch metrics as Tune recorded them (result.json, one JSON object per line)."""
    path = f"{root}/tune/{model}/result.json"
    if not storage.exists(fs, path):
        return []
    text = storage.read_bytes(fs, path).decode(errors="replace")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):
                # Tune appends one line per epoch; a node lost mid-append leaves
                # the last one torn. The epochs before it are whole and are what
                # an interrupted trial's curve is drawn from.
                break
            raise ReportError(f"{path}, line {number}: not readable JSON ({exc})") from None
    return [r for r in rows if isinstance(r, dict) and "epoch" in r]


def _number(value: Any, nullable: bool = False) -> bool:
    if value is None:
        return nullable
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_evaluation(path: str, evaluation: Any) -> None:
    """Refuse, naming the file and the fields, an evaluation the report cannot use as it is."""
    missing = [k for k in EVALUATION_KEYS if not isinstance(evaluation, dict) or k not in evaluation]
    if not missing:
        val = evaluation["val"]
        missing = [f"val.{k}" for k in VAL_KEYS if k not in val] if isinstance(val, dict) else ["val (an object)"]
    if missing:
        raise ReportError(f"{path}: not a trial evaluation, lacks {', '.join(missing)}")
    # Undefined metrics are null (melanoma recall without a melanoma, AUC with one class).
    wrong = [k for k in ("accuracy", "log_loss", "balanced_accuracy", "macro_f1") if not _number(evaluation[k])]
    wrong += [k for k in ("melanoma_recall", "roc_auc_ovr") if not _number(evaluation[k], nullable=True)]
    wrong += [f"val.{k}" for k in VAL_KEYS if not _number(evaluation["val"][k], nullable=k == "balanced_accuracy")]
    per_class = evaluation["per_class"]
    if not (isinstance(per_class, dict) and per_class and all(
            isinstance(c, dict) and _number(c.get("precision"), True) and _number(c.get("recall"), True)
            and _number(c.get("support")) for c in per_class.values())):
        wrong.append("per_class (an object of {precision, recall, support} per class)")
    matrix = evaluation["confusion_matrix"]
    size = len(per_class) if isinstance(per_class, dict) else -1
    if not (isinstance(matrix, list) and len(matrix) == size and all(
            isinstance(r, list) and len(r) == size and all(_number(v) for v in r) for r in matrix)):
        wrong.append(f"confusion_matrix ({size} rows of {size} counts, one per class)")
    if wrong:
        raise ReportError(f"{path}: not what a trial's evaluation holds: {', '.join(wrong)}")


#: Per-epoch values the report reads; each a number (NaN allowed) where present.
HISTORY_NUMBERS = ("images_per_second", "epoch_seconds", "loss", "accuracy", "balanced_accuracy",
                   "val_loss", "val_accuracy", "val_balanced_accuracy")


def _check_history(path: str, history: Any) -> None:
    if not (isinstance(history, list)
            and all(isinstance(h, dict) and "images_per_second" in h and "epoch" in h for h in history)):
        raise ReportError(f"{path}: not a per-epoch history (a list of objects with epoch and images_per_second)")
    for i, entry in enumerate(history):
        wrong = [k for k in HISTORY_NUMBERS if k in entry and not _number(entry[k])]
        if not _number(entry["epoch"]):
            wrong.insert(0, "epoch")
        if wrong:
            raise ReportError(f"{path}: entry {i} (epoch {entry['epoch']!r}): {', '.join(wrong)} not a number")


def _check_experiment(path: str, experiment: Any) -> None:
    comparison = experiment.get("comparison") if isinstance(experiment, dict) else None
    runs = experiment.get("runs") if isinstance(experiment, dict) else None
    problems = []
    if not isinstance(comparison, dict) or any(k not in comparison for k in ("name", "data", "profile", "scheduler", "seed")):
        problems.append("comparison (an object with name, data, profile, scheduler and seed)")
    if not isinstance(runs, dict) or not runs:
        problems.append("runs (an object of one or more trials)")
    else:
        for trial, run in runs.items():
            ok = (isinstance(run, dict) and isinstance(run.get("recipe"), dict) and _number(run["recipe"].get("epochs"))
                  and isinstance(run.get("data"), dict) and isinstance(run.get("scaling"), dict)
                  and all(_number(run["scaling"].get(k)) for k in ("workers", "gpus_per_worker")))
            if not ok:
                problems.append(f"runs.{trial} (a resolved run: recipe.epochs, data, scaling)")
    if problems:
        raise ReportError(f"{path}: not what `skincluster compare` writes: {'; '.join(problems[:3])}")


def collect(experiment_dir: str) -> tuple[pd.DataFrame, dict[str, dict], dict[str, list], dict]:
    """(results table, evaluations, histories, experiment.json) of an experiment folder."""
    fs, root = storage.resolve(experiment_dir)
    experiment = _read_json(fs, f"{root}/experiment.json")
    if experiment is None:
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{experiment_dir}: no such folder")
        raise FileNotFoundError(f"{experiment_dir}: no experiment.json; is this a `skincluster compare` folder?")
    _check_experiment(f"{root}/experiment.json", experiment)
    rows, evaluations, histories = [], {}, {}
    for model, run in experiment["runs"].items():
        run_dir = f"{root}/runs/{model}"
        evaluation = _read_json(fs, f"{run_dir}/evaluation.json")
        if evaluation is not None:
            _check_evaluation(f"{run_dir}/evaluation.json", evaluation)
        history = _read_json(fs, f"{run_dir}/history.json")
        if history is not None:
            _check_history(f"{run_dir}/history.json", history)
        history = history or _tune_history(fs, root, model)
        histories[model] = history
        if evaluation:
            evaluations[model] = evaluation
        last = history[-1] if history else {}
        if evaluation:
            if last.get("stopped_early"):
                status = "early stopped"
            elif last.get("stopped_by_time_budget"):
                status = "time budget"
            else:
                status = "finished"
        elif history and experiment["comparison"].get("scheduler") == "asha":
            status = "stopped by scheduler"
        elif history:
            status = "interrupted"  # epochs ran but no evaluation: the driver died, or the trial failed
        else:
            status = "not run"
        val_bal = [h["val_balanced_accuracy"] for h in history
                   if _number(h.get("val_balanced_accuracy")) and not math.isnan(h["val_balanced_accuracy"])]
        study = STUDY_REPORTED.get(model, {})
        row = {
            "model": model,
            "status": status,
            "epochs_run": len(history),
            "epoch_budget": run["recipe"]["epochs"],
            "train_minutes": sum(h.get("epoch_seconds", 0.0) for h in history) / 60.0,
            "images_per_second": statistics.median(h["images_per_second"] for h in history) if history else math.nan,
            "best_val_balanced_accuracy": max(val_bal) if val_bal else math.nan,
            "study_test_accuracy": study.get("test_accuracy", math.nan),
        }
        if evaluation:
            row.update(
                test_accuracy=evaluation["accuracy"],
                test_loss=evaluation["log_loss"],
                val_accuracy=evaluation["val"]["accuracy"],
                val_loss=evaluation["val"]["log_loss"],
                balanced_accuracy=evaluation["balanced_accuracy"],
                macro_f1=evaluation["macro_f1"],
                melanoma_recall=evaluation["melanoma_recall"],
                roc_auc=evaluation["roc_auc_ovr"],
            )
        rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    return table, evaluations, histories, experiment


def best_model(table: pd.DataFrame, evaluations: dict[str, dict]) -> str | None:
    """The model with the best validation balanced accuracy (test is for reporting, not choosing)."""
    scored = [(e["val"]["balanced_accuracy"], m) for m, e in evaluations.items()]
    scored = [(s, m) for s, m in scored if s is not None and not math.isnan(s)]
    return max(scored)[1] if scored else None


def build_report(experiment_dir: str) -> dict[str, Any]:
    """Write every report file into the experiment folder; return a short summary."""
    import matplotlib

    matplotlib.use("Agg")

    fs, root = storage.resolve(experiment_dir)
    table, evaluations, histories, experiment = collect(experiment_dir)
    table = table.sort_values("balanced_accuracy", ascending=False, na_position="last").reset_index(drop=True)
    # Everything is built before the first file is written, so a damaged input
    # or an interrupt leaves the previous report's files as they were, not
    # half old and half new.
    files: dict[str, bytes] = {}
    for model, history in histories.items():
        if history:
            files[f"curves/{model}.png"] = _png(_curves_figure(model, history))
    if any(histories.values()):
        files["curves/all_val.png"] = _png(_all_val_figure(histories))
    for model, evaluation in evaluations.items():
        files[f"confusion/{model}.png"] = _png(_confusion_figure(model, evaluation))

    leaderboard = table
    ensemble_row, ensemble_note = ensemble(experiment_dir, experiment, evaluations)
    if ensemble_row is not None:
        leaderboard = pd.concat([table, pd.DataFrame([ensemble_row]).reindex(columns=COLUMNS)], ignore_index=True)
        leaderboard = leaderboard.sort_values("balanced_accuracy", ascending=False, na_position="last")
    results_md = _markdown_table(leaderboard.reset_index(drop=True))
    files["results.csv"] = table.to_csv(index=False).encode()
    files["results.md"] = (results_md + "\n").encode()

    best = best_model(table, evaluations)
    best_problem = _best_model_file(fs, root, best, evaluations[best], files) if best else None
    report = _report_markdown(experiment, table, results_md, histories, evaluations, best, ensemble_note,
                              not_exported=best_problem)
    files["report.md"] = report.encode()
    if best_problem or not best:
        # No best/ that contradicts report.md: an older best model is not this report's.
        for name in BEST_FILES:
            if storage.exists(fs, f"{root}/{name}"):
                fs.delete_file(f"{root}/{name}")
    # Each file is replaced whole (written under a temporary name, then
    # renamed); report.md last, as it is the one that says the rest is done.
    # An interrupted report may leave some files from the run before: the next
    # `skincluster report` rewrites them all, and removes the temporary files
    # of one killed outright once they are an hour old.
    for name, data in files.items():
        storage.write_bytes_atomic(fs, f"{root}/{name}", data)
    for folder in dict.fromkeys(posixpath.dirname(f"{root}/{name}")
                                for name in (*files, *BEST_FILES, "ensemble/evaluation.json")):
        storage.remove_stale_temporaries(fs, folder)  # of a report killed outright
    return {"experiment": experiment_dir, "best": best, "rows": len(table), "ensemble": ensemble_note,
            "report": storage.join(experiment_dir, "report.md")}


#: What build_report writes under best/: the model, and which one it is.
BEST_FILES = ("best/model.keras", "best/best.json")


def _best_model_file(fs, root: str, best: str, evaluation: dict, files: dict[str, bytes]) -> str | None:
    """Add best/ to `files` from the best trial's model; or say why it cannot be exported."""
    import zipfile

    source = f"runs/{best}/model.keras"
    if not storage.exists(fs, f"{root}/{source}"):
        return f"`{source}` is missing from the experiment folder"
    data = storage.read_bytes(fs, f"{root}/{source}")
    try:  # a .keras file is a zip: a torn or overwritten one must not replace a good copy
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as exc:
        damaged = str(exc)
    if damaged is not None:
        return f"`{source}` is damaged ({damaged})"
    files["best/model.keras"] = data
    files["best/best.json"] = (json.dumps({"model": best, "chosen_by": "val balanced accuracy",
                                           "sha256": hashlib.sha256(data).hexdigest(),
                                           "evaluation": evaluation}, indent=2) + "\n").encode()
    return None


def ensemble_members(experiment_dir: str, evaluations: dict[str, dict]) -> list[str]:
    """Trials with a final model, best validation balanced accuracy first (test is for reporting only)."""
    fs, root = storage.resolve(experiment_dir)
    scored = []
    for model, evaluation in evaluations.items():
        score = (evaluation.get("val") or {}).get("balanced_accuracy")
        if score is None or math.isnan(score) or not storage.exists(fs, f"{root}/runs/{model}/model.keras"):
            continue
        scored.append((-score, model))
    return [model for _, model in sorted(scored)]


def ensemble(experiment_dir: str, experiment: dict, evaluations: dict[str, dict]) -> tuple[dict | None, str]:
    """(the leaderboard row of the best two models averaged, or None; a sentence saying which or why not)."""
    members = ensemble_members(experiment_dir, evaluations)
    if len(members) < ENSEMBLE_SIZE:
        return None, (f"No ensemble row: {len(members)} trial(s) finished with a saved model and a validation score; "
                      f"averaging needs {ENSEMBLE_SIZE}.")
    members = members[:ENSEMBLE_SIZE]
    runs = [experiment["runs"][m]["data"] for m in members]
    same = ("store", "limit", "seed", "fingerprint")
    if any(tuple(r.get(k) for k in same) != tuple(runs[0].get(k) for k in same) for r in runs):
        return None, f"No ensemble row: {' and '.join(members)} were evaluated on different data."
    fs, root = storage.resolve(experiment_dir)
    # The cache is keyed on the members' evaluations and models: a retrained
    # member changes both, a model file replaced by another (or damaged) its bytes.
    model_files = {m: storage.read_bytes(fs, f"{root}/runs/{m}/model.keras") for m in members}
    key = hashlib.sha256(b"".join(storage.read_bytes(fs, f"{root}/runs/{m}/evaluation.json") + model_files[m]
                                  for m in members)).hexdigest()
    cache_path = f"{root}/ensemble/evaluation.json"
    try:
        cached = _read_json(fs, cache_path)
    except ReportError:
        cached = None  # a torn cache is recomputed, not a reason to refuse the report
    if isinstance(cached, dict) and cached.get("members") == members and cached.get("key") == key:
        evaluation = cached["evaluation"]
    else:
        try:
            evaluation = _evaluate_ensemble(model_files, runs[0])
        except Exception as exc:  # noqa: BLE001
            # The row is an extra: a store that moved or a model that no longer
            # loads must not cost the report of the trials themselves.
            return None, f"No ensemble row: evaluating {' + '.join(members)} failed: {type(exc).__name__}: {exc}"
        storage.write_json_atomic(fs, cache_path, {"members": members, "key": key, "chosen_by": "val balanced accuracy",
                                                   "data": runs[0], "evaluation": evaluation})
    row = {
        "model": f"ensemble ({' + '.join(members)})",
        "status": ENSEMBLE_STATUS,
        "test_accuracy": evaluation["accuracy"],
        "test_loss": evaluation["log_loss"],
        "val_accuracy": evaluation["val"]["accuracy"],
        "val_loss": evaluation["val"]["log_loss"],
        "balanced_accuracy": evaluation["balanced_accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "melanoma_recall": evaluation["melanoma_recall"],
        "roc_auc": evaluation["roc_auc_ovr"],
        "best_val_balanced_accuracy": evaluation["val"]["balanced_accuracy"],
        "study_test_accuracy": math.nan,
    }
    note = (f"The ensemble row averages the class probabilities of {' and '.join(f'`{m}`' for m in members)}, "
            "the two best models by validation balanced accuracy, on the same test split "
            f"(test balanced accuracy {evaluation['balanced_accuracy']:.3f}, melanoma recall "
            f"{_fmt(evaluation['melanoma_recall'])}). `skincluster export runs/{members[0]}/model.keras "
            f"runs/{members[1]}/model.keras --out DIR` writes it as one model.")
    return row, note


def _evaluate_ensemble(model_files: dict[str, bytes], data: dict) -> dict:
    """Load the members (written to a local temporary folder: Keras reads local files), average, evaluate."""
    import os
    import tempfile

    from skincluster.data.store import open_store
    from skincluster.models import load_model
    from skincluster.serve.export import ensemble_model
    from skincluster.train.evaluate import evaluate_model

    models = []
    with tempfile.TemporaryDirectory(prefix="skincluster-ensemble-") as tmp:
        for model, content in model_files.items():
            local = os.path.join(tmp, f"{model}.keras")
            with open(local, "wb") as fh:
                fh.write(content)
            models.append(load_model(local))
    store = open_store(data["store"])
    if data.get("fingerprint") not in (None, store.manifest.get("fingerprint")):
        raise ValueError(f"{data['store']} was ingested again since the members were trained")
    evaluation = evaluate_model(ensemble_model(models), store, data["limit"], data["seed"])
    evaluation.update(model="ensemble", members=list(model_files))
    return evaluation


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown_table(table: pd.DataFrame) -> str:
    headers = {
        "model": "model", "status": "status", "epochs_run": "epochs", "epoch_budget": "budget",
        "train_minutes": "train min", "images_per_second": "img/s", "test_accuracy": "test acc",
        "test_loss": "test loss", "val_accuracy": "val acc", "val_loss": "val loss",
        "balanced_accuracy": "**bal. acc**", "macro_f1": "macro-F1", "melanoma_recall": "**mel recall**",
        "roc_auc": "ROC AUC", "best_val_balanced_accuracy": "best val bal. acc",
        "study_test_accuracy": "study's test acc",
    }
    lines = ["| " + " | ".join(headers[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for _, row in table.iterrows():
        cells = []
        for c in COLUMNS:
            v = row[c]
            if c in ("train_minutes",):
                cells.append(_fmt(float(v), 1))
            elif c == "images_per_second":
                cells.append(_fmt(float(v), 0))
            elif c in ("epochs_run", "epoch_budget"):
                cells.append("–" if pd.isna(v) else str(int(v)))  # the ensemble row has no epochs
            else:
                cells.append(_fmt(v if isinstance(v, str) else float(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hardware(runs: dict[str, dict]) -> str:
    """Workers and GPUs per trial: once when every trial had the same, else trial by trial."""
    def shape(run):
        return f"{run['scaling']['workers']} worker(s) x {run['scaling']['gpus_per_worker']:g} GPU"

    shapes = {trial: shape(run) for trial, run in runs.items()}
    if len(set(shapes.values())) == 1:
        return f"{next(iter(shapes.values()))} per trial"
    return "per trial: " + ", ".join(f"{trial} {s}" for trial, s in shapes.items())


def _report_markdown(experiment, table, results_md, histories, evaluations, best, ensemble_note="",
                     not_exported: str | None = None) -> str:
    cmp = experiment["comparison"]
    any_run = next(iter(experiment["runs"].values()))
    lines = [
        f"# Comparison `{cmp['name']}`",
        "",
        f"Data: `{cmp['data']}` · profile `{cmp['profile']}` · scheduler `{cmp['scheduler']}` · "
        f"{_hardware(experiment['runs'])} · "
        f"seed {cmp['seed']}"
        + (f" · limit {any_run['data']['limit']} training images" if any_run["data"]["limit"] else ""),
        "",
        "Metrics are on the test split of the store, in which no lesion appears in two splits. "
        "Balanced accuracy (mean recall over the seven classes) and melanoma recall are the headline numbers: "
        "always answering 'nv' scores about 67% accuracy on HAM10000 but only 1/7 balanced accuracy.",
        "",
    ]
    leaky = any(e.get("leaky_split") for e in evaluations.values())
    if leaky:
        lines += ["> **WARNING: this store uses the leaky image-level split; test scores are inflated.**", ""]
    if best:
        e = evaluations[best]
        lines += [
            f"**Best model (by validation balanced accuracy): `{best}`** — test balanced accuracy "
            f"{e['balanced_accuracy']:.3f}, accuracy {e['accuracy']:.3f}, melanoma recall {_fmt(e['melanoma_recall'])}, "
            f"macro ROC AUC {_fmt(e['roc_auc_ovr'])}. "
            + (f"Not exported: {not_exported}." if not_exported else "Exported as `best/model.keras`."),
            "",
        ]
    lines += ["## Leaderboard", "", results_md, ""]
    if ensemble_note:
        lines += [ensemble_note, ""]
    lines += [
        "The study's column is the accuracy its own write-up reports, on its image-level (leaky) split; "
        "empty where our copy of the study gives no figure.",
        "",
        "## Validation curves",
        "",
        "![validation curves of all models](curves/all_val.png)",
        "",
        "## Per model",
        "",
    ]
    for model in table["model"]:
        lines.append(f"### {model}")
        lines.append("")
        if histories.get(model):
            lines.append(f"![learning curves of {model}](curves/{model}.png)")
        if model in evaluations:
            e = evaluations[model]
            lines.append(f"![confusion matrix of {model}](confusion/{model}.png)")
            lines.append("")
            lines.append("| class | precision | recall | support |")
            lines.append("|---|---|---|---|")
            for name, c in e["per_class"].items():
                lines.append(f"| {name} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {c['support']} |")
        lines.append("")
    return "\n".join(lines)


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buf.getvalue()


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["epoch"], h[key]) for h in history if key in h and h[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _curves_figure(model: str, history: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(
        axes,
        [
            ("accuracy", ("accuracy", "val_accuracy")),
            ("balanced accuracy", ("balanced_accuracy", "val_balanced_accuracy")),
            ("loss", ("loss", "val_loss")),
        ],
    ):
        for key, style in zip(keys, ("-", "--")):
            x, y = _series(history, key)
            ax.plot(x, y, style, marker="o" if len(x) < 30 else None, label="val" if key.startswith("val") else "train")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(model)
    return fig


def _all_val_figure(histories: dict[str, list]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, history in histories.items():
        for ax, key in zip(axes, ("val_balanced_accuracy", "val_loss")):
            x, y = _series(history, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, label=model)
    for ax, title in zip(axes, ("validation balanced accuracy", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _confusion_figure(model: str, evaluation: dict):
    import matplotlib.pyplot as plt

    matrix = np.asarray(evaluation["confusion_matrix"], dtype=float)
    names = list(evaluation["per_class"])
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, support, out=np.zeros_like(matrix), where=support > 0)
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if normalised[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(f"{model}: confusion (rows normalised)")
    return fig
