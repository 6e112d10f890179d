"""`skincluster explain`: Grad-CAM that points at the lesion, every architecture, bad files named."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg_bytes
from skincluster.cli import main as cli_main
from skincluster.config import CLASS_NAMES, IMAGE_HEIGHT, IMAGE_WIDTH
from skincluster.models import create_model, list_models
from skincluster.serve.explain import explain

#: Two look-alike-free classes told apart only by the lesion's colour, so the
#: only evidence for either class is inside the lesion.
LESION_COLOURS = {"nv": (105, 68, 45), "vasc": (165, 38, 72)}


def lesion_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (n,100,125,3), labels, lesion masks bool (n,100,125)).

    Unlike the demo data set, whose lesions sit near the centre, each lesion
    here is an ellipse at a uniformly random place on mottled skin, so a
    heatmap that points at "the middle" does not pass for one that points at
    the lesion.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.float32)
    images = np.empty((n, IMAGE_HEIGHT, IMAGE_WIDTH, 3), np.uint8)
    masks = np.empty((n, IMAGE_HEIGHT, IMAGE_WIDTH), bool)
    classes = list(LESION_COLOURS)
    labels = np.array([CLASS_NAMES.index(classes[i % 2]) for i in range(n)], np.int32)
    for i in range(n):
        skin = np.array([222, 178, 156], np.float32) + rng.normal(0, 10, 3)
        mottle = np.asarray(Image.fromarray(rng.normal(0, 8, (5, 6)).astype(np.float32), mode="F")
                            .resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BICUBIC))
        image = skin + mottle[..., None] + rng.normal(0, 5, (IMAGE_HEIGHT, IMAGE_WIDTH, 3))
        rx, ry = rng.uniform(9, 15), rng.uniform(9, 15)
        cx, cy = rng.uniform(rx + 2, IMAGE_WIDTH - rx - 2), rng.uniform(ry + 2, IMAGE_HEIGHT - ry - 2)
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        colour = np.array(LESION_COLOURS[CLASS_NAMES[labels[i]]], np.float32) + rng.normal(0, 12, 3)
        image[mask] = colour + rng.normal(0, 10, (int(mask.sum()), 3))
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
        masks[i] = mask
    return images, labels, masks


@pytest.fixture(scope="module")
def trained_cnn():
    """The registry's cnn, a few epochs on lesions that move around (about 20 s on 2 cores)."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    images, labels, _ = lesion_images(320, seed=1)
    model = create_model("cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, batch_size=32, epochs=4, verbose=0)
    return model


def test_grad_cam_points_at_the_lesion(trained_cnn):
    images, labels, masks = lesion_images(40, seed=2)
    probs = np.asarray(trained_cnn(images, training=False))
    assert (probs.argmax(1) == labels).mean() >= 0.8, "the cnn did not learn the task; the heatmap test would mean nothing"
    hits, ratios = [], []
    for image, mask in zip(images, masks):
        result = explain(trained_cnn, image)
        assert result.method == "grad-cam" and result.layer == "conv_3"
        assert result.heatmap.shape == mask.shape
        # conv_3's cells are 4x4 pixels and the map is upsampled bilinearly: allow one cell of slack.
        near = _dilate(mask, 4)
        y, x = np.unravel_index(np.argmax(result.heatmap), mask.shape)
        hits.append(near[y, x])
        ratios.append(result.heatmap[mask].mean() / max(result.heatmap[~near].mean(), 1e-6))
    # A random heatmap's hottest pixel lands near the lesion ~8% of the time, and
    # its mean heat inside and outside the lesion are equal (ratio ~1).
    assert np.mean(hits) >= 0.8, f"hottest point near the lesion in only {np.mean(hits):.0%} of images"
    assert np.median(ratios) >= 2.0, f"median heat inside/outside the lesion {np.median(ratios):.2f}"


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=pixels)


