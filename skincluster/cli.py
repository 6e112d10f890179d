"""`skincluster` command line. Argument parsing only: each command calls the package.

Heavy imports (TensorFlow, Ray) happen inside the command that needs them, so
`skincluster ingest` and `--help` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import signal
import sys

from skincluster.config import PROFILES, Scaling



def _add_ingest(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="HAM10000 (Kaggle folders or Dataverse zips, local or s3://) -> Parquet store",
        description="Decode, resize to 125x100, split by lesion and write Parquet shards plus manifest.json.",
    )
    p.add_argument("source", help="folder, .zip or URI holding HAM10000_metadata.csv and the images")
    p.add_argument("dest", help="store folder or URI (created; an existing store is replaced atomically)")
    p.add_argument("--split", choices=("lesion", "image"), default="lesion",
                   help="lesion: no lesion in two splits (default); image: the study's leaky split")
    p.add_argument("--clean", choices=("none", "study"), default="none",
                   help="study: drop rows with missing/zero age or unknown sex/localization, as the study did")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--fractions", default="0.675,0.075,0.25", help="train,val,test fractions (default the study's)")
    p.add_argument("--strict", action="store_true", help="exit non-zero and write nothing if any row is quarantined")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args) -> int:
    from skincluster.data.ingest import IngestOptions, ingest

    try:
        fractions = tuple(float(x) for x in args.fractions.split(","))
    except ValueError:
        raise ValueError(f"--fractions expects three numbers like 0.675,0.075,0.25, got {args.fractions!r}") from None
    options = IngestOptions(
        split=args.split, clean=args.clean, seed=args.seed, fractions=fractions, strict=args.strict, workers=args.workers
    )
    # A scheduler or `kill` stops a long ingest with SIGTERM, whose default
    # action skips every cleanup; take it like Ctrl-C, which removes the
    # scratch pixels file (hundreds of MB) and leaves the previous store whole.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        ingest(args.source, args.dest, options)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _add_demo_data(sub) -> None:
    p = sub.add_parser(
        "demo-data",
        help="write a synthetic HAM10000-shaped data set (Kaggle layout) for trying things out",
    )
    p.add_argument("dest", help="folder to create")
    p.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--size", default="600x450", help="image size WIDTHxHEIGHT (default 600x450, as the original)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo data set in DEST")
    p.set_defaults(func=_run_demo_data)


def _run_demo_data(args) -> int:
    from skincluster.data.synthetic import write_demo_dataset

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size expects WIDTHxHEIGHT like 600x450, got {args.size!r}") from None
    summary = write_demo_dataset(args.dest, n_images=args.images, image_size=(width, height), seed=args.seed,
                                 overwrite=args.overwrite)
    if summary.written:
        print(f"wrote {summary.n_images} synthetic images of {summary.n_lesions} lesions to {summary.path}")
    else:
        print(f"{summary.path} already holds this demo data set ({summary.n_images} images, same --images, --size "
              "and --seed); nothing written")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train one architecture (Ray Train run, or --local in this process)",
        description="Train one registered architecture on a store; evaluate it on the lesion-grouped test split.",
    )
    p.add_argument("model", help="architecture name (see `skincluster models`)")
    p.add_argument("--data", required=True, help="store folder or URI (from `skincluster ingest`)")
    p.add_argument("--storage", default="runs", help="folder or URI for run folders (default ./runs)")
    p.add_argument("--name", default=None, help="run name (default MODEL-PROFILE); the same name resumes")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (debug mode)")
    _add_run_options(p)
    p.set_defaults(func=_run_train)


def _add_run_options(p, per_trial: bool = False) -> None:
    """Options shared by `train` and `compare`: size, hardware, recipe overrides."""
    p.add_argument("--profile", choices=tuple(PROFILES), default="full",
                   help="smoke: seconds on a CPU; cpu: sized for CPUs; full: the study's epochs (default)")
    p.add_argument("--limit", type=int, default=None, help="train on N images (val/test shrink in proportion)")
    p.add_argument("--seed", type=int, default=0)
    for option, field, kind, help_text in _SCALING_OPTIONS:
        if per_trial:
            # Repeatable, [TRIAL:]VALUE: a comparison's trials may each need other hardware.
            p.add_argument(option, dest=field, action="append", default=[], metavar="[TRIAL:]N",
                           help=f"{help_text}; prefix an architecture or variant for that trial only, "
                                f"e.g. {option} mobilenet_enhanced:{'4' if field != 'cpus_per_worker' else '8'} "
                                "(repeatable)")
        else:
            p.add_argument(option, dest=field, type=kind, default=getattr(Scaling(), field), help=help_text)
    _add_recipe_options(p)


#: The hardware options of `train` and `compare`: option, Scaling field, its type, help.
_SCALING_OPTIONS = (
    ("--workers", "workers", int, "Ray Train workers per run (default 1)"),
    ("--gpus-per-worker", "gpus_per_worker", float, "GPUs per worker (default 0)"),
    ("--cpus-per-worker", "cpus_per_worker", float, "CPUs per worker (default 1)"),
    ("--max-failures", "max_failures", int, "worker restarts allowed per run (default 2)"),
)


def _scaling(args):
    return Scaling(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                   cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures)


def _trial_scalings(args) -> tuple[Scaling, dict[str, dict[str, str]]]:
    """`compare`'s hardware options: the scaling of every trial, and the per-trial ones by trial name."""
    from skincluster.config import replace_fields

    default: dict[str, str] = {}
    per_trial: dict[str, dict[str, str]] = {}
    for option, field, _, _ in _SCALING_OPTIONS:
        for text in getattr(args, field):
            trial, sep, value = (part.strip() for part in text.rpartition(":"))
            if sep and not trial:
                raise ValueError(f"{option} {text!r}: name the trial before ':', e.g. {option} nn:1")
            target = per_trial.setdefault(trial, {}) if sep else default
            if field in target:
                raise ValueError(f"{option} is given twice for {trial or 'every trial'}")
            target[field] = value
    try:
        scaling = replace_fields(Scaling(), default)
    except ValueError as exc:
        raise ValueError(f"hardware for every trial: {exc}") from None
    return scaling, per_trial


