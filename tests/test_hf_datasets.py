"""Hugging Face ``datasets`` as a data source: feature -> modality mapping, decoding, splits, CLI, errors.

Every dataset here is built in tmp_path with ``Dataset.from_dict`` and written with ``save_to_disk``;
nothing is downloaded (a hub id is only tried offline, to check the error line).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from conftest import run_cli
from fusionkit.errors import DataError
from fusionkit.registry import build

datasets = pytest.importorskip("datasets")
sf = pytest.importorskip("soundfile")
from PIL import Image  # noqa: E402

CLASSES = ["cat", "dog", "eel"]
TINY_CLI = ["--no-progress", "train.epochs=1", "train.batch_size=4", "model.dim=16", "runtime.accelerator=cpu"]


def wav_bytes(i: int, rate: int = 8000) -> bytes:
    """0.1 s of a sine at ``rate`` Hz as WAV file bytes (800 samples at 8 kHz)."""
    buf = io.BytesIO()
    sf.write(buf, wave(i, rate), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def wave(i: int, rate: int = 8000) -> np.ndarray:
    return (0.1 * np.sin(np.arange(rate // 10) * 0.05 * (i + 1))).astype(np.float32)


def save(ds, path):
    ds.save_to_disk(str(path))
    return path


def tiny_saved_dataset(path):
    """12 rows (image, caption with row 3 empty, 3-float vector, 8 kHz WAV, ClassLabel of 3, an int
    id) written by ``save_to_disk`` to ``path``."""
    from datasets import Audio, ClassLabel, Dataset, Features, Sequence, Value
    from datasets import Image as HFImage

    n = 12
    flat = Dataset.from_dict(
        {"img": [Image.new("RGB", (8, 6), (20 * i, 5, 0)) for i in range(n)],
         "caption": ["" if i == 3 else f"a sample of class {CLASSES[i % 3]}" for i in range(n)],
         "feat": [[float(i), 1.0, 2.0] for i in range(n)],
         "label": [i % 3 for i in range(n)], "id": list(range(n))},
        features=Features({"img": HFImage(), "caption": Value("string"), "feat": Sequence(Value("float32")),
                           "label": ClassLabel(names=CLASSES), "id": Value("int64")}))
    # Audio.encode_example needs torchcodec even for bytes: add the column as a struct and cast it
    flat = flat.add_column("speech", [{"bytes": wav_bytes(i), "path": None} for i in range(n)])
    return save(flat.cast_column("speech", Audio()), path)


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    """``flat``: :func:`tiny_saved_dataset`; ``dd``: a DatasetDict train (9) / test (3) with string
    labels and vectors only; ``no_label``: 4 rows, row 2 without a label; ``broken``: 4 rows, row
    3's image bytes are not an image."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as HFImage

    root = tmp_path_factory.mktemp("hf")
    vec = lambda k, m: {"feat": [[float(i % 2), float(i), 1.0] for i in range(k, k + m)],  # noqa: E731
                        "label": [["bird", "ant"][i % 2] for i in range(k, k + m)]}
    dd = DatasetDict({"train": Dataset.from_dict(vec(0, 9)), "test": Dataset.from_dict(vec(9, 3))})
    images = [{"bytes": png_bytes(i), "path": None} for i in range(3)] + [{"bytes": b"\x89PNG broken", "path": None}]
    small = lambda labels: Dataset.from_dict(  # noqa: E731
        {"img": images, "label": labels}, features=Features({"img": HFImage(), "label": Value("string")}))
    return {"flat": tiny_saved_dataset(root / "flat"), "dd": save(dd, root / "dd"),
            "no_label": save(small(["a", "b", None, "a"]), root / "no_label"),
            "broken": save(small(["a", "b", "b", "a"]), root / "broken")}


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5, 4), 10 * i).save(buf, format="PNG")
    return buf.getvalue()


def load(**data):
    ds = build("datasets", {"name": "hf_datasets", **data}, "data")
    return ds, ds.load()


