"""Continuation: init files and uploads -> frames fitted to the model -> VAE latents -> the cache;
`Pipeline.stream(init=)` and `generate --init`."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from asd_deploy.config import ModelConfig
from asd_deploy.continuation import decode_init_bytes, fit_frames, init_latents, init_pixel_frames, read_init
from asd_deploy.generator import generate
from asd_deploy.pipeline import Pipeline
from asd_deploy.schedule import Schedule
from asd_deploy.video import write_mp4

from conftest import assert_close


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_fit_frames_crops_to_the_aspect_then_resizes():
    frames = np.zeros((2, 40, 200, 3), np.uint8)
    frames[:, :, 75:125] = 255  # a white centre band 50 wide: the 60-wide centre crop keeps it
    out = fit_frames(frames, 32, 48)
    assert out.shape == (2, 32, 48, 3) and out.dtype == np.uint8
    assert out[:, :, 24].min() == 255 and out[:, :, 0].max() == 0
    assert fit_frames(out, 32, 48) is out


def test_init_frame_counts_fill_whole_chunks():
    cfg = ModelConfig.preset("tiny")  # 3 latent frames per chunk, 3 chunks in the cache
    assert init_pixel_frames(cfg, 1) == 9          # an image: one chunk (held)
    assert init_pixel_frames(cfg, 20) == 9         # 5 latent frames: one whole chunk
    assert init_pixel_frames(cfg, 21) == 21        # two chunks
    assert init_pixel_frames(cfg, 1000) == 33      # at most the cache window
    for n in (9, 21, 33):
        assert cfg.latent_frames_for(n) % cfg.frames_per_chunk == 0


def test_read_and_decode_init(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(_png(img))
    assert np.array_equal(read_init(tmp_path / "a.png")[0], img)
    assert np.array_equal(decode_init_bytes(_png(img))[0], img)
    video = np.repeat(img[None], 5, axis=0)
    write_mp4(video, tmp_path / "v.mp4")
    assert read_init(tmp_path / "v.mp4").shape == (5, 20, 30, 3)
    assert decode_init_bytes((tmp_path / "v.mp4").read_bytes()).shape == (5, 20, 30, 3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_init(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="could not read it as a video"):
        read_init(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="not an image or video"):
        decode_init_bytes(b"hello")
    with pytest.raises(ValueError, match="damaged image"):
        decode_init_bytes(_png(img)[:40])


def test_stream_continues_from_frames(pipe):
    cfg = pipe.config
    frames = np.zeros((3, cfg.height, cfg.width, 3), np.uint8)
    frames[:, :, : cfg.width // 2] = (0, 0, 255)
    lat = init_latents(pipe.vae, frames, cfg)
    assert lat.shape == (1, cfg.in_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width)
    s = pipe.stream("a red circle moving right", seed=1, frames=21, init=frames, latents_only=True)
    list(s)
    ctx = pipe.encode_prompt("a red circle moving right")
    ref = torch.cat(list(generate(pipe.step, ctx, num_chunks=2, schedule=Schedule(1, True), seed=1, prefill=lat)), 2)
    assert_close(torch.cat(s.latents, 2), ref, 1e-5, "Pipeline.stream(init=frames) vs generate(prefill=)")


@pytest.mark.slow  # ~20 s on 2 cores: CLI subprocesses
def test_generate_cli_init(tmp_path):
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (255, 0, 0)
    (tmp_path / "start.png").write_bytes(_png(img))
    out = tmp_path / "out.pt"
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--init", str(tmp_path / "start.png"),
                        "--frames", "9", "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plain = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--frames", "9", "--quiet", "--out", str(plain)],
                   check=True, capture_output=True, timeout=300)
    a = torch.load(out, weights_only=True)
    assert a.shape == torch.load(plain, weights_only=True).shape
    assert (a - torch.load(plain, weights_only=True)).abs().max() > 1e-2, "--init changed nothing"
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--init", str(tmp_path / "nope.png"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--init" in r.stderr and "no such file" in r.stderr and "Traceback" not in r.stderr