def _add_recipe_options(p) -> None:
    p.add_argument("--config", default=None, help="JSON file of recipe overrides, e.g. {\"epochs\": 20}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one recipe field, e.g. --set learning_rate=3e-4 --set augmentation.zoom=0.2; "
                        "prefix a model (or a compare --variant) to apply it to that one only: "
                        "--set mobilenet:weights=/path/mobilenet.h5 "
                        "(repeatable; applied after --config)")


def _recipe_overrides(args) -> dict:
    from skincluster.config import load_overrides, parse_assignments

    overrides = load_overrides(args.config) if args.config else {}
    overrides.update(parse_assignments(args.set))
    return overrides


def _run_train(args) -> int:
    from skincluster.config import check_override_prefixes
    from skincluster.models import get_recipe, list_models
    from skincluster.train.evaluate import format_summary
    from skincluster.train.launch import resolve_run, run_local, run_ray

    overrides = _recipe_overrides(args)
    check_override_prefixes(overrides, {m: get_recipe(m) for m in list_models()})
    run = resolve_run(args.model, args.data, storage_dir=args.storage, name=args.name, profile=args.profile,
                      overrides=overrides, limit=args.limit, seed=args.seed, scaling=_scaling(args))
    if args.local and args.workers != 1:
        raise ValueError("--local runs one worker in this process; drop --workers or --local")
    result = run_local(run) if args.local else run_ray(run)
    if result.reused:
        print(f"{result.run_dir} already holds this finished run; nothing trained.")
    print(format_summary(run.model, result.evaluation))
    print(f"run folder: {result.run_dir}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="the main job: train and compare architectures with Ray Tune, then write the report",
        description="One Ray Tune trial per architecture, each a Ray Train run; results collected in "
                    "STORAGE/NAME (results.csv, results.md, report.md, curves/, confusion/, best/).",
    )
    p.add_argument("--data", required=True, help="store folder or URI (from `skincluster ingest`)")
    p.add_argument("--storage", default="experiments", help="folder or URI for experiments (default ./experiments)")
    p.add_argument("--name", default=None, help="experiment name (default compare-PROFILE); the same name resumes")
    p.add_argument("--models", default=None, help="comma-separated architectures (default: all registered)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=MODEL",
                   help="one more trial, NAME, of architecture MODEL, told apart by --set NAME:FIELD=VALUE "
                        "(repeatable): --variant mobilenet_unweighted=mobilenet --set mobilenet_unweighted:class_weight=none")
    p.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience (epochs without val balanced accuracy gain) for recipes that stop early")
    p.add_argument("--scheduler", choices=("plateau", "asha"), default="plateau",
                   help="plateau: each recipe's own early stopping (default); asha: Tune's ASHA on val balanced accuracy")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster fits)")
    _add_run_options(p, per_trial=True)
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from skincluster.tune.compare import Comparison, run_comparison

    scaling, trial_scaling = _trial_scalings(args)
    spec = Comparison(
        data=args.data,
        storage=args.storage,
        name=args.name if args.name is not None else f"compare-{args.profile}",  # "" is an error, not the default
        models=_model_names(args.models),
        variants=_variants(args.variant),
        profile=args.profile,
        patience=args.patience,
        scheduler=args.scheduler,
        scaling=scaling,
        trial_scaling=trial_scaling,
        overrides=_recipe_overrides(args),
        limit=args.limit,
        seed=args.seed,
        max_concurrent=args.max_concurrent,
    )
    experiment = run_comparison(spec)
    _print_report_location(experiment)
    return 0


