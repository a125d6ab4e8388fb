"""The public streaming API and the CLI, end to end on the embedded default model."""
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from asd_deploy.pipeline import Pipeline
from asd_deploy.video import read_mp4


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def test_stream_yields_chunks_before_the_end(pipe):
    cfg = pipe.config
    s = pipe.stream("a blue square moving left", steps=1, ffe=True, seed=0, frames=33)
    first = next(s)
    assert first.dtype == np.uint8 and first.shape == (9, cfg.height, cfg.width, 3)
    assert len(s.stats.chunks) == 1 and len(s.latents) == 1      # chunk 2 not generated yet
    rest = list(s)
    assert [f.shape[0] for f in rest] == [12, 12]
    assert s.stats.frames == 33 and s.stats.first_frame_s < s.stats.chunks[-1].ready_s
    summary = s.stats.summary(pipe.fps)
    assert summary["fps_with_vae"] < summary["fps_dit_only"]


def test_call_returns_whole_video_same_as_stream(pipe):
    video, s = pipe("a green circle moving up", steps=2, ffe=False, seed=4, frames=21)
    assert video.shape[0] == 21
    again = np.concatenate(list(pipe.stream("a green circle moving up", steps=2, ffe=False, seed=4, frames=21)))
    assert np.array_equal(video, again)


def test_threads_match_sequential(pipe):
    prompts = [("a red circle moving right", 1), ("a yellow triangle moving down", 2)]
    sequential = [pipe(p, seed=s, frames=21)[0] for p, s in prompts]
    results = [None, None]

    def run(i):
        results[i] = pipe(prompts[i][0], seed=prompts[i][1], frames=21)[0]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, sequential):
        assert np.array_equal(a, b)


def test_bad_inputs(pipe, tmp_path):
    with pytest.raises(ValueError, match="non-empty prompt"):
        next(pipe.stream("   "))
    with pytest.raises(ValueError, match=r"frames=10 is not 1\+4k"):
        pipe.stream("a red circle", frames=10)
    with pytest.raises(FileNotFoundError, match="not found or has no config.json"):
        Pipeline.from_pretrained(str(tmp_path / "missing"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "asd_deploy", *args], capture_output=True, text=True, timeout=300)


def test_cli_writes_a_real_mp4_and_sheet(tmp_path):
    out, sheet = tmp_path / "v.mp4", tmp_path / "s.png"
    r = _cli("generate", "--prompt", "a red circle moving right", "--steps", "1", "--ffe", "--seed", "3",
             "--frames", "21", "--out", str(out), "--sheet", str(sheet), "--quiet")
    assert r.returncode == 0, r.stderr
    frames, fps = read_mp4(out)
    assert frames.shape == (21, 32, 48, 3) and fps == 16
    assert sheet.stat().st_size > 0
    from asd_deploy.registry import default_is_trained
    assert default_is_trained() and "RANDOM weights" not in r.stderr  # the shipped default is trained
    assert "FPS" in r.stdout and "first frame after" in r.stdout and "21 frames 48x32" in r.stdout


def test_cli_says_when_weights_are_random(tmp_path):
    r = _cli("generate", "--prompt", "a red circle moving right", "--checkpoint", "random", "--config", "tiny",
             "--steps", "1", "--frames", "9", "--out", str(tmp_path / "v.mp4"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr


def test_cli_latents_and_errors(tmp_path):
    out = tmp_path / "lat.pt"
    r = _cli("generate", "--config", "tiny", "--steps", "1", "--frames", "9", "--seed", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lat = torch.load(out, weights_only=True)
    assert lat.shape == (1, 16, 3, 4, 6)
    for args, needle in [(["--frames", "10"], "frames=10 is not 1+4k"),
                         (["--steps", "7"], "steps must be an integer in 1..4"),
                         (["--prompt", ""], "non-empty prompt"),
                         (["--out", str(tmp_path / "no" / "dir" / "x.mp4")], "does not exist"),
                         (["--out", str(tmp_path / "x.gif")], "must end in .mp4"),
                         (["--model", str(tmp_path / "nomodel")], "not found")]:
        r = _cli("generate", "--frames", "9", "--out", str(tmp_path / "ok.mp4"), *args)
        assert r.returncode != 0 and needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_cli_gpu_backend_fails_cleanly_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message; a GPU is present")
    r = _cli("generate", "--backend", "trt", "--frames", "9", "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "TensorRT backend unavailable" in r.stderr and "pip install .[gpu]" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.mp4").exists()
    r = _cli("generate", "--cuda-graph", "--frames", "9", "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "CUDA graphs need a CUDA GPU" in r.stderr and not (tmp_path / "x.mp4").exists()