# -- mapping and decoding ----------------------------------------------------------------------
def test_features_become_modalities_and_decode(hf_data):
    """Image/string/float-list/Audio columns are found from the features; values decode to the
    stored pixels, text, vector and (resampled) waveform; an empty caption is a missing modality."""
    ds, bundle = load(path=str(hf_data["flat"]))
    specs = ds.modality_specs()
    assert {m: s.kind for m, s in specs.items()} == {"img": "image", "caption": "text", "feat": "vector",
                                                      "speech": "audio"}
    assert specs["feat"].dim == 3 and specs["speech"].extra == {"sample_rate": 16000}
    assert bundle.classes == CLASSES and bundle.info["ignored_columns"] == ["id"]
    assert bundle.info["summary"].startswith(f"hf_datasets '{hf_data['flat']}': img <- column 'img' (image), "
                                             "caption <- column 'caption' (text), feat <- column 'feat' (vector, 3), "
                                             "speech <- column 'speech' (audio); label <- column 'label' "
                                             "(ClassLabel, 3 classes); ignored columns: id")
    # 4 rows per class, 0.2 of each drawn for val and for test
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert "val and test drawn from train" in bundle.info["summary"]
    train = bundle.splits["train"]
    assert sorted(train.ids + bundle.splits["val"].ids + bundle.splits["test"].ids) == list(range(12))
    for i, row in enumerate(train.ids):
        item = train[i]
        assert item["target"] == row % 3
        img, text, feat, speech = (item["inputs"][m] for m in ("img", "caption", "feat", "speech"))
        assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (20 * row, 5, 0)
        assert text == (None if row == 3 else f"a sample of class {CLASSES[row % 3]}")
        np.testing.assert_array_equal(feat, np.array([row, 1, 2], dtype=np.float32))
        assert speech.dtype == np.float32 and speech.shape == (1, 1600)  # 800 samples at 8 kHz -> 16 kHz
    assert (train.present["caption"] == [row != 3 for row in train.ids]).all()
    _, native = load(path=str(hf_data["flat"]), sample_rate=8000, modalities={"audio": "speech"})
    item = native.splits["train"][0]
    np.testing.assert_allclose(item["inputs"]["audio"][0], wave(native.splits["train"].ids[0]), atol=1e-6)


def test_dataset_dict_splits_and_string_labels(hf_data):
    """A DatasetDict's own test split is used and val is drawn from train; string labels give the
    sorted class names; ``splits`` maps split names explicitly."""
    _, bundle = load(path=str(hf_data["dd"]))
    assert bundle.classes == ["ant", "bird"]
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 7, "val": 2, "test": 3}
    assert bundle.splits["test"].ids == [0, 1, 2] and bundle.info["split"] == {
        "train": "train", "val": "train", "test": "test"}
    test = bundle.splits["test"]
    assert [test[i]["target"] for i in range(3)] == [0, 1, 0]  # rows 9, 10, 11: ant, bird, ant
    _, mapped = load(path=str(hf_data["dd"]), splits={"train": "train", "val": "test", "test": "test"})
    assert {k: len(v) for k, v in mapped.splits.items()} == {"train": 9, "val": 3, "test": 3}


def test_select_leaves_out_rows_without_the_chosen_modalities(hf_data):
    _, bundle = load(path=str(hf_data["flat"]), modalities={"text": "caption"})
    splits = {k: v.select(["text"]) for k, v in bundle.splits.items()}
    assert sum(len(s) for s in splits.values()) == 11  # row 3 has an empty caption
    dropped = [d for s in splits.values() for d in s.dropped]
    assert [(d["id"], d["stage"]) for d in dropped] == [(3, "select")]


