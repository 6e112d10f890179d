"""Small hand-made HAM10000 sources for data tests (no dependency on the synthetic generator)."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from skincluster.config import CLASS_NAMES

HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def jpeg_bytes(color, size=(200, 150), mode="RGB", fmt="JPEG", seed=0) -> bytes:
    """A flat-coloured image with a little noise so JPEG does not collapse it."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.zeros((h, w, 3), dtype=np.int16) + np.asarray(color, dtype=np.int16)
    pixels = np.clip(base + rng.integers(-8, 8, size=base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_rows(n_lesions_per_class: int = 6, images_per_lesion=(1, 2, 3)) -> list[dict]:
    """Rows for every class, lesions with 1-3 images, ids in HAM10000's formats."""
    rows = []
    lesion = image = 0
    for dx in CLASS_NAMES:
        for k in range(n_lesions_per_class):
            lesion += 1
            for _ in range(images_per_lesion[k % len(images_per_lesion)]):
                image += 1
                rows.append({
                    "lesion_id": f"HAM_{lesion:07d}",
                    "image_id": f"ISIC_{image:07d}",
                    "dx": dx,
                    "dx_type": "histo",
                    "age": str(20 + 5 * (image % 12)) + ".0",
                    "sex": ("male", "female")[image % 2],
                    "localization": ("back", "face", "trunk")[image % 3],
                })
    return rows


def color_of(dx: str) -> tuple[int, int, int]:
    i = CLASS_NAMES.index(dx)
    return (40 + 30 * i, 200 - 25 * i, 90 + 20 * (i % 3))


def csv_text(rows: list[dict], header=HEADER, sep=",") -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, delimiter=sep, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_kaggle(root: Path, rows: list[dict], images: dict[str, bytes] | None = None, header=HEADER) -> Path:
    """Kaggle layout: metadata CSV beside HAM10000_images_part_1/ and _2/."""
    root.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else default_images(rows)
    for i, (image_id, data) in enumerate(sorted(images.items())):
        folder = root / ("HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2")
        folder.mkdir(exist_ok=True)
        (folder / f"{image_id}.jpg").write_bytes(data)
    (root / "HAM10000_metadata.csv").write_text(csv_text(rows, header))
    return root


def write_dataverse(root: Path, rows: list[dict], images: dict[str, bytes] | None = None) -> Path:
    """Dataverse layout: a tab-separated HAM10000_metadata beside two image zips."""
    root.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else default_images(rows)
    items = sorted(images.items())
    for part, chunk in ((1, items[::2]), (2, items[1::2])):
        with zipfile.ZipFile(root / f"HAM10000_images_part{part}.zip", "w") as zf:
            for image_id, data in chunk:
                zf.writestr(f"{image_id}.jpg", data)
            zf.writestr(f"__MACOSX/._{chunk[0][0]}.jpg", b"\x00\x05\x16\x07 not an image")
    (root / "HAM10000_metadata.tab").write_text(csv_text(rows, sep="\t"))
    return root


def default_images(rows: list[dict]) -> dict[str, bytes]:
    return {r["image_id"]: jpeg_bytes(color_of(r["dx"]), seed=i) for i, r in enumerate(rows)}
