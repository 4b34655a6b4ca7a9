"""Your own files: media decoding, the manifest dataset, skipping bad samples, the demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import run_cli
from fusionkit.data import media
from fusionkit.data.loader import Collate, EncodedDataset
from fusionkit.errors import DataError
from fusionkit.registry import build, registry

# tiny encoders: a 1-block timm CNN on 16x16 images and an MLP on vectors
SMALL_IMAGE = {"name": "timm", "model_name": "test_resnet", "image_size": 16}
TINY_CLI = ["--no-progress", "train.epochs=1", "train.batch_size=8", "model.dim=16", "runtime.accelerator=cpu"]


def scratch(*modalities: str) -> list[str]:
    """Overrides that replace the manifest's frozen pretrained encoders of ``modalities`` (image or
    audio) by a 1-block timm CNN trained from scratch."""
    size = {"image": ["image_size=32"], "audio": []}
    return [f"model.encoders.{m}.{kv}" for m in modalities
            for kv in ["model_name=test_resnet", "pretrained=false", "trainable=true", *size[m]]]


# -- file writers --------------------------------------------------------------------------
def png(path: Path, value: int = 128, mode: str = "RGB", size: int = 8) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.full((size, size, channels), value, np.uint8).squeeze(-1 if channels == 1 else ())
    Image.fromarray(arr, mode).save(path)
    return path.name


def wav(path: Path, seconds: float = 0.25, rate: int = 8000, channels: int = 1) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    x = np.stack([0.5 * np.sin(2 * np.pi * 440 * (c + 1) * t) for c in range(channels)], 1).astype(np.float32)
    sf.write(path, x, rate, subtype="FLOAT")
    return x.T  # (C, T)


def mp4(path: Path, frames: int = 10, height: int = 32, width: int = 48, fps: int = 5) -> None:
    """Frame k is a flat gray image of brightness 20 * k, so decoded frames can be told apart."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            img = np.full((height, width, 3), 20 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def compressed_audio(path: Path, codec: str, seconds: float = 0.5, rate: int = 16000) -> None:
    """A 440 Hz mono tone encoded with PyAV (mp3 or aac)."""
    import av

    t = np.arange(int(seconds * rate)) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (1, T)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are, for bad lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def dataset(path: Path, **kw):
    return build("datasets", {"name": "manifest", "path": str(path), **kw})


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


# -- media decoding --------------------------------------------------------------------------
def test_load_image_modes(tmp_path):
    png(tmp_path / "rgb.png", 200)
    png(tmp_path / "gray.png", 50, mode="L")
    png(tmp_path / "alpha.png", 90, mode="RGBA")
    rgb, gray, alpha = (media.load_image(tmp_path / f) for f in ("rgb.png", "gray.png", "alpha.png"))
    assert (rgb.mode, rgb.size, np.asarray(rgb)[0, 0].tolist()) == ("RGB", (8, 8), [200, 200, 200])
    assert (gray.mode, int(np.asarray(gray)[3, 3])) == ("L", 50)
    assert alpha.mode == "RGB" and np.asarray(alpha).shape == (8, 8, 3)


def test_load_audio_wav_resampled_8k_to_16k(tmp_path):
    x = wav(tmp_path / "a.wav", seconds=0.25, rate=8000, channels=2)  # (2, 2000)
    same = media.load_audio(tmp_path / "a.wav", 8000)
    assert same.dtype == np.float32 and same.shape == (2, 2000)
    np.testing.assert_allclose(same, x, atol=1e-6)
    up = media.load_audio(tmp_path / "a.wav", 16000)
    assert up.dtype == np.float32 and up.shape == (2, 4000)
    assert peak_hz(up[0], 16000) == pytest.approx(440, abs=5)  # the tone survives resampling
    assert peak_hz(up[1], 16000) == pytest.approx(880, abs=5)


@pytest.mark.parametrize("suffix,codec", [("mp3", "mp3"), ("m4a", "aac")])
def test_load_audio_compressed_via_pyav(tmp_path, suffix, codec):
    compressed_audio(tmp_path / f"a.{suffix}", codec, seconds=0.5, rate=16000)
    x = media.load_audio(tmp_path / f"a.{suffix}", 8000)
    assert x.dtype == np.float32 and x.shape[0] == 1
    assert 3500 <= x.shape[1] <= 5500  # 0.5 s at 8 kHz, give or take the codec's padding
    assert peak_hz(x[0], 8000) == pytest.approx(440, abs=10)


