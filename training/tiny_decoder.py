"""`python -m training.tiny_decoder`: distil a tiny causal decoder from a VAE's decoder.

    python -m training.tiny_decoder --vae VAE_FOLDER --out out/tiny_decoder
        [--model default|MODEL_FOLDER|none] [--config demo] [--arch demo] [--data procedural|VIDEO_FOLDER]
        [--clips 512] [--clip-frames 13] [--generated 64] [--max-steps 3000] [--batch 8] [--lr 2e-3]
        [--amp bf16] [--save-every 250] [--resume] [--eval-clips 16] [--toybench-prompts 8] [--quiet]

Owns: the recipe (`train_tiny_decoder`): a pool of latents and the full VAE decoder's frames for
them (the teacher), computed once and cached beside the output (`<out>.pool.pt`); training the
tiny decoder (`asd_deploy.decoders.tiny`) on whole clips (its decode is causal and exact in any
chunk split, so a clip trains the streaming decode); and the report written into the output
folder (`train_report.json`): speed against the full decoder at the model's geometry (`--config`,
by default the `--model`'s), PSNR against the full decoder's frames (on held-out encoder latents
as they are, the same perturbed, and on DiT-generated latents when a DiT is given), and ToyBench with each decoder on the same generated latents. Does not own the network, the
data (`data.py`) or ToyBench's scoring (`toybench.py`).

Latents: the VAE encoder's (posterior mode, normalized) on procedural videos or the user's
`NAME.mp4 + NAME.txt` folder, half of them perturbed by Gaussian noise (`--latent-noise`: a DiT's
latents are near, not on, the encoder's), plus `--generated` latents sampled from the DiT
(`--model`: "default" or a model folder; "none" for neither these nor ToyBench) on procedural
captions. The teacher decodes each exactly.
Targets are the teacher's frames: the tiny decoder learns the VAE decoder, not the videos.

Goals it is designed for (default model, 64x96): >= 10x faster than the full decoder, PSNR
>= 30 dB against it, ToyBench overall within 0.02 of it. Resumable (`--save-every`, `--resume`:
`<out>.state.pt`, bit for bit); the output folder is written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from asd_deploy.config import PRESETS, ModelConfig
from asd_deploy.decoders.tiny import TINY_DECODER_ARCHS, TinyDecoder
from asd_deploy.decoders.vae import VaeDecodeNet
from asd_deploy.vae import VideoVAE

from .data import MAX_SPEED_SCALE, check_speed_scale_arg
from .resume import load_state, save_state, state_path
from .vae import psnr, render


def _to_u8(video: torch.Tensor) -> torch.Tensor:
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_clips(data: str, num: int, frames: int, cfg: ModelConfig, seed: int, speed_scale: float = 1.0) -> torch.Tensor:
    """float [num, 3, frames, H, W] in [-1, 1]: procedural videos (objects at `speed_scale` x the
    grammar's speeds), or the clips of a video folder (NAME.mp4 + NAME.txt; cycled if it holds
    fewer than `num`)."""
    if data == "procedural":
        return render(num, seed, frames, cfg.height, cfg.width, max_objects=2, speed_scale=speed_scale)
    if speed_scale != 1.0:
        raise ValueError(f"--speed-scale {speed_scale:g} applies to procedural data; {data} is a video folder")
    from .data import VideoFolder

    ds = VideoFolder(data, frames, cfg.height, cfg.width)
    v = torch.stack([torch.from_numpy(ds[i % len(ds)]["video"]) for i in range(num)])
    return v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


@torch.no_grad()
def model_config(model: str | None, config: str | None) -> ModelConfig:
    """The geometry to train at: the preset `config`, else the DiT `model`'s config."""
    if config is not None:
        return ModelConfig.preset(config)
    if model is None:
        raise ValueError("give --config (the geometry to train at) when there is no --model")
    if model == "default":
        from asd_deploy.registry import default_config
        return default_config()
    root = Path(model)
    if not (root / "config.json").is_file():
        hint = (f" ({model!r} is a config preset: give --config {model}; --model names the DiT)"
                if model in PRESETS else "")
        raise FileNotFoundError(f"--model {model}: not 'default', 'none' or a model folder with config.json{hint}")
    return ModelConfig.from_dict(json.loads((root / "config.json").read_text())["model"])


