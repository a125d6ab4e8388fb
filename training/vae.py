"""The default model's VAE: a tiny `AutoencoderKLWan` trained on the procedural videos.

Owns: `train_vae` (reconstruction L1 + MSE of the posterior mode, unclamped, plus a small KL;
Adam with cosine decay and gradient clipping; on clips rendered once from
`training.data.ProceduralVideos`: single frames first, then 9-frame clips), the latent
statistics written into the VAE config (`latents_mean` / `latents_std`, so `VideoVAE.normalize`
gives unit-scale latents), held-out reconstruction PSNR, and `python -m training.vae`. Does not
own the network (diffusers) or the streaming decode (`asd_deploy/vae.py`).

Why this VAE: Wan2.1's own VAE is 250 MB and made for 480p; the embedded default must stay
under 25 MB and run at 64x96 on a CPU. The small configs (`asd_deploy.vae.VAE_ARCHS`) keep Wan's
layout and strides (time 4, space 8, z_dim 16), so every code path (causal streaming decode,
normalization, exports) is the one a real Wan VAE takes. `deepen` grows a trained VAE to more
residual blocks per level without changing its outputs. Held-out PSNR of each run:
`train_report.json` in its output folder (the README's recipe gives the figures).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from asd_deploy.config import ModelConfig
from asd_deploy.vae import TINY_CONFIG, VideoVAE

from .data import MAX_SPEED_SCALE, check_speed_scale_arg
from .resume import load_state, save_state, state_path


def render(num: int, seed: int, frames: int, height: int, width: int, max_objects: int = 3,
           speed_scale: float = 1.0) -> torch.Tensor:
    """Procedural videos as float [N, 3, T, H, W] in [-1, 1] (`speed_scale`: as the DiT's `data.speed_scale`)."""
    from .data import ProceduralVideos

    ds = ProceduralVideos(num_samples=num, seed=seed, height=height, width=width, frames=frames,
                          max_objects=max_objects, speed_scale=speed_scale)
    v = torch.stack([torch.from_numpy(np.ascontiguousarray(ds[i]["video"])) for i in range(num)])
    return v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def held_out_videos(cfg: ModelConfig, seed: int, num: int, max_objects: int, speed_scale: float = 1.0,
                    image: bool = False) -> torch.Tensor:
    """The held-out set of a `seed` training run: `num` videos of seed + 1 at `speed_scale`, whole
    (the model's cache length in pixel frames), or single frames for an image phase (`image`)."""
    frames = 1 if image else cfg.pixel_frames_for(cfg.max_cache_frames)
    return render(num, seed + 1, frames, cfg.height, cfg.width, max_objects, speed_scale)


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """[B, 1, T, H, W]: 1 on the background, 1 + weight where a pixel differs from its frame's
    median colour. The shapes cover ~5% of a frame; unweighted, a tiny VAE first learns to paint
    the plain background alone (seen here: 15 dB, objects gone)."""
    bg = x.flatten(3).median(dim=3).values[..., None, None]  # [B, 3, T, 1, 1]
    fg = ((x - bg).abs().sum(1, keepdim=True) > 0.1).float()
    return 1 + weight * fg


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1], measured on the uint8 pixels a viewer sees."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@torch.no_grad()
def latent_stats(vae, videos: torch.Tensor, batch: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over `videos` (the normalization constants)."""
    zs = [vae.encode(videos[i:i + batch]).latent_dist.mode() for i in range(0, len(videos), batch)]
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [C, N*F*h*w]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


@torch.no_grad()
def evaluate(vae: VideoVAE, videos: torch.Tensor, batch: int = 8) -> float:
    recon = torch.cat([vae.decode(vae.encode(videos[i:i + batch])) for i in range(0, len(videos), batch)])
    return psnr(recon, videos)


def decode_for_training(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` without its final clamp to [-1, 1] (same causal frame loop and cache).
    Trained through the clamp, a pixel pushed past the wrong bound gets no gradient and stays dead."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)


@torch.no_grad()
def inflate_temporal(vae) -> int:
    """Make an image-trained Wan VAE a per-frame video VAE (I3D-style inflation); returns the
    number of layers changed. Each causal 3x3x3 convolution keeps only its last temporal tap (the
    one single frames trained), and each temporal resampler starts as an identity on the latest
    frame (downsampling keeps the later frame of a pair; upsampling repeats a frame). Fine-tuning on
    clips then learns the temporal taps from a working start (seen here: 18 dB on 9-frame clips at
    step 0, against 7 dB with the untrained temporal taps)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    changed = 0
    for m in vae.modules():
        if isinstance(m, WanResample) and hasattr(m, "time_conv"):
            w = m.time_conv.weight  # [k * C, C, 3, 1, 1]: k = 2 output frames (up) or 1 (down)
            c = w.shape[1]
            w.zero_()
            m.time_conv.bias.zero_()
            for k in range(w.shape[0] // c):
                w[k * c:(k + 1) * c, :, -1, 0, 0] = torch.eye(c)
            changed += 1
        elif isinstance(m, WanCausalConv3d) and m.weight.shape[2] > 1 and m.weight.shape[3] > 1:
            m.weight[:, :, :-1].zero_()
            changed += 1
    return changed


def deepen(vae, num_res_blocks: int):
    """A copy of a Wan VAE with `num_res_blocks` residual blocks per level (more than it has) that
    computes exactly what it did: each level keeps its trained blocks first (the first one changes
    the width) and gets new blocks after them whose last convolution is zero, so each new block is
    the identity until training moves it (the zero-init residual of a grown network). The middle
    blocks, resamplers and attention are copied unchanged."""
    from diffusers import AutoencoderKLWan

    cfg = dict(vae.config)
    old = int(cfg["num_res_blocks"])
    if num_res_blocks <= old:
        raise ValueError(f"num_res_blocks={num_res_blocks}: expected more than the VAE's {old}")
    if cfg.get("is_residual") or cfg.get("attn_scales"):
        raise ValueError("deepen supports the Wan2.1 layout (is_residual=False, no attn_scales)")
    keep = {k: v for k, v in cfg.items() if not k.startswith("_")}
    new = AutoencoderKLWan(**dict(keep, num_res_blocks=num_res_blocks))
    src, dst = vae.state_dict(), new.state_dict()
    levels = len(cfg["dim_mult"])

    def enc_index(level: int, block: int, nrb: int) -> int:  # flat down_blocks: nrb res blocks (+ a resample) per level
        return level * (nrb + 1) + block

    mapping = {}  # new key prefix -> old key prefix
    for lv in range(levels):
        for b in range(old):
            mapping[f"encoder.down_blocks.{enc_index(lv, b, num_res_blocks)}."] = f"encoder.down_blocks.{enc_index(lv, b, old)}."
        if lv != levels - 1:
            mapping[f"encoder.down_blocks.{enc_index(lv, num_res_blocks, num_res_blocks)}."] = \
                f"encoder.down_blocks.{enc_index(lv, old, old)}."
        for b in range(old + 1):
            mapping[f"decoder.up_blocks.{lv}.resnets.{b}."] = f"decoder.up_blocks.{lv}.resnets.{b}."
    grown = {f"encoder.down_blocks.{enc_index(lv, b, num_res_blocks)}." for lv in range(levels)
             for b in range(old, num_res_blocks)}
    grown |= {f"decoder.up_blocks.{lv}.resnets.{b}." for lv in range(levels) for b in range(old + 1, num_res_blocks + 1)}
    out, used = {}, set()
    for key, value in dst.items():
        prefix = next((p for p in mapping if key.startswith(p)), None)
        if prefix is not None:
            old_key = mapping[prefix] + key[len(prefix):]
        elif any(key.startswith(p) for p in grown):
            out[key] = torch.zeros_like(value) if ".conv2." in key else value
            continue
        else:
            old_key = key  # blocks outside the levels: convs in/out, middle, quant convs, upsamplers
        if old_key not in src or src[old_key].shape != value.shape:
            raise RuntimeError(f"deepen: no source for {key} (looked for {old_key})")
        out[key] = src[old_key].clone()
        used.add(old_key)
    missing = set(src) - used
    if missing:
        raise RuntimeError(f"deepen: {len(missing)} trained tensors left unused, e.g. {sorted(missing)[:3]}")
    new.load_state_dict(out)
    return new


def _random_crops(x: torch.Tensor, crop: tuple[int, int] | None, g: torch.Generator) -> torch.Tensor:
    """One random crop per clip of x [B, 3, T, H, W] (the same window on every frame)."""
    if crop is None:
        return x
    ch, cw = crop
    h, w = x.shape[-2:]
    ys = torch.randint(0, h - ch + 1, (len(x),), generator=g).tolist()
    xs = torch.randint(0, w - cw + 1, (len(x),), generator=g).tolist()
    return torch.stack([c[..., y:y + ch, x0:x0 + cw] for c, y, x0 in zip(x, ys, xs)])


def train_vae(out: Path, steps: int = 6000, batch: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              num_videos: int = 2048, clip_frames: int = 1, eval_videos: int = 32, seed: int = 0,
              fg_weight: float = 0.0, clip_grad: float = 1.0, max_objects: int = 2,
              model: str = "tiny", init: Path | None = None, inflate: bool = False, arch: str | None = None,
              crop: tuple[int, int] | None = None, amp: str | None = None, save_every: int = 0,
              resume: bool = False, speed_scale: float = 1.0, log=print) -> dict:
    """Train, normalize, evaluate and save a diffusers folder at `out` (atomically). Returns the report.

    The recipe (README) runs it three times: on single frames (`clip_frames=1`: the causal
    convolutions see only their last temporal tap, and an image batch is ~9x cheaper than a clip
    batch), first on random crops (`crop`: a fully convolutional net learns edges and colours from
    a quarter of the pixels), then on whole frames; then, from that folder (`init`,
    `inflate=True`: see `inflate_temporal`), on 9-frame clips so the temporal taps learn too. Adam
    with cosine decay to 10% and gradient clipping: at lr 1e-3 without clipping the loss climbs
    back to the mean-colour plateau (seen here). `amp="bf16"`: bf16 autocast (1.7x on an
    AVX-512-BF16 CPU; evaluation stays fp32). `save_every` > 0 writes a resumable state
    (`<out>.state.pt`) that `resume=True` continues from, bit for bit. `log=None`: silent.
    `arch` names a new VAE's architecture (default "tiny"); with `init`, an arch that is the init's
    with more residual blocks per level grows it first (`deepen`: the same outputs at step 0).
    `speed_scale`: the objects' speeds, as the DiT's `data.speed_scale` (train the VAE on the motion
    its DiT will draw); the held-out PSNR is measured at that speed, and at 1 too when it differs."""
    from diffusers import AutoencoderKLWan
    from tqdm import tqdm

    from asd_deploy.vae import VAE_ARCHS

    if clip_frames < 1 or (clip_frames - 1) % 4:
        raise ValueError(f"clip_frames={clip_frames}: expected 1 + 4k frames (the VAE's temporal stride is 4)")
    if arch is not None and arch not in VAE_ARCHS:
        raise ValueError(f"arch={arch!r}; valid: {sorted(VAE_ARCHS)}")
    if not 0 < speed_scale <= MAX_SPEED_SCALE:
        raise ValueError(f"speed_scale={speed_scale}: expected a value in (0, {MAX_SPEED_SCALE}]")
    if amp not in (None, "bf16"):
        raise ValueError(f"amp={amp!r}; valid: None (fp32) or 'bf16'")
    if steps < 1 or batch < 1 or num_videos < 1:
        raise ValueError(f"steps, batch and num_videos must be >= 1; got {steps}, {batch}, {num_videos}")
    quiet = log is None
    log = log or (lambda msg: None)
    cfg = ModelConfig.preset(model)
    if crop is not None and (crop[0] % 8 or crop[1] % 8 or crop[0] > cfg.height or crop[1] > cfg.width):
        raise ValueError(f"crop={crop}: expected multiples of 8 no larger than {cfg.height}x{cfg.width}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # uint8 pool (a quarter of the float memory), converted per batch
    train = ((render(num_videos, seed, clip_frames, cfg.height, cfg.width, max_objects, speed_scale) + 1) * 127.5)\
        .round().to(torch.uint8)
    # held out: whole videos (33 frames at tiny); single frames for an image phase, whose temporal taps are untrained
    held_out = held_out_videos(cfg, seed, eval_videos, max_objects, speed_scale, image=clip_frames == 1)
    log(f"rendered {num_videos} training clips {list(train.shape[1:])} and {eval_videos} held-out videos "
        f"in {time.perf_counter() - t0:.1f} s")
    if init is not None:
        vae = AutoencoderKLWan.from_pretrained(str(init), local_files_only=True).train()
        if arch is not None:
            want, have = VAE_ARCHS[arch], dict(vae.config)
            differ = sorted(k for k, v in want.items() if k != "num_res_blocks" and have.get(k) != v)
            if differ or want["num_res_blocks"] < have["num_res_blocks"]:
                raise ValueError(f"arch={arch!r} differs from the VAE at {init} in {differ or ['num_res_blocks']}: "
                                 f"--init continues a VAE of the same arch, or grows it to more residual blocks")
            if want["num_res_blocks"] > have["num_res_blocks"]:
                vae = deepen(vae, want["num_res_blocks"]).train()
                log(f"grew {init} from {have['num_res_blocks']} to {want['num_res_blocks']} residual blocks per level")
    else:
        vae = AutoencoderKLWan(z_dim=cfg.in_channels, **VAE_ARCHS[arch or "tiny"]).train()
    if inflate:
        if init is None:
            raise ValueError("inflate=True needs init: an image-trained VAE folder (clip_frames=1)")
        log(f"inflated {inflate_temporal(vae)} temporal layers of {init} to per-frame copies")
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    history, start, train_s = [], 0, 0.0
    state = state_path(out)
    if resume and state.is_file():
        start, train_s, history = load_state(state, vae, opt, sched, g)
        log(f"resumed {state} at step {start}")
    t1 = time.perf_counter() - train_s
    bar = tqdm(range(start, steps), desc="vae", unit="step", disable=quiet, initial=start, total=steps)
    for step in bar:
        x = _random_crops(train[torch.randint(0, num_videos, (batch,), generator=g)], crop, g)
        x = x.float() / 127.5 - 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            posterior = vae.encode(x).latent_dist
            # the posterior mode, not a sample: with sampled latents from the start the decoder learns to
            # ignore them (posterior collapse; seen here as background-only reconstructions)
            rec = decode_for_training(vae, posterior.mode()).float()
        w = foreground_weights(x, fg_weight) if fg_weight else torch.ones_like(x[:, :1])
        rec_loss = ((w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean())
        kl = posterior.kl().float().mean() / posterior.mean[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), clip_grad)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "recon": rec_loss.item(), "kl": kl.item()})
            bar.set_postfix(recon=f"{rec_loss.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_state(state, vae, opt, sched, g, step + 1, time.perf_counter() - t1, history)
    train_s = time.perf_counter() - t1
    vae.eval()
    mean, std = latent_stats(vae, train[:256].float() / 127.5 - 1.0)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    arch_name = arch or ("tiny" if init is None else f"as {init}")
    wrapped = VideoVAE(vae, source=f"trained {arch_name} ({steps} steps on procedural {clip_frames}-frame clips)")
    report = {"init": str(init) if init else None, "inflate": inflate, "arch": arch_name, "model": model,
              "num_res_blocks": int(vae.config.num_res_blocks), "speed_scale": speed_scale,
              "steps": steps, "batch": batch, "lr": lr, "seed": seed, "crop": list(crop) if crop else None, "amp": amp,
              "kl_weight": kl_weight, "fg_weight": fg_weight, "clip_frames": clip_frames,
              "max_objects": max_objects, "num_videos": num_videos, "train_seconds": round(train_s, 1),
              "heldout_psnr_db": round(evaluate(wrapped, held_out), 2),
              "heldout_videos": eval_videos, "heldout_frames": held_out.shape[2],
              "params": sum(p.numel() for p in vae.parameters()), "history": history}
    if speed_scale != 1.0:
        report["heldout_psnr_db_speed1"] = round(evaluate(wrapped, held_out_videos(
            cfg, seed, eval_videos, max_objects, image=clip_frames == 1)), 2)
    if init is not None:
        prev = Path(init) / "train_report.json"
        if prev.is_file():
            report["previous"] = json.loads(prev.read_text())
    wrapped.save(out, extra={"train_report.json": json.dumps(report, indent=2)})
    state.unlink(missing_ok=True)
    log(f"VAE: held-out PSNR {report['heldout_psnr_db']} dB after {steps} steps ({train_s:.0f} s); saved {out}")
    return report


def compare(folders: list[Path], model: str = "demo", speed_scale: float = 1.0, seed: int = 0,
            eval_videos: int = 32, max_objects: int = 2) -> list[dict]:
    """Held-out PSNR of several VAE folders on one held-out set (the set a `seed` training run
    holds out: `eval_videos` whole videos of seed + 1), at `speed_scale` and at speed 1, so runs
    whose reports used other sets or speeds can be read side by side."""
    cfg = ModelConfig.preset(model)
    speeds = sorted({1.0, float(speed_scale)})
    sets = {s: held_out_videos(cfg, seed, eval_videos, max_objects, s) for s in speeds}
    rows = []
    for folder in folders:
        vae = VideoVAE.from_pretrained(folder)
        rows.append({"vae": str(folder), "params": sum(p.numel() for p in vae.vae.parameters()),
                     "num_res_blocks": int(vae.vae.config.num_res_blocks),
                     **{f"psnr_db_speed{s:g}": round(evaluate(vae, sets[s]), 2) for s in speeds}})
    return rows


def main(argv=None) -> int:
    from asd_deploy.cli import add_deprecated, add_quiet, positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.vae", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/vae", help="output diffusers AutoencoderKLWan folder")
    p.add_argument("--max-steps", type=positive_int, default=6000, help="training steps")
    p.add_argument("--steps", type=str, default=None, help=argparse.SUPPRESS)  # denoising steps elsewhere
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--num-videos", type=positive_int, default=2048)
    p.add_argument("--fg-weight", type=float, default=0.0, help="extra loss weight of object pixels")
    p.add_argument("--clip-frames", type=int, default=1, help="frames per training clip (1 + 4k; 1 = images)")
    p.add_argument("--init", default=None, help="continue from this VAE folder")
    p.add_argument("--inflate", action="store_true",
                   help="start the temporal taps of --init (an image-trained VAE) as per-frame copies")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--max-objects", type=int, default=2, help="objects per scene, as the DiT's data config")
    p.add_argument("--config", default="tiny", help="model config preset whose resolution the VAE trains at")
    add_deprecated(p, "--model", "--config", dest="config")
    p.add_argument("--arch", default=None,
                   help="VAE architecture (asd_deploy.vae.VAE_ARCHS) of a new VAE (default tiny); with --init, the "
                        "init's arch with more residual blocks grows it (same outputs at step 0)")
    p.add_argument("--speed-scale", type=float, default=1.0,
                   help="the objects' speeds, as the DiT's data.speed_scale (held-out PSNR measured at it)")
    p.add_argument("--crop", default=None, help="HxW random crops of the frames (multiples of 8), e.g. 32x48")
    p.add_argument("--amp", default=None, choices=["bf16"], help="bf16 autocast (default fp32)")
    p.add_argument("--save-every", type=int, default=500, help="write a resumable state every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt if it exists")
    p.add_argument("--compare", nargs="+", default=None, metavar="VAE",
                   help="train nothing: held-out PSNR of these VAE folders on one held-out set (--seed's), at "
                        "--speed-scale and at 1, as a JSON list (to --report, else stdout)")
    p.add_argument("--report", default=None, help="with --compare: write the JSON here (atomically)")
    add_quiet(p)
    a = p.parse_args(argv)
    check_speed_scale_arg(p, a.speed_scale)
    if a.compare:
        from asd_deploy.checkpoint import atomic_write

        missing = [f for f in a.compare if not (Path(f) / "config.json").is_file()]
        if missing:
            p.error(f"--compare: {missing} are not VAE folders (no config.json)")
        videos = 32
        rows = compare([Path(f) for f in a.compare], a.config, a.speed_scale, a.seed, eval_videos=videos)
        text = json.dumps({"config": a.config, "speed_scale": a.speed_scale, "seed": a.seed,
                           "heldout_videos": videos, "rows": rows}, indent=1)
        if a.report:
            atomic_write(Path(a.report), lambda tmp: Path(tmp).write_text(text))
        print(text)
        return 0
    if a.steps is not None:
        p.error(f"--steps is the number of denoising steps in every asd-deploy tool; the VAE's training length "
                f"is --max-steps (e.g. --max-steps {a.steps})")
    crop = None
    if a.crop:
        try:
            crop = tuple(int(v) for v in a.crop.lower().split("x"))
        except ValueError:
            crop = ()
        if len(crop) != 2:
            p.error(f"--crop {a.crop!r}: expected HxW, e.g. 32x48")

    def run():
        train_vae(Path(a.out), steps=a.max_steps, batch=a.batch, lr=a.lr, kl_weight=a.kl_weight,
                  num_videos=a.num_videos, clip_frames=a.clip_frames, fg_weight=a.fg_weight, seed=a.seed,
                  max_objects=a.max_objects, model=a.config, init=Path(a.init) if a.init else None,
                  inflate=a.inflate, arch=a.arch, crop=crop, amp=a.amp, save_every=a.save_every,
                  resume=a.resume, speed_scale=a.speed_scale, log=None if a.quiet else print)
        return 0
    return run_command(run, interrupted=f"interrupted; rerun with --resume to continue from {a.out}.state.pt")


if __name__ == "__main__":
    raise SystemExit(main())
