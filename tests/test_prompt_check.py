"""The independent prompt checker reads real one-object videos right and catches each wrong word."""
from pathlib import Path

import numpy as np
import pytest

from training.data import BACKGROUNDS, PALETTE, ProceduralVideos, make_caption
from training.prompt_check import PROMPTS, check, read_video

WORDS = ("background", "color", "shape", "direction")


def _items(n, seed=3):
    ds = ProceduralVideos(n, seed=seed, height=64, width=96, frames=33, max_objects=1)
    return [ds[i] for i in range(n)]


def test_real_videos_read_right():
    items = _items(60)
    ok = [all(check(it["video"], it["caption"])[k] for k in WORDS) for it in items]
    assert np.mean(ok) >= 0.97, [it["caption"] for it, good in zip(items, ok) if not good]


def test_each_wrong_word_is_caught():
    for it in _items(12, seed=5):
        (o,) = it["objects"]
        video = it["video"]
        other_colour = next(c for c in PALETTE if c != o.color and PALETTE[c] != BACKGROUNDS[it["background"]])
        recolour = video.copy()
        recolour[(video == PALETTE[o.color]).all(-1)] = PALETTE[other_colour]
        assert not check(recolour, it["caption"])["color"]
        other_bg = next(b for b in BACKGROUNDS if b != it["background"] and BACKGROUNDS[b] != PALETTE[o.color])
        rebg = video.copy()
        rebg[(video == BACKGROUNDS[it["background"]]).all(-1)] = BACKGROUNDS[other_bg]
        assert not check(rebg, it["caption"])["background"]
        other_shape = next(s for s in ("circle", "square", "triangle") if s != o.shape)
        assert not check(video, make_caption(it["background"], [(o.color, other_shape, o.direction)]))["shape"]
        still = np.repeat(video[:1], len(video), 0)
        assert not check(still, it["caption"])["direction"]          # no motion
        r = read_video(video[:8][::-1])                              # the first frames played backwards
        assert r["direction"] != check(video, it["caption"])["read"]["direction"]


def test_prompts_cover_the_vocabulary_and_one_object_only():
    from training.data import DIRECTIONS, SHAPES, parse_caption
    specs = [parse_caption(p) for p in PROMPTS]
    assert PROMPTS[0] == "a red circle moving right on a white background"  # the README's
    assert {s["objects"][0][0] for s in specs} == set(PALETTE)
    assert {s["objects"][0][1] for s in specs} == set(SHAPES)
    assert {s["objects"][0][2] for s in specs} == set(DIRECTIONS)
    assert {s["background"] for s in specs} == set(BACKGROUNDS)
    with pytest.raises(ValueError, match="one-object"):
        check(np.zeros((5, 64, 96, 3), np.uint8), "a red circle moving right and a blue square moving up on a black background")


# ---- the shipped default ------------------------------------------------------------------------

README_PICTURE = Path(__file__).parents[1] / "training" / "reports" / "command1.png"
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def shipped():
    from asd_deploy.pipeline import Pipeline
    from asd_deploy.registry import default_is_trained
    assert default_is_trained()
    return Pipeline.from_pretrained("default")


@pytest.fixture(scope="module")
def shipped_checks(shipped):
    return [check(shipped(p, seed=s)[0], p) for p in PROMPTS for s in SEEDS]


def test_readme_picture_is_command_1s_sheet(shipped, tmp_path):
    """The README's picture is the contact sheet README command 1 writes for the shipped default
    (that command runs the ORT engine, which agrees with eager within 1e-4: a rounding step on a
    few pixels at most). Regenerate it whenever the default changes (see the README)."""
    from imageio.v2 import imread

    from asd_deploy.video import SheetSampler
    stream = shipped.stream(PROMPTS[0], steps=1, ffe=True, seed=0)
    sampler = SheetSampler(stream.frames)  # what `generate --sheet` does
    for chunk in stream:
        sampler.add(chunk)
    sampler.sheet(tmp_path / "s.png")
    got, want = imread(tmp_path / "s.png").astype(int), imread(README_PICTURE).astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.mean() < 0.1 and diff.max() <= 8, (diff.mean(), diff.max())


@pytest.mark.slow  # 16 videos of the shipped default (the shared fixture, ~37 s)
def test_shipped_default_shows_its_background_and_colour(shipped_checks):
    """The README's prompts x 2 seeds, read by the independent checker: the named background in
    every video, the named colour in most (0.75 over the 4 seeds of the committed
    training/reports/prompt_check.md; the previous default had 0.72, the dim-64 one before it 0.00)."""
    rate = {k: np.mean([c[k] for c in shipped_checks]) for k in WORDS}
    assert rate["background"] == 1.0 and rate["color"] >= 0.6, rate


@pytest.mark.slow  # 16 videos of the shipped default (the shared fixture, ~37 s)
def test_shipped_default_moves_its_object_the_named_way(shipped_checks):
    """The named direction of motion in 7 of these 16 videos (0.62 over the 4 seeds of the committed
    report; the previous default, whose teacher never learnt motion from text, 0.09, and a random
    heading 1/8): the bar leaves room for a video or two to round the other way on another CPU."""
    rate = {k: np.mean([c[k] for c in shipped_checks]) for k in WORDS}
    assert rate["direction"] >= 0.3, rate


@pytest.mark.slow  # the same 16 videos
@pytest.mark.xfail(strict=True, reason="issue 17 goal not met: the shipped 64x96 DMD-only student gets background, "
                                       "colour and mostly the direction right but the shape in under half the "
                                       "videos (colour 0.75, shape 0.44, direction 0.62 over 4 seeds)")
def test_shipped_default_shows_its_colour_shape_and_direction(shipped_checks):
    rate = {k: np.mean([c[k] for c in shipped_checks]) for k in WORDS}
    assert min(rate["color"], rate["shape"], rate["direction"]) >= 0.75, rate
