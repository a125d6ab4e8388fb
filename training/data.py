"""Captioned training videos: procedural scenes of coloured shapes, and the user's own clips.

Owns: `ProceduralVideos` (a seeded dataset of bouncing shapes with captions that say what is
drawn), the caption grammar (`make_caption` / `parse_caption`), the colour palette (`PALETTE`,
`BACKGROUNDS`), `VideoFolder` (NAME.mp4 + NAME.txt pairs) and the fixed `eval_prompts`.
Does not own: encoding to latents (`train.LatentCache`), scoring generated videos
(`toybench.py`) or mp4 I/O (`asd_deploy.video`).

A procedural item is a pure function of (seed, index): same seed, same bytes, in any process.
Scene rules, which `toybench.py` relies on:
  - a plain background from `BACKGROUNDS`; 1..max_objects objects (weighted towards 1-2) in
    distinct colours from `PALETTE`, each a circle, square or triangle (apex up) of "radius"
    r = 15-25% of min(H, W), see below (circle radius, square half-side, triangle half-base =
    half-height);
  - each centre moves at constant velocity and reflects off the frame edges, so the whole shape
    stays inside the frame; the initial heading is one of 8 compass directions +-10 degrees (the
    caption names it) and no bounce happens in the first `DIRECTION_FRAMES` frames;
  - objects never touch (a 1-pixel gap between bounding boxes in every frame). Crowded scenes
    use smaller shapes (upper radius bound minus 4% per extra object); a scene gets
    `_LAYOUT_TRIES` layouts of `_LAYOUT_TRIES` tries per object, else drops its last object.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Saturated object colours, pairwise >= 127 apart in RGB (so a 60-unit colour cap is unambiguous).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "orange": (255, 128, 0), "purple": (128, 0, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Counter-clockwise from "right" in 45-degree steps (angles with y pointing up, as a viewer sees it).
DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")

RADIUS_RANGE = (0.15, 0.25)      # object radius / min(H, W)
SPEED_RANGE = (0.02, 0.05)       # pixels per frame / min(H, W)
HEADING_JITTER_DEG = 10.0        # initial heading = compass direction +- this
DIRECTION_FRAMES = 4             # no bounce before this frame: the caption's direction is visible
_LAYOUT_TRIES = 40
_MIN_SIDE = 16


@dataclass(frozen=True)
class ObjectSpec:
    """One drawn object. `positions` [T, 2] are (x, y) centres in pixels (x right, y down);
    `velocity` is the initial (vx, vy) in pixels per frame."""
    color: str
    shape: str
    direction: str
    radius: float
    velocity: tuple[float, float]
    positions: np.ndarray


# ---------------------------------------------------------------------------------------------
# caption grammar
# ---------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(background: str, objects: list[tuple[str, str, str]]) -> str:
    """"a red circle moving right, a blue square moving up and a cyan triangle moving left on a
    white background" from (color, shape, direction) triples."""
    if not objects:
        raise ValueError("a caption needs at least one object")
    phrases = [f"{_article(c)} {c} {s} moving {d}" for c, s, d in objects]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body} on {_article(background)} {background} background"


_OBJECT_RE = re.compile(r"an? (?P<color>[a-z]+) (?P<shape>[a-z]+) moving (?P<direction>[a-z-]+)")
_CAPTION_RE = re.compile(r"(?P<body>.+) on an? (?P<background>[a-z]+) background")


def parse_caption(caption: str) -> dict:
    """Invert `make_caption`: {"background": name, "objects": [(color, shape, direction), ...]}.
    Case and a trailing period are ignored; anything else off the grammar raises ValueError."""
    text = " ".join(caption.strip().lower().rstrip(".").split())
    m = _CAPTION_RE.fullmatch(text)

    def bad(why: str):
        return ValueError(f"cannot parse caption {caption!r}: {why}; expected e.g. 'a red circle moving "
                          f"right and a blue square moving up-left on a black background'")
    if not m:
        raise bad("no '... on a <colour> background' ending")
    if m["background"] not in BACKGROUNDS:
        raise bad(f"background {m['background']!r} is not one of {sorted(BACKGROUNDS)}")
    objects = []
    for part in re.split(r", | and ", m["body"]):
        o = _OBJECT_RE.fullmatch(part)
        if not o:
            raise bad(f"{part!r} is not 'a <colour> <shape> moving <direction>'")
        for what, value, valid in (("colour", o["color"], PALETTE), ("shape", o["shape"], SHAPES),
                                   ("direction", o["direction"], DIRECTIONS)):
            if value not in valid:
                raise bad(f"{what} {value!r} is not one of {sorted(valid)}")
        objects.append((o["color"], o["shape"], o["direction"]))
    return {"background": m["background"], "objects": objects}


