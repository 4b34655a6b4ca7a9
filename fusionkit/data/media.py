"""Decode media files into the raw values encoders take: images, audio, video.

- :func:`load_image`: Pillow -> ``PIL.Image`` in mode ``RGB`` or ``L``.
- :func:`load_audio`: soundfile for WAV/FLAC/OGG, PyAV for anything else (mp3, m4a, ...),
  resampled with ``torchaudio.functional.resample`` -> ``np.float32 (C, T)``.
  (``torchaudio.load`` is not used: in torchaudio 2.9 it needs torchcodec.)
- :func:`load_video`: PyAV -> ``np.uint8 (F, H, W, 3)`` plus the frame rate, optionally
  subsampled uniformly to ``max_frames`` while decoding, so a long video never sits in memory.
- :func:`decode_image`, :func:`decode_audio`, :func:`decode_video`: the same for a file's bytes
  held in memory (a tar member of a WebDataset shard, a Hugging Face ``datasets`` cell); ``name``
  (e.g. ``shard.tar:000001.wav``) is what error messages call it, and its suffix picks the reader.

Every failure is a :class:`~fusionkit.errors.DataError` that names the file and the reason.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np
from PIL import Image

from fusionkit.errors import DataError

SOUNDFILE_SUFFIXES = (".wav", ".flac", ".ogg")  # read by libsndfile; everything else goes to PyAV


def _reason(err: Exception) -> str:
    """FFmpeg errors repeat the file name; keep only what went wrong."""
    return str(getattr(err, "strerror", None) or err)


def _without(reason: str, source: object) -> str:
    """Drop the ``<_io.BytesIO object at 0x...>`` that readers print for in-memory data."""
    return reason if isinstance(source, (str, Path)) else reason.replace(f" {source!r}", "")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file '{path}' does not exist")
    if not path.is_file():
        raise DataError(f"{what} file '{path}' is not a file")
    return path


# -- images --------------------------------------------------------------------------------
def load_image(path: str | Path) -> Image.Image:
    """Read an image file; grayscale modes become ``L``, everything else ``RGB``.

    Raises:
        DataError: the file is missing, unreadable or not a decodable image.
    """
    path = _existing(path, "image")
    return _read_image(path, f"image file '{path}'")


def decode_image(data: bytes, name: str) -> Image.Image:
    """:func:`load_image` for an image file's bytes; ``name`` says where they come from.

    Raises:
        DataError: the bytes are not a decodable image.
    """
    return _read_image(io.BytesIO(data), f"image '{name}'")


def _read_image(source: Path | BinaryIO, what: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()  # decode now, so a truncated file fails here and not in a worker later
            if img.mode in ("L", "RGB"):
                return img.copy()
            gray = img.mode in ("1", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            return img.convert("L" if gray else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        # UnidentifiedImageError is an OSError; a truncated PNG raises OSError or SyntaxError
        reason = _without(str(err).replace(f" '{source}'", ""), source)  # Pillow repeats the file name
        raise DataError(f"{what} cannot be decoded: {reason}") from None


# -- audio ---------------------------------------------------------------------------------
def _read_soundfile(source: str | BinaryIO, what: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
        raise DataError(f"{what} cannot be decoded: {_without(str(err), source)}") from None
    return np.ascontiguousarray(data.T), int(rate)  # (C, T)


def _read_pyav(source: str | BinaryIO, what: str) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(source) as container:
            if not container.streams.audio:
                raise DataError(f"{what} has no audio stream")
            stream = container.streams.audio[0]
            # planar float32 keeps channels apart: to_ndarray() is then (C, n) for every codec
            resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
            chunks, rate = [], stream.rate
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (C, n)
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray())
    except DataError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise DataError(f"{what} cannot be decoded: {_reason(err)}") from None
    if not chunks:
        raise DataError(f"{what} has zero samples")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), int(rate)  # (C, T)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read an audio file as ``np.float32 (C, T)`` at ``sample_rate`` Hz.

    WAV/FLAC/OGG go through soundfile; other containers (mp3, m4a, ...) through PyAV.

    Raises:
        DataError: the file is missing, cannot be decoded, or holds zero samples.
    """
    path = _existing(path, "audio")
    what = f"audio file '{path}'"
    reader = _read_soundfile if path.suffix.lower() in SOUNDFILE_SUFFIXES else _read_pyav
    return _checked_audio(*reader(str(path), what), sample_rate, what)