def test_chosen_class_is_explained(trained_cnn):
    images, _, _ = lesion_images(2, seed=3)
    vasc = CLASS_NAMES.index("vasc")
    result = explain(trained_cnn, images[0], class_index=vasc)
    assert result.class_index == vasc and result.class_name == "vasc"


@pytest.mark.parametrize("name", list_models())
def test_every_architecture_gets_a_heatmap(name):
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    model = create_model(name, weights=None)
    image = np.random.default_rng(0).integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
    result = explain(model, image)
    assert result.heatmap.shape == (IMAGE_HEIGHT, IMAGE_WIDTH)
    assert np.isfinite(result.heatmap).all() and result.heatmap.min() >= 0 and result.heatmap.max() <= 1
    # training=False: called without it, the augmentation layers of cnn_aug and the backbones run.
    np.testing.assert_allclose(result.probabilities, np.asarray(model(image[None], training=False))[0], atol=1e-5)
    if name == "nn":  # a dense net: no feature map, documented saliency fallback
        assert result.method == "saliency" and result.layer is None
    else:
        assert result.method == "grad-cam"
        if name.startswith(("mobilenet", "resnet", "densenet")):  # the map inside the nested backbone
            from skincluster.models import backbone_of

            assert result.layer == f"{backbone_of(model).name} ({backbone_of(model).layers[-1].name})"


@pytest.fixture(scope="module")
def cnn_file(trained_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "cnn.keras"
    trained_cnn.save(path)
    return str(path)


def test_cli_writes_png_at_the_image_size(cnn_file, tmp_path, capsys):
    images, _, masks = lesion_images(1, seed=4)
    # A 4:3 photo at 3x: the PNG keeps the photo's size, not the model's 125x100.
    photo = Image.fromarray(images[0]).resize((375, 300), Image.Resampling.BICUBIC)
    photo.save(tmp_path / "lesion.png")
    out = tmp_path / "heat.png"
    assert cli_main(["explain", cnn_file, str(tmp_path / "lesion.png"), "--out", str(out)]) == 0
    assert "Grad-CAM on conv_3" in capsys.readouterr().out
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (375, 300)
    assert cli_main(["explain", cnn_file, str(tmp_path / "lesion.png"), "--out", str(out), "--class", "mel"]) == 0
    assert "heatmap for mel" in capsys.readouterr().out


def test_the_photo_of_a_16_bit_image_is_scaled_not_clipped_to_white(tmp_path):
    from skincluster.serve.explain import read_image

    gray = np.linspace(7, 243, 150 * 200).reshape(150, 200).round().astype(np.uint16)
    Image.fromarray(gray * 257).save(tmp_path / "g16.png")  # Pillow mode "I;16"
    view, photo = read_image(str(tmp_path / "g16.png"))
    np.testing.assert_array_equal(np.asarray(photo)[..., 1], gray)
    assert abs(float(view.mean()) - float(gray.mean())) < 2


def test_cli_names_bad_files(cnn_file, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(os.urandom(2000))
    good = tmp_path / "ok.jpg"
    good.write_bytes(jpeg_bytes((180, 120, 100)))
    cases = [
        ([cnn_file, str(broken)], "broken.jpg"),
        ([cnn_file, str(tmp_path / "missing.jpg")], "missing.jpg"),
        ([cnn_file, str(good), "--class", "cancer"], "unknown class 'cancer'"),
        ([str(tmp_path / "nomodel.keras"), str(good)], "nomodel.keras"),
        ([cnn_file, str(good), "--out", str(tmp_path / "no" / "such" / "x.png")], "does not exist"),
        ([cnn_file, str(good), "--out", cnn_file], "is one of the inputs"),  # was: the model replaced by a PNG
        ([cnn_file, str(good), "--out", str(good)], "is one of the inputs"),  # ... or the photo
    ]
    for args, expected in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "x.png")]
        assert cli_main(["explain", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "x.png").exists()
    assert good.read_bytes() == jpeg_bytes((180, 120, 100))
