"""ToyBench: a deterministic scorer for videos of the procedural grammar (`training/data.py`).
It learns nothing: every number comes from colour segmentation against the fixed palette.

    python -m training.toybench --checkpoint default --steps 1 [--no-ffe] [--ffe-steps 4] [--seeds 0 1] [--prompts 8]
                                [--config tiny] [--frames N] [--json OUT]

Owns: `score_video`, `score_many`, `format_table` and the CLI that generates `eval_prompts` with
`asd_deploy.pipeline.Pipeline` and scores them. Does not own the grammar, palette or scene rules
(`data.py`) nor generation.

Measurement. Each pixel takes the nearest colour of PALETTE + BACKGROUNDS if it lies within
`COLOR_CAP` of it (RGB distance), else none. COLOR_CAP is under half the smallest distance between
two known colours, so a pixel can be within the cap of one colour at most; it tolerates the mild
blur and colour drift of a learned VAE. For each named object and frame, the largest 4-connected
blob of its colour is the object when it covers at least `MIN_AREA_FRAC` of the frame.

Metrics, each in [0, 1] (higher is better except artifact_rate), means over the named objects:
  adherence    0.8 * object + 0.2 * background. object = presence * (0.5 + 0.25 * shape +
               0.25 * motion): presence = fraction of frames where the blob exists; shape = fraction
               of those where the named shape fits the blob best (IoU with a circle, square and
               apex-up triangle inscribed in the blob's bounding box); motion = 1 when the centroid's
               displacement over the first `DIRECTION_FRAMES` frames lies within `DIRECTION_TOL_DEG`
               of the named direction. background = fraction of frames whose most common colour is
               the named background and covers >= 30% of the frame.
  consistency  presence * clip(1 - cv(area), 0, 1), cv = std / mean of the blob's pixel area over
               the frames where it exists. (The pixel grid alone gives a hard-edged shape of radius
               5 px a cv of up to ~0.07.)
  smoothness   presence / (1 + (rms / max(SMOOTH_MIN_PX, SMOOTH_SCALE * min(H, W)))^2), rms =
               RMS residual (pixels) of straight-line fits to the centroid's x(t) and y(t) between
               bounces: zero for constant velocity. A bounce shows as a turning frame (a local
               extremum of x or y) where the blob is within 1.5 px + 1.5 frames of motion (capped at
               the dataset's top speed) of that frame edge; each such frame is left out and splits
               the fit. Stretches under 3 frames carry no residual.
  artifact_rate  fraction of pixels within COLOR_CAP of no known colour.
  stray_rate   fraction of pixels of a known colour the caption does not name (a hallucinated
               object, a wrong background).
  overall      mean over the named objects of presence * (0.5 + 0.5 * motion) * (0.4 + 0.2 * shape +
               0.2 * steadiness + 0.2 * straightness), times (0.5 + 0.5 * background), times
               (1 - artifact_rate - stray_rate). steadiness = clip(1 - cv(area), 0, 1) and
               straightness = 1 / (1 + rel^2) are consistency and smoothness before their presence
               factor. Everything is gated by the named objects being there, and halved where they
               do not move as named: a video of the right background alone scores 0, a static or
               wrong-way object at most 0.5 (so a model that ignores the motion cannot reach a 0.7
               goal), a wrong colour about 0 (`baselines` makes these videos; tests hold the floor).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from .data import (BACKGROUNDS, DIRECTION_FRAMES, DIRECTIONS, MAX_SPEED_SCALE, PALETTE, SPEED_RANGE, eval_prompts,
                   parse_caption)

COLOR_CAP = 60.0           # RGB distance; < half the closest pair of known colours (127)
MIN_AREA_FRAC = 0.005      # a blob smaller than this share of the frame is not an object
DIRECTION_TOL_DEG = 35.0   # the dataset's heading jitter is 10 degrees
SMOOTH_SCALE = 0.02        # rms off-line centroid error (share of min(H, W)) that scores 0.5 ...
SMOOTH_MIN_PX = 1.5        # ... but never under this: the pixel grid alone jitters a hard-edged
                           # shape's centroid by 0.15-0.27 px rms (measured on the procedural videos)
METRICS = ("adherence", "consistency", "smoothness", "artifact_rate", "overall")
EXTRA = ("stray_rate",)
DETAILS = ("presence", "shape", "motion", "background")

_NAMES = list(PALETTE) + list(BACKGROUNDS)
_RGB = np.array([PALETTE.get(n) or BACKGROUNDS[n] for n in _NAMES], np.float32)  # [K, 3]
_MIN_GAP = min(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(_RGB, 2))
if COLOR_CAP >= _MIN_GAP / 2:
    raise ValueError(f"COLOR_CAP {COLOR_CAP} must stay under half the closest pair of known colours ({_MIN_GAP:.0f})")
_USE_SCIPY = True   # tests flip this to compare the numpy labelling with scipy's


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------


def color_labels(frame: np.ndarray) -> np.ndarray:
    """int [H, W]: index into PALETTE + BACKGROUNDS names of each pixel's colour, -1 for none."""
    d2 = ((frame.astype(np.float32)[:, :, None, :] - _RGB) ** 2).sum(-1)   # [H, W, K]
    idx = d2.argmin(-1)
    return np.where(np.take_along_axis(d2, idx[..., None], -1)[..., 0] <= COLOR_CAP ** 2, idx, -1)


