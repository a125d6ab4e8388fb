"""The toy analogue of the paper's Table 2: DMD-only vs DMD + ASD students, with and without FFE,
at 1 and 2 steps, scored by ToyBench with bootstrap confidence intervals.

Owns: `sample_teacher` (the teacher at its multi-step setting: `sample_chunks` with an Euler
schedule and classifier-free guidance), the floor and ceiling rows (real videos, real videos
through the VAE, and `toybench.baselines`), `evaluate_row` (generate over a fixed prompt set x
seeds, decode, score every video; with `--tiny-decoder`, every row's latents decoded by both
decoders, paired), `bootstrap_ci` and the paired comparison, and
`python -m training.ablation`, which writes the table as Markdown and JSON. Does not own the
scorer (`toybench.py`), the sampler (`asd_deploy.generator`) or training.

    python -m training.ablation --config demo --vae out/vae-demo --teacher out/train/demo/teacher/checkpoint.pt \\
        --dmd out/train/demo-dmd-s0/distill/checkpoint.pt out/train/demo-dmd-s1/distill/checkpoint.pt \\
        --asd out/train/demo-s0/distill/checkpoint.pt out/train/demo-s1/distill/checkpoint.pt \\
        --prompts 32 --seeds 0 1 --out training/reports/ablation

Statistics. Every row scores the same prompts x noise seeds (per trained model: a student row
pools its training seeds). A row's 95% interval resamples prompts with replacement (10 000
draws; a prompt carries all its videos: seeds and training runs), so it covers the prompt set's
sampling error; the spread between training seeds is printed beside it. ASD - DMD differences
are paired: the same prompt, seed and training-seed index on both sides, resampled by prompt.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from asd_deploy.checkpoint import atomic_write, load_checkpoint
from asd_deploy.config import ModelConfig
from asd_deploy.generator import EagerStep, SeededNoise, generate, sample_chunks
from asd_deploy.schedule import EulerSchedule, Schedule
from asd_deploy.text import load_text_encoder
from asd_deploy.vae import VideoVAE, from_uint8_frames, to_uint8_frames

from . import toybench
from .data import ProceduralVideos, check_speed_scale_arg, eval_prompts

BOOTSTRAP = 10_000


@torch.no_grad()
def sample_teacher(step: EagerStep, context: torch.Tensor, num_chunks: int, steps: int = 20,
                   guidance: float = 3.0, shift: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Latents [B, C, 3 * num_chunks, h, w]: per chunk, `steps` Euler steps of the guided flow
    v = v(null) + g * (v(prompt) - v(null)) from sigma 1 to 0, then the clean pass into both
    branches' caches (`sample_chunks` with an `EulerSchedule`)."""
    return torch.cat(list(sample_chunks(step, context, num_chunks=num_chunks, schedule=EulerSchedule(steps, shift),
                                        noise=SeededNoise(seed, step.device), guidance=guidance)), dim=2)


