"""Continuation: start a stream from a user's video or image instead of from nothing.

Owns: reading an init file or upload (`read_init`, `decode_init_bytes`), fitting its frames to
the model's size (`fit_frames`: centre crop to the aspect ratio, then an antialiased resize) and
turning them into the clean latents that prefill the cache (`init_latents`). The generator's
`prefill_cache` writes them, the same way as a generated chunk's clean pass. Does not own the
VAE (`vae.py`), the cache, or the loop.

Which frames: the last frames of the video, as many as the cache window holds (earlier ones
would be evicted before the first new chunk anyway), trimmed to a count the VAE maps to whole
chunks of latent frames (1 + 4(L - 1) pixel frames for L latent frames, L a multiple of
frames_per_chunk: 9, 21, 33, ... at Wan's strides). A shorter video, or an image, is extended
by repeating its last frame (a still image becomes a still clip the video continues from).
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .vae import from_uint8_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_INIT_BYTES = 32 * 1024 * 1024
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM")  # png, jpeg, bmp (webp: RIFF....WEBP)


def _as_frames(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:  # grey
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (3, 4) or not len(a):
        raise ValueError(f"{what}: expected an RGB image or video; got an array of shape {list(a.shape)}")
    a = a[..., :3]  # drop alpha
    if a.dtype != np.uint8:
        raise ValueError(f"{what}: expected 8-bit colour; got {a.dtype}")
    return a


def read_init(path: str | os.PathLike) -> np.ndarray:
    """An image (png, jpg, webp, bmp) or a video (anything ffmpeg reads) -> uint8 [T, H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init {path}: no such file; expected an image (png, jpg) or a video (mp4)")
    import imageio.v3 as iio

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _as_frames(iio.imread(path), str(path))
    from .video import read_mp4

    try:
        frames, _ = read_mp4(path)
    except Exception as e:
        raise ValueError(f"--init {path}: could not read it as a video ({type(e).__name__}); expected an image "
                         f"(png, jpg) or a video (mp4)") from None
    return _as_frames(frames, str(path))


def decode_init_bytes(data: bytes) -> np.ndarray:
    """An uploaded image or video (raw bytes) -> uint8 [T, H, W, 3]."""
    if not data:
        raise ValueError("init: empty upload; expected an image (png, jpg) or a video (mp4)")
    if len(data) > MAX_INIT_BYTES:
        raise ValueError(f"init: {len(data)} bytes is over the {MAX_INIT_BYTES} byte limit")
    if data.startswith(IMAGE_MAGIC) or data[8:12] == b"WEBP":
        import imageio.v3 as iio

        try:
            return _as_frames(iio.imread(io.BytesIO(data)), "init")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"init: a damaged image ({type(e).__name__}); expected png or jpg bytes") from None
    with tempfile.TemporaryDirectory() as tmp:  # ffmpeg reads containers from a file
        f = Path(tmp) / "init.mp4"  # ffmpeg probes the content; the name only satisfies imageio
        f.write_bytes(data)
        try:
            from .video import read_mp4
            return _as_frames(read_mp4(f)[0], "init")
        except Exception as e:
            raise ValueError(f"init: not an image or video ffmpeg can read ({type(e).__name__}); expected png, "
                             f"jpg or mp4 bytes") from None


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, h, w, 3] -> [T, height, width, 3]: centre crop to the aspect ratio, antialiased resize."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    if h * width > w * height:  # too tall: crop rows
        ch = max(1, round(w * height / width))
        top = (h - ch) // 2
        frames = frames[:, top:top + ch]
    else:
        cw = max(1, round(h * width / height))
        left = (w - cw) // 2
        frames = frames[:, :, left:left + cw]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def init_pixel_frames(config: ModelConfig, available: int) -> int:
    """How many pixel frames to encode: the most, up to the cache window, that fill whole chunks
    (at least one chunk: shorter inputs are padded)."""
    fpc, st = config.frames_per_chunk, config.vae_stride[0]
    chunks = max(1, min(config.cache_chunks, (1 + (available - 1) // st) // fpc))
    return 1 + st * (chunks * fpc - 1)


@torch.no_grad()
def init_latents(vae, frames: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (any size) -> normalized clean latents [1, C, L, h, w] with L a
    multiple of frames_per_chunk, ready for `generator.prefill_cache` (or `SlotEngine.open(init=)`)."""
    frames = _as_frames(frames, "init")
    n = init_pixel_frames(config, len(frames))
    frames = frames[-n:]
    if len(frames) < n:  # an image or a short clip: hold the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])
    frames = fit_frames(frames, config.height, config.width)
    lat = vae.encode(from_uint8_frames(frames))
    want = (1, config.in_channels, config.latent_frames_for(n), config.latent_height, config.latent_width)
    if tuple(lat.shape) != want:
        raise ValueError(f"the VAE encoded the init frames to {list(lat.shape)}; the DiT expects {list(want)}")
    return lat