def _model_names(text: str | None) -> tuple[str, ...]:
    """--models a,b as a tuple; () (all registered) only when the option is left out."""
    if text is None:
        return ()
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names:
        raise ValueError(f"--models {text!r} names no architecture; leave --models out to compare all of them")
    return names


def _variants(assignments: list[str]) -> dict[str, str]:
    variants = {}
    for text in assignments:
        name, sep, model = (part.strip() for part in text.partition("="))
        if not sep or not name or not model:
            raise ValueError(f"--variant takes NAME=MODEL, e.g. mobilenet_unweighted=mobilenet; got {text!r}")
        if name in variants:
            raise ValueError(f"--variant {name} is given twice")
        variants[name] = model
    return variants


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild an experiment's report from its folder alone")
    p.add_argument("experiment", help="experiment folder or URI (STORAGE/NAME of `skincluster compare`)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from skincluster.tune.report import build_report

    build_report(args.experiment)
    _print_report_location(args.experiment)
    return 0


def _print_report_location(experiment: str) -> None:
    from skincluster import storage

    fs, path = storage.resolve(experiment)
    print()
    print(storage.read_bytes(fs, f"{path}/results.md").decode())
    print(f"report: {storage.join(experiment, 'report.md')}")


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="class probabilities for images (research use; not a diagnosis)",
        description="Decode and resize each image exactly as ingest does, then average the probabilities of "
                    "the given model(s). Files that cannot be read are reported; the others are still processed.",
    )
    p.add_argument("paths", nargs="+", metavar="MODEL.keras... IMAGE_OR_FOLDER...",
                   help="one or more saved models (.keras or Keras SavedModel folders), then images or folders")
    p.add_argument("--tta", action="store_true", help="also average horizontal and vertical flips")
    p.add_argument("--json", default=None, help="write the predictions as JSON to this file")
    p.add_argument("--csv", default=None, help="write the predictions as CSV to this file")
    p.set_defaults(func=_run_predict)


def _is_model_path(path: str) -> bool:
    import os

    return path.endswith(".keras") or os.path.isfile(os.path.join(path, "saved_model.pb"))