def student_sampler(model, schedule: Schedule, num_chunks: int):
    step = EagerStep(model)
    return lambda ctx, seed: torch.cat(list(generate(step, ctx, num_chunks=num_chunks, schedule=schedule,
                                                     seed=seed)), dim=2)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, draws: int = BOOTSTRAP, seed: int = 0):
    """(mean, lo, hi): the mean of `values` and its 95% interval from resampling whole groups
    (prompts) with replacement."""
    values, groups = np.asarray(values, float), np.asarray(groups)
    keys = np.unique(groups)
    sums = np.array([values[groups == k].sum() for k in keys])
    counts = np.array([(groups == k).sum() for k in keys])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), (draws, len(keys)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(lo), float(hi)


def paired_difference(a: dict, b: dict, metric: str = "overall") -> dict:
    """b - a on the same videos (prompt, noise seed, training-seed index), CI by prompt."""
    va, vb = np.array([v[metric] for v in a["per_video"]]), np.array([v[metric] for v in b["per_video"]])
    keys_a = [(v["prompt"], v["seed"], v["run"]) for v in a["per_video"]]
    if keys_a != [(v["prompt"], v["seed"], v["run"]) for v in b["per_video"]]:
        raise ValueError(f"rows {a['name']!r} and {b['name']!r} did not score the same videos")
    mean, lo, hi = bootstrap_ci(vb - va, np.array([k[0] for k in keys_a]))
    return {"a": a["name"], "b": b["name"], "metric": metric, "diff": mean, "lo": lo, "hi": hi}


def _common_runs(a: dict, b: dict) -> tuple[dict, dict]:
    """Two rows restricted to the training runs both have (arms trained with different numbers
    of seeds pair run 0 with run 0, and so on)."""
    n = min(len(a["per_run"]), len(b["per_run"]))
    return tuple({**r, "per_video": [v for v in r["per_video"] if v["run"] < n]} for r in (a, b))


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


def _summarise(name: str, per_video: list[dict], seconds: float) -> dict:
    metrics = toybench.METRICS + toybench.EXTRA + toybench.DETAILS
    row = {"name": name, **{k: float(np.mean([v[k] for v in per_video])) for k in metrics}}
    mean, lo, hi = bootstrap_ci(np.array([v["overall"] for v in per_video]), np.array([v["prompt"] for v in per_video]))
    runs = sorted({v["run"] for v in per_video})
    row.update(overall_lo=lo, overall_hi=hi, videos=len(per_video), seconds=round(seconds, 1),
               per_run=[float(np.mean([v["overall"] for v in per_video if v["run"] == r])) for r in runs],
               per_video=per_video)
    return row


TINY_SUFFIX = ", tiny decoder"
CEILING_ROW, ENCODER_ROW = "real videos through the VAE (ceiling)", "real videos through the VAE encoder"


def decoders_for(vae: VideoVAE, tiny=None) -> dict:
    """Name suffix -> decode(latents) -> video in [-1, 1]: the VAE's decoder, and the tiny decoder
    on the same latents when one is given."""
    out = {"": vae.decode}
    if tiny is not None:
        out[TINY_SUFFIX] = lambda z: tiny.first(z.to(tiny.dtype))[0]
    return out


def evaluate_rows(name: str, samplers: list, decoders: dict, contexts: torch.Tensor, prompts: list[str],
                  seeds: list[int], speed_scale: float = 1.0) -> list[dict]:
    """`samplers[r](context [1, L, D], seed) -> latents` for each training run r; each video's
    latents decoded by every decoder (one row each, `name` + the decoder's suffix) and scored
    (`speed_scale`: the teacher's training data's, see `toybench.score_video`)."""
    per_video = {k: [] for k in decoders}
    t0 = time.perf_counter()
    for r, sample in enumerate(samplers):
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                latents = sample(contexts[i:i + 1], seed)
                for k, decode in decoders.items():
                    video = to_uint8_frames(decode(latents))
                    per_video[k].append({"prompt": prompt, "seed": seed, "run": r,
                                         **toybench.score_video(video, prompt, speed_scale)})
    return [_summarise(name + k, rows, time.perf_counter() - t0) for k, rows in per_video.items()]


def evaluate_row(name: str, samplers: list, vae: VideoVAE, contexts: torch.Tensor, prompts: list[str],
                 seeds: list[int]) -> dict:
    return evaluate_rows(name, samplers, decoders_for(vae), contexts, prompts, seeds)[0]


def reference_rows(vae: VideoVAE, config: ModelConfig, num: int, num_chunks: int, seed: int = 4321,
                   decoders: dict | None = None, speed_scale: float = 1.0) -> list[dict]:
    """Floor and ceiling: real procedural videos (the same grammar as the prompts, at the
    teacher's data speed), as rendered and through the VAE, and ToyBench's baselines (background
    only, a held frame, a wrong colour, a wrong direction), each scored against the real caption."""
    frames = config.pixel_frames_for(num_chunks * config.frames_per_chunk)
    ds = ProceduralVideos(num_samples=num, seed=seed, height=config.height, width=config.width, frames=frames,
                          max_objects=2, speed_scale=speed_scale)
    per: dict[str, list[dict]] = {}
    for i in range(num):
        item = ds[i]
        z = vae.encode(from_uint8_frames(item["video"]))
        videos = {"real videos": item["video"],
                  CEILING_ROW: to_uint8_frames(vae.decode(z)),
                  **{f"{ENCODER_ROW}{k}": to_uint8_frames(decode(z)) for k, decode in (decoders or {}).items() if k},
                  **{f"baseline: {k}": v for k, v in toybench.baselines(item).items()}}
        for name, video in videos.items():
            per.setdefault(name, []).append({"prompt": item["caption"], "seed": 0, "run": 0,
                                             **toybench.score_video(video, item["caption"], speed_scale)})
    return [_summarise(name, rows, 0.0) for name, rows in per.items()]


ROWS = {  # the paper's Table 2 names: (arm, FFE)
    "neither": ("DMD only", False), "ASD only": ("ASD", False), "FFE only": ("DMD only", True), "both": ("ASD", True)}


def run(teacher: Path | None, students: dict[str, list[Path]], vae: Path, config: ModelConfig, num_prompts: int = 32,
        seeds=(0, 1), num_chunks: int = 3, teacher_steps: int = 20, guidance: float = 3.0,
        text_encoder: str = "default", step_counts=(1, 2), log=print, tiny_decoder: Path | None = None,
        speed_scale: float = 1.0) -> dict:
    prompts = eval_prompts(num_prompts)
    enc = load_text_encoder(text_encoder, config.text_len)
    contexts = enc.encode(prompts).float().cpu()
    vae_ = VideoVAE.from_pretrained(vae)
    tiny = None
    if tiny_decoder is not None:
        from asd_deploy.decoders.tiny import TinyDecoder
        tiny = TinyDecoder.from_pretrained(tiny_decoder)
    decoders = decoders_for(vae_, tiny)
    rows = reference_rows(vae_, config, num_prompts, num_chunks, decoders=decoders, speed_scale=speed_scale)
    for r in rows:
        log(f"{r['name']}: {r['overall']:.3f}")
    if teacher is not None:
        t_model = EagerStep(load_checkpoint(teacher, config, prefer="generator_ema"))
        rows += evaluate_rows(f"teacher ({teacher_steps} steps, CFG {guidance})", [lambda c, s: sample_teacher(
            t_model, c, num_chunks, teacher_steps, guidance, seed=s)], decoders, contexts, prompts, list(seeds),
            speed_scale)
        log(f"{rows[-1]['name']}: {rows[-1]['overall']:.3f}")
    table2 = {}
    for arm, paths in students.items():
        models = [load_checkpoint(p, config, prefer="generator_ema") for p in paths]
        for steps in step_counts:
            for ffe in (False, True):
                sched = Schedule(steps=steps, ffe=ffe)
                row, *others = evaluate_rows(f"{arm}, {sched.describe()}", [student_sampler(m, sched, num_chunks)
                                                                           for m in models],
                                             decoders, contexts, prompts, list(seeds), speed_scale)
                rows += [row, *others]
                table2[(arm, steps, ffe)] = row
                log(f"{row['name']}: {row['overall']:.3f} [{row['overall_lo']:.3f}, {row['overall_hi']:.3f}]")
    by_name = {r["name"]: r for r in rows}
    twin_of = {f"{ENCODER_ROW}{TINY_SUFFIX}": CEILING_ROW}  # the one twin not named row + suffix
    decoder_diffs = [paired_difference(by_name[twin_of.get(r["name"], r["name"].removesuffix(TINY_SUFFIX))], r)
                     for r in rows if r["name"].endswith(TINY_SUFFIX)]
    diffs = []
    if {"DMD only", "ASD"} <= set(students):
        for steps in step_counts:
            for ffe in (False, True):
                a, b = _common_runs(table2[("DMD only", steps, ffe)], table2[("ASD", steps, ffe)])
                d = paired_difference(a, b)
                diffs.append({**d, "steps": steps, "ffe": ffe, "runs_paired": len({v["run"] for v in a["per_video"]})})
    return {"rows": rows, "differences": diffs, "decoder_differences": decoder_diffs, "table2": [
        {"row": label, "steps": steps, "overall": table2[(arm, steps, ffe)]["overall"],
         "lo": table2[(arm, steps, ffe)]["overall_lo"], "hi": table2[(arm, steps, ffe)]["overall_hi"]}
        for steps in step_counts for label, (arm, ffe) in ROWS.items() if (arm, steps, ffe) in table2]}


def to_markdown(result: dict, meta: dict) -> str:
    cols = ["overall", "adherence", "consistency", "smoothness", "artifact_rate", "stray_rate", "presence",
            "shape", "motion", "background"]
    speed = meta.get("speed_scale", 1.0)
    speed = "" if speed == 1.0 else f", objects at {speed:g}x the grammar's speeds"
    lines = [f"ToyBench, {meta['prompts']} prompts x seeds {meta['seeds']}, {meta['chunks']} chunks{speed}; "
             f"overall with its 95% bootstrap interval over prompts; `runs`: each training seed's mean.", "",
             "| row | overall [95% CI] | runs | " + " | ".join(cols[1:]) + " | videos |",
             "|---|---|---|" + "---|" * (len(cols) - 1) + "---|"]
    for r in result["rows"]:
        runs = ", ".join(f"{v:.3f}" for v in r["per_run"]) if len(r["per_run"]) > 1 else ""
        lines.append(f"| {r['name']} | {r['overall']:.3f} [{r['overall_lo']:.3f}, {r['overall_hi']:.3f}] | {runs} | "
                     + " | ".join(f"{r[c]:.3f}" for c in cols[1:]) + f" | {r['videos']} |")
    if result["table2"]:
        lines += ["", "Table 2 layout (overall [95% CI]):", "", "| row | steps | overall |", "|---|---|---|"]
        lines += [f"| {t['row']} | {t['steps']} | {t['overall']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}] |"
                  for t in result["table2"]]
    if result["differences"]:
        runs = {d.get("runs_paired") for d in result["differences"]}
        first = "" if len(runs) != 1 or None in runs else f"; the first {runs.pop()} training seed(s) of each arm"
        lines += ["", f"ASD - DMD only, paired (same prompts, seeds, training-seed index{first}):", "",
                  "| steps | FFE | difference in overall [95% CI] |", "|---|---|---|"]
        lines += [f"| {d['steps']} | {'yes' if d['ffe'] else 'no'} | {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |"
                  for d in result["differences"]]
    if result.get("decoder_differences"):
        lines += ["", "Tiny decoder - the VAE's decoder, paired (the same latents decoded by both):", "",
                  "| latents | difference in overall [95% CI] |", "|---|---|"]
        lines += [f"| {d['a']} | {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |"
                  for d in result["decoder_differences"]]
    return "\n".join(lines) + "\n"


def _run_config(checkpoint) -> dict | None:
    """The run config `training.train` writes beside a checkpoint (None without one)."""
    path = Path(checkpoint).parent / "config.json" if checkpoint else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def model_config(checkpoints: list, preset: str) -> ModelConfig:
    """The model config the checkpoints were trained with (`training.train` writes it beside
    each checkpoint); all must agree. Without one, the preset."""
    found = {c: ModelConfig.from_dict(run["model"]) for c in checkpoints if (run := _run_config(c)) is not None}
    if len({m.to_json() for m in found.values()}) > 1:
        raise ValueError(f"the checkpoints were trained with different model configs: {sorted(found)}")
    return next(iter(found.values())) if found else ModelConfig.preset(preset)


def data_speed_scale(teacher, students: list) -> float:
    """The motion speed of the data the models learnt (`data.speed_scale` of the run's config.json
    beside each checkpoint): the teacher's when it has one, else the students' (which must
    agree); 1 without any."""
    def read(c):
        run = _run_config(c)  # training.train writes {"model": ..., "train": {"data": ...}, "stage": ...}
        return None if run is None else float(run.get("train", {}).get("data", {}).get("speed_scale", 1.0))
    if (mine := read(teacher)) is not None:
        return mine
    found = {c: v for c in students if (v := read(c)) is not None}
    if len(set(found.values())) > 1:
        raise ValueError(f"the students were trained on data of different speeds {found}; give --speed-scale")
    return next(iter(found.values()), 1.0)


def main(argv=None) -> int:
    from asd_deploy.cli import positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher checkpoint.pt (its row is left out without it)")
    p.add_argument("--dmd", nargs="*", default=[], help="DMD-only student checkpoint.pt, one per training seed")
    p.add_argument("--asd", nargs="*", default=[], help="ASD student checkpoint.pt, one per training seed")
    p.add_argument("--vae", required=True, help="VAE folder")
    p.add_argument("--config", default="demo",
                   help="model config preset, for checkpoints without the run's config.json beside them")
    p.add_argument("--prompts", type=positive_int, default=32)
    p.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1])
    p.add_argument("--chunks", type=positive_int, default=3)
    p.add_argument("--teacher-steps", type=positive_int, default=20, help="Euler steps of the teacher's sampler")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--tiny-decoder", default=None,
                   help="tiny decoder folder: every row is also decoded by it, with its paired difference")
    p.add_argument("--text-encoder", default="default",
                   help="prompt encoder: 'default' (the shipped grammar encoder, what generate uses), 'minilm' "
                        "(what the models were trained with) or a folder")
    p.add_argument("--speed-scale", type=float, default=None,
                   help="the data's motion speed (a multiple of SPEED_RANGE) for the real-video rows and the "
                        "scorer; default: data.speed_scale of the teacher's run config.json (else 1)")
    p.add_argument("--out", default="training/reports/ablation", help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    check_speed_scale_arg(p, a.speed_scale)
    for path in [a.teacher, *a.dmd, *a.asd]:
        if path is not None and not Path(path).is_file():
            p.error(f"checkpoint {path} does not exist")
    return run_command(_main, a)


def _main(a) -> int:
    students = {k: [Path(v) for v in vs] for k, vs in (("DMD only", a.dmd), ("ASD", a.asd)) if vs}
    speed = a.speed_scale if a.speed_scale is not None else data_speed_scale(a.teacher, [*a.dmd, *a.asd])
    result = run(Path(a.teacher) if a.teacher else None, students, Path(a.vae),
                 model_config([a.teacher, *a.dmd, *a.asd], a.config),
                 a.prompts, a.seeds, a.chunks, a.teacher_steps, a.guidance,
                 text_encoder=a.text_encoder, tiny_decoder=Path(a.tiny_decoder) if a.tiny_decoder else None,
                 speed_scale=speed)
    out = Path(a.out)
    meta = {"prompts": a.prompts, "seeds": a.seeds, "chunks": a.chunks, "config": a.config, "vae": a.vae,
            "checkpoints": {"teacher": a.teacher, "dmd": a.dmd, "asd": a.asd}, "tiny_decoder": a.tiny_decoder,
            "speed_scale": speed, "text_encoder": a.text_encoder, "bootstrap_draws": BOOTSTRAP}
    print(write_report(out, result, meta, to_markdown))
    return 0


def write_report(out: Path, result: dict, meta: dict, markdown) -> str:
    """OUT.json ({**result, **meta}) and OUT.md (`markdown(result, meta)`), each written
    atomically; returns the Markdown."""
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({**result, **meta}, indent=1)))
    md = markdown(result, meta)
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    return md


if __name__ == "__main__":
    raise SystemExit(main())
