"""The default model's recipe pieces: VAE training, packaging a student as a model folder, the
teacher's multi-step sampler used by the ablation. Small sizes; the real run is in the README."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asd_deploy.checkpoint import read_state_dict
from asd_deploy.generator import EagerStep, generate
from asd_deploy.model import build_model
from asd_deploy.pipeline import Pipeline
from asd_deploy.schedule import Schedule
from asd_deploy.vae import VideoVAE
from training.ablation import sample_teacher
from training.package import package_model
from training.vae import compare, deepen, decode_for_training, evaluate, inflate_temporal, render, train_vae

from conftest import assert_close, rand_context

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_vae_training_learns_and_normalizes(tmp_path):
    """Some dozens of steps on one clip cut the reconstruction loss, the saved folder loads, its
    latent statistics normalize the training clips to zero mean and unit std, and the report's
    PSNR is the one `evaluate` measures on the held-out videos."""
    kw = dict(steps=80, batch=1, lr=2e-3, num_videos=1, clip_frames=5, eval_videos=2, fg_weight=0.0, log=None)
    report = train_vae(tmp_path / "vae", **kw)
    first, last = report["history"][0]["recon"], report["history"][-1]["recon"]
    assert last < 0.7 * first, report["history"]
    vae = VideoVAE.from_pretrained(tmp_path / "vae")
    assert abs(evaluate(vae, render(2, 1, 33, 32, 48, max_objects=2)) - report["heldout_psnr_db"]) < 0.01
    z = vae.encode(render(1, 0, 5, 32, 48, max_objects=2))  # the clips it trained on (all of them: stats cover them)
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-3 and (per_channel.std(1) - 1).abs().max() < 1e-2
    assert json.loads((tmp_path / "vae" / "train_report.json").read_text())["steps"] == 80


def test_training_decode_is_the_decode_without_its_clamp():
    """The training decode runs the same causal frame loop as diffusers' decode; only the final
    clamp to [-1, 1] (which would zero the gradient of pixels pushed past a bound) is left out."""
    vae = VideoVAE.tiny(seed=3).vae
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(4)  # push some outputs past [-1, 1] so the clamp matters
        z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
        raw = decode_for_training(vae, z)
        ref = vae.decode(z).sample
    assert raw.abs().max() > 1.0
    assert_close(raw.clamp(-1, 1), ref, 1e-6, "training decode vs diffusers decode")


def test_inflated_vae_is_the_image_vae_on_every_frame():
    """After `inflate_temporal`, a static 9-frame clip encodes to the image latent in every latent
    frame and decodes to the image decode in every pixel frame; the temporal taps are no longer
    random (without inflation the clip's later frames differ from the image)."""
    vae = VideoVAE.tiny(seed=1).vae
    image = render(1, 0, 1, 32, 48)
    clip = image.expand(-1, -1, 9, -1, -1)
    with torch.no_grad():
        z_img = vae.encode(image).latent_dist.mode()
        before = vae.encode(clip).latent_dist.mode()
        assert (before[:, :, 1:] - z_img).abs().max() > 1e-2
        assert inflate_temporal(vae) > 0
        z = vae.encode(clip).latent_dist.mode()
        assert_close(z, z_img.expand_as(z), 1e-5, "inflated encoder, static clip")
        assert_close(decode_for_training(vae, z), decode_for_training(vae, z_img).expand(-1, -1, 9, -1, -1),
                     1e-5, "inflated decoder, static clip")


def test_deepened_vae_computes_what_it_did_and_then_trains_its_new_blocks(tmp_path):
    """`deepen` adds residual blocks per level whose outputs start at zero: the grown VAE encodes
    and decodes a clip exactly as the trained one did, every trained tensor is carried over, and
    one training step moves the new blocks (their zero convolution gets a gradient). A grown
    saved VAE continues training under `train_vae(init=..., arch=...)` (here on twice-as-fast
    objects, measured at both speeds); an arch that is not the init's (other widths) is refused by name."""
    from diffusers import AutoencoderKLWan

    small = VideoVAE.tiny(seed=2).vae  # TINY_CONFIG: one residual block per level
    grown = deepen(small, 2)
    assert grown.config.num_res_blocks == 2
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in small.parameters())
    clip = render(1, 0, 5, 32, 48)
    with torch.no_grad():
        z = small.encode(clip).latent_dist.mode()
        assert torch.equal(grown.encode(clip).latent_dist.mode(), z)
        assert torch.equal(grown.decode(z).sample, small.decode(z).sample)
    new_conv = grown.decoder.up_blocks[0].resnets[2].conv2.weight
    assert new_conv.abs().max() == 0
    decode_for_training(grown, grown.encode(clip).latent_dist.mode()).sub(clip).pow(2).mean().backward()
    assert new_conv.grad.abs().max() > 0
    with pytest.raises(ValueError, match="more than"):
        deepen(grown, 2)
    VideoVAE(small).save(tmp_path / "small")
    import asd_deploy.vae as AV
    AV.VAE_ARCHS["tiny2-test"] = dict(AV.TINY_CONFIG, num_res_blocks=2)
    try:
        kw = dict(steps=1, batch=1, num_videos=1, clip_frames=5, eval_videos=1, log=None)
        report = train_vae(tmp_path / "g", init=tmp_path / "small", arch="tiny2-test", speed_scale=2, **kw)
        assert report["num_res_blocks"] == 2 and report["arch"] == "tiny2-test" and report["speed_scale"] == 2
        assert report["heldout_psnr_db_speed1"] > 0  # measured at the data's speed and at speed 1
        with pytest.raises(ValueError, match="speed_scale"):
            train_vae(tmp_path / "s", speed_scale=0, **kw)
        assert AutoencoderKLWan.from_pretrained(str(tmp_path / "g")).config.num_res_blocks == 2
        with pytest.raises(ValueError, match="base_dim"):
            train_vae(tmp_path / "h", init=tmp_path / "small", arch="demo", **kw)
    finally:
        del AV.VAE_ARCHS["tiny2-test"]