# ---------------------------------------------------------------------------------------------
# procedural scenes
# ---------------------------------------------------------------------------------------------


def _count_weights(max_objects: int) -> np.ndarray:
    w = 0.5 ** np.arange(max_objects)  # 1 object: ~57%, 2: ~29%, 3: ~14% at max_objects=3
    return w / w.sum()


def _sample_scene(rng: np.random.Generator, n: int) -> tuple[str, list[tuple[str, str, int]]]:
    """Background name and n (colour, shape, direction index) with distinct colours."""
    background = str(rng.choice(list(BACKGROUNDS)))
    colors = rng.choice(list(PALETTE), size=n, replace=False)
    return background, [(str(c), SHAPES[rng.integers(len(SHAPES))], int(rng.integers(len(DIRECTIONS))))
                        for c in colors]


def _fold(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect unbounded positions u into [lo, hi] (a triangle wave): constant velocity + bounces."""
    span = hi - lo
    q = np.mod(u - lo, 2 * span)
    return lo + np.where(q <= span, q, 2 * span - q)


def _trajectory(rng, direction: int, r: float, height: int, width: int, frames: int, speed_scale: float = 1.0):
    """Initial velocity (vx, vy) and centres [T, 2] for one object of radius r."""
    side = min(height, width)
    angle = np.deg2rad(45.0 * direction + rng.uniform(-HEADING_JITTER_DEG, HEADING_JITTER_DEG))
    speed = rng.uniform(*SPEED_RANGE) * side * speed_scale
    v = np.array([np.cos(angle), -np.sin(angle)]) * speed   # image y points down
    lo = np.array([r, r])
    hi = np.array([width - 1 - r, height - 1 - r])
    # start far enough from the wall ahead that the first DIRECTION_FRAMES frames do not bounce
    k = min(DIRECTION_FRAMES, frames - 1)
    start_lo = np.minimum(lo + np.maximum(0.0, -v * k), hi)
    start_hi = np.maximum(start_lo, hi - np.maximum(0.0, v * k))
    p0 = rng.uniform(start_lo, start_hi)
    t = np.arange(frames, dtype=np.float64)[:, None]
    unfolded = p0 + v * t
    pos = np.stack([_fold(unfolded[:, a], lo[a], hi[a]) for a in range(2)], axis=1)
    return (float(v[0]), float(v[1])), pos


def _apart(a_pos, a_r, b_pos, b_r) -> bool:
    """Bounding boxes a pixel apart in every frame."""
    gap = a_r + b_r + 1.0
    d = np.abs(a_pos - b_pos)
    return bool(np.all((d[:, 0] > gap) | (d[:, 1] > gap)))


def shape_mask(shape: str, cx, cy, r, height: int, width: int) -> np.ndarray:
    """Bool [T, H, W] (or [H, W] for scalar centres): pixel centres inside the shape."""
    cx, cy = np.asarray(cx, np.float64)[..., None, None], np.asarray(cy, np.float64)[..., None, None]
    y = np.arange(height, dtype=np.float64)[:, None]
    x = np.arange(width, dtype=np.float64)[None, :]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex (cx, cy - r), base y = cy + r from cx - r to cx + r
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


MAX_SPEED_SCALE = 4  # speed_scale's bound: objects at most 4x the grammar's speeds


def check_speed_scale_arg(parser, value: float | None) -> None:
    """`parser.error` unless a `--speed-scale` value is in (0, MAX_SPEED_SCALE] (None: not given)."""
    if value is not None and not 0 < value <= MAX_SPEED_SCALE:
        parser.error(f"--speed-scale must be in (0, {MAX_SPEED_SCALE}]; got {value}")


class ProceduralVideos:
    """Seeded captioned videos of bouncing shapes. `ds[i]` is {"video": uint8 [T, H, W, 3],
    "caption": str, "objects": [ObjectSpec], "background": name}, a function of (seed, i) only.
    `speed_scale` multiplies every speed drawn from SPEED_RANGE (1: the scenes as they always were)."""

    def __init__(self, num_samples: int, seed: int, height: int, width: int, frames: int, max_objects: int = 3,
                 speed_scale: float = 1.0):
        if min(height, width) < _MIN_SIDE:
            raise ValueError(f"procedural videos need height and width >= {_MIN_SIDE}; got {height}x{width}")
        if frames < 1 or num_samples < 0 or seed < 0:
            raise ValueError(f"need frames >= 1, num_samples >= 0, seed >= 0; got frames={frames}, "
                             f"num_samples={num_samples}, seed={seed}")
        if not 1 <= max_objects <= len(PALETTE):
            raise ValueError(f"max_objects must be in 1..{len(PALETTE)} (distinct colours); got {max_objects}")
        if not 0 < speed_scale <= MAX_SPEED_SCALE:
            raise ValueError(f"speed_scale must be in (0, {MAX_SPEED_SCALE}] (a multiple of SPEED_RANGE); "
                             f"got {speed_scale}")
        self.num_samples, self.seed, self.max_objects = num_samples, seed, max_objects
        self.speed_scale = float(speed_scale)
        self.height, self.width, self.frames = height, width, frames

    def __len__(self) -> int:
        return self.num_samples

    def objects(self, i: int) -> tuple[str, list[ObjectSpec]]:
        """The scene of item i without rendering it: (background, objects)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, i])
        n = int(rng.choice(np.arange(1, self.max_objects + 1), p=_count_weights(self.max_objects)))
        background, scene = _sample_scene(rng, n)
        side = min(self.height, self.width)
        while True:
            r_lo, r_hi = RADIUS_RANGE
            r_hi = max(r_lo, r_hi - 0.04 * (len(scene) - 1))  # smaller shapes in crowded scenes
            for _ in range(_LAYOUT_TRIES):
                placed: list[ObjectSpec] = []
                for color, shape, d in scene:
                    for _ in range(_LAYOUT_TRIES):
                        r = rng.uniform(r_lo, r_hi) * side
                        v, pos = _trajectory(rng, d, r, self.height, self.width, self.frames, self.speed_scale)
                        if all(_apart(pos, r, o.positions, o.radius) for o in placed):
                            placed.append(ObjectSpec(color, shape, DIRECTIONS[d], float(r), v, pos))
                            break
                    else:
                        break
                if len(placed) == len(scene):
                    return background, placed
            scene = scene[:-1]  # a single object always fits

    def __getitem__(self, i: int) -> dict:
        background, objs = self.objects(i)
        video = np.empty((self.frames, self.height, self.width, 3), np.uint8)
        video[:] = BACKGROUNDS[background]
        for o in objs:
            mask = shape_mask(o.shape, o.positions[:, 0], o.positions[:, 1], o.radius, self.height, self.width)
            video[mask] = PALETTE[o.color]
        caption = make_caption(background, [(o.color, o.shape, o.direction) for o in objs])
        return {"video": video, "caption": caption, "objects": objs, "background": background}