def _components_numpy(mask: np.ndarray) -> np.ndarray:
    """4-connected labels (0 = background, else 1 + the smallest flat index in the component)."""
    h, w = mask.shape
    flat = np.arange(1, h * w + 1).reshape(h, w)
    lab = np.where(mask, flat, 0)
    big = h * w + 1
    while True:
        cur = np.where(mask, lab, big)
        new = cur.copy()
        new[1:] = np.minimum(new[1:], cur[:-1])
        new[:-1] = np.minimum(new[:-1], cur[1:])
        new[:, 1:] = np.minimum(new[:, 1:], cur[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], cur[:, 1:])
        new = np.where(mask, new, 0)
        # pointer jumping: a label names a pixel of the same component; take that pixel's label
        jumped = new.ravel()[np.maximum(new.ravel() - 1, 0)].reshape(h, w)
        new = np.where(mask, np.minimum(new, np.where(jumped > 0, jumped, big)), 0)
        if np.array_equal(new, lab):
            return lab
        lab = new


def components(mask: np.ndarray) -> np.ndarray:
    """int [H, W] 4-connected component labels, 0 off the mask (scipy when installed)."""
    if _USE_SCIPY:
        try:
            from scipy import ndimage
        except ImportError:
            pass
        else:
            return ndimage.label(mask)[0]
    return _components_numpy(mask)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """Bool [H, W]: the largest 4-connected component of `mask` (all False if empty)."""
    if not mask.any():
        return mask
    lab = components(mask)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == counts.argmax()


