"""`skincluster predict MODEL... IMAGE_OR_FOLDER...`: class probabilities per image.

Images are decoded and resized exactly as ingest does (`decode_image`), so a
model sees the pixels it was trained on. Several models are averaged (an
ensemble); `--tta` also averages horizontal and vertical flips. A file that is
not a readable image is reported by name and the others are still processed;
inside a folder, files that are not .jpg/.jpeg/.png are skipped and counted, so
a folder of TIFFs does not pass for an empty result.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from skincluster.config import CLASS_LONG_NAMES, CLASS_NAMES
from skincluster.data.images import ImageDecodeError, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NOT_A_DIAGNOSIS = (
    "NOT A DIAGNOSIS: research software. These probabilities come from a model trained on HAM10000 "
    "dermoscopy images; they must not be used to diagnose or rule out skin cancer. See a dermatologist."
)


@dataclass
class Predictions:
    images: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CLASS_NAMES))))
    #: (path, reason) for every input that could not be read.
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: Files inside the given folders that are not .jpg/.jpeg/.png (hidden files aside).
    skipped: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        out = []
        for path, probs in zip(self.images, self.probabilities):
            best = int(np.argmax(probs))
            out.append({
                "image": path,
                "prediction": CLASS_NAMES[best],
                "prediction_name": CLASS_LONG_NAMES[CLASS_NAMES[best]],
                "probability": float(probs[best]),
                **{f"p_{name}": float(p) for name, p in zip(CLASS_NAMES, probs)},
            })
        return out


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Files as given, folders walked for images (sorted).

    Returns (image files, errors, skipped): a missing path or a subfolder that
    cannot be listed is an error; a non-image file inside a folder is skipped.
    """
    files: list[str] = []
    errors: list[tuple[str, str]] = []
    skipped: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            # Without onerror os.walk drops an unreadable subfolder without a word.
            walk_errors: list[OSError] = []
            seen: set[str] = set()
            # Linked folders are followed (a data set's parts are often linked in), each once: a link
            # back up the tree would otherwise be walked for ever.
            for root, folders, names in os.walk(item, onerror=walk_errors.append, followlinks=True):
                if os.path.realpath(root) in seen:
                    folders[:] = []
                    continue
                seen.add(os.path.realpath(root))
                folders[:] = [f for f in folders if not f.startswith(".")]  # hidden, like hidden files
                for name in names:
                    if name.startswith("."):
                        continue  # .DS_Store, macOS "._" resource forks
                    path = os.path.join(root, name)
                    (found if name.lower().endswith(IMAGE_SUFFIXES) else skipped).append(path)
            errors.extend((exc.filename or item, f"cannot list folder: {exc.strerror or exc}") for exc in walk_errors)
            if not found and not walk_errors:
                errors.append((item, "folder holds no .jpg/.jpeg/.png images"))
            files.extend(sorted(found))
        elif os.path.isfile(item):
            files.append(item)
        else:
            errors.append((item, "no such file or folder"))
    return files, errors, sorted(skipped)


def predict(models: list, inputs: list[str], *, tta: bool = False, batch_size: int = 64) -> Predictions:
    """Average the class probabilities of `models` (loaded Keras models) over every readable image."""
    files, errors, skipped = expand_inputs(inputs)
    images, names = [], []
    for path in files:
        try:
            with open(path, "rb") as fh:
                images.append(decode_image(fh.read()))
            names.append(path)
        except (ImageDecodeError, OSError) as exc:
            errors.append((path, str(exc)))
    result = Predictions(images=names, errors=errors, skipped=skipped)
    if not images:
        return result
    batch = np.stack(images)
    views = [batch, batch[:, :, ::-1], batch[:, ::-1, :]] if tta else [batch]
    total = np.zeros((len(batch), len(CLASS_NAMES)))
    for model in models:
        for view in views:
            for start in range(0, len(view), batch_size):
                chunk = np.ascontiguousarray(view[start : start + batch_size])
                total[start : start + len(chunk)] += np.asarray(model(chunk, training=False), dtype=np.float64)
    result.probabilities = total / (len(models) * len(views))
    return result


def format_table(predictions: Predictions) -> str:
    header = f"{'image':<40} {'prediction':<48} {'p':>5}  " + " ".join(f"{n:>5}" for n in CLASS_NAMES)
    lines = [header, "-" * len(header)]
    for row in predictions.rows():
        label = f"{row['prediction']} ({row['prediction_name']})"
        name = row["image"] if len(row["image"]) <= 40 else "..." + row["image"][-37:]
        probs = " ".join(f"{row[f'p_{n}']:5.2f}" for n in CLASS_NAMES)
        lines.append(f"{name:<40} {label:<48} {row['probability']:5.2f}  {probs}")
    return "\n".join(lines)


def to_json(predictions: Predictions) -> str:
    return json.dumps({
        "warning": NOT_A_DIAGNOSIS,
        "classes": {n: CLASS_LONG_NAMES[n] for n in CLASS_NAMES},
        "predictions": predictions.rows(),
        "errors": [{"image": p, "error": e} for p, e in predictions.errors],
        "skipped": predictions.skipped,
    }, indent=2)


def to_csv(predictions: Predictions) -> str:
    buf = io.StringIO()
    fields = ["image", "prediction", "prediction_name", "probability", *(f"p_{n}" for n in CLASS_NAMES)]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(predictions.rows())
    return buf.getvalue()