def eval_prompts(n: int = 8, seed: int = 1234) -> list[str]:
    """A fixed, distinct set of prompts from the procedural grammar, alternating one and two
    objects (the same n and seed give the same list)."""
    prompts: list[str] = []
    k = 0
    while len(prompts) < n:
        rng = np.random.default_rng([seed, k])
        background, scene = _sample_scene(rng, 1 + k % 2)
        p = make_caption(background, [(c, s, DIRECTIONS[d]) for c, s, d in scene])
        if p not in prompts:
            prompts.append(p)
        k += 1
    return prompts


# ---------------------------------------------------------------------------------------------
# the user's videos
# ---------------------------------------------------------------------------------------------


class VideoFolder:
    """NAME.mp4 + NAME.txt (the caption) pairs in `root`, sorted by name. `ds[i]` is {"video":
    uint8 [frames, height, width, 3] (the first `frames` frames, resized), "caption", "path"}."""

    def __init__(self, root, frames: int, height: int, width: int):
        self.root, self.frames, self.height, self.width = Path(root), frames, height, width
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        self.paths = sorted(self.root.glob("*.mp4"))
        if not self.paths:
            raise ValueError(f"no .mp4 files in {self.root}; expected pairs NAME.mp4 + NAME.txt (the caption)")
        self.captions = []
        for p in self.paths:
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                raise FileNotFoundError(f"{p} has no caption file {txt.name}; write its caption there")
            caption = " ".join(txt.read_text().split())
            if not caption:
                raise ValueError(f"caption file {txt} is empty; write the caption of {p.name} in it")
            self.captions.append(caption)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        import torch

        from asd_deploy.video import read_mp4

        path = self.paths[i]
        video, _fps = read_mp4(path)
        if video.shape[0] < self.frames:
            raise ValueError(f"{path} has {video.shape[0]} frames; need at least {self.frames}")
        video = video[:self.frames]
        if video.shape[1:3] != (self.height, self.width):
            v = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float()  # [T, 3, h, w]
            v = torch.nn.functional.interpolate(v, size=(self.height, self.width), mode="bilinear",
                                                antialias=True, align_corners=False)
            video = v.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return {"video": np.ascontiguousarray(video), "caption": self.captions[i], "path": str(path)}
