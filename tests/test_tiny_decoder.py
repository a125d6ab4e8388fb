"""The tiny-decoder recipe at toy size: it trains on the tiny random VAE, learns, saves a folder
the pipeline loads, reports speed / PSNR / ToyBench against the full decoder from what it
measured, and resumes bit for bit after an interruption."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from asd_deploy.decoders.tiny import TinyDecoder
from asd_deploy.vae import VideoVAE
from training.tiny_decoder import pool_psnr, train_tiny_decoder

KW = dict(config="tiny", arch="tiny", clips=4, clip_frames=9, batch=2, eval_clips=2, lr=3e-3, log=None,
          speed_repeats=1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae") / "vae"
    VideoVAE.tiny(seed=0).save(d)
    return d


@pytest.fixture(scope="module")
def tiny_model_dir(vae_dir):
    """A model folder at the tiny geometry (random DiT, the tiny VAE): what the recipe samples
    generated latents from at toy size (the embedded default is 64x96)."""
    from safetensors.torch import save_file

    from asd_deploy.config import ModelConfig
    from asd_deploy.model import build_model

    cfg = ModelConfig.preset("tiny")
    d = vae_dir.parent / "model"
    shutil.copytree(vae_dir, d / "vae")
    save_file({k: v.contiguous() for k, v in build_model(cfg, seed=0).state_dict().items()}, str(d / "dit.safetensors"))
    (d / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "text_encoder": "default",
                                               "checkpoint": "dit.safetensors", "fps": 16}))
    return d


def test_trains_loads_and_reports(vae_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "td"
    r = train_tiny_decoder(out, vae_dir, steps=60, generated=2, model=str(tiny_model_dir), toybench_prompts=1, **KW)
    assert r["history"][-1]["loss"] < 0.8 * r["history"][0]["loss"], r["history"]
    net = TinyDecoder.from_pretrained(out)
    assert json.loads((out / "train_report.json").read_text())["steps"] == 60
    sp = r["speed"]
    assert sp["full_decoder_chunk_s"] > 0
    assert sp["speedup"] == pytest.approx(sp["full_decoder_chunk_s"] / sp["tiny_decoder_chunk_s"])
    pool = torch.load(str(out) + ".pool.pt", weights_only=True)
    assert len(pool["train_lat"]) == 4 + 2 and len(pool["gen_lat"]) == 1  # clips + generated; generated held out
    held = pool_psnr(net, pool["held_lat"], pool["held_px"])
    assert r["psnr_db"]["heldout_vs_full_decoder"] == pytest.approx(held, abs=0.01)
    assert {"generated_vs_full_decoder", "heldout_perturbed_vs_full_decoder"} <= set(r["psnr_db"])
    assert not torch.equal(pool["held_lat"], pool["held_noisy_lat"])  # the same clips, perturbed
    tb = r["toybench"]
    assert tb["overall_diff"] == pytest.approx(tb["tiny"]["overall"] - tb["vae"]["overall"])
    assert not (tmp_path / "td.state.pt").exists()
    from asd_deploy.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(str(tiny_model_dir), decoder="tiny", tiny_decoder=str(out))
    assert pipe.info["decoder"] == "tiny" and pipe("a red circle moving right", frames=9)[0].shape == \
        (9, pipe.config.height, pipe.config.width, 3)


def test_resume_is_bit_for_bit(vae_dir, tmp_path, monkeypatch):
    ref = train_tiny_decoder(tmp_path / "a", vae_dir, model=None, steps=6, save_every=0, **KW)
    real, calls = torch.nn.utils.clip_grad_norm_, [0]

    def crash(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_decoder(tmp_path / "b", vae_dir, model=None, steps=6, save_every=3, **KW)
    assert (tmp_path / "b.state.pt").is_file() and not (tmp_path / "b").exists()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    got = train_tiny_decoder(tmp_path / "b", vae_dir, model=None, steps=6, save_every=3, resume=True, **KW)
    a, b = TinyDecoder.from_pretrained(tmp_path / "a"), TinyDecoder.from_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert got["history"] == ref["history"]


def test_init_starts_from_a_trained_decoder(vae_dir, tmp_path):
    """--init: the run starts from the given decoder's weights (lr 0 keeps them exactly), keeps its
    report as `previous`, and refuses a decoder of another architecture."""
    first = tmp_path / "first"
    train_tiny_decoder(first, vae_dir, model=None, steps=6, save_every=0, **KW)
    again = tmp_path / "again"
    r = train_tiny_decoder(again, vae_dir, model=None, steps=3, save_every=0, init=first, **{**KW, "lr": 0.0})
    a, b = TinyDecoder.from_pretrained(first), TinyDecoder.from_pretrained(again)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert r["init"] == str(first) and r["previous"]["steps"] == 6 and "history" not in r["previous"]
    with pytest.raises(ValueError, match="pass the --arch it was trained with"):
        train_tiny_decoder(tmp_path / "other", vae_dir, model=None, steps=3, save_every=0, init=first,
                           **{**KW, "arch": "demo-lite", "config": "tiny"})


def test_pool_at_the_dit_data_speed(vae_dir, tmp_path):
    """speed_scale: the pool's procedural clips move at that multiple of the grammar's speeds (other
    clips than at speed 1), the report says so, a speed-1 pool is not reused for it,
    and a video folder refuses it."""
    from asd_deploy.config import ModelConfig
    from training.tiny_decoder import load_clips

    cfg = ModelConfig.preset("tiny")
    one, two = load_clips("procedural", 2, 9, cfg, 0), load_clips("procedural", 2, 9, cfg, 0, speed_scale=2.0)
    assert one.shape == two.shape and not torch.equal(one, two)
    out = tmp_path / "td"
    r1 = train_tiny_decoder(out, vae_dir, model=None, steps=1, save_every=0, **KW)
    pool1 = torch.load(str(out) + ".pool.pt", weights_only=True)
    r2 = train_tiny_decoder(out, vae_dir, model=None, steps=1, save_every=0, speed_scale=2.0, **KW)
    pool2 = torch.load(str(out) + ".pool.pt", weights_only=True)
    assert (r1["speed_scale"], r2["speed_scale"]) == (1.0, 2.0) and pool1["key"] != pool2["key"]
    assert not torch.equal(pool1["held_px"], pool2["held_px"])
    with pytest.raises(ValueError, match="applies to procedural data"):
        load_clips(str(tmp_path), 1, 9, cfg, 0, speed_scale=2.0)


@pytest.mark.slow  # one subprocess per bad input (~12 s)
def test_cli_errors(vae_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "training.tiny_decoder", "--vae", str(vae_dir), "--out",
                               str(tmp_path / "x"), *args], capture_output=True, text=True, timeout=120)
    for args, needle in [(["--arch", "huge"], "valid:"), (["--clip-frames", "8"], "1 + 4k"),
                         (["--model", "demo"], "give --config demo"), (["--steps", "9"], "--max-steps 9"),
                         (["--model", "none"], "give --config"),
                         (["--speed-scale", "0"], "--speed-scale must be in (0, 4]")]:
        r = run(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "training.tiny_decoder", "--vae", str(tmp_path / "none"), "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_generated_latents_any_clip_length(tiny_model_dir):
    """A clip length that is not whole chunks (the recipe's default 13 frames: 4 latent frames) gets
    the first latent frames of whole chunks the DiT sampled, equal to the shorter run's."""
    from asd_deploy.config import ModelConfig
    from training.tiny_decoder import generated_latents

    cfg = ModelConfig.preset("tiny")
    four = generated_latents(str(tiny_model_dir), 1, 13, cfg, 0)
    three = generated_latents(str(tiny_model_dir), 1, 9, cfg, 0)
    assert four.shape[2] == 4 and three.shape[2] == 3
    assert torch.equal(four[:, :, :3], three)