def generated_latents(dit: str, num: int, frames: int, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """[num, C, F, h, w] latents the DiT samples for procedural captions (1 step + FFE); F is the
    latent frame count of `frames` pixel frames. The DiT makes whole chunks, so it samples the
    fewest that cover F and the clip keeps the first F (the rest cannot change them: causal)."""
    from asd_deploy.pipeline import Pipeline

    from .data import ProceduralVideos

    pipe = Pipeline.from_pretrained(dit)
    if (pipe.config.height, pipe.config.width) != (cfg.height, cfg.width):
        raise ValueError(f"--model {dit} generates {pipe.config.width}x{pipe.config.height}; --config {cfg.name} "
                         f"is {cfg.width}x{cfg.height}")
    caps = ProceduralVideos(num, seed, cfg.height, cfg.width, 1, max_objects=2)
    stride, fpc = pipe.config.vae_stride[0], pipe.config.frames_per_chunk
    keep = 1 + (frames - 1) // stride
    whole = 1 + stride * (math.ceil(keep / fpc) * fpc - 1)  # pixel frames of the covering chunks
    lat = []
    for i in range(num):
        s = pipe.stream(caps[i]["caption"], seed=seed + i, frames=whole, latents_only=True)
        list(s)
        lat.append(torch.cat(s.latents, dim=2)[0, :, :keep])
    return torch.stack(lat)


@torch.no_grad()
def teacher_pool(vae: VideoVAE, videos: torch.Tensor | None, extra: torch.Tensor | None, noise: float, seed: int,
                 batch: int = 8, perturb_every: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents float [N, C, F, h, w], the full decoder's frames uint8 [N, 3, T, H, W]); every
    `perturb_every`-th clip's encoder latents get Gaussian noise of std `noise`."""
    g = torch.Generator().manual_seed(seed)
    lat = []
    if videos is not None:
        for i in range(0, len(videos), batch):
            z = vae.encode(videos[i:i + batch])
            eps = torch.randn(z.shape, generator=g)
            keep = (torch.arange(i, i + len(z)) % perturb_every != perturb_every - 1).view(-1, 1, 1, 1, 1)
            lat.append(torch.where(keep, z, z + noise * eps))
    if extra is not None:
        lat.append(extra.float())
    latents = torch.cat(lat)
    net = VaeDecodeNet(vae)
    frames = torch.cat([_to_u8(net.first(latents[i:i + batch])[0]) for i in range(0, len(latents), batch)])
    return latents, frames


def pool_psnr(tiny: TinyDecoder, latents: torch.Tensor, frames: torch.Tensor, batch: int = 8) -> float:
    """PSNR (dB, on uint8 pixels) of the tiny decoder's frames against the full decoder's."""
    out = torch.cat([_to_u8(tiny.first(latents[i:i + batch])[0]) for i in range(0, len(latents), batch)])
    return psnr(out.float() / 127.5 - 1, frames.float() / 127.5 - 1)


def chunk_seconds(net, cfg: ModelConfig, repeats: int = 5) -> float:
    """Median seconds of one steady chunk (decode_next) at the model's geometry, batch 1."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(cfg.chunk_shape(1), generator=g)
    s = net.stream(1)
    s.decode_chunk(lat)  # the first chunk, and a warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.decode_chunk(lat)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def toybench_compare(dit: str, vae: VideoVAE, tiny: TinyDecoder, prompts: int, frames: int | None) -> dict:
    """ToyBench of the DiT's videos decoded by the full decoder and by the tiny one (the same
    latents: one stream, both decoders)."""
    from asd_deploy.pipeline import Pipeline
    from asd_deploy.vae import to_uint8_frames

    from .data import eval_prompts
    from .toybench import score_many

    pipe = Pipeline.from_pretrained(dit)
    full, small = VaeDecodeNet(vae).stream(), tiny.stream()
    videos = {"vae": [], "tiny": []}
    caps = eval_prompts(prompts)
    for p in caps:
        s = pipe.stream(p, steps=1, ffe=True, seed=0, frames=frames, latents_only=True)
        list(s)
        full.reset()
        small.reset()
        for name, dec in (("vae", full), ("tiny", small)):
            videos[name].append(np.concatenate([to_uint8_frames(dec.decode_chunk(c)) for c in s.latents]))
    scores = {name: score_many(v, caps) for name, v in videos.items()}
    return {"prompts": prompts, "dit": dit, "vae": scores["vae"], "tiny": scores["tiny"],
            "overall_diff": scores["tiny"]["overall"] - scores["vae"]["overall"]}


def train_tiny_decoder(out: Path, vae: str | Path, model: str | None = "default", config: str | None = None,
                       arch: str = "demo", data: str = "procedural",
                       clips: int = 512, clip_frames: int = 13, latent_noise: float = 0.2, generated: int = 64,
                       steps: int = 3000, batch: int = 8, lr: float = 2e-3,
                       amp: str | None = None, seed: int = 0, save_every: int = 250, resume: bool = False,
                       eval_clips: int = 16, toybench_prompts: int = 8, speed_repeats: int = 5,
                       init: str | Path | None = None, speed_scale: float = 1.0, log=print) -> dict:
    """Distil, evaluate, save (atomically) and return the report. `model`: the DiT for generated
    latents and ToyBench ("default" or a model folder; None: neither); `config`: the geometry
    (default: the model's); `steps`: training steps; `init`: a trained tiny-decoder folder of the
    same `arch` to start from (a fine-tune: longer training, or another data set); `speed_scale`: the
    procedural clips' motion speed (the DiT's `data.speed_scale`, so the pool looks like its latents)."""
    from tqdm import tqdm

    from asd_deploy.checkpoint import atomic_write
    from asd_deploy.backends.manifest import stage_key

    quiet = log is None
    log = log or (lambda msg: None)
    dit = None if model in (None, "none") else model
    cfg = model_config(dit, config)
    if arch not in TINY_DECODER_ARCHS:
        raise ValueError(f"--arch {arch!r}; valid: {sorted(TINY_DECODER_ARCHS)}")
    if clip_frames < 1 or (clip_frames - 1) % cfg.vae_stride[0]:
        raise ValueError(f"--clip-frames {clip_frames}: expected 1 + {cfg.vae_stride[0]}k frames")
    if min(steps, batch, clips, eval_clips) < 1 or generated < 0:
        raise ValueError("steps, batch, clips and eval_clips must be >= 1 and generated >= 0")
    if not 0 < speed_scale <= MAX_SPEED_SCALE:
        raise ValueError(f"speed_scale must be in (0, {MAX_SPEED_SCALE}] (a multiple of the grammar's speeds); "
                         f"got {speed_scale}")
    if amp not in (None, "bf16"):
        raise ValueError(f"amp={amp!r}; valid: None (fp32) or 'bf16'")
    if generated and dit is None:
        generated = 0  # no DiT: encoder latents only
    teacher = VideoVAE.from_pretrained(vae)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        tiny = TinyDecoder(TINY_DECODER_ARCHS[arch], source=f"distilled from {vae}").train()
    if init is not None:
        start_from = TinyDecoder.from_pretrained(init)
        if start_from.config.to_dict() != tiny.config.to_dict():
            raise ValueError(f"--init {init} is a {start_from.config.name!r} tiny decoder "
                             f"({start_from.config.to_dict()}); --arch {arch} is {tiny.config.to_dict()}: "
                             f"pass the --arch it was trained with")
        tiny.load_state_dict(start_from.state_dict())
    if (tiny.z_dim, tiny.spatial_stride, tiny.temporal_stride) != \
            (teacher.z_dim, teacher.spatial_stride, teacher.temporal_stride):
        raise ValueError(f"--arch {arch} decodes {tiny.z_dim} channels at stride ({tiny.temporal_stride}, "
                         f"{tiny.spatial_stride}); the VAE has {teacher.z_dim} at ({teacher.temporal_stride}, "
                         f"{teacher.spatial_stride})")
    if teacher.spatial_stride != cfg.vae_stride[1]:
        raise ValueError(f"the VAE's spatial stride {teacher.spatial_stride} is not config {cfg.name}'s "
                         f"{cfg.vae_stride[1]}")

    # ---- the teacher's pool (cached: the costly part, deterministic) -----------------------------
    t0 = time.perf_counter()
    pool_path = Path(str(out) + ".pool.pt")
    from asd_deploy.decoders.engine import decoder_hash
    key = stage_key(vae=decoder_hash(VaeDecodeNet(teacher)), config=cfg.to_dict(), data=data, clips=clips,
                    frames=clip_frames, noise=latent_noise, generated=generated, dit=dit, seed=seed, eval=eval_clips,
                    **({"speed": speed_scale} if speed_scale != 1.0 else {}))  # a speed-1 pool keeps its key
    pool = torch.load(pool_path, weights_only=True) if pool_path.is_file() else None
    if pool is None or pool.get("key") != key:
        log(f"teacher: encoding and decoding {clips} training + {eval_clips} held-out clips of {clip_frames} frames "
            f"({data}){f' and {generated} DiT-generated' if generated else ''} ...")
        gen = generated_latents(dit, generated + max(1, generated // 8), clip_frames, cfg, seed + 7) if generated \
            else None
        train_lat, train_px = teacher_pool(teacher, load_clips(data, clips, clip_frames, cfg, seed, speed_scale),
                                           None if gen is None else gen[:generated], latent_noise, seed)
        held = load_clips(data, eval_clips, clip_frames, cfg, seed + 1, speed_scale)
        held_lat, held_px = teacher_pool(teacher, held, None, 0.0, seed + 1)  # the encoder's latents as they are
        noisy_lat, noisy_px = teacher_pool(teacher, held, None, latent_noise, seed + 2, perturb_every=1)
        pool = {"key": key, "train_lat": train_lat, "train_px": train_px, "held_lat": held_lat, "held_px": held_px,
                "held_noisy_lat": noisy_lat, "held_noisy_px": noisy_px}
        if gen is not None:
            pool["gen_lat"], pool["gen_px"] = teacher_pool(teacher, None, gen[generated:], 0.0, seed)
        atomic_write(pool_path, lambda tmp: torch.save(pool, tmp))
        log(f"teacher pool: {len(pool['train_lat'])} clips in {time.perf_counter() - t0:.0f} s -> {pool_path}")
    train_lat, train_px = pool["train_lat"], pool["train_px"]

    # ---- distillation ------------------------------------------------------------------------
    opt = torch.optim.Adam(tiny.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to 5%
        opt, lambda s: 0.05 + 0.475 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)  # batches: the only randomness of the loop
    history, start, train_s = [], 0, 0.0
    state = state_path(out)
    if resume and state.is_file():
        start, train_s, history = load_state(state, tiny, opt, sched, g)
        log(f"resumed {state} at step {start}")
    t1 = time.perf_counter() - train_s
    drop = tiny.temporal_stride - 1  # a video's first latent frame decodes to its last frame of 4
    bar = tqdm(range(start, steps), desc="tiny decoder", unit="step", disable=quiet, initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(train_lat), (batch,), generator=g)
        target = train_px[idx].float() / 127.5 - 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            pred = tiny.decode(train_lat[idx])[0][:, :, drop:].float()
        loss = (pred - target).abs().mean() + (pred - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_state(state, tiny, opt, sched, g, step + 1, time.perf_counter() - t1, history)
    train_s = time.perf_counter() - t1
    tiny.eval().requires_grad_(False)

    # ---- report ------------------------------------------------------------------------------
    full_s, tiny_s = chunk_seconds(VaeDecodeNet(teacher), cfg, speed_repeats), chunk_seconds(tiny, cfg, speed_repeats)
    report = {"vae": str(vae), "model": dit, "geometry": cfg.name, "arch": arch, "config": tiny.config.to_dict(),
              "data": data, "speed_scale": speed_scale,
              "clips": clips, "clip_frames": clip_frames, "latent_noise": latent_noise, "generated": generated,
              "steps": steps, "batch": batch, "lr": lr, "amp": amp, "seed": seed,
              "init": None if init is None else str(init),
              "train_seconds": round(train_s, 1), "params": sum(p.numel() for p in tiny.parameters()),
              "speed": {"geometry": f"{cfg.width}x{cfg.height}, chunks of {cfg.frames_per_chunk} latent frames",
                        "full_decoder_chunk_s": full_s, "tiny_decoder_chunk_s": tiny_s, "speedup": full_s / tiny_s,
                        "goal_speedup": 10.0},
              "psnr_db": {"heldout_vs_full_decoder": round(pool_psnr(tiny, pool["held_lat"], pool["held_px"]), 2),
                          "heldout_perturbed_vs_full_decoder":
                              round(pool_psnr(tiny, pool["held_noisy_lat"], pool["held_noisy_px"]), 2),
                          "goal": 30.0},
              "history": history}
    if init is not None and (Path(init) / "train_report.json").is_file():  # the lineage, as the VAE's report keeps it
        before = json.loads((Path(init) / "train_report.json").read_text())
        report["previous"] = {k: v for k, v in before.items() if k != "history"}
    if "gen_lat" in pool:
        report["psnr_db"]["generated_vs_full_decoder"] = round(pool_psnr(tiny, pool["gen_lat"], pool["gen_px"]), 2)
    if dit is not None and toybench_prompts:
        report["toybench"] = toybench_compare(dit, teacher, tiny, toybench_prompts,
                                              cfg.pixel_frames_for(cfg.max_cache_frames))
        report["toybench"]["goal_abs_diff"] = 0.02
    tiny.source = str(out)
    tiny.save(out, extra={"train_report.json": json.dumps(report, indent=2)})
    state.unlink(missing_ok=True)
    tb = report.get("toybench")
    log(f"tiny decoder: {report['speed']['speedup']:.1f}x faster than the full decoder, PSNR "
        f"{report['psnr_db']['heldout_vs_full_decoder']} dB against it (held out)"
        + (f", ToyBench overall {tb['tiny']['overall']:.3f} vs {tb['vae']['overall']:.3f}" if tb else "")
        + f"; saved {out}")
    return report


def main(argv=None) -> int:
    from asd_deploy.cli import add_quiet, positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.tiny_decoder", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae", required=True, help="the full VAE (a diffusers AutoencoderKLWan folder): the teacher")
    p.add_argument("--out", required=True, help="output tiny-decoder folder")
    p.add_argument("--model", default="default",
                   help="the DiT ('default', a model folder, or 'none'): generated latents and ToyBench")
    p.add_argument("--config", default=None, help="config preset whose geometry to train at (default: the model's)")
    p.add_argument("--arch", default="demo", help=f"architecture: {sorted(TINY_DECODER_ARCHS)}")
    p.add_argument("--data", default="procedural", help="'procedural' or a folder of NAME.mp4 + NAME.txt")
    p.add_argument("--clips", type=positive_int, default=512, help="training clips in the teacher pool")
    p.add_argument("--speed-scale", type=float, default=1.0,
                   help="procedural clips' motion speed, a multiple of the grammar's (the DiT's data.speed_scale)")
    p.add_argument("--clip-frames", type=int, default=13,
                   help="pixel frames per clip (1 + 4k); the decode is exactly causal, so short clips train streaming")
    p.add_argument("--latent-noise", type=float, default=0.2, help="noise std on every other clip's latents")
    p.add_argument("--generated", type=int, default=64, help="DiT-generated latent clips added to the pool")
    p.add_argument("--max-steps", type=positive_int, default=3000, help="training steps")
    p.add_argument("--steps", type=str, default=None, help=argparse.SUPPRESS)  # denoising steps elsewhere
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--amp", default=None, choices=["bf16"], help="bf16 autocast (default fp32)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--save-every", type=int, default=250, help="resumable state every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt if it exists")
    p.add_argument("--init", default=None,
                   help="start from this trained tiny-decoder folder (same --arch): train longer or fine-tune")
    p.add_argument("--eval-clips", type=positive_int, default=16, help="held-out clips for the PSNR")
    p.add_argument("--toybench-prompts", type=int, default=8, help="ToyBench prompts with a --model (0: skip)")
    add_quiet(p)
    a = p.parse_args(argv)
    check_speed_scale_arg(p, a.speed_scale)
    if a.steps is not None:
        p.error(f"--steps is the number of denoising steps in every asd-deploy tool; the decoder's training "
                f"length is --max-steps (e.g. --max-steps {a.steps})")

    def run():
        train_tiny_decoder(Path(a.out), a.vae, model=a.model, config=a.config, arch=a.arch, data=a.data,
                           clips=a.clips, clip_frames=a.clip_frames, latent_noise=a.latent_noise,
                           generated=a.generated, steps=a.max_steps, batch=a.batch, lr=a.lr, amp=a.amp, seed=a.seed,
                           save_every=a.save_every, resume=a.resume, eval_clips=a.eval_clips,
                           toybench_prompts=a.toybench_prompts, init=a.init, speed_scale=a.speed_scale,
                           log=None if a.quiet else print)
        return 0
    return run_command(run, interrupted=f"interrupted; rerun with --resume to continue from {a.out}.state.pt")


if __name__ == "__main__":
    raise SystemExit(main())