def test_load_video_all_frames_and_uniform_subsample(tmp_path):
    mp4(tmp_path / "v.mp4", frames=10, height=32, width=48, fps=5)
    frames, fps = media.load_video(tmp_path / "v.mp4")
    assert frames.dtype == np.uint8 and frames.shape == (10, 32, 48, 3) and fps == 5.0
    few, _ = media.load_video(tmp_path / "v.mp4", max_frames=4)
    assert few.shape == (4, 32, 48, 3)
    # frames 0, 3, 6, 9 of the clip (brightness 20 * k; the codec is lossy by a few levels)
    np.testing.assert_allclose(few.reshape(4, -1).mean(1), [0, 60, 120, 180], atol=6)


def test_media_errors_name_the_file_and_reason(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + b"\0" * 40)
    (tmp_path / "junk.mp4").write_bytes(b"garbage" * 20)
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 8000)
    cases = [
        (lambda: media.load_image(tmp_path / "nope.png"), "image file", "nope.png' does not exist"),
        (lambda: media.load_image(tmp_path / "junk.png"), "image file", "junk.png' cannot be decoded"),
        (lambda: media.load_audio(tmp_path / "junk.wav", 16000), "audio file", "junk.wav' cannot be decoded"),
        (lambda: media.load_audio(tmp_path / "empty.wav", 16000), "audio file", "empty.wav' has zero samples"),
        (lambda: media.load_video(tmp_path / "junk.mp4"), "video file", "junk.mp4' cannot be decoded"),
        (lambda: media.load_audio(tmp_path / "junk.mp4", 16000), "audio file", "junk.mp4' cannot be decoded"),
    ]
    for call, what, message in cases:
        with pytest.raises(DataError) as err:
            call()
        assert what in str(err.value) and message in str(err.value)


# -- the manifest dataset --------------------------------------------------------------------
@pytest.fixture
def files(tmp_path) -> Path:
    """A data folder with images, a WAV, an MP4 and a .npy vector, referenced relatively."""
    root = tmp_path / "data"
    for k in range(6):
        png(root / "img" / f"{k}.png", 40 * k)
    wav(root / "snd" / "a.wav", rate=8000)
    mp4(root / "vid" / "a.mp4", frames=6)
    (root / "vec").mkdir()
    np.save(root / "vec" / "v.npy", np.arange(3, dtype=np.float32))
    return root


ROWS = [  # label, split, image, text, vector
    ("cat", "train", "img/0.png", "a cat", [1, 0, 0]),
    ("dog", "train", "img/1.png", "a dog", [0, 1, 0]),
    ("cat", "train", None, "another cat", [1, 1, 0]),
    ("dog", "val", "img/3.png", None, [0, 0, 1]),
    ("cat", "test", "img/4.png", "a cat again", None),
    ("dog", "test", "img/5.png", "", [1, 0, 1]),
]


def _rows_as_dicts():
    return [{"image": img, "text": text, "vec": vec, "label": label, "split": split}
            for label, split, img, text, vec in ROWS]