def decode_audio(data: bytes, name: str, sample_rate: int) -> np.ndarray:
    """:func:`load_audio` for an audio file's bytes; ``name``'s suffix picks the reader (soundfile
    for .wav/.flac/.ogg, PyAV for others; without a suffix soundfile, then PyAV).

    Raises:
        DataError: the bytes cannot be decoded or hold zero samples.
    """
    what = f"audio '{name}'"
    suffix = PurePath(name).suffix.lower()
    if suffix in SOUNDFILE_SUFFIXES or not suffix:
        try:
            decoded = _read_soundfile(io.BytesIO(data), what)
        except DataError:
            if suffix:
                raise
            decoded = _read_pyav(io.BytesIO(data), what)  # no suffix: maybe mp3/m4a
    else:
        decoded = _read_pyav(io.BytesIO(data), what)
    return _checked_audio(*decoded, sample_rate, what)


def _checked_audio(data: np.ndarray, rate: int, sample_rate: int, what: str) -> np.ndarray:
    """Reject empty or non-finite audio; resample ``(C, T)`` from ``rate`` to ``sample_rate``."""
    if data.shape[1] == 0:
        raise DataError(f"{what} has zero samples")
    if not np.isfinite(data).all():
        raise DataError(f"{what} holds NaN or infinite samples")
    if rate != sample_rate:
        import torch
        import torchaudio.functional as AF  # imported here: torchaudio takes seconds to import

        data = AF.resample(torch.from_numpy(data), rate, sample_rate).numpy()  # (C, T')
    return np.ascontiguousarray(data, dtype=np.float32)


# -- video ---------------------------------------------------------------------------------
def _pick(n: int, k: int) -> np.ndarray:
    """``k`` indices spread uniformly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def load_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float | None]:
    """Decode a video file to RGB frames.

    Args:
        path: any container/codec FFmpeg (PyAV) reads.
        max_frames: keep at most this many frames, spread uniformly over the video; None keeps all.

    Returns:
        ``(frames, fps)``: ``np.uint8 (F, H, W, 3)`` and the stream's average frame rate
        (None when the container does not say).

    Raises:
        DataError: the file is missing, has no video stream, cannot be decoded or has zero frames.
    """
    path = _existing(path, "video")
    return _read_video(str(path), f"video file '{path}'", max_frames)


def decode_video(data: bytes, name: str, max_frames: int | None = None) -> tuple[np.ndarray, float | None]:
    """:func:`load_video` for a video file's bytes; ``name`` says where they come from.

    Raises:
        DataError: the bytes have no video stream, cannot be decoded or hold zero frames.
    """
    return _read_video(io.BytesIO(data), f"video '{name}'", max_frames)


def _read_video(source: str | BinaryIO, what: str, max_frames: int | None) -> tuple[np.ndarray, float | None]:
    import av
    from av.video.reformatter import VideoReformatter

    if max_frames is not None and max_frames < 1:
        raise DataError(f"max_frames must be at least 1, got {max_frames}")
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise DataError(f"{what} has no video stream")
            stream = container.streams.video[0]
            # one decoding thread: clips are decoded in DataLoader workers (one per core), and on
            # short clips FFmpeg's own threads cost more than they save (1.4x on the demo's clips)
            stream.thread_count = 1
            rgb = VideoReformatter()  # one conversion context for all frames, not one per frame (2.4x)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            total = int(stream.frames or 0)
            kept: list[tuple[int, np.ndarray]] = []  # (frame index, (H, W, 3))
            wanted = set(_pick(total, max_frames).tolist()) if max_frames and total else None
            stride = 1  # used when the frame count is unknown: keep every stride-th frame
            for i, frame in enumerate(container.decode(stream)):
                if wanted is not None:
                    if i in wanted:
                        kept.append((i, rgb.reformat(frame, format="rgb24").to_ndarray()))
                    continue
                if i % stride == 0:
                    kept.append((i, rgb.reformat(frame, format="rgb24").to_ndarray()))
                if max_frames and len(kept) >= 2 * max_frames:
                    # bound memory: keep every other frame and double the stride
                    kept, stride = kept[::2], stride * 2
    except DataError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise DataError(f"{what} cannot be decoded: {_reason(err)}") from None
    if not kept:
        raise DataError(f"{what} has zero frames")
    if max_frames and len(kept) > max_frames:
        kept = [kept[j] for j in _pick(len(kept), max_frames)]
    frames = np.stack([f for _, f in kept])  # (F, H, W, 3)
    return frames, fps