# -- the command line --------------------------------------------------------------------------
def test_cli_trains_on_a_saved_dataset_with_four_modalities(hf_data, tmp_path):
    """``fusionkit train --config`` on the saved dataset: image, text, audio and vector columns
    under names of our choosing, 1 epoch with tiny encoders."""
    config = tmp_path / "hf.yaml"
    config.write_text(
        f"data: {{name: hf_datasets, path: '{hf_data['flat']}', label: label,\n"
        "       modalities: {image: img, text: caption, audio: speech, feat: feat}}\n"
        "model:\n  encoders:\n"
        "    image: {name: timm, model_name: test_resnet, image_size: 32}\n"
        "    audio: {name: mel_cnn, model_name: test_resnet, n_mels: 32}\n")
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(config), "--out", str(out), *TINY_CLI)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["train_samples"] == 6 and epoch["val"]["n"] == 3
    test = json.loads((out / "results.json").read_text())["test"]
    assert test["n"] == 3 and set(test["mean_weights"]) == {"audio", "feat", "image", "text"}


def test_cli_trains_on_a_dataset_dict(hf_data, tmp_path):
    from fusionkit.training.trainer import load_run

    out = tmp_path / "run"
    proc = run_cli("train", f"data={{name: hf_datasets, path: '{hf_data['dd']}'}}", "--out", str(out), *TINY_CLI)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.jsonl").read_text())["train_samples"] == 7
    assert json.loads((out / "results.json").read_text())["test"]["n"] == 3
    _, bundle, model = load_run(out)
    assert bundle.classes == ["ant", "bird"] and model.modalities == ["feat"]


def test_offline_hub_id_is_one_line(tmp_path):
    proc = run_cli("train", "data={name: hf_datasets, path: nobody-here/no-such-dataset}", "--out",
                   str(tmp_path / "run"), *TINY_CLI, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: dataset 'nobody-here/no-such-dataset' cannot be loaded offline: not a local folder "
                     "and not in the Hugging Face cache; download it once with network access or pass a folder "
                     "written by save_to_disk"]
    assert not (tmp_path / "run").exists()


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"path": "{root}/nope"}, "hf_datasets '{root}/nope': the folder does not exist"),
    ({"label": "lbl"}, "no label column 'lbl' (data.label); columns are img, caption, feat, label, id, speech"),
    ({"modalities": {"image": "picture"}}, "data.modalities.image names column 'picture', which the dataset "
                                          "does not have (columns: img, caption, feat, label, id, speech)"),
    ({"modalities": {"n": "id"}}, "column 'id' is Value('int64'); a modality column holds"),
    ({"splits": {"train": "train", "val": "validation"}}, "data.splits.val: hf_datasets '{root}/flat' has no "
                                                          "split 'validation' (splits: train)"),
])
def test_bad_config_is_one_data_error(hf_data, data, message):
    root = hf_data["flat"].parent
    data = {"path": str(hf_data["flat"]), **{k: v.format(root=root) if isinstance(v, str) else v
                                               for k, v in data.items()}}
    with pytest.raises(DataError) as err:
        load(**data)
    assert message.format(root=root) in str(err.value) and "\n" not in str(err.value)


def test_bad_rows_error_or_are_skipped(hf_data):
    """A row without a label stops loading (naming split and row); a broken image fails when read,
    naming the row and column. With on_bad_sample=skip both are left out and reported."""
    same = {"splits": {"train": "train", "val": "train", "test": "train"}}
    with pytest.raises(DataError, match=r"split 'train' row 2 has no label \(column 'label'\)$"):
        load(path=str(hf_data["no_label"]), **same)
    _, bundle = load(path=str(hf_data["no_label"]), on_bad_sample="skip", **same)
    assert [(r["id"], r["reason"]) for r in bundle.info["skipped"]] == [(2, "has no label (column 'label')")]
    assert bundle.splits["train"].ids == [0, 1, 3] and bundle.splits["train"][0]["inputs"]["img"].size == (5, 4)
    _, bundle = load(path=str(hf_data["broken"]), **same)
    with pytest.raises(DataError, match=r"^hf_datasets '.*/broken' split 'train' row 3, column 'img': image "
                                        r"'row 3' cannot be decoded: cannot identify image file$"):
        bundle.splits["train"][3]
    _, bundle = load(path=str(hf_data["broken"]), on_bad_sample="skip", **same)
    marker = bundle.splits["train"][3]
    assert marker["id"] == 3 and marker["skip"].startswith("column 'img': image 'row 3' cannot be decoded")
