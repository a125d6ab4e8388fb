"""Long videos: does the shipped student keep its background and its object for 20 seconds?

    python -m training.longvideo [--model default] [--chunks 27] [--prompts 8] [--seeds 0 1]
                                 [--out training/reports/longvideo]

Owns: `chunk_scores` (per chunk of a decoded video, ToyBench's presence of the named objects,
the named background and the clean-pixel share, combined as `consistency`) and the CLI, which
generates each prompt x seed twice, with the model's rolling window (its `max_cache_frames`,
with sink frames) and with a cache that holds the whole video (no eviction), and writes a
per-chunk table. 27 chunks = 81 latent frames = 321 frames, 20 s at 16 fps. Does not own the
scorer (`toybench.py`) or generation.

Per chunk c (its pixel frames): consistency = presence * background * (1 - artifact - stray), each
from `toybench.score_video` on those frames. The motion term is left out: after a bounce the
caption's initial direction no longer holds, and a chunk is too short to judge it alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import toybench
from .data import eval_prompts


def chunk_scores(video: np.ndarray, caption: str, frames_per_chunk: list[int]) -> list[dict]:
    """Per chunk of uint8 [T, H, W, 3] (split by `frames_per_chunk`): presence, background,
    clean pixel share and their product `consistency`."""
    out, start = [], 0
    for n in frames_per_chunk:
        s = toybench.score_video(video[start:start + n], caption)
        clean = max(0.0, 1.0 - s["artifact_rate"] - s["stray_rate"])
        out.append({"presence": s["presence"], "background": s["background"], "clean": clean,
                    "consistency": s["presence"] * s["background"] * clean})
        start += n
    return out


@torch.no_grad()
def run(model: str, num_chunks: int, prompts: list[str], seeds: list[int], steps: int = 1, ffe: bool = True,
        ffe_steps: int = 4, log=print) -> dict:
    from asd_deploy.generator import EagerStep, generate
    from asd_deploy.model import build_model
    from asd_deploy.pipeline import Pipeline
    from asd_deploy.schedule import Schedule
    from asd_deploy.vae import to_uint8_frames

    pipe = Pipeline.from_pretrained(model)
    base = pipe.step.model
    cfg = base.config
    whole = dataclasses.replace(cfg, max_cache_frames=num_chunks * cfg.frames_per_chunk)
    full = build_model(whole, seed=None)
    full.load_state_dict(base.state_dict())
    settings = {f"rolling window ({cfg.max_cache_frames} frames, {cfg.sink_frames} sink)": EagerStep(base),
                f"whole video in the cache ({whole.max_cache_frames} frames)": EagerStep(full)}
    result = {"model": model, "chunks": num_chunks, "pixel_frames": cfg.pixel_frames_for(num_chunks * cfg.frames_per_chunk),
              "steps": steps, "ffe": ffe, "ffe_steps": ffe_steps, "prompts": prompts, "seeds": seeds, "settings": {}}
    for name, step in settings.items():
        per_chunk = []
        for prompt in prompts:
            ctx = pipe.encode_prompt(prompt)
            for seed in seeds:
                dec = pipe.vae.stream_decoder()
                frames, sizes = [], []
                for lat in generate(step, ctx, num_chunks=num_chunks, schedule=Schedule(steps, ffe, ffe_steps), seed=seed):
                    f = to_uint8_frames(dec.decode_chunk(lat))
                    frames.append(f)
                    sizes.append(len(f))
                per_chunk.append(chunk_scores(np.concatenate(frames), prompt, sizes))
        means = {k: [float(np.mean([v[c][k] for v in per_chunk])) for c in range(num_chunks)]
                 for k in ("consistency", "presence", "background", "clean")}
        result["settings"][name] = means
        log(f"{name}: consistency first 3 chunks {np.mean(means['consistency'][:3]):.3f}, "
            f"last 3 {np.mean(means['consistency'][-3:]):.3f}")
    return result


def to_markdown(result: dict) -> str:
    names = list(result["settings"])
    lines = [f"Long videos (`python -m training.longvideo`): model {result['model']}, {result['chunks']} chunks = "
             f"{result['pixel_frames']} frames, {result['steps']} step(s){' + FFE' if result['ffe'] else ''}, "
             f"{len(result['prompts'])} prompts x seeds {result['seeds']}. Per chunk: presence x background x "
             f"clean pixels (ToyBench).", "", "| chunk | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in range(result["chunks"]):
        lines.append(f"| {c} | " + " | ".join(f"{result['settings'][n]['consistency'][c]:.3f}" for n in names) + " |")
    lines.append("| mean, chunks 0-2 | " + " | ".join(
        f"{np.mean(result['settings'][n]['consistency'][:3]):.3f}" for n in names) + " |")
    lines.append(f"| mean, last 3 | " + " | ".join(
        f"{np.mean(result['settings'][n]['consistency'][-3:]):.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from asd_deploy.cli import add_schedule_args, positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.longvideo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="'default' or a model folder")
    p.add_argument("--chunks", type=positive_int, default=27, help="chunks per video (27: 321 frames, 20 s at 16 fps)")
    p.add_argument("--prompts", type=positive_int, default=8, help="how many of eval_prompts() (one object each)")
    p.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1])
    add_schedule_args(p)
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return run_command(_main, p.parse_args(argv))


def _main(a) -> int:
    prompts = [q for q in eval_prompts(2 * a.prompts) if " and " not in q][:a.prompts]
    result = run(a.model, a.chunks, prompts, a.seeds, a.steps, a.ffe, ffe_steps=a.ffe_steps)
    md = to_markdown(result)
    print(md)
    if a.out:
        from asd_deploy.checkpoint import atomic_write
        out = Path(a.out)
        atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
