"""Video files: mp4 through imageio-ffmpeg (its ffmpeg binary ships in the PyPI wheel), PNG
contact sheets, and reading back. Every file is written to a temporary name and renamed.

Owns: file I/O of uint8 frames [T, H, W, 3]. Does not own decoding latents (`vae.py`).
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


def write_mp4(frames: np.ndarray, path, fps: int = 16) -> Path:
    """H.264 mp4 (yuv420p). Odd sizes are padded by ffmpeg's macro-block rounding off: we keep
    the exact size by encoding with macro_block_size=1."""
    import imageio.v2 as iio

    frames = _check_frames(frames)

    def write(tmp):
        with iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                            macro_block_size=1, ffmpeg_log_level="error",
                            output_params=["-pix_fmt", "yuv420p"]) as w:
            for f in frames:
                w.append_data(f)
    return _atomic(Path(path), write)


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