def test_jsonl_and_csv_manifests_read_the_same(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths are relative to the manifest's folder, not to the cwd
    jsonl(files / "m.jsonl", _rows_as_dicts())
    lines = ["image,text,vec,label,split"] + [
        f"{img or ''},{text or ''},\"{json.dumps(vec) if vec else ''}\",{label},{split}"
        for label, split, img, text, vec in ROWS]
    (files / "m.csv").write_text("\n".join(lines) + "\n")
    bundles = [dataset(files / name).load() for name in ("m.jsonl", "m.csv")]
    for b, first_line in zip(bundles, (1, 2)):  # a CSV's first data row is line 2
        assert b.classes == ["cat", "dog"]
        assert {m: s.kind for m, s in b.modalities.items()} == {"image": "image", "text": "text", "vec": "vector"}
        assert b.modalities["vec"].dim == 3
        assert {k: len(s) for k, s in b.splits.items()} == {"train": 3, "val": 1, "test": 2}
        train = b.splits["train"]
        assert train.ids == [first_line, first_line + 1, first_line + 2]
        assert train.targets == [0, 1, 0]
        assert train.columns["image"][0] == str(files / "img" / "0.png")  # kept as a path until read
        item = train[0]["inputs"]
        assert item["image"].mode == "RGB" and np.asarray(item["image"])[0, 0, 0] == 0
        assert item["text"] == "a cat"
        assert item["vec"].dtype == np.float32 and item["vec"].tolist() == [1, 0, 0]
        assert train[2]["inputs"]["image"] is None  # null / empty = modality missing
        assert b.splits["test"][1]["inputs"]["text"] is None
        assert b.splits["test"][0]["inputs"]["vec"] is None


def test_kinds_are_inferred_without_decoding_media(files):
    rows = [{"id": 7, "photo": "img/0.png", "voice": "snd/a.wav", "clip": "vid/a.mp4", "feat": "vec/v.npy",
             "note": "hello", "label": 1}]
    ds = dataset(jsonl(files / "m.jsonl", rows))
    specs = ds.modality_specs()
    assert {m: s.kind for m, s in specs.items()} == {
        "photo": "image", "voice": "audio", "clip": "video", "feat": "vector", "note": "text"}  # 'id' ignored
    assert specs["voice"].extra == {"sample_rate": 16000} and specs["feat"].dim == 3
    declared = dataset(files / "m.jsonl", modalities={"note": "text", "photo": "image"}, sample_rate=8000)
    assert sorted(declared.modality_specs()) == ["note", "photo"]
    defaults = declared.default_encoders()
    assert defaults["photo"] == {"name": "timm", "model_name": "efficientnet_lite0", "pretrained": "bundled",
                                 "trainable": False, "image_size": 64}


def test_drawn_split_is_stratified_and_fixed_by_seed(files):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    path = jsonl(files / "m.jsonl", rows)
    a, b = dataset(path).load(), dataset(path).load()
    assert a.info["split"] == "drawn (seed 0)"
    assert {k: len(s) for k, s in a.splits.items()} == {"train": 12, "val": 4, "test": 4}
    assert all(sorted(s.targets) == [0] * (len(s) // 2) + [1] * (len(s) // 2) for s in a.splits.values())
    assert a.splits["val"].ids == b.splits["val"].ids
    assert a.splits["val"].ids != dataset(path, split_seed=1).load().splits["val"].ids


def test_missing_values_give_false_mask_in_mixed_batches(files):
    bundle = dataset(jsonl(files / "m.jsonl", _rows_as_dicts()), modalities={"image": "image", "vec": "vector"}).load()
    specs = bundle.modalities
    encoders = {"image": build("encoders", SMALL_IMAGE, spec=specs["image"]),
                "vec": build("encoders", {"name": "mlp", "hidden": 8}, spec=specs["vec"])}
    split = bundle.splits["train"]  # rows 1-3: row 3 has no image
    batch = Collate(encoders)([EncodedDataset(split, encoders)[i] for i in range(len(split))])
    assert batch["mask"].tolist() == [[True, True], [True, True], [False, True]]  # sorted: image, vec
    assert batch["rows"]["image"].tolist() == [0, 1] and batch["rows"]["vec"].tolist() == [0, 1, 2]
    assert tuple(batch["inputs"]["image"].shape) == (2, 3, 16, 16)
    assert tuple(batch["inputs"]["vec"].shape) == (3, 3)
    assert batch["target"].tolist() == [0, 1, 0] and batch["skipped"] == []
    test = bundle.splits["test"]  # row 5 lacks the vector
    batch = Collate(encoders)([EncodedDataset(test, encoders)[i] for i in range(len(test))])
    assert batch["mask"].tolist() == [[True, False], [True, True]]


# -- bad data --------------------------------------------------------------------------------
GOOD = {"image": "img/0.png", "vec": [1, 2, 3], "label": "a", "split": "train"}


@pytest.mark.parametrize("bad,kwargs,message", [
    ('{"image": "img/0.png", "label": ', {}, "is not valid JSON"),
    ('["img/0.png", "a"]', {}, "must be a JSON object"),
    ({"image": "img/0.png", "vec": [1, 2, 3], "split": "train"}, {}, "has no label (column 'label')"),
    ({**GOOD, "label": "zebra"}, {"classes": ["a", "b"]}, "label 'zebra' is not one of data.classes (a, b)"),
    ({**GOOD, "image": "img/missing.png"}, {}, "image file 'img/missing.png' does not exist"),
    ({**GOOD, "vec": [1, 2]}, {}, "vector has length 2, expected 3"),
    ({**GOOD, "vec": [1, "x", 3]}, {}, "vector holds a non-numeric or non-finite entry 'x'"),
    ({**GOOD, "vec": "vec/none.npy"}, {}, "vector file 'vec/none.npy' does not exist"),
    ({"image": None, "vec": None, "label": "a", "split": "train"}, {}, "has no modality at all"),
    ({**GOOD, "split": "training"}, {}, "split must be train, val or test"),
])
def test_bad_rows_name_the_line_and_file(files, bad, kwargs, message):
    rows = [GOOD, {**GOOD, "split": "val"}, {**GOOD, "split": "test"}, bad]  # the bad row is line 4
    path = jsonl(files / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        dataset(path, **kwargs).load()
    text = str(err.value)
    assert f"manifest '{path}' line 4" in text and message in text, text


def test_bad_csv_line_and_unknown_format(files):
    (files / "m.csv").write_text("image,label\nimg/0.png,a\nimg/1.png,b,extra\n")
    with pytest.raises(DataError, match=r"m.csv' line 3 has 3 fields, the header has 2"):
        dataset(files / "m.csv").load()
    (files / "m.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown format '.txt'"):
        dataset(files / "m.txt").modality_specs()
    with pytest.raises(DataError, match=r"manifest file '.*nope.jsonl' does not exist"):
        dataset(files / "nope.jsonl").modality_specs()


def test_corrupt_file_fails_at_access_naming_line_and_file(files):
    (files / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [GOOD, {**GOOD, "image": "img/bad.png"}, {**GOOD, "split": "val"}, {**GOOD, "split": "test"}]
    bundle = dataset(jsonl(files / "m.jsonl", rows)).load()  # exists, so loading passes
    with pytest.raises(DataError) as err:
        bundle.splits["train"][1]
    assert "line 2, column 'image'" in str(err.value) and "bad.png' cannot be decoded" in str(err.value)


def test_skip_mode_drops_and_reports_rows(files):
    (files / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [GOOD, "{not json", {**GOOD, "image": "img/gone.png"}, {**GOOD, "image": "img/bad.png"},
            {**GOOD, "vec": [1]}, {**GOOD, "split": "val"}, {**GOOD, "split": "test"}]
    bundle = dataset(jsonl(files / "m.jsonl", rows), on_bad_sample="skip").load()
    skipped = bundle.info["skipped"]
    assert [(r["id"], r["stage"]) for r in skipped] == [(2, "load"), (3, "load"), (5, "load")]
    assert "img/gone.png' does not exist" in skipped[1]["reason"] and "length 1" in skipped[2]["reason"]
    train = bundle.splits["train"]
    assert train.ids == [1, 4]  # line 4 exists but is corrupt: found only when read
    marker = train[1]
    assert marker["id"] == 4 and "bad.png' cannot be decoded" in marker["skip"]
    specs = bundle.modalities
    encoders = {"image": build("encoders", SMALL_IMAGE, spec=specs["image"])}
    sub = train.select(["image"])
    batch = Collate(encoders)([EncodedDataset(sub, encoders)[i] for i in range(len(sub))])
    assert batch["mask"].shape == (1, 1) and batch["target"].tolist() == [0]
    assert [ident for ident, _ in batch["skipped"]] == [4]
    empty = Collate(encoders)([EncodedDataset(sub, encoders)[1]])  # only the corrupt sample
    assert empty["mask"].shape == (0, 1) and empty["inputs"]["image"] is None and len(empty["skipped"]) == 1


def test_select_leaves_out_rows_without_the_chosen_modalities(files):
    bundle = dataset(jsonl(files / "m.jsonl", _rows_as_dicts())).load()
    train = bundle.splits["train"].select(["image"])
    assert train.ids == [1, 2] and train.targets == [0, 1]
    assert [(d["id"], d["stage"]) for d in train.dropped] == [(3, "select")]


# -- the command line ------------------------------------------------------------------------
def test_cli_trains_on_a_manifest_skipping_bad_rows(files, tmp_path):
    """1 epoch on image,text,vector with --on-bad-sample skip; skipped rows are reported."""
    (files / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    rows = _rows_as_dicts() + [  # lines 1-6 are fine
        "{oops",  # line 7: not JSON
        {"image": "img/gone.png", "text": "x", "vec": [0, 0, 1], "label": "dog", "split": "train"},  # 8: no file
        {"image": "img/bad.png", "text": "bad", "vec": [0, 1, 1], "label": "cat", "split": "test"}]  # 9: corrupt
    path = jsonl(files / "m.jsonl", rows)
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(path), "--modalities", "image,text,vec",
                   "--on-bad-sample", "skip", "--out", str(out), *TINY_CLI, *scratch("image"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 3 row(s)" in proc.stderr and "line 7" in proc.stderr and "line 9" in proc.stderr
    report = json.loads((out / "skipped.json").read_text())
    assert report["count"] == 3
    assert [(r["id"], r["stage"], r["split"]) for r in report["rows"]] == [
        (7, "load", None), (8, "load", None), (9, "access", "test")]
    assert "bad.png' cannot be decoded" in report["rows"][2]["reason"]
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["n"] == 2  # 3 test rows, one corrupt
    proc = run_cli("eval", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["n"] == 2 and set(data["mean_weights"]) == {"image", "text", "vec"}
    assert data["accuracy"] == pytest.approx(results["test"]["accuracy"])


def test_cli_bad_manifest_is_one_line_naming_the_line(files, tmp_path):
    path = jsonl(files / "m.jsonl", [GOOD, {**GOOD, "image": "img/gone.png"}])
    proc = run_cli("train", "--data", str(path), "--modalities", "image", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"manifest '{path}' line 2 image file 'img/gone.png' does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # bad data is found before a run folder is made


def test_unknown_modality_lists_the_manifest_columns(files):
    from fusionkit.config import resolve
    from fusionkit.errors import ConfigError

    path = jsonl(files / "m.jsonl", _rows_as_dicts())
    with pytest.raises(ConfigError) as err:  # what `train --data m.jsonl --modalities imag` resolves
        resolve({"data": {"name": "manifest", "path": str(path)}, "modalities": ["imag"]})
    assert "'imag' is not a modality of dataset 'manifest'; did you mean 'image'? (choices: image, text, vec)" \
        in str(err.value)


# -- the demo dataset ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "digits"
    proc = run_cli("data", "demo", str(out), "--n-per-class", "3", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 30 samples" in proc.stdout
    return out


def test_demo_writes_files_and_a_manifest(demo):
    rows = [json.loads(line) for line in (demo / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and sorted({r["label"] for r in rows}) == list(range(10))
    assert all(set(r) == {"image", "text", "audio", "video", "label", "split"} for r in rows)
    assert {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")} == {"train": 10, "val": 10, "test": 10}
    lacking = [r for r in rows if None in (r["image"], r["text"], r["audio"], r["video"])]
    assert 1 <= len(lacking) <= 12 and all(sum(v is None for v in r.values()) == 1 for r in lacking)
    for r in rows:
        for m in ("image", "audio", "video"):
            assert r[m] is None or (demo / r[m]).is_file()
    first = next(r for r in rows if r["image"] and r["video"] and r["audio"])
    assert media.load_image(demo / first["image"]).size == (32, 32)
    frames, _ = media.load_video(demo / first["video"])
    assert frames.shape == (8, 48, 48, 3) and frames.max() > 100  # the digit is visible
    assert media.load_audio(demo / first["audio"], 16000).shape[1] > 1600
    readme = (demo / "README.txt").read_text()
    assert "Audio source: " in readme and "load_digits" in readme


def test_demo_refuses_a_non_empty_folder(demo):
    before = (demo / "manifest.jsonl").read_text()
    proc = run_cli("data", "demo", str(demo), "--n-per-class", "3")
    assert proc.returncode == 2
    assert "is not empty; pass --overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (demo / "manifest.jsonl").read_text() == before


def test_demo_tone_fallback_is_deterministic_and_encodes_the_digit(tmp_path):
    from fusionkit.data.demo import MELODIES, tones, write_demo
    from fusionkit.errors import RunDirError

    r = write_demo(tmp_path / "d", n_per_class=3, seed=0, use_espeak=False)
    assert r.audio_source == "tones" and "espeak-ng was NOT found" in (tmp_path / "d" / "README.txt").read_text()
    before = (tmp_path / "d" / "manifest.jsonl").read_text()
    with pytest.raises(RunDirError, match="is not empty; pass --overwrite"):
        write_demo(tmp_path / "d", n_per_class=3, seed=0, use_espeak=False)
    write_demo(tmp_path / "d", n_per_class=3, seed=0, use_espeak=False, overwrite=True)
    assert (tmp_path / "d" / "manifest.jsonl").read_text() == before  # same seed, same dataset
    rng = np.random.default_rng(0)
    for digit in (0, 9):
        x = tones(digit, rng)
        first_note = x[: int(0.14 * 16000)]
        assert peak_hz(first_note, 16000) == pytest.approx(220 * 2 ** (MELODIES[digit][0] / 12), rel=0.05)


@pytest.mark.skipif(not ({"mel_cnn", "frames"} <= set(registry("encoders").names())),
                    reason="audio/video encoders (mel_cnn, frames) are not registered")
def test_cli_trains_on_the_demo_with_four_modalities(demo, tmp_path):
    out = tmp_path / "run4"
    proc = run_cli("train", "--data", str(demo / "manifest.jsonl"), "--modalities", "image,text,audio,video",
                   "--out", str(out), *TINY_CLI, "train.batch_size=32", *scratch("image", "audio"),
                   "model.encoders.video.image.model_name=test_resnet", "model.encoders.video.image.image_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["test"]
    assert results["n"] == 10 and set(results["mean_weights"]) == {"audio", "image", "text", "video"}
    assert sum(results["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
