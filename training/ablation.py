"""The toy analogue of the paper's Table 2: teacher vs DMD-only vs ASD students, scored by ToyBench.

Owns: `sample_teacher` (the teacher at its multi-step setting: an Euler flow-matching sampler with
classifier-free guidance, chunk by chunk, with one KV cache per guidance branch), `evaluate_row`
(generate over the fixed prompt set and seeds, decode, score) and `python -m training.ablation`,
which writes the table as Markdown and JSON. Does not own the scorer (`toybench.py`), the students'
sampler (`asd_deploy.generator.generate`) or training.

    python -m training.ablation --teacher out/train/default/teacher/checkpoint.pt \\
        --dmd out/train/default-dmd/distill/checkpoint.pt --asd out/train/default/distill/checkpoint.pt \\
        --vae out/vae --out training/reports/ablation
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asd_deploy.checkpoint import atomic_write, load_checkpoint
from asd_deploy.config import ModelConfig
from asd_deploy.generator import EagerStep, SeededNoise, generate, sample_chunks
from asd_deploy.schedule import EulerSchedule, Schedule
from asd_deploy.text import load_text_encoder
from asd_deploy.vae import VideoVAE, to_uint8_frames

from . import toybench
from .data import eval_prompts


@torch.no_grad()
def sample_teacher(step: EagerStep, context: torch.Tensor, num_chunks: int, steps: int = 20,
                   guidance: float = 3.0, shift: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Latents [B, C, 3 * num_chunks, h, w]: per chunk, `steps` Euler steps of the guided flow
    v = v(null) + g * (v(prompt) - v(null)) from sigma 1 to 0, then the clean pass into both
    branches' caches (`sample_chunks` with an `EulerSchedule`)."""
    return torch.cat(list(sample_chunks(step, context, num_chunks=num_chunks, schedule=EulerSchedule(steps, shift),
                                        noise=SeededNoise(seed, step.device), guidance=guidance)), dim=2)


def evaluate_row(name: str, sample, vae: VideoVAE, contexts: torch.Tensor, prompts: list[str],
                 seeds: list[int]) -> dict:
    """`sample(context [1, L, D], seed) -> latents`; decode, score every (prompt, seed) video."""
    videos, captions, t0 = [], [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            lat = sample(contexts[i:i + 1], seed)
            videos.append(to_uint8_frames(vae.decode(lat)))
            captions.append(prompt)
    scores = toybench.score_many(videos, captions)
    return {"name": name, **scores, "videos": len(videos), "seconds": round(time.perf_counter() - t0, 1)}


def reconstruction_row(vae: VideoVAE, config: ModelConfig, num: int, num_chunks: int, seed: int = 4321) -> dict:
    """The ceiling any generator can reach through this VAE: real procedural videos (not the eval
    prompts: the same grammar), encoded and decoded, scored against their own captions."""
    from .data import ProceduralVideos

    frames = config.pixel_frames_for(num_chunks * config.frames_per_chunk)
    ds = ProceduralVideos(num_samples=num, seed=seed, height=config.height, width=config.width, frames=frames)
    videos, captions = [], []
    for i in range(num):
        item = ds[i]
        x = torch.from_numpy(item["video"]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        videos.append(to_uint8_frames(vae.decode(vae.encode(x))))
        captions.append(item["caption"])
    return {"name": "real videos through the VAE (ceiling)", **toybench.score_many(videos, captions),
            "videos": num, "seconds": 0.0}


def student_sampler(model, schedule: Schedule, num_chunks: int):
    step = EagerStep(model)
    return lambda ctx, seed: torch.cat(list(generate(step, ctx, num_chunks=num_chunks, schedule=schedule,
                                                     seed=seed)), dim=2)


def run(teacher: Path, students: dict[str, Path], vae: Path, config: ModelConfig, num_prompts: int = 8,
        seeds=(0, 1), num_chunks: int = 3, teacher_steps: int = 20, guidance: float = 3.0,
        text_encoder: str = "default", log=print) -> list[dict]:
    prompts = eval_prompts(num_prompts)
    enc = load_text_encoder(text_encoder, config.text_len)
    contexts = enc.encode(prompts).float().cpu()
    vae_ = VideoVAE.from_pretrained(vae)
    rows = [reconstruction_row(vae_, config, len(prompts) * len(seeds), num_chunks)]
    log(toybench.format_table(rows))
    t_model = EagerStep(load_checkpoint(teacher, config, prefer="generator_ema"))
    rows.append(evaluate_row(f"teacher ({teacher_steps} steps, CFG {guidance})", lambda c, s: sample_teacher(
        t_model, c, num_chunks, teacher_steps, guidance, seed=s), vae_, contexts, prompts, list(seeds)))
    log(toybench.format_table(rows[-1:]))
    for label, path in students.items():
        model = load_checkpoint(path, config, prefer="generator_ema")
        for steps in (1, 2):
            for ffe in (False, True):
                sched = Schedule(steps=steps, ffe=ffe)
                rows.append(evaluate_row(f"{label}, {sched.describe()}", student_sampler(model, sched, num_chunks),
                                         vae_, contexts, prompts, list(seeds)))
                log(toybench.format_table(rows[-1:]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher checkpoint.pt")
    p.add_argument("--dmd", help="DMD-only student checkpoint.pt")
    p.add_argument("--asd", help="ASD student checkpoint.pt")
    p.add_argument("--vae", required=True, help="VAE folder")
    p.add_argument("--config", default="tiny", help="model config preset of all three")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--out", default="training/reports/ablation", help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    students = {k: Path(v) for k, v in (("DMD only", a.dmd), ("ASD (DMD + alpha L_ASD)", a.asd)) if v}
    rows = run(Path(a.teacher), students, Path(a.vae), ModelConfig.preset(a.config), a.prompts, a.seeds, a.chunks,
               a.teacher_steps, a.guidance)
    out = Path(a.out)
    table = toybench.format_table(rows)
    meta = {"prompts": a.prompts, "seeds": a.seeds, "chunks": a.chunks, "checkpoints": {
        "teacher": a.teacher, "dmd": a.dmd, "asd": a.asd}, "vae": a.vae}
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({"rows": rows, **meta}, indent=2)))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table + "\n"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