def test_compare_reads_vaes_side_by_side_on_one_held_out_set(tmp_path):
    """`compare` scores each folder on the same held-out videos, at the data's speed and at 1:
    its figures are `evaluate`'s on that set, and two different VAEs get different figures."""
    for seed in (1, 2):
        VideoVAE.tiny(seed=seed).save(tmp_path / f"v{seed}")
    rows = compare([tmp_path / "v1", tmp_path / "v2"], model="tiny", speed_scale=2, eval_videos=2)
    assert [r["num_res_blocks"] for r in rows] == [1, 1]
    fast = render(2, 1, 33, 32, 48, max_objects=2, speed_scale=2)
    assert rows[0]["psnr_db_speed2"] == round(evaluate(VideoVAE.from_pretrained(tmp_path / "v1"), fast), 2)
    assert rows[0]["psnr_db_speed1"] != rows[0]["psnr_db_speed2"]
    assert rows[0]["psnr_db_speed2"] != rows[1]["psnr_db_speed2"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = subprocess.run([sys.executable, "-m", "training.train", "--recipe", "micro", "--max-steps", "2", "--out",
                        str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    VideoVAE.tiny().save(out / "vae")
    return out


def test_package_writes_a_model_folder_the_pipeline_runs(micro_run, tmp_path):
    ckpt = micro_run / "distill" / "checkpoint.pt"
    folder = package_model(ckpt, micro_run / "vae", tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["trained"] and meta["source"]["weights"] == "generator_ema"
    pipe = Pipeline.from_pretrained(str(folder))
    ema = read_state_dict(ckpt, "generator_ema")
    for k, v in pipe.step.model.state_dict().items():
        assert torch.equal(v, ema[k].float()), k
    frames = list(pipe.stream("a red circle moving right on a white background", steps=1, ffe=False, frames=9))
    assert frames[0].shape == (9, pipe.config.height, pipe.config.width, 3)


def test_ablation_scores_at_the_speed_the_run_config_names(micro_run, tmp_path):
    """The ablation's scorer speed is read from the run config training.train wrote beside the
    checkpoint (`train.data.speed_scale`): a teacher trained at speed 2 is scored at 2 (it was
    read from the wrong level once, and every run scored at 1); the teacher's wins over students."""
    from training.ablation import data_speed_scale

    ckpt = micro_run / "distill" / "checkpoint.pt"
    assert data_speed_scale(ckpt, []) == 1.0
    run = json.loads((micro_run / "distill" / "config.json").read_text())
    run["train"]["data"]["speed_scale"] = 2  # the key training.train writes (KeyError if it moved)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(run))
    assert data_speed_scale(tmp_path / "t" / "checkpoint.pt", [ckpt]) == 2.0
    assert data_speed_scale(None, [tmp_path / "t" / "checkpoint.pt"]) == 2.0
    with pytest.raises(ValueError, match="different speeds"):
        data_speed_scale(None, [ckpt, tmp_path / "t" / "checkpoint.pt"])


def test_package_over_budget_leaves_nothing(micro_run, tmp_path):
    with pytest.raises(ValueError, match="over the 0.01 MB budget"):
        package_model(micro_run / "distill" / "checkpoint.pt", micro_run / "vae", tmp_path / "model", budget_mb=0.01)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="config.json"):
        package_model(micro_run / "distill" / "checkpoint.pt", tmp_path, tmp_path / "model")


def test_teacher_sampler_one_step_unguided_is_the_one_step_student_loop(tiny_cfg):
    """With 1 Euler step and guidance 1 the teacher sampler reduces to x0 = x - v at sigma 1,
    which is what the student loop computes: an independent check of its noise order, timesteps
    and caching. More steps and guidance change the result."""
    model = build_model(tiny_cfg, seed=3)
    step, ctx = EagerStep(model), rand_context(tiny_cfg)
    ours = sample_teacher(step, ctx, num_chunks=4, steps=1, guidance=1.0, seed=5)
    loop = torch.cat(list(generate(step, ctx, num_chunks=4, schedule=Schedule(steps=1), seed=5)), dim=2)
    assert_close(ours, loop, 1e-5, "teacher sampler (1 step, g=1) vs student loop")
    guided = sample_teacher(step, ctx, num_chunks=4, steps=8, guidance=3.0, seed=5)
    assert guided.shape == loop.shape and (guided - loop).abs().max() > 1e-2


def test_bootstrap_interval_and_paired_difference():
    """The interval holds the mean, shrinks with more prompts, is a point for constant values;
    a paired difference of a row with itself is exactly 0, and rows of other videos are refused."""
    from training.ablation import bootstrap_ci, paired_difference
    rng = np.random.default_rng(0)
    v = rng.normal(0.5, 0.2, 64)
    m, lo, hi = bootstrap_ci(v, np.repeat(np.arange(32), 2))
    assert lo < m < hi and m == pytest.approx(v.mean())
    v4 = rng.normal(0.5, 0.2, 256)
    _, lo4, hi4 = bootstrap_ci(v4, np.repeat(np.arange(128), 2))
    assert hi4 - lo4 < 0.75 * (hi - lo)
    assert bootstrap_ci(np.full(10, 0.3), np.arange(10))[1:] == pytest.approx((0.3, 0.3))
    row = {"name": "a", "per_video": [{"prompt": "p", "seed": s, "run": 0, "overall": x} for s, x in enumerate(v)]}
    d = paired_difference(row, row)
    assert (d["diff"], d["lo"], d["hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same videos"):
        paired_difference(row, {"name": "b", "per_video": row["per_video"][1:]})


def test_coherence_needs_a_chunk_after_chunk_0(tmp_path):
    """One chunk leaves nothing to score after chunk 0: a clear error before anything loads."""
    from asd_deploy.config import ModelConfig
    from training.coherence import measure

    with pytest.raises(ValueError, match="--chunks 1: at least 2"):
        measure(tmp_path / "none.pt", tmp_path / "no-vae", ModelConfig.preset("tiny"), chunks=1)


def test_ablation_pairs_arms_of_different_seed_counts_on_their_common_runs():
    """Two DMD-only seeds against one ASD seed: the difference pairs run 0 with run 0 (the
    second DMD seed is left out, not mismatched), and says how many runs it paired."""
    from training.ablation import _common_runs, paired_difference

    def row(name, values):
        per = [{"prompt": f"p{i % 3}", "seed": 0, "run": r, "overall": v} for r, vs in enumerate(values)
               for i, v in enumerate(vs)]
        return {"name": name, "per_run": [float(np.mean(vs)) for vs in values], "per_video": per}
    dmd = row("dmd", [[0.1, 0.2, 0.3], [0.9, 0.9, 0.9]])
    asd = row("asd", [[0.2, 0.3, 0.4]])
    a, b = _common_runs(dmd, asd)
    assert [v["run"] for v in a["per_video"]] == [0, 0, 0] and b["per_video"] == asd["per_video"]
    assert paired_difference(a, b)["diff"] == pytest.approx(0.1)


def test_ablation_cli_writes_table2_with_intervals(micro_run, tmp_path):
    """Two 'training seeds' per arm (the same checkpoint twice): the Table 2 rows exist at 1 and 2
    steps with intervals around their means, the reference rows are there, and ASD - DMD is 0."""
    ckpt = str(micro_run / "distill" / "checkpoint.pt")
    out = tmp_path / "abl"
    r = subprocess.run([sys.executable, "-m", "training.ablation", "--vae", str(micro_run / "vae"), "--dmd", ckpt, ckpt,
                        "--asd", ckpt, ckpt, "--prompts", "2", "--seeds", "0", "--chunks", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    names = [row["name"] for row in res["rows"]]
    assert "real videos" in names and "baseline: background only" in names
    assert len(res["table2"]) == 8 and {t["row"] for t in res["table2"]} == {"neither", "ASD only", "FFE only", "both"}
    for t in res["table2"]:
        assert t["lo"] <= t["overall"] <= t["hi"]
    for row in res["rows"]:
        if row["name"].startswith("ASD"):
            assert row["videos"] == 2 * 2 and len(row["per_run"]) == 2
    assert all(d["diff"] == 0.0 for d in res["differences"]) and len(res["differences"]) == 4
    assert "| neither | 1 |" in out.with_suffix(".md").read_text()


def test_ablation_decodes_every_row_with_the_tiny_decoder_too(micro_run, tmp_path):
    """--tiny-decoder: each row has a twin decoded by the tiny decoder from the same latents (the
    real videos through the VAE's encoder too), with a paired difference per row that is the
    twin's mean minus the row's."""
    from asd_deploy.decoders.tiny import TinyDecoder, TinyDecoderConfig

    TinyDecoder(TinyDecoderConfig(channels=(16, 8, 8, 4))).save(tmp_path / "tiny")
    ckpt = str(micro_run / "distill" / "checkpoint.pt")
    out = tmp_path / "abl"
    r = subprocess.run([sys.executable, "-m", "training.ablation", "--vae", str(micro_run / "vae"), "--asd", ckpt,
                        "--teacher", str(micro_run / "teacher" / "checkpoint.pt"), "--teacher-steps", "2",
                        "--tiny-decoder", str(tmp_path / "tiny"), "--prompts", "2", "--seeds", "0", "--chunks", "1",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {row["name"]: row for row in res["rows"]}
    twins = [n for n in rows if n.endswith(", tiny decoder")]
    assert "real videos through the VAE encoder, tiny decoder" in twins
    assert any(n.startswith("teacher") for n in twins) and sum(n.startswith("ASD") for n in twins) == 4
    assert len(res["decoder_differences"]) == len(twins)
    for d in res["decoder_differences"]:
        assert d["diff"] == pytest.approx(rows[d["b"]]["overall"] - rows[d["a"]]["overall"])
    assert "Tiny decoder - the VAE's decoder" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_coherence_scores_chunks_apart_under_controlled_inputs(micro_run, tmp_path):
    """training.coherence: every row of its three tables is there; the teacher given the real
    chunk 0 has exactly the real video's chunk 0 (the prefill is the real latents), and the real
    chunk 0 with no noise decodes to the real video's first frames (the decode is causal)."""
    out = tmp_path / "coh"
    r = subprocess.run([sys.executable, "-m", "training.coherence", "--teacher",
                        str(micro_run / "teacher" / "checkpoint.pt"), "--vae", str(micro_run / "vae"),
                        "--videos", "2", "--chunks", "2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {part: {row["name"]: row for row in res[part]} for part in ("context", "sampler", "noise")}
    assert len(rows["context"]) == 6 and len(rows["sampler"]) == 4 and len(rows["noise"]) == 5
    real, given = rows["context"]["real video through the VAE: chunk 0"], \
        rows["context"]["teacher, given the real chunk 0: chunk 0"]
    clean = rows["noise"]["real chunk 0 + noise std 0.0"]
    for k in ("overall", "smoothness", "consistency", "shape", "presence"):
        assert given[k] == real[k] == clean[k], k
    for part in rows.values():
        for row in part.values():
            assert row["smoothness_lo"] <= row["smoothness"] <= row["smoothness_hi"] and row["videos"] == 2
    assert "python -m training.coherence --teacher" in out.with_suffix(".md").read_text()


def test_vae_training_resumes_exactly(tmp_path):
    """6 steps straight, or a run killed just after writing its state at step 2 and resumed to 6:
    the same weights, bit for bit (crops and bf16 autocast included); a finished run leaves no
    state file behind."""
    import training.vae as V

    kw = dict(batch=2, lr=1e-3, num_videos=4, clip_frames=1, eval_videos=1, crop=(16, 24), amp="bf16", log=None)
    train_vae(tmp_path / "a", steps=6, save_every=2, **kw)
    assert not (tmp_path / "a.state.pt").exists()
    orig = V.save_state

    def killed_after_saving(*args):
        orig(*args)
        raise KeyboardInterrupt
    V.save_state = killed_after_saving
    try:
        with pytest.raises(KeyboardInterrupt):
            train_vae(tmp_path / "c", steps=6, save_every=2, **kw)
    finally:
        V.save_state = orig
    assert (tmp_path / "c.state.pt").exists() and not (tmp_path / "c").exists()
    import shutil
    shutil.copy(tmp_path / "c.state.pt", tmp_path / "d.state.pt")
    said = []
    train_vae(tmp_path / "c", steps=6, save_every=2, resume=True, **{**kw, "log": said.append})
    assert any("resumed" in m and "at step 2" in m for m in said), said
    # the state really is what the run continues from: tampered weights give other weights
    st = torch.load(tmp_path / "d.state.pt", weights_only=True)
    st["net"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in st["net"].items()}
    torch.save(st, tmp_path / "d.state.pt")
    train_vae(tmp_path / "d", steps=6, save_every=2, resume=True, **kw)
    from safetensors.torch import load_file
    d = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    a = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    c = load_file(tmp_path / "c" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)
