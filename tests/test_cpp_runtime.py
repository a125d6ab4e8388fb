"""The C++ runtime (CMakeLists.txt, asd_deploy/csrc/): built with cmake + make against the torch
wheel's libtorch, run on the default model's AOTInductor engine, compared with the Python runtime.

The library and `asd_stream` are built once per module into a temp folder (~15 s), the engine once
(~30 s). Latents must equal Python's eager loop for the same seed and prompt within fp32's own
error over that video (`video_tol`, never below 1e-4), and
bad engines and inputs must give clear errors, never a crash (checked through the C ABI with
ctypes too, the way a host application would call it)."""
import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asd_deploy.generator import EagerStep, generate
from asd_deploy.registry import load_dit
from asd_deploy.schedule import Schedule
from asd_deploy.video import read_mp4

from conftest import assert_close, rand_context, video_tol

pytestmark = pytest.mark.slow  # a cmake build and an AOTInductor engine: about two minutes on 2 cores
ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str:
    here = Path(sys.executable).parent / "cmake"  # the `cmake` wheel from the dev install
    found = str(here) if here.exists() else shutil.which("cmake")
    if found is None:
        pytest.fail("cmake not found: `pip install -e '.[dev]'` installs it")
    return found


@pytest.fixture(scope="module")
def native(tmp_path_factory, default_engines):
    """(build folder, engine folder, loaded default model)."""
    tmp = tmp_path_factory.mktemp("cpp")
    cmake, b = _cmake(), tmp / "build"
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(b), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], check=True, capture_output=True)
    r = subprocess.run([cmake, "--build", str(b), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, f"C++ build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    engine = default_engines[0]("aoti")  # the session's, shared with test_export
    return b, engine, load_dit("default")


def _stream(native, *args, engine=None):
    b, default_engine, _ = native
    cmd = [str(b / "asd_stream"), "--engine", str(engine or default_engine), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _prompt(tmp_path, cfg, seed=0, shape=None):
    ctx = rand_context(cfg, seed=seed)
    path = tmp_path / "prompt.npy"
    np.save(path, ctx.numpy() if shape is None else ctx.numpy().reshape(shape))
    return ctx, path


def _manifest_schedule(engine) -> Schedule:
    s = json.loads((Path(engine) / "manifest.json").read_text())["schedule"]
    return Schedule(steps=s["steps"], ffe=s["ffe"], ffe_steps=s["ffe_steps"])


@pytest.mark.parametrize("steps,ffe,chunks", [(None, None, 5), (2, 1, 7)],
                         ids=["manifest-schedule", "2step-ffe-rolling"])
def test_cpp_latents_match_python(native, tmp_path, steps, ffe, chunks):
    """Same seed and prompt -> the same latents as the Python loop (eager model), through the
    rolling-window boundary (7 chunks > 3-chunk cache), per-chunk files equal the stacked file."""
    _, _, loaded = native
    ctx, prompt = _prompt(tmp_path, loaded.config)
    extra = [] if steps is None else ["--steps", steps, "--ffe", ffe]
    r = _stream(native, "--prompt", prompt, "--chunks", chunks, "--seed", 11, "--out", tmp_path / "lat.npy",
                "--chunk-dir", tmp_path / "chunks", *extra)
    assert r.returncode == 0, r.stderr
    got = torch.from_numpy(np.load(tmp_path / "lat.npy"))
    sched = _manifest_schedule(native[1]) if steps is None else Schedule(steps=steps, ffe=bool(ffe))
    if steps is None:
        assert sched == Schedule(1, True, 4)  # export.build's default: 1 step, FFE on with 4 steps
    ref = torch.cat(list(generate(EagerStep(loaded.model), ctx, num_chunks=chunks, schedule=sched, seed=11)), dim=2)
    assert got.shape == ref.shape
    assert_close(got, ref, video_tol(sched, chunks), f"C++ {sched.describe()} latents vs Python")
    fpc = loaded.config.frames_per_chunk
    for c in range(chunks):
        one = torch.from_numpy(np.load(tmp_path / "chunks" / f"chunk_{c:04d}.npy"))
        assert torch.equal(one, got[:, :, c * fpc:(c + 1) * fpc])
    other = _stream(native, "--prompt", prompt, "--chunks", 2, "--seed", 12, "--out", tmp_path / "o.npy", *extra)
    assert other.returncode == 0 and not torch.allclose(torch.from_numpy(np.load(tmp_path / "o.npy")), got[:, :, :2 * fpc])


def test_cpp_and_python_api_agree_on_ffe_steps(native, tmp_path):
    """The engine's FFE step count (here 2, written into a copy's manifest) drives the C++ loop;
    the Python API's `ffe_steps=2` gives the same latents, and they differ from 4 FFE steps."""
    from asd_deploy.pipeline import Pipeline

    engine = shutil.copytree(native[1], tmp_path / "ffe2")
    m = json.loads((engine / "manifest.json").read_text())
    m["schedule"] = Schedule(1, True, 2).to_dict()
    (engine / "manifest.json").write_text(json.dumps(m))
    pipe = Pipeline.from_pretrained("default")
    prompt = "a green triangle moving up on a white background"
    np.save(tmp_path / "p.npy", pipe.encode_prompt(prompt).numpy())
    r = _stream(native, "--prompt", tmp_path / "p.npy", "--chunks", 3, "--seed", 4, "--out", tmp_path / "lat.npy",
                engine=engine)
    assert r.returncode == 0, r.stderr
    got = torch.from_numpy(np.load(tmp_path / "lat.npy"))
    frames = pipe.config.pixel_frames_for(3 * pipe.config.frames_per_chunk)

    def python(ffe_steps):
        s = pipe.stream(prompt, steps=1, ffe=True, ffe_steps=ffe_steps, seed=4, frames=frames, latents_only=True)
        list(s)
        return torch.cat(s.latents, dim=2)
    assert_close(got, python(2), video_tol(Schedule(1, True, 2), 3), "C++ vs Python API, 1-step + FFE with 2 steps")
    assert (got - python(4)).abs().max() > 1e-2


def test_cpp_timesteps_follow_the_model_config(native, tmp_path):
    """The network's t is the manifest config's num_train_timesteps * sigma (here 500, written into
    a copy's manifest), as the Python loop computes it from its config; not a literal 1000."""
    import dataclasses

    engine = shutil.copytree(native[1], tmp_path / "t500")
    m = json.loads((engine / "manifest.json").read_text())
    m["model"]["config"]["num_train_timesteps"] = 500
    (engine / "manifest.json").write_text(json.dumps(m))
    _, _, loaded = native
    ctx, prompt = _prompt(tmp_path, loaded.config)
    r = _stream(native, "--prompt", prompt, "--chunks", 2, "--seed", 3, "--out", tmp_path / "lat.npy", engine=engine)
    assert r.returncode == 0, r.stderr
    got = torch.from_numpy(np.load(tmp_path / "lat.npy"))
    step = EagerStep(loaded.model)
    step.config = dataclasses.replace(loaded.config, num_train_timesteps=500)
    sched = _manifest_schedule(native[1])
    assert_close(got, torch.cat(list(generate(step, ctx, num_chunks=2, schedule=sched, seed=3)), dim=2),
                 video_tol(sched, 2),
                 "C++ vs Python at num_train_timesteps 500")
    base = torch.cat(list(generate(EagerStep(loaded.model), ctx, num_chunks=2, schedule=sched, seed=3)), dim=2)
    assert (got - base).abs().max() > 1e-2


def test_cpp_reads_encode_prompt_output(native, tmp_path):
    """The Python side's `encode-prompt` file feeds the C++ runtime directly."""
    out = tmp_path / "p.npy"
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "encode-prompt", "--prompt", "a red circle moving right",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = _stream(native, "--prompt", out, "--chunks", 2, "--out", tmp_path / "lat.npy")
    assert r.returncode == 0, r.stderr
    ctx = torch.from_numpy(np.load(out))
    ref = torch.cat(list(generate(EagerStep(native[2].model), ctx, num_chunks=2, seed=0,
                                  schedule=_manifest_schedule(native[1]))), dim=2)
    assert_close(torch.from_numpy(np.load(tmp_path / "lat.npy")), ref, video_tol(_manifest_schedule(native[1]), 2),
                 "C++ latents from encode-prompt")
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "decode", "--latents", str(tmp_path / "lat.npy"),
                        "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    video, _ = read_mp4(tmp_path / "v.mp4")
    cfg = native[2].config
    assert video.shape == (cfg.pixel_frames_for(ref.shape[2]), cfg.height, cfg.width, 3)
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "decode", "--latents", str(out), "--out",
                        str(tmp_path / "w.mp4")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and f"decodes latents [1, 16, F, {cfg.latent_height}, {cfg.latent_width}]" in r.stderr and not (tmp_path / "w.mp4").exists()


def _broken_engine(native, tmp_path, edit):
    src = native[1]
    dst = tmp_path / "engine"
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_manifest(**changes):
    def edit(d):
        m = json.loads((d / "manifest.json").read_text())
        m.update(changes)
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


def _truncate(d):
    p = d / "step.pt2"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("case,edit,message", [
    ("missing", None, "no engine at"),
    ("truncated", _truncate, "truncated"),
    ("ort engine", _edit_manifest(backend="ort"), "built for backend \"ort\""),
    ("other torch", _edit_manifest(torch_version="2.9.0+cpu"), "built with torch 2.9.0"),
    ("unfinished", _edit_manifest(complete=False), "did not finish"),
    ("bad json", lambda d: (d / "manifest.json").write_text("{\"backend\": "), "not valid JSON"),
    ("missing package", lambda d: (d / "cross_kv.pt2").unlink(), "cross_kv.pt2 is missing"),
])
def test_cpp_bad_engine_is_a_clear_error(native, tmp_path, case, edit, message):
    engine = tmp_path / "nowhere" if edit is None else _broken_engine(native, tmp_path, edit)
    _, prompt = _prompt(tmp_path, native[2].config)
    r = _stream(native, "--prompt", prompt, "--out", tmp_path / "lat.npy", engine=engine)
    assert r.returncode != 0 and message in r.stderr, (case, r.returncode, r.stderr)
    assert "export.build" in r.stderr  # says how to (re)build
    assert not (tmp_path / "lat.npy").exists()


def test_cpp_bad_inputs(native, tmp_path):
    cfg = native[2].config
    _, wrong = _prompt(tmp_path, cfg, shape=(1, cfg.text_len * 2, cfg.text_dim // 2))
    r = _stream(native, "--prompt", wrong, "--out", tmp_path / "lat.npy")
    assert r.returncode != 0 and "this engine wants [1, 32, 384]" in r.stderr, r.stderr
    np.save(tmp_path / "f64.npy", rand_context(cfg).numpy().astype(np.float64))
    r = _stream(native, "--prompt", tmp_path / "f64.npy", "--out", tmp_path / "lat.npy")
    assert r.returncode != 0 and "expected float32" in r.stderr, r.stderr
    r = _stream(native, "--prompt", tmp_path / "absent.npy", "--out", tmp_path / "lat.npy")
    assert r.returncode != 0 and "cannot open" in r.stderr
    r = _stream(native, "--prompt", wrong, "--out", tmp_path / "lat.npy", "--steps", 9)
    assert r.returncode == 2 and "bad value for --steps" in r.stderr
    assert not (tmp_path / "lat.npy").exists()


def test_c_abi_never_crashes_the_host(native, tmp_path):
    """A host application calling the library wrongly gets status codes and messages."""
    b, engine, loaded = native
    lib = ctypes.CDLL(str(b / "libasd_runtime.so"))
    lib.asd_last_error.restype = ctypes.c_char_p
    lib.asd_create.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.asd_next_chunk.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.asd_set_prompt_embedding.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.asd_chunk_numel.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
    lib.asd_destroy.argtypes = [ctypes.c_void_p]
    h = ctypes.c_void_p()
    assert lib.asd_create(str(tmp_path / "none").encode(), None, ctypes.byref(h)) == 2 and not h.value
    assert b"no engine at" in lib.asd_last_error()
    assert lib.asd_create(None, None, ctypes.byref(h)) == 1
    assert lib.asd_next_chunk(None, None, 0) == 1 and b"null runtime handle" in lib.asd_last_error()

    assert lib.asd_create(str(engine).encode(), None, ctypes.byref(h)) == 0, lib.asd_last_error()
    n = ctypes.c_int64()
    assert lib.asd_chunk_numel(h, ctypes.byref(n)) == 0 and n.value == int(np.prod(loaded.config.chunk_shape()))
    buf = np.zeros(n.value, np.float32)
    assert lib.asd_next_chunk(h, buf.ctypes.data, n.value) == 3 and b"no prompt" in lib.asd_last_error()
    ctx = rand_context(loaded.config).numpy()
    assert lib.asd_set_prompt_embedding(h, ctx.ctypes.data, ctx.size - 1) == 1
    assert lib.asd_set_prompt_embedding(h, ctx.ctypes.data, ctx.size) == 0
    assert lib.asd_next_chunk(h, buf.ctypes.data, n.value - 1) == 1 and b"must hold" in lib.asd_last_error()
    assert lib.asd_next_chunk(h, buf.ctypes.data, n.value) == 0 and lib.asd_last_error() == b""
    sched = _manifest_schedule(engine)
    ref = list(generate(EagerStep(loaded.model), torch.from_numpy(ctx), num_chunks=2, seed=0, schedule=sched))
    assert_close(torch.from_numpy(buf).view(ref[0].shape), ref[0], video_tol(sched, 1), "C ABI chunk 0")
    second = np.zeros_like(buf)
    assert lib.asd_next_chunk(h, second.ctypes.data, n.value) == 0
    assert_close(torch.from_numpy(second).view(ref[1].shape), ref[1], video_tol(sched, 2), "C ABI chunk 1")
    # asd_reset: an empty cache and a reseeded generator, the prompt kept
    lib.asd_reset.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    assert lib.asd_reset(None, 0) == 1
    again = np.zeros_like(buf)
    assert lib.asd_reset(h, 0) == 0 and lib.asd_next_chunk(h, again.ctypes.data, n.value) == 0
    assert np.array_equal(again, buf)  # chunk 0 of seed 0 again, not chunk 2
    assert lib.asd_reset(h, 5) == 0 and lib.asd_next_chunk(h, again.ctypes.data, n.value) == 0
    ref5 = next(generate(EagerStep(loaded.model), torch.from_numpy(ctx), num_chunks=1, seed=5, schedule=sched))
    assert_close(torch.from_numpy(again).view(ref5.shape), ref5, video_tol(sched, 1), "C ABI chunk 0 after asd_reset(seed 5)")
    lib.asd_destroy(h)


def _python_frames(loaded, ctx, chunks, seed, schedule, decoder="vae"):
    """The Python side's frames for the same prompt, seed and schedule: eager latents through
    diffusers' streaming decode of the default VAE (or the eager tiny decoder), as uint8."""
    from asd_deploy.decoders.tiny import TinyDecoder
    from asd_deploy.registry import ASSETS
    from asd_deploy.vae import VideoVAE, to_uint8_frames

    dec = (VideoVAE.from_pretrained(ASSETS / "vae").stream_decoder() if decoder == "vae" else
           TinyDecoder.from_pretrained(ASSETS / "tiny_decoder").stream())
    lat = generate(EagerStep(loaded.model), ctx, num_chunks=chunks, schedule=schedule, seed=seed)
    return np.concatenate([to_uint8_frames(dec.decode_chunk(c)) for c in lat])


def test_cpp_writes_frames_and_mp4(native, tmp_path):
    """--frames (uint8 .npy, streamed) equals the Python frames up to the uint8 rounding of the
    latents' fp32 difference (at most 1 level, in under 1% of values: the bar the server's frames
    meet); --video pipes the same frames through ffmpeg into an mp4."""
    import imageio_ffmpeg

    _, _, loaded = native
    ctx, prompt = _prompt(tmp_path, loaded.config)
    r = _stream(native, "--prompt", prompt, "--chunks", 4, "--seed", 5, "--frames", tmp_path / "f.npy",
                "--video", tmp_path / "v.mp4", "--ffmpeg", imageio_ffmpeg.get_ffmpeg_exe())
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "f.npy")
    ref = _python_frames(loaded, ctx, 4, 5, _manifest_schedule(native[1]))
    cfg = loaded.config
    assert got.dtype == np.uint8 and got.shape == ref.shape == (cfg.pixel_frames_for(12), cfg.height, cfg.width, 3)
    diff = np.abs(got.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    video, fps = read_mp4(tmp_path / "v.mp4")
    assert video.shape == got.shape and fps == 16
    # H.264 yuv420p at crf 18 is lossy (halved chroma blurs saturated shapes on 64x96 frames), so
    # the mp4 is held to being these frames in order: much closer to each frame than to its neighbour
    err = np.abs(video.astype(float) - got).mean()
    shifted = np.abs(video[1:].astype(float) - got[:-1]).mean()
    assert err < 12 and err < 0.5 * shifted, (err, shifted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "prompt.npy", "v.mp4"]  # no temp files


def test_cpp_decodes_with_the_engine_decoder_it_is_asked_for(native, tmp_path):
    """The default engine carries the VAE (primary) and the tiny decoder: `--decoder tiny` writes
    the eager tiny decoder's frames (up to uint8 rounding); a decoder the engine lacks is a clear
    error naming what it has and how to rebuild."""
    _, _, loaded = native
    ctx, prompt = _prompt(tmp_path, loaded.config)
    r = _stream(native, "--prompt", prompt, "--chunks", 3, "--seed", 2, "--frames", tmp_path / "t.npy",
                "--decoder", "tiny")
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "t.npy")
    ref = _python_frames(loaded, ctx, 3, 2, _manifest_schedule(native[1]), decoder="tiny")
    vae = _python_frames(loaded, ctx, 3, 2, _manifest_schedule(native[1]))
    assert got.shape == ref.shape == vae.shape
    diff = np.abs(got.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    assert np.abs(got.astype(int) - vae).mean() > 0.5  # not the VAE's frames: the decoder asked for ran
    r = _stream(native, "--prompt", prompt, "--frames", tmp_path / "x.npy", "--decoder", "big")
    assert r.returncode == 1 and 'no "big" decoder' in r.stderr and "tiny" in r.stderr and "vae" in r.stderr
    assert not (tmp_path / "x.npy").exists()


def test_cpp_frames_need_a_decoder_and_ffmpeg(native, tmp_path):
    def drop_decoder(d):
        m = json.loads((d / "manifest.json").read_text())
        for g in ("decode_first", "decode_next"):
            m["runtime"].pop(g)
        (d / "manifest.json").write_text(json.dumps(m))
    engine = _broken_engine(native, tmp_path, drop_decoder)
    _, prompt = _prompt(tmp_path, native[2].config)
    r = _stream(native, "--prompt", prompt, "--frames", tmp_path / "f.npy", engine=engine)
    assert r.returncode == 1 and "no decoder graphs" in r.stderr and "export.build" in r.stderr
    r = _stream(native, "--prompt", prompt, "--out", tmp_path / "lat.npy", engine=engine)
    assert r.returncode == 0, r.stderr  # latents still work
    r = _stream(native, "--prompt", prompt, "--video", tmp_path / "v.mp4", "--ffmpeg", tmp_path / "no-ffmpeg")
    assert r.returncode == 2 and "needs ffmpeg" in r.stderr and "imageio_ffmpeg" in r.stderr
    r = _stream(native, "--prompt", prompt)
    assert r.returncode == 2 and "at least one output" in r.stderr
    assert not (tmp_path / "f.npy").exists() and not (tmp_path / "v.mp4").exists()
