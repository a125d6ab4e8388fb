"""The default model's VAE: a tiny `AutoencoderKLWan` trained on the procedural videos.

Owns: `train_vae` (foreground-weighted reconstruction L1 + MSE of the posterior mode and a small KL, AdamW with cosine decay, on clips
rendered once from `training.data.ProceduralVideos`), the latent statistics written into the
VAE config (`latents_mean` / `latents_std`, so `VideoVAE.normalize` gives unit-scale latents),
held-out reconstruction PSNR, and `python -m training.vae`. Does not own the network (diffusers)
or the streaming decode (`asd_deploy/vae.py`).

Why this VAE: Wan2.1's own VAE is 250 MB and made for 480p; the embedded default must stay
under 25 MB and run at 32x48 on a CPU. The tiny config keeps Wan's layout and strides (time 4,
space 8, z_dim 16), so every code path (causal streaming decode, normalization, exports) is
the one a real Wan VAE takes; on flat-coloured shapes it reconstructs well (PSNR in the report).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from asd_deploy.checkpoint import atomic_write
from asd_deploy.config import ModelConfig
from asd_deploy.vae import TINY_CONFIG, VideoVAE


def render(num: int, seed: int, frames: int, height: int, width: int, max_objects: int = 3) -> torch.Tensor:
    """Procedural videos as float [N, 3, T, H, W] in [-1, 1]."""
    from .data import ProceduralVideos

    ds = ProceduralVideos(num_samples=num, seed=seed, height=height, width=width, frames=frames,
                          max_objects=max_objects)
    v = torch.stack([torch.from_numpy(np.ascontiguousarray(ds[i]["video"])) for i in range(num)])
    return v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


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


def train_vae(out: Path, steps: int = 2500, batch: int = 4, lr: float = 1e-3, kl_weight: float = 1e-6,
              num_videos: int = 1024, clip_frames: int = 17, eval_videos: int = 32, seed: int = 0,
              fg_weight: float = 3.0,
              model: str = "tiny", init: Path | None = None, log=print) -> dict:
    """Train, normalize, evaluate and save a diffusers folder at `out` (atomically). Returns the report.
    `init`: a VAE folder to continue from (e.g. short clips first, then long ones); `log=None`: silent."""
    from diffusers import AutoencoderKLWan
    from tqdm import tqdm

    quiet = log is None
    log = log or (lambda msg: None)
    cfg = ModelConfig.preset(model)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train = render(num_videos, seed, clip_frames, cfg.height, cfg.width)
    held_out = render(eval_videos, seed + 1, cfg.pixel_frames_for(cfg.max_cache_frames), cfg.height, cfg.width)
    log(f"rendered {num_videos} training clips {list(train.shape[1:])} and {eval_videos} held-out videos "
        f"in {time.perf_counter() - t0:.1f} s")
    if init is not None:
        vae = AutoencoderKLWan.from_pretrained(str(init), local_files_only=True).train()
    else:
        vae = AutoencoderKLWan(z_dim=cfg.in_channels, **TINY_CONFIG).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    history, t1 = [], time.perf_counter()
    for step in tqdm(range(steps), desc="vae", unit="step", disable=quiet):
        x = train[torch.randint(0, num_videos, (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        # the posterior mode, not a sample: with sampled latents from the start the decoder learns to
        # ignore them (posterior collapse; seen here as background-only reconstructions)
        rec = vae.decode(posterior.mode()).sample
        w = foreground_weights(x, fg_weight)
        rec_loss = ((w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean())
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "recon": rec_loss.item(), "kl": kl.item()})
    train_s = time.perf_counter() - t1
    vae.eval()
    mean, std = latent_stats(vae, train[:256])
    vae.register_to_config(latents_mean=mean, latents_std=std)
    wrapped = VideoVAE(vae, source=f"trained tiny ({steps} steps on procedural videos)")
    report = {"init": str(init) if init else None, "steps": steps, "batch": batch, "lr": lr,
              "kl_weight": kl_weight, "fg_weight": fg_weight, "clip_frames": clip_frames, "train_seconds": round(train_s, 1),
              "heldout_psnr_db": round(evaluate(wrapped, held_out), 2),
              "heldout_videos": eval_videos, "heldout_frames": held_out.shape[2],
              "params": sum(p.numel() for p in vae.parameters()), "history": history}
    wrapped.save(out)
    atomic_write(Path(out) / "train_report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    log(f"VAE: held-out PSNR {report['heldout_psnr_db']} dB after {steps} steps ({train_s:.0f} s); saved {out}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.vae", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/vae", help="output diffusers AutoencoderKLWan folder")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--num-videos", type=int, default=1024)
    p.add_argument("--fg-weight", type=float, default=3.0, help="extra loss weight of object pixels")
    p.add_argument("--clip-frames", type=int, default=17, help="frames per training clip (1 + 4k)")
    p.add_argument("--init", default=None, help="continue from this VAE folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="tiny", help="model config preset whose resolution the VAE trains at")
    a = p.parse_args(argv)
    train_vae(Path(a.out), steps=a.steps, batch=a.batch, lr=a.lr, kl_weight=a.kl_weight, num_videos=a.num_videos,
              clip_frames=a.clip_frames, fg_weight=a.fg_weight, seed=a.seed, model=a.model, init=Path(a.init) if a.init else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
