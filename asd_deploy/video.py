"""Video files: mp4 through imageio-ffmpeg (its ffmpeg binary ships in the PyPI wheel), PNG
contact sheets, and reading back. Every file is written to a temporary name and renamed.

Owns: file I/O of uint8 frames [T, H, W, 3]: `Mp4Writer` (chunk by chunk into ffmpeg, constant
memory for any length, renamed into place only when closed cleanly), `write_mp4` (the one-shot
case of it), `SheetSampler` (a bounded, evenly spaced subsample of a stream for its contact
sheet), `contact_sheet`, `read_mp4`. Does not own decoding latents (`decoders/`, `vae.py`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work if `path` cannot be written: missing folder, a folder in its place, a
    read-only file already there (never silently replaced), or a folder that refuses new files.
    The last is tried for real (a probe file is created and removed): permission bits do not tell,
    e.g. for root under /sys or on a read-only mount."""
    import tempfile

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name")
    if path.exists() and not path.stat().st_mode & 0o222:
        raise PermissionError(f"cannot write {path}: it exists and is read-only; remove it or choose another name")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write {path}: folder {parent} does not accept new files "
                              f"({e.strerror or e})") from None
    return path


def _atomic(path: Path, write) -> Path:
    from .checkpoint import atomic_write

    check_writable(path)
    return atomic_write(path, write)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1; got {frames.dtype} {list(frames.shape)}")
    return frames


class Mp4Writer:
    """H.264 mp4 (yuv420p) written chunk by chunk: frames go straight to the ffmpeg process, so
    memory stays constant for any length. The file is written under a temporary name beside
    `path` and renamed onto it by `close()`; leaving the `with` block on an error (or `abort()`)
    removes it, so `path` only ever holds a whole video. Odd sizes are kept exactly
    (macro_block_size=1). Every chunk must have the first chunk's frame size."""

    def __init__(self, path, fps: int = 16):
        import tempfile

        import imageio.v2 as iio

        self.path = check_writable(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.tmp.", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        self._tmp, self.frames, self._size = Path(tmp), 0, None
        self._w = iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                 macro_block_size=1, ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv420p"])

    def append(self, frames: np.ndarray) -> None:
        frames = _check_frames(frames)
        if self._size is None:
            self._size = frames.shape[1:]
        elif frames.shape[1:] != self._size:
            raise ValueError(f"frames of size {list(frames.shape[1:])} after frames of size {list(self._size)}: "
                             f"one video has one frame size")
        for f in frames:
            self._w.append_data(f)
        self.frames += len(frames)

    def close(self) -> Path:
        from .checkpoint import _UMASK

        self._w.close()
        if not self.frames:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"no frames were written to {self.path}")
        os.chmod(self._tmp, 0o666 & ~_UMASK)
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._w.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.abort()


def write_mp4(frames: np.ndarray, path, fps: int = 16) -> Path:
    """The whole video at once (one chunk of `Mp4Writer`)."""
    frames = _check_frames(frames)
    with Mp4Writer(path, fps) as w:
        w.append(frames)
    return w.path


class SheetSampler:
    """Keeps `count` evenly spaced frames of a `total`-frame stream as its chunks pass by, for a
    contact sheet: memory bounded by `count`, whatever the length."""

    def __init__(self, total: int, count: int = 16):
        self.keep = set(np.linspace(0, max(total - 1, 0), min(count, max(total, 1))).round().astype(int).tolist())
        self.seen, self.frames = 0, []

    def add(self, frames: np.ndarray) -> None:
        for i in range(len(frames)):
            if self.seen + i in self.keep:
                self.frames.append(np.array(frames[i]))
        self.seen += len(frames)

    def sheet(self, path, cols: int = 8) -> Path:
        return contact_sheet(np.stack(self.frames), path, cols=cols)


def read_mp4(path) -> tuple[np.ndarray, float]:
    """uint8 frames [T, H, W, 3] and the stored fps."""
    import imageio.v2 as iio

    with iio.get_reader(str(path), format="FFMPEG") as r:
        fps = r.get_meta_data()["fps"]
        return np.stack(list(r.iter_data())), fps


def contact_sheet(frames: np.ndarray, path, cols: int = 8, every: int = 1, scale: int = 2) -> Path:
    """A PNG grid of every `every`-th frame, each upscaled `scale`x (nearest) for viewing."""
    import imageio.v2 as iio

    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"a contact sheet is a PNG: its name must end in .png; got {Path(path).name!r}")
    frames = _check_frames(frames)[::every]
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = frames.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    sheet = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = f
    return _atomic(Path(path), lambda tmp: iio.imwrite(tmp, sheet, format="PNG"))
