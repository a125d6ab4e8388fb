"""Where a teacher loses temporal coherence: ToyBench on frame ranges and under controlled inputs.

    python -m training.coherence --teacher training/checkpoints/teacher-speed2/checkpoint.pt \\
        --vae training/checkpoints/vae-speed2 --videos 16 --out training/reports/teacher-runs/coherence

Three measurements on the same procedural videos (the teacher's data grammar and speed), each
row with the mean of every ToyBench metric and a 95% interval of smoothness over videos:
  context   chunk 0 and the later chunks scored apart, for the real video through the VAE, the
            teacher from the caption alone (its own chunk 0 in its cache), and the teacher given
            the real chunk 0 (`prefill`): if the later chunks are as bad after the real chunk 0,
            the fault is the continuation itself, not the errors it inherits (exposure bias).
  sampler   chunk 0 alone under sampler variants (CFG, Euler steps, shift): a fault that no
            setting moves is the model's.
  noise     the real chunk 0's latents plus white noise of a given std (normalized latent units)
            through the VAE: how much unstructured latent error costs, against the teacher's.
(Motion on the later chunks is not comparable to the full-video figure: objects have bounced by
then, so the named direction no longer holds over their first frames.)

Owns the three measurements and the CLI; reuses the sampler (`asd_deploy.generator`), the
scorer (`toybench`) and the statistics and run-config readers of `ablation`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from asd_deploy.checkpoint import load_checkpoint
from asd_deploy.generator import EagerStep, SeededNoise, sample_chunks
from asd_deploy.schedule import EulerSchedule
from asd_deploy.text import load_text_encoder
from asd_deploy.vae import VideoVAE, from_uint8_frames, to_uint8_frames

from . import toybench
from .ablation import bootstrap_ci, data_speed_scale, model_config, write_report
from .data import ProceduralVideos, check_speed_scale_arg

KEYS = ("overall", "smoothness", "consistency", "shape", "presence", "motion")
SAMPLERS = {"CFG 3, 20 steps, shift 5 (the ablation's)": (3.0, 20, 5.0), "no CFG, 20 steps, shift 5": (None, 20, 5.0),
            "CFG 3, 50 steps, shift 5": (3.0, 50, 5.0), "CFG 3, 20 steps, shift 1": (3.0, 20, 1.0)}
NOISE_STDS = (0.0, 0.1, 0.2, 0.3, 0.5)


@torch.no_grad()
def measure(teacher: Path, vae_path: Path, config, videos: int = 16, chunks: int = 3, seed: int = 0,
            speed_scale: float = 1.0, text_encoder: str = "default") -> dict:
    """{"context": rows, "sampler": rows, "noise": rows}; each row {"name", metric means,
    "smoothness_lo", "smoothness_hi", "videos"}."""
    if chunks < 2:
        raise ValueError(f"--chunks {chunks}: at least 2 (chunk 0 and the chunks after it are scored apart)")
    vae = VideoVAE.from_pretrained(vae_path)
    step = EagerStep(load_checkpoint(teacher, config, prefer="generator_ema"))
    enc = load_text_encoder(text_encoder, config.text_len)
    fpc = config.frames_per_chunk
    first = config.pixel_frames_for(fpc)  # pixel frames of chunk 0
    ds = ProceduralVideos(num_samples=videos, seed=4321, height=config.height, width=config.width,
                          frames=config.pixel_frames_for(chunks * fpc), max_objects=2, speed_scale=speed_scale)
    g = torch.Generator().manual_seed(seed)
    per: dict[str, dict[str, list[dict]]] = {"context": {}, "sampler": {}, "noise": {}}

    def score(part: str, name: str, video: np.ndarray, caption: str):
        per[part].setdefault(name, []).append(toybench.score_video(video, caption, speed_scale))

    def sample(ctx, num, guidance=3.0, steps=20, shift=5.0, prefill=None):
        return torch.cat(list(sample_chunks(step, ctx, num_chunks=num, schedule=EulerSchedule(steps, shift),
                                            noise=SeededNoise(seed, step.device), guidance=guidance,
                                            prefill=prefill)), 2)

    for i in range(videos):
        item = ds[i]
        cap = item["caption"]
        z = vae.encode(from_uint8_frames(item["video"]))
        ctx = enc.encode([cap]).float()
        z0 = z[:, :, :fpc]
        runs = {"real video through the VAE": z, "teacher, its own chunk 0": sample(ctx, chunks),
                "teacher, given the real chunk 0": torch.cat([z0, sample(ctx, chunks - 1, prefill=z0)], 2)}
        for name, lat in runs.items():
            video = to_uint8_frames(vae.decode(lat))
            score("context", f"{name}: chunk 0", video[:first], cap)
            score("context", f"{name}: chunks 1-{chunks - 1}", video[first:], cap)
        for name, (guidance, steps, shift) in SAMPLERS.items():
            score("sampler", name, to_uint8_frames(vae.decode(sample(ctx, 1, guidance, steps, shift))), cap)
        for std in NOISE_STDS:
            noisy = z0 + std * torch.randn(z0.shape, generator=g)
            score("noise", f"real chunk 0 + noise std {std}", to_uint8_frames(vae.decode(noisy)), cap)
    out = {}
    for part, rows in per.items():
        out[part] = []
        for name, scores in rows.items():
            s = np.array([v["smoothness"] for v in scores])
            _, lo, hi = bootstrap_ci(s, np.arange(len(s)))
            out[part].append({"name": name, **{k: float(np.mean([v[k] for v in scores])) for k in KEYS},
                              "smoothness_lo": lo, "smoothness_hi": hi, "videos": len(scores)})
    return out


def to_markdown(result: dict, meta: dict) -> str:
    lines = [f"Temporal coherence of `{meta['teacher']}` (VAE `{meta['vae']}`): {meta['videos']} procedural videos "
             f"of {meta['chunks']} chunks at speed {meta['speed_scale']:g}, noise seed {meta['seed']}; smoothness with "
             f"its 95% interval over videos. Command: `{meta['command']}`."]
    titles = {"context": "Chunk 0 and the later chunks, scored apart (teacher: CFG 3, 20 Euler steps, shift 5)",
              "sampler": "Chunk 0 under sampler variants", "noise": "The real chunk 0's latents plus white noise"}
    for part, rows in result.items():
        lines += ["", f"### {titles[part]}", "", "| row | smoothness [95% CI] | " + " | ".join(KEYS[:1] + KEYS[2:])
                  + " |", "|---" * (len(KEYS) + 1) + "|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['smoothness']:.3f} [{r['smoothness_lo']:.3f}, {r['smoothness_hi']:.3f}] | "
                         + " | ".join(f"{r[k]:.3f}" for k in KEYS[:1] + KEYS[2:]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import sys

    from asd_deploy.cli import positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.coherence", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint.pt")
    p.add_argument("--vae", required=True, help="VAE folder")
    p.add_argument("--config", default="demo", help="model config preset, for a checkpoint without its run config")
    p.add_argument("--videos", type=positive_int, default=16)
    p.add_argument("--chunks", type=positive_int, default=3)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--speed-scale", type=float, default=None,
                   help="the data's motion speed; default: data.speed_scale of the teacher's run config")
    p.add_argument("--out", required=True, help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    if not Path(a.teacher).is_file():
        p.error(f"--teacher {a.teacher} does not exist")
    check_speed_scale_arg(p, a.speed_scale)
    a.command = "python -m training.coherence " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_command(_main, a)


def _main(a) -> int:
    speed = a.speed_scale if a.speed_scale is not None else data_speed_scale(a.teacher, [])
    result = measure(Path(a.teacher), Path(a.vae), model_config([a.teacher], a.config), a.videos, a.chunks, a.seed,
                     speed)
    meta = {"teacher": a.teacher, "vae": a.vae, "videos": a.videos, "chunks": a.chunks, "seed": a.seed,
            "speed_scale": speed, "command": a.command}
    print(write_report(Path(a.out), result, meta, to_markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