def _run_predict(args) -> int:
    import os

    from skincluster import storage
    from skincluster.serve.export import load_models
    from skincluster.serve.predict import NOT_A_DIAGNOSIS, format_table, predict, to_csv, to_json

    model_paths = [p for p in args.paths if _is_model_path(p)]
    inputs = [p for p in args.paths if not _is_model_path(p)]
    if not model_paths:
        raise ValueError("give at least one model (.keras file or SavedModel folder) before the images")
    if not inputs:
        raise ValueError("give at least one image or folder after the model(s)")
    outputs = [(option, path) for option, path in (("--json", args.json), ("--csv", args.csv)) if path]
    for option, path in outputs:  # before the predictions, which may take long
        storage.check_local_output(path, args.paths, option)
    if args.json and args.csv and os.path.realpath(args.json) == os.path.realpath(args.csv):
        raise ValueError(f"--json and --csv name the same file ({args.json})")
    predictions = predict(load_models(model_paths), inputs, tta=args.tta)  # names a model file that won't load
    print(NOT_A_DIAGNOSIS, file=sys.stderr)
    if predictions.images:
        print(format_table(predictions))
    for path, error in predictions.errors:
        print(f"error: {path}: {error}", file=sys.stderr)
    if predictions.skipped:
        shown = ", ".join(predictions.skipped[:3]) + (", ..." if len(predictions.skipped) > 3 else "")
        print(f"note: skipped {len(predictions.skipped)} file(s) that are not .jpg/.jpeg/.png: {shown}",
              file=sys.stderr)
    if args.json:
        storage.write_local_atomic(args.json, to_json(predictions).encode("utf-8"))
    if args.csv:
        storage.write_local_atomic(args.csv, to_csv(predictions).encode("utf-8"))
    return 1 if predictions.errors else 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model (or the average of several) as .keras, SavedModel and TFLite (float32/float16/int8)",
        description="Write MODEL (several: their ensemble average) into DIR as model.keras, saved_model/ "
                    "(serving signature: uint8 images (None,100,125,3) -> 7 probabilities) and TFLite files; "
                    "with --data, calibrate the int8 file on train images and compare every format on the "
                    "test split. The report goes to DIR/export.json.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=".keras file(s) or Keras SavedModel folder(s)")
    p.add_argument("--out", required=True, help="local folder to write into (created)")
    p.add_argument("--data", default=None,
                   help="store (from `skincluster ingest`): int8 calibration images and test-split evaluation")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on N test images (a seeded random subset) instead of the whole test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration and --limit samples (default 0)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from skincluster.serve.export import export, format_report

    # SIGTERM (a scheduler, `kill`) like Ctrl-C: the staging folder is removed, the previous export kept.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = export(args.models, args.out, store_uri=args.data, limit=args.limit, seed=args.seed)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(report))
    return 0


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="Grad-CAM heatmap of where a model looked, overlaid on the image",
        description="Decode IMAGE as ingest does, compute a Grad-CAM heatmap for the predicted class (or --class) "
                    "on the model's last convolutional feature map (input-gradient saliency for `nn`, which has "
                    "none), and write it over the image as a PNG of the image's own size.",
    )
    p.add_argument("model", help=".keras file or Keras SavedModel folder")
    p.add_argument("image", help="image file (.jpg/.png)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="explain this class instead of the predicted one (akiec, bcc, bkl, df, mel, nv, vasc)")
    p.set_defaults(func=_run_explain)


def _run_explain(args) -> int:
    from skincluster import storage
    from skincluster.serve.explain import class_index_of, explain_file, format_explanation, read_image
    from skincluster.serve.export import load_models

    class_index_of(args.class_name)  # a typo in --class fails before the model is loaded
    read_image(args.image)  # ... and so does an unreadable image
    storage.check_local_output(args.out, [args.model, args.image], "--out")  # ... and an output over an input
    (model,) = load_models([args.model])
    result = explain_file(model, args.image, args.out, args.class_name)
    print(format_explanation(result, args.image, args.out))
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered architectures and their recipes")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from skincluster.models import get_recipe, list_models

    for name in list_models():
        r = get_recipe(name)
        print(f"{name:<20} lr {r.learning_rate:g}  epochs {r.epochs}  batch {r.batch_size}  "
              f"augment {'yes' if r.augmentation.enabled else 'no'}  trainable {r.trainable_layers}  "
              f"early stop {r.early_stopping_patience}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skincluster",
        description="Train and compare skin-lesion classifiers on HAM10000 with Ray Train and Ray Tune.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ingest(sub)
    _add_demo_data(sub)
    _add_train(sub)
    _add_compare(sub)
    _add_report(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_explain(sub)
    _add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skincluster.data.ham10000 import SourceError
    from skincluster.data.ingest import IngestError
    from skincluster.data.store import StoreError
    from skincluster.train.launch import RunFailed
    from skincluster.train.resources import ResourceError

    try:
        return int(args.func(args) or 0)
    except IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (SourceError, StoreError, ResourceError, RunFailed, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
