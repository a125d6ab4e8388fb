"""An independent check that a video shows its one-object prompt: background, colour, rough shape
and direction of motion, each read straight off the pixels.

    python -m training.prompt_check [--model default] [--seeds 0 1 2 3] [--out training/reports/prompt_check]

Owns: `read_video` (what a one-object video shows, as words of the prompt grammar), `check`
(each word against the prompt), `PROMPTS` (single-object prompts across the vocabulary, the
README's first) and the CLI, which generates them with the shipped model and writes a report.
Does not own ToyBench (`toybench.py`), which it deliberately shares no code with: a second
opinion by other means, so that a flaw of one scorer does not hide in both.

How each word is read (frame by frame, no palette distance caps, no connected components):
  background  the median colour of the frame's one-pixel border, the nearest named background;
  object      pixels farther than FG_DIST (RGB) from that colour; the video needs them in at least
              half its frames, covering at least MIN_FG of a frame;
  colour      the median RGB of the object pixels over the video, the nearest palette colour;
  shape       fill = object pixels / bounding-box area per frame (median): a square fills its
              box (1.0), a circle pi/4 (0.79), a triangle 1/2; nearest of the three;
  direction   the object pixels' centroid from the first frame to frame DIRECTION_SPAN (or the
              last), angle to the nearest of the 8 compass directions, and it must move at least
              MIN_MOVE of the frame's smaller side.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .data import BACKGROUNDS, DIRECTIONS, PALETTE, parse_caption

FG_DIST = 80.0
MIN_FG = 0.01
DIRECTION_SPAN = 4
MIN_MOVE = 0.03
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
# one object each, every colour, shape, direction and background at least once; the README's first
PROMPTS = [
    "a red circle moving right on a white background",
    "a green square moving down on a black background",
    "a blue triangle moving up on a white background",
    "a yellow circle moving left on a gray background",
    "a magenta square moving up-right on a white background",
    "a cyan triangle moving down-left on a black background",
    "an orange circle moving up-left on a black background",
    "a purple square moving down-right on a white background",
]


def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    d = [np.linalg.norm(rgb - np.array(table[n], float)) for n in names]
    return names[int(np.argmin(d))]


def read_video(video: np.ndarray) -> dict:
    """What a uint8 [T, H, W, 3] video shows: {"background", "color", "shape", "direction",
    "object_frames"} (None for what cannot be read)."""
    v = np.asarray(video, float)
    t, h, w = v.shape[:3]
    border = np.concatenate([v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]], axis=1)  # [T, 2(H+W), 3]
    bg_rgb = np.median(border.reshape(-1, 3), axis=0)
    out = {"background": _nearest(bg_rgb, BACKGROUNDS), "color": None, "shape": None, "direction": None}
    fg = np.linalg.norm(v - bg_rgb, axis=-1) > FG_DIST           # [T, H, W]
    has = fg.reshape(t, -1).mean(1) >= MIN_FG
    out["object_frames"] = float(has.mean())
    if has.mean() < 0.5:
        return out
    out["color"] = _nearest(np.median(v[fg], axis=0), PALETTE)
    fills, cents = [], np.full((t, 2), np.nan)
    for i in np.flatnonzero(has):
        ys, xs = np.nonzero(fg[i])
        fills.append(len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)))
        cents[i] = xs.mean(), ys.mean()
    fill = float(np.median(fills))
    out["shape"] = min(FILL, key=lambda s: abs(FILL[s] - fill))
    out["fill"] = fill
    valid = np.flatnonzero(has)
    a, b = valid[0], valid[valid <= valid[0] + DIRECTION_SPAN][-1]
    dx, dy = cents[b] - cents[a]
    if b > a and np.hypot(dx, dy) >= MIN_MOVE * min(h, w):
        angle = np.degrees(np.arctan2(-dy, dx)) % 360.0              # y up, as a viewer reads it
        out["direction"] = DIRECTIONS[int(np.round(angle / 45.0)) % 8]
    return out


def check(video: np.ndarray, prompt: str) -> dict:
    """{"background": bool, "color": bool, "shape": bool, "direction": bool, "read": read_video(...)}
    for a one-object prompt of the grammar."""
    spec = parse_caption(prompt)
    if len(spec["objects"]) != 1:
        raise ValueError(f"prompt_check reads one-object prompts; {prompt!r} names {len(spec['objects'])}")
    (color, shape, direction), = spec["objects"]
    seen = read_video(video)
    return {"background": seen["background"] == spec["background"], "color": seen["color"] == color,
            "shape": seen["shape"] == shape, "direction": seen["direction"] == direction, "read": seen}


def main(argv=None) -> int:
    from asd_deploy.cli import add_schedule_args, positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.prompt_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help="'default' or a model folder")
    add_schedule_args(p)
    p.add_argument("--seeds", type=seed_arg, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--frames", type=positive_int, default=None, help="pixel frames (default: the model's)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return run_command(_main, p.parse_args(argv))


def _main(a) -> int:
    from asd_deploy.checkpoint import atomic_write
    from asd_deploy.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(a.model)
    rows = []
    for prompt in PROMPTS:
        for seed in a.seeds:
            video, _ = pipe(prompt, steps=a.steps, ffe=a.ffe, ffe_steps=a.ffe_steps, seed=seed, frames=a.frames)
            r = check(video, prompt)
            rows.append({"prompt": prompt, "seed": seed, **{k: r[k] for k in ("background", "color", "shape", "direction")},
                         "read": {k: v for k, v in r["read"].items()}})
    keys = ("background", "color", "shape", "direction")
    rate = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    all_ok = float(np.mean([all(r[k] for k in keys) for r in rows]))
    lines = [f"Independent prompt check (`python -m training.prompt_check`): model {a.model}, {a.steps} step(s)"
             f"{' + FFE' if a.ffe else ''}, seeds {a.seeds}.", "",
             "| prompt | " + " | ".join(keys) + " | read as |", "|---|" + "---|" * (len(keys) + 1)]
    for prompt in PROMPTS:
        rs = [r for r in rows if r["prompt"] == prompt]
        seen = "; ".join(f"{r['read']['color']} {r['read']['shape']} {r['read']['direction']} on "
                         f"{r['read']['background']}" for r in rs)
        lines.append(f"| {prompt} | " + " | ".join(f"{sum(r[k] for r in rs)}/{len(rs)}" for k in keys) + f" | {seen} |")
    lines += ["", "| all prompts | " + " | ".join(f"{rate[k]:.2f}" for k in keys) + f" | all four right: {all_ok:.2f} |"]
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        out = Path(a.out)
        atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(
            {"rows": rows, "rates": rate, "all_right": all_ok, "model": a.model, "steps": a.steps, "ffe": a.ffe,
             "ffe_steps": a.ffe_steps}, indent=1)))
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