def _shape_ious(blob: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> dict[str, float]:
    """IoU of the blob with each shape inscribed in its bounding box (pixel-centre tests)."""
    crop = blob[y0:y1 + 1, x0:x1 + 1]
    y = np.arange(y0, y1 + 1, dtype=np.float64)[:, None]
    x = np.arange(x0, x1 + 1, dtype=np.float64)[None, :]
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = (y1 - y0) / 2 + 0.5, (x1 - x0) / 2 + 0.5
    top, height = y0 - 0.5, y1 - y0 + 1.0
    templates = {"circle": ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0,
                 "square": np.ones_like(crop),
                 "triangle": np.abs(x - cx) <= rx * (y - top) / height}
    return {s: float((crop & t).sum() / (crop | t).sum()) for s, t in templates.items()}


def _track(video: np.ndarray, labels: list[np.ndarray], color: str) -> dict:
    """Per frame: presence, area, centroid (x, y), bounding box and best-fitting shape."""
    t, h, w = video.shape[:3]
    k = _NAMES.index(color)
    min_area = max(4.0, MIN_AREA_FRAC * h * w)
    present = np.zeros(t, bool)
    area = np.zeros(t)
    centroid = np.full((t, 2), np.nan)
    box = np.zeros((t, 4), int)   # x0, x1, y0, y1
    shape = [None] * t
    for i, lab in enumerate(labels):
        blob = largest_blob(lab == k)
        n = int(blob.sum())
        if n < min_area:
            continue
        ys, xs = np.nonzero(blob)
        present[i], area[i] = True, n
        centroid[i] = xs.mean(), ys.mean()
        box[i] = xs.min(), xs.max(), ys.min(), ys.max()
        ious = _shape_ious(blob, ys.min(), ys.max(), xs.min(), xs.max())
        shape[i] = max(ious, key=ious.get)
    return {"present": present, "area": area, "centroid": centroid, "box": box, "shape": shape}


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def _motion_ok(tr: dict, direction: str) -> float:
    t = len(tr["present"])
    if t < 2:
        return 1.0   # a still image has no motion to contradict the caption
    k = min(DIRECTION_FRAMES, t - 1)
    if not (tr["present"][0] and tr["present"][k]):
        return 0.0
    dx, dy = tr["centroid"][k] - tr["centroid"][0]
    if np.hypot(dx, dy) < 0.5:
        return 0.0
    measured = np.degrees(np.arctan2(-dy, dx))            # y up, as the caption reads
    named = 45.0 * DIRECTIONS.index(direction)
    err = abs((measured - named + 180.0) % 360.0 - 180.0)
    return float(err <= DIRECTION_TOL_DEG)


def _steadiness(tr: dict) -> float:
    """clip(1 - cv(area), 0, 1) over the frames where the object exists (0 if it never does)."""
    p = tr["present"]
    if not p.any():
        return 0.0
    a = tr["area"][p]
    return float(np.clip(1.0 - a.std() / a.mean(), 0.0, 1.0))


def _runs(mask: np.ndarray):
    """(start, stop) of each maximal run of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return zip(edges[::2], edges[1::2])


def _straightness(tr: dict, h: int, w: int, speed_scale: float = 1.0) -> float:
    """1 / (1 + rel^2) of the centroid's off-line residual (1 when too short to measure, 0 if absent).
    `speed_scale`: the data's speeds as a multiple of SPEED_RANGE (its top speed caps the wall
    tolerance)."""
    p, c, box = tr["present"], tr["centroid"], tr["box"]
    if not p.any():
        return 0.0
    if len(p) < 3:
        return 1.0   # too short to measure a trajectory
    both = p[1:] & p[:-1]
    speed = np.median(np.abs(np.diff(c, axis=0))[both], axis=0) if both.any() else np.zeros(2)   # [2] x, y
    # a wall is within one frame of motion of a bounce's turning frame; the speed that widens this
    # tolerance is capped at the dataset's fastest, so fast erratic motion cannot excuse itself
    tol = 1.5 + 1.5 * np.minimum(speed, SPEED_RANGE[1] * speed_scale * min(h, w))
    residuals = []
    for axis, (lo, hi, size) in enumerate(((0, 1, w), (2, 3, h))):
        y = c[:, axis]
        turn_low = np.zeros(len(p), bool)
        turn_high = np.zeros(len(p), bool)
        turn_low[1:-1] = (y[1:-1] <= y[:-2]) & (y[1:-1] <= y[2:]) & (box[1:-1, lo] <= tol[axis])
        turn_high[1:-1] = (y[1:-1] >= y[:-2]) & (y[1:-1] >= y[2:]) & (box[1:-1, hi] >= size - 1 - tol[axis])
        # the bounce happened just before or just after a turning frame: leave that frame out and
        # the frames on either side each lie on their own straight line
        for a, b in _runs(p & ~(turn_low | turn_high)):
            if b - a >= 3:
                t = np.arange(a, b, dtype=np.float64)
                residuals.append(y[a:b] - np.polyval(np.polyfit(t, y[a:b], 1), t))
    rms = float(np.sqrt(np.mean(np.concatenate(residuals) ** 2))) if residuals else 0.0
    rel = rms / max(SMOOTH_MIN_PX, SMOOTH_SCALE * min(h, w))
    return float(1.0 / (1.0 + rel * rel))


def score_video(video: np.ndarray, caption: str, speed_scale: float = 1.0) -> dict:
    """Metrics of one uint8 [T, H, W, 3] video against its procedural-grammar caption (see the
    module doc), plus the adherence details presence / shape / motion / background.
    `speed_scale`: the training data's `data.speed_scale` (its top speed bounds the motion that
    may excuse a turn near a wall; 1: SPEED_RANGE as it is)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or not len(video):
        raise ValueError(f"video must be uint8 [T, H, W, 3] with T >= 1; got {video.dtype} {list(video.shape)}")
    if not 0 < speed_scale <= MAX_SPEED_SCALE:
        raise ValueError(f"speed_scale must be in (0, {MAX_SPEED_SCALE}] (a multiple of SPEED_RANGE); got {speed_scale}")
    spec = parse_caption(caption)
    t, h, w = video.shape[:3]
    labels = [color_labels(f) for f in video]
    bg_k = _NAMES.index(spec["background"])
    named = {bg_k} | {_NAMES.index(c) for c, _, _ in spec["objects"]}
    stray = np.array([k not in named for k in range(len(_NAMES))])
    bg_ok, unassigned, strays = [], 0, 0
    for lab in labels:
        counts = np.bincount(lab.ravel() + 1, minlength=len(_NAMES) + 1)   # [1 + K], slot 0: none
        unassigned += counts[0]
        strays += counts[1:][stray].sum()
        bg_ok.append(counts[1:].argmax() == bg_k and counts[1 + bg_k] >= 0.3 * h * w)
    background = float(np.mean(bg_ok))
    per = {m: [] for m in ("object", "presence", "shape", "motion", "consistency", "smoothness", "gated")}
    for color, shape, direction in spec["objects"]:
        tr = _track(video, labels, color)
        p = tr["present"]
        shape_ok = float(np.mean([s == shape for s, q in zip(tr["shape"], p) if q])) if p.any() else 0.0
        motion = _motion_ok(tr, direction)
        steady, straight = _steadiness(tr), _straightness(tr, h, w, speed_scale)
        per["object"].append(p.mean() * (0.5 + 0.25 * shape_ok + 0.25 * motion))
        per["presence"].append(p.mean())
        per["shape"].append(shape_ok)
        per["motion"].append(motion)
        per["consistency"].append(p.mean() * steady)
        per["smoothness"].append(p.mean() * straight)
        per["gated"].append(p.mean() * (0.5 + 0.5 * motion) * (0.4 + 0.2 * shape_ok + 0.2 * steady + 0.2 * straight))
    m = {k: float(np.mean(v)) for k, v in per.items()}
    artifact, stray_rate = float(unassigned / (t * h * w)), float(strays / (t * h * w))
    out = {"adherence": 0.8 * m["object"] + 0.2 * background, "consistency": m["consistency"],
           "smoothness": m["smoothness"], "artifact_rate": artifact,
           "overall": m["gated"] * (0.5 + 0.5 * background) * max(0.0, 1.0 - artifact - stray_rate),
           "stray_rate": stray_rate}
    out.update(presence=m["presence"], shape=m["shape"], motion=m["motion"], background=background)
    return out


