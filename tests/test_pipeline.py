"""The public streaming API and the CLI, end to end on the embedded default model.

Beyond shapes: the stream's latents are the sampler's for the same prompt, seed and schedule,
its frames are the VAE's decode of those latents, every argument changes what it should (and
nothing else), bad arguments are refused, memory stays bounded over long streams, NaN never
turns into a black video. CLI tests call `cli.main` in-process (one subprocess checks the real
entry point); each asserts the exit status, the message and that no traceback is printed."""
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from asd_deploy import cli
from asd_deploy.generator import generate
from asd_deploy.pipeline import NonFiniteError, Pipeline, StreamStats
from asd_deploy.schedule import Schedule
from asd_deploy.video import read_mp4

PROMPT = "a blue square moving left"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("default")


def _latents(pipe, prompt, schedule, seed, chunks):
    return torch.cat(list(generate(pipe.step, pipe.encode_prompt(prompt), num_chunks=chunks, schedule=schedule,
                                   seed=seed)), dim=2)


def test_stream_is_the_sampler_then_the_decoder(pipe):
    """Chunks arrive one at a time; their latents are `generate`'s for the same prompt, seed and
    schedule, and the frames are the VAE's decode of exactly those latents."""
    cfg = pipe.config
    s = pipe.stream(PROMPT, steps=1, ffe=True, seed=5, frames=33, keep_latents=True)
    first = next(s)
    assert first.dtype == np.uint8 and first.shape == (9, cfg.height, cfg.width, 3)
    assert s.stats.num_chunks == 1 and len(s.latents) == 1      # chunk 2 not generated yet
    rest = list(s)
    assert [f.shape[0] for f in rest] == [12, 12]
    lat = torch.cat(s.latents, dim=2)
    assert torch.equal(lat, _latents(pipe, PROMPT, Schedule(1, True, 4), 5, 3))
    from asd_deploy.vae import to_uint8_frames
    whole = to_uint8_frames(pipe.vae.decode(lat))
    streamed = np.concatenate([first, *rest])
    assert np.abs(whole.astype(int) - streamed.astype(int)).max() <= 1  # streaming decode == whole decode
    assert streamed.std() > 1  # not a constant (black or grey) video


def test_stats_add_up(pipe):
    s = pipe.stream(PROMPT, steps=2, ffe=False, seed=1, frames=21)
    frames = list(s)
    st = s.stats
    assert st.frames == sum(len(f) for f in frames) == 21 and st.num_chunks == len(st.chunks) == 2
    assert st.dit_s == pytest.approx(sum(c.dit_s for c in st.chunks))
    assert st.vae_s == pytest.approx(sum(c.vae_s for c in st.chunks))
    assert st.first_frame_s == st.chunks[0].ready_s < st.chunks[1].ready_s
    summary = st.summary(pipe.fps)
    assert summary["fps_dit_only"] == pytest.approx(21 / st.dit_s)
    assert summary["fps_with_vae"] == pytest.approx(21 / (st.dit_s + st.vae_s))
    assert summary["video_seconds"] == pytest.approx(21 / pipe.fps)


def test_each_argument_does_what_it_says(pipe):
    base = dict(steps=1, ffe=True, seed=3, frames=21, latents_only=True)

    def lat(**kw):
        s = pipe.stream(PROMPT, **{**base, **kw})
        list(s)
        return torch.cat(s.latents, dim=2)
    ref = lat()
    assert torch.equal(ref, lat())                                  # deterministic
    assert not torch.equal(ref, lat(seed=4))
    assert not torch.equal(ref, lat(steps=2))
    no_ffe = lat(ffe=False)
    assert not torch.equal(ref, no_ffe)
    # --ffe-steps reaches the sampler: chunk 0 changes with it, and 1 FFE step equals no FFE at 1 step
    two = lat(ffe_steps=2)
    assert not torch.equal(two[:, :, :3], ref[:, :, :3])
    assert torch.equal(two, _latents(pipe, PROMPT, Schedule(1, True, 2), 3, 2))
    assert torch.equal(lat(ffe_steps=1), no_ffe)
    video, s = pipe(PROMPT, steps=1, ffe=True, ffe_steps=2, seed=3, frames=21)
    assert s.schedule == Schedule(1, True, 2) and video.shape[0] == 21


def test_threads_match_sequential(pipe):
    prompts = [("a red circle moving right", 1), ("a yellow triangle moving down", 2)]
    sequential = [pipe(p, seed=s, frames=21)[0] for p, s in prompts]
    assert not np.array_equal(*sequential)
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


