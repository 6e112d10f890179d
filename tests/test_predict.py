"""`skincluster predict`: probabilities per image, ensembles and flips, bad files named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import REAL_DATA
from skincluster.cli import main as cli_main
from skincluster.config import CLASS_NAMES
from skincluster.data.images import decode_image
from skincluster.serve.predict import predict

from helpers import jpeg_bytes


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from skincluster.models import create_model

    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (1, 2):
        import tf_keras as keras

        keras.utils.set_random_seed(seed)
        path = folder / f"nn-{seed}.keras"
        create_model("nn").save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "a.jpg").write_bytes(jpeg_bytes((200, 120, 90), size=(600, 450)))
    (folder / "b.png").write_bytes(jpeg_bytes((90, 60, 40), size=(320, 240), fmt="PNG"))
    (folder / "broken.jpg").write_bytes(os.urandom(3000))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_matches_the_model_on_ingest_pixels(saved_models, images):
    from skincluster.models import load_model

    model = load_model(saved_models[0])
    out = predict([model], [str(images / "a.jpg")])
    with open(images / "a.jpg", "rb") as fh:
        expected = np.asarray(model(decode_image(fh.read())[None], training=False))
    np.testing.assert_allclose(out.probabilities, expected, rtol=1e-5)


def test_folder_ensemble_and_tta(saved_models, images):
    from skincluster.models import load_model

    models = [load_model(p) for p in saved_models]
    out = predict(models, [str(images)], tta=True)
    assert [os.path.basename(p) for p in out.images] == ["a.jpg", "b.png"]  # the .txt is not an image
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    single = [predict([m], [str(images)]).probabilities for m in models]
    assert not np.allclose(out.probabilities, np.mean(single, axis=0))  # flips changed the average
    assert [os.path.basename(p) for p, _ in out.errors] == ["broken.jpg"]


def test_cli_writes_json_and_csv_and_names_bad_files(saved_models, images, tmp_path, capsys):
    code = cli_main(["predict", saved_models[0], str(images), str(tmp_path / "missing.jpg"),
                     "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv")])
    assert code == 1  # some inputs failed; the rest were still predicted
    captured = capsys.readouterr()
    assert "NOT A DIAGNOSIS" in captured.err
    assert "broken.jpg" in captured.err and "missing.jpg" in captured.err
    report = json.loads((tmp_path / "p.json").read_text())
    assert len(report["predictions"]) == 2 and report["predictions"][0]["prediction"] in CLASS_NAMES
    assert (tmp_path / "p.csv").read_text().count("\n") == 3


def test_an_output_over_an_input_or_in_no_folder_is_refused_before_predicting(saved_models, images, tmp_path, capsys):
    model = tmp_path / "model.keras"
    model.write_bytes(open(saved_models[0], "rb").read())
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((images / "a.jpg").read_bytes())
    cases = [
        (["--csv", str(model)], f"--csv {model}: is one of the inputs"),  # was: the model replaced by the CSV
        (["--json", str(photo)], f"--json {photo}: is one of the inputs"),
        (["--json", str(tmp_path)], "is a folder"),
        (["--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "nodir" / "p.csv")], "does not exist"),
        (["--json", str(tmp_path / "p.out"), "--csv", str(tmp_path / "p.out")], "--json and --csv name the same file"),
    ]
    for options, message in cases:
        assert cli_main(["predict", str(model), str(photo), *options]) == 2, options
        captured = capsys.readouterr()
        assert message in captured.err and "NOT A DIAGNOSIS" not in captured.err, captured.err  # nothing predicted
    assert model.read_bytes() == open(saved_models[0], "rb").read() and not (tmp_path / "p.json").exists()


def test_a_previous_output_is_replaced_whole(saved_models, images, tmp_path, monkeypatch):
    from skincluster import storage

    out = tmp_path / "p.json"
    assert cli_main(["predict", saved_models[0], str(images / "a.jpg"), "--json", str(out)]) == 0
    before = out.read_bytes()

    def dies(fs, path, data):  # killed while writing: the temporary file, never the previous one
        with fs.open_output_stream(f"{path}.tmp-dead") as fh:
            fh.write(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "write_bytes_atomic", dies)
    assert cli_main(["predict", saved_models[0], str(images), "--json", str(out)]) == 130
    assert out.read_bytes() == before


def test_linked_folders_are_followed_once(saved_models, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "part1").symlink_to(images, target_is_directory=True)  # a data set's part linked in
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # ... and a link back up the tree
    (folder / ".cache").mkdir()
    (folder / ".cache" / "a.jpg").write_bytes((images / "a.jpg").read_bytes())
    out = tmp_path / "p.json"
    assert cli_main(["predict", saved_models[0], str(folder), "--json", str(out)]) == 1  # broken.jpg in images
    predicted = [r["image"] for r in json.loads(out.read_text())["predictions"]]
    assert sorted(os.path.basename(p) for p in predicted) == ["a.jpg", "b.png"]


def test_a_model_file_that_does_not_load_is_named(images, tmp_path, capsys):
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"not a model")
    assert cli_main(["predict", str(fake), str(images)]) == 2
    assert f"{fake}: cannot load as a Keras model" in capsys.readouterr().err


def test_folder_reports_skipped_files_and_unlistable_subfolders(saved_models, images, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    (folder / "a.jpg").write_bytes((images / "a.jpg").read_bytes())
    (folder / "scan.tif").write_bytes(b"II*\0")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "locked" / "b.jpg").write_bytes((images / "a.jpg").read_bytes())
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder, so the denial is simulated
        # shutil.rmtree lists folders by descriptor: only paths can be "locked".
        if not isinstance(path, int) and os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code = cli_main(["predict", saved_models[0], str(folder), "--json", str(tmp_path / "p.json")])
    assert code == 1  # a folder that could not be read is an error, not a silent gap
    err = capsys.readouterr().err
    assert f"error: {folder / 'locked'}: cannot list folder: Permission denied" in err
    assert "note: skipped 1 file(s) that are not .jpg/.jpeg/.png" in err and "scan.tif" in err
    report = json.loads((tmp_path / "p.json").read_text())
    assert [os.path.basename(r["image"]) for r in report["predictions"]] == ["a.jpg"]
    assert [os.path.basename(p) for p in report["skipped"]] == ["scan.tif"]  # hidden files are not counted


def test_a_model_without_softmax_is_refused(images, tmp_path, capsys):
    import tf_keras as keras

    from skincluster.config import IMAGE_SHAPE

    inputs = keras.Input(IMAGE_SHAPE)
    logits = keras.layers.Dense(len(CLASS_NAMES))(keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path / "logits.keras"
    keras.Model(inputs, logits).save(path)
    assert cli_main(["predict", str(path), str(images)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: its outputs are not class probabilities" in err and "softmax" in err


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real HAM10000 not found at {REAL_DATA}")
def test_predict_on_real_images(saved_models):
    from skincluster.models import load_model

    folder = REAL_DATA / "HAM10000_images_part_1"
    files = sorted(str(p) for p in folder.glob("*.jpg"))[:5]
    out = predict([load_model(saved_models[0])], files)
    assert len(out.images) == 5 and not out.errors