def baselines(item: dict) -> dict[str, np.ndarray]:
    """Videos that must score below the real one, made from a procedural item (`data.py`): the
    named background alone; the first frame held still; every object in another palette colour;
    the video mirrored so each object moves another way (left <-> right; where every object moves
    straight up or down, upside down instead, which also turns a triangle over)."""
    from .data import PALETTE

    video = item["video"]
    bg = BACKGROUNDS[item["background"]]
    only_bg = np.empty_like(video)
    only_bg[:] = bg
    recolour = video.copy()
    named = [o.color for o in item["objects"]]
    spare = [c for c in PALETTE if c not in named]
    for c, other in zip(named, spare):
        recolour[(video == PALETTE[c]).all(-1)] = PALETTE[other]
    vertical = all(o.direction in ("up", "down") for o in item["objects"])
    wrong_way = video[:, ::-1] if vertical else video[:, :, ::-1]
    return {"background only": only_bg, "static object (first frame held)": np.repeat(video[:1], len(video), 0),
            "wrong colour": recolour, "wrong direction": np.ascontiguousarray(wrong_way)}


def score_many(videos, captions) -> dict:
    """Mean of each `score_video` metric over (video, caption) pairs."""
    videos, captions = list(videos), list(captions)
    if len(videos) != len(captions) or not videos:
        raise ValueError(f"need as many captions as videos (at least one); got {len(videos)} videos, "
                         f"{len(captions)} captions")
    scores = [score_video(v, c) for v, c in zip(videos, captions)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table; floats to 3 decimals. Columns default to the first row's keys."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _pipeline(args):
    from asd_deploy.pipeline import Pipeline

    if args.checkpoint == "default" or (Path(args.checkpoint) / "config.json").is_file():
        return Pipeline.from_pretrained(args.checkpoint, device=args.device)
    return Pipeline.from_checkpoint(args.checkpoint, args.config, device=args.device)


def main(argv=None) -> int:
    from asd_deploy.cli import add_schedule_args, positive_int, run_command, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.toybench", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default",
                   help="'default', a model folder (config.json ...), a DiT checkpoint file or 'random'")
    p.add_argument("--config", default=None, help="model config preset for a checkpoint file (tiny, small, ...)")
    add_schedule_args(p)
    p.add_argument("--seeds", type=seed_arg, nargs="+", default=[0], help="noise seeds per prompt")
    p.add_argument("--prompts", type=positive_int, default=8, help="how many of eval_prompts()")
    p.add_argument("--frames", type=positive_int, default=None, help="pixel frames per video (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the scores here")
    return run_command(_main, p.parse_args(argv))


def _main(args) -> int:
    if args.json:
        from asd_deploy.video import check_writable
        check_writable(args.json)
    pipe = _pipeline(args)
    rows = []
    for prompt in eval_prompts(args.prompts):
        for seed in args.seeds:
            video, _ = pipe(prompt, steps=args.steps, ffe=args.ffe, ffe_steps=args.ffe_steps, seed=seed,
                            frames=args.frames)
            rows.append({"prompt": prompt, "seed": seed, **score_video(video, prompt)})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS + EXTRA + DETAILS}
    from asd_deploy.schedule import Schedule
    print(f"ToyBench: {args.checkpoint}, {Schedule(args.steps, args.ffe, args.ffe_steps).describe()}, "
          f"{len(rows)} videos")
    print(format_table(rows + [{"prompt": "**mean**", "seed": "", **mean}], ["prompt", "seed", *METRICS]))
    if args.json:
        from asd_deploy.checkpoint import atomic_write
        result = {"checkpoint": args.checkpoint, "steps": args.steps, "ffe": args.ffe, "ffe_steps": args.ffe_steps,
                  "seeds": args.seeds,
                  "mean": mean, "videos": rows, "model": pipe.info}
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