def test_bad_inputs_are_refused_not_coerced(pipe, tmp_path):
    with pytest.raises(ValueError, match="non-empty prompt"):
        next(pipe.stream("   "))
    with pytest.raises(ValueError, match=r"frames=10 is not 1\+4k"):
        pipe.stream("a red circle", frames=10)
    for frames in (0, -9, True, 9.0, "9"):      # 0 used to mean "default length", True one frame
        with pytest.raises(ValueError, match="frames must be a positive integer"):
            pipe.stream("a red circle", frames=frames)
    for seed in (1.5, -1, 2 ** 63, True, "0"):  # 1.5 used to become 1, -1 to become 2**64 - 1
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            pipe.stream("a red circle", seed=seed)
    with pytest.raises(ValueError, match="steps must be an integer in 1..4"):
        pipe.stream("a red circle", ffe=True, ffe_steps=5)
    assert pipe.stream("a red circle", seed=np.int64(7), frames=np.int64(9)).num_chunks == 1
    with pytest.raises(FileNotFoundError, match="not found or has no config.json"):
        Pipeline.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.slow  # hundreds of chunks (~10 s)
def test_long_stream_memory_is_bounded(pipe):
    """However long a stream runs, it keeps the last few timings and no latents (unless asked)."""
    cfg = pipe.config
    chunks = 12
    s = pipe.stream(PROMPT, frames=cfg.pixel_frames_for(chunks * cfg.frames_per_chunk))
    s.stats = StreamStats(keep=4)
    n = sum(len(f) for f in s)
    assert s.stats.num_chunks == chunks and s.stats.frames == n and len(s.stats.chunks) == 4
    assert [c.index for c in s.stats.chunks] == [8, 9, 10, 11]
    assert s.latents == [] and s.last_latents.shape == cfg.chunk_shape()
    assert s.stats.first_frame_s < s.stats.chunks[0].ready_s  # chunk 0's time survives its eviction


def test_prompt_cache_is_bounded_lru(pipe):
    p = Pipeline(pipe.config, pipe.step, pipe.text_encoder, pipe.vae, prompt_cache_size=3)
    embs = {k: p.encode_prompt(f"a red circle {k}") for k in "abc"}
    p.encode_prompt("a red circle a")                    # refreshes a: b is now the oldest
    p.encode_prompt("a red circle d")
    assert list(p._prompt_cache) == ["a red circle c", "a red circle a", "a red circle d"]
    assert p.encode_prompt("a red circle a") is embs["a"]
    assert torch.equal(p.encode_prompt("a red circle b"), embs["b"])  # re-encoded, same values


class _NaNStep:
    """A backend whose flow turns to NaN: what damaged weights or a broken engine produce."""

    def __init__(self, step):
        self.step, self.config, self.dtype, self.device, self.name = step, step.config, step.dtype, step.device, "nan"

    def cross_kv(self, context):
        return self.step.cross_kv(context)

    def __call__(self, *args):
        flow, k, v = self.step(*args)
        return flow * float("nan"), k, v


def test_nan_latents_fail_loudly(pipe):
    bad = Pipeline(pipe.config, _NaNStep(pipe.step), pipe.text_encoder, pipe.vae, info={"backend": "nan"})
    for latents_only in (False, True):
        with pytest.raises(NonFiniteError, match="chunk 0 of 2: the DiT \\(nan\\) produced NaN or Inf"):
            list(bad.stream(PROMPT, frames=21, latents_only=latents_only))


# ---- CLI ---------------------------------------------------------------------------------------------
def _main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_entry_point_writes_a_real_mp4_and_sheet(tmp_path):
    out, sheet = tmp_path / "v.mp4", tmp_path / "s.png"
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--prompt", "a red circle moving right",
                        "--steps", "1", "--ffe", "--seed", "3", "--frames", "21", "--out", str(out), "--sheet",
                        str(sheet), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar with --quiet, no third-party advice
    frames, fps = read_mp4(out)
    from asd_deploy.registry import default_config, default_is_trained
    cfg = default_config()
    assert frames.shape == (21, cfg.height, cfg.width, 3) and fps == 16
    from imageio.v2 import imread
    assert imread(sheet).shape[2] == 3 and open(sheet, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert default_is_trained() and "RANDOM weights" not in r.stderr  # the shipped default is trained
    assert f"21 frames {cfg.width}x{cfg.height}" in r.stdout and "1-step + FFE (4 steps on chunk 0), seed 3" in r.stdout


def test_cli_video_is_the_api_video(tmp_path, capsys, pipe):
    code, out, _ = _main(capsys, "generate", "--prompt", PROMPT, "--steps", "2", "--ffe-steps", "3", "--seed", "9",
                         "--frames", "9", "--out", str(tmp_path / "lat.pt"), "--quiet")
    assert code == 0 and "2-step + FFE (3 steps on chunk 0), seed 9" in out
    lat = torch.load(tmp_path / "lat.pt", weights_only=True)
    assert torch.equal(lat, _latents(pipe, PROMPT, Schedule(2, True, 3), 9, 1))


def test_cli_says_when_weights_are_random(tmp_path, capsys):
    code, _, err = _main(capsys, "generate", "--checkpoint", "random", "--config", "tiny", "--steps", "1",
                         "--frames", "9", "--out", str(tmp_path / "v.pt"), "--quiet")
    assert code == 0 and "RANDOM weights" in err


def test_cli_errors_are_one_line_and_nothing_is_written(tmp_path, capsys, tiny_model):
    ok = str(tmp_path / "ok.mp4")
    readonly = tmp_path / "ro.mp4"
    readonly.write_bytes(b"keep me")
    readonly.chmod(0o444)
    nan = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    nan["head.head.weight"].fill_(float("nan"))
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "broken.pt").write_bytes(b"\x80\x02garbage")
    for args, needle in [
        (["--frames", "10"], "frames=10 is not 1+4k"),
        (["--steps", "7"], "steps must be an integer in 1..4"),
        (["--ffe-steps", "0"], "steps must be an integer in 1..4"),
        (["--prompt", ""], "non-empty prompt"),
        (["--out", str(tmp_path / "no" / "dir" / "x.mp4")], "does not exist"),
        (["--out", str(tmp_path / "x.gif")], "must end in .mp4"),
        (["--out", str(readonly)], "exists and is read-only"),
        (["--out", "/sys/asd-deploy-test.mp4"], "does not accept new files"),
        (["--out", str(tmp_path / "x.pt"), "--sheet", str(tmp_path / "s.png")], "needs video frames"),
        (["--sheet", str(tmp_path / "s.jpg")], "--sheet must end in .png"),
        (["--model", str(tmp_path / "nomodel")], "not found"),
        (["--checkpoint", str(tmp_path / "nan.pt"), "--config", "tiny"], "hold NaN or Inf: ['head.head.weight']"),
        (["--checkpoint", str(tmp_path / "broken.pt"), "--config", "tiny"], "truncated or corrupt"),
        (["--device", "nonsense"], "is not a device"),
    ]:
        code, _, err = _main(capsys, "generate", "--frames", "9", "--out", ok, "--quiet", *args)
        assert code == 2 and err.startswith("error: ") and needle in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "nan.pt", "ro.mp4"]
    assert readonly.read_bytes() == b"keep me" and not readonly.stat().st_mode & 0o222


@pytest.mark.parametrize("seed", ["-1", str(2 ** 70), "1.5"])
def test_cli_seed_out_of_range_is_a_usage_error(capsys, seed):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--seed", seed])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: expected an integer in [0, 2**63)" in err


def test_cli_device_and_gpu_backends_fail_cleanly_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU messages; a GPU is present")
    code, _, err = _main(capsys, "generate", "--device", "cuda", "--frames", "9", "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and "--device cuda:" in err and "use --device cpu" in err
    code, _, err = _main(capsys, "generate", "--backend", "trt", "--frames", "9", "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and "TensorRT backend unavailable" in err and "pip install .[gpu]" in err
    code, _, err = _main(capsys, "generate", "--cuda-graph", "--frames", "9", "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and "CUDA graphs need a CUDA GPU" in err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_decode_refuses_bad_latents(tmp_path, capsys):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/asd_deploy_pwned_decode",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    from asd_deploy.registry import default_config
    cfg = default_config()
    lat = torch.zeros(1, 16, 3, cfg.latent_height, cfg.latent_width)
    lat[0, 0, 0, 0, 0] = float("nan")
    np.save(tmp_path / "nan.npy", lat.numpy())
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "int.npy", np.zeros((1, 16, 3, cfg.latent_height, cfg.latent_width), np.int64))
    with open(tmp_path / "pickle.pt", "wb") as f:
        pickle.dump([1, 2], f, protocol=2)     # a plain pickle, not a torch file
    torch.save([1.0, 2.0], tmp_path / "list.pt")
    for name, needle in [("evil.pt", "refused to load"), ("nan.npy", "hold NaN or Inf"),
                         ("obj.npy", "numeric .npy"), ("int.npy", "expected a float tensor"),
                         ("pickle.pt", "cannot read"), ("list.pt", "holds list"), ("absent.npy", "does not exist")]:
        code, _, err = _main(capsys, "decode", "--latents", str(tmp_path / name), "--out", str(tmp_path / "v.mp4"))
        assert code == 2 and needle in err, (name, err)
    assert not (tmp_path / "v.mp4").exists() and not os.path.exists("/tmp/asd_deploy_pwned_decode")


def test_console_script_is_declared():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = meta["project"]["scripts"]["asd-deploy"]
    module, func = target.split(":")
    assert module == "asd_deploy.cli" and callable(getattr(cli, func))
