"""Procedural videos (determinism, captions that match the drawing, bounces), the caption grammar,
the evaluation prompts and VideoFolder (round trip through mp4 and its errors)."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from training.data import (BACKGROUNDS, DIRECTION_FRAMES, DIRECTIONS, PALETTE, ProceduralVideos, VideoFolder,
                           eval_prompts, make_caption, parse_caption, shape_mask)

H, W = 32, 48


def _digest(ds, n):
    h = hashlib.sha256()
    for i in range(n):
        it = ds[i]
        h.update(it["video"].tobytes())
        h.update(it["caption"].encode())
    return h.hexdigest()


def test_deterministic_by_seed():
    a, b = ProceduralVideos(4, seed=0, height=H, width=W, frames=9), ProceduralVideos(4, 0, H, W, 9)
    assert _digest(a, 4) == _digest(b, 4) == _digest(a, 4)
    assert np.array_equal(a[2]["video"], b[2]["video"]) and a[2]["caption"] == b[2]["caption"]
    c = ProceduralVideos(4, seed=1, height=H, width=W, frames=9)
    assert _digest(a, 4) != _digest(c, 4)
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(4))
    # item i does not depend on num_samples or on what was drawn before
    assert np.array_equal(ProceduralVideos(9, 0, H, W, 9)[3]["video"], a[3]["video"])


def test_deterministic_across_processes():
    code = ("import hashlib; from training.data import ProceduralVideos as P; "
            f"print(hashlib.sha256(P(3, 5, {H}, {W}, 9)[2]['video'].tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hashlib.sha256(ProceduralVideos(3, 5, H, W, 9)[2]["video"].tobytes()).hexdigest()


@pytest.mark.parametrize("size", [(H, W), (48, 32), (64, 96)])
def test_items_match_their_captions(size):
    h, w = size
    ds = ProceduralVideos(12, seed=3, height=h, width=w, frames=17, max_objects=3)
    assert len(ds) == 12
    for i in range(len(ds)):
        it = ds[i]
        v, objs = it["video"], it["objects"]
        assert v.dtype == np.uint8 and v.shape == (17, h, w, 3)
        assert 1 <= len(objs) <= 3
        parsed = parse_caption(it["caption"])
        assert parsed["background"] == it["background"] in BACKGROUNDS
        assert parsed["objects"] == [(o.color, o.shape, o.direction) for o in objs]
        assert len({o.color for o in objs}) == len(objs)
        for o in objs:
            # the caption's direction is the initial heading (8-way, y up)
            angle = np.degrees(np.arctan2(-o.velocity[1], o.velocity[0]))
            assert DIRECTIONS[int(np.round(angle / 45.0)) % 8] == o.direction
            # the whole shape stays inside the frame
            x, y = o.positions[:, 0], o.positions[:, 1]
            assert (x - o.radius >= 0).all() and (x + o.radius <= w - 1).all()
            assert (y - o.radius >= 0).all() and (y + o.radius <= h - 1).all()
            assert 0.15 * min(h, w) - 1e-9 <= o.radius <= 0.25 * min(h, w) + 1e-9
            # drawn where it says and never hidden by another object: its colour covers its mask
            mask = shape_mask(o.shape, x, y, o.radius, h, w)
            assert mask.sum(axis=(1, 2)).min() >= 0.01 * h * w
            color = (v == PALETTE[o.color]).all(-1)
            assert np.array_equal(color, mask), f"item {i}: {o.color} {o.shape} pixels differ from its mask"
        bg = (v == BACKGROUNDS[it["background"]]).all(-1)
        drawn = np.zeros_like(bg)
        for o in objs:
            drawn |= (v == PALETTE[o.color]).all(-1)
        assert np.array_equal(bg, ~drawn), "every pixel is the background or one object"


def test_object_counts_weighted_towards_few():
    ds = ProceduralVideos(60, seed=0, height=H, width=W, frames=5, max_objects=3)
    counts = np.bincount([len(ds.objects(i)[1]) for i in range(len(ds))], minlength=4)
    assert counts[0] == 0 and counts[1] > counts[3] and counts[2] > 0 and counts[3] > 0, counts
    assert all(len(ProceduralVideos(20, 0, H, W, 5, max_objects=1).objects(i)[1]) == 1 for i in range(20))


def test_constant_velocity_and_bounces():
    ds = ProceduralVideos(6, seed=2, height=H, width=W, frames=120, max_objects=1)
    for i in range(len(ds)):
        (o,) = ds.objects(i)[1]
        d = np.diff(o.positions, axis=0)                      # [T-1, 2]
        flips = (np.sign(d[1:]) * np.sign(d[:-1]) < 0).sum()
        assert flips >= 1, f"item {i}: no bounce in 120 frames"
        # between bounces each axis moves at the initial speed; at a bounce step by less
        speed = np.abs(np.array(o.velocity))
        assert (np.abs(d) <= speed + 1e-9).all()
        assert np.isclose(np.abs(d), speed).mean() > 0.8
        # no bounce before the caption's direction is visible
        assert np.allclose(d[:DIRECTION_FRAMES], np.array(o.velocity))



@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_speed_scale_multiplies_every_speed_and_keeps_the_captions_true(scale):
    """speed_scale k: every object's speed is SPEED_RANGE * min(H, W) * k, still no bounce in the
    first DIRECTION_FRAMES frames, so ToyBench still reads each caption's direction off the video."""
    from training import toybench
    from training.data import SPEED_RANGE

    h, w = 64, 96
    ds = ProceduralVideos(24, seed=5, height=h, width=w, frames=33, max_objects=2, speed_scale=scale)
    lo, hi = (scale * v * min(h, w) for v in SPEED_RANGE)
    for i in range(len(ds)):
        it = ds[i]
        for o in it["objects"]:
            assert lo - 1e-9 <= float(np.hypot(*o.velocity)) <= hi + 1e-9, (i, o.velocity)
            assert np.allclose(np.diff(o.positions, axis=0)[:DIRECTION_FRAMES], np.array(o.velocity))
        assert toybench.score_video(it["video"], it["caption"])["motion"] == 1.0, it["caption"]
    assert _digest(ProceduralVideos(4, seed=5, height=h, width=w, frames=9, speed_scale=1.0), 4) == \
        _digest(ProceduralVideos(4, seed=5, height=h, width=w, frames=9), 4)  # 1: the scenes as before
    with pytest.raises(ValueError, match="speed_scale"):
        ProceduralVideos(4, seed=5, height=h, width=w, frames=9, speed_scale=0)

def test_caption_grammar_round_trip():
    objs = [("orange", "circle", "up-left"), ("blue", "square", "down"), ("red", "triangle", "right")]
    for n in (1, 2, 3):
        cap = make_caption("gray", objs[:n])
        assert parse_caption(cap) == {"background": "gray", "objects": objs[:n]}
    assert make_caption("white", objs[:1]) == "an orange circle moving up-left on a white background"
    assert make_caption("black", objs[:2]) == ("an orange circle moving up-left and a blue square moving down "
                                               "on a black background")
    assert parse_caption("A Red circle  moving right on a white background.")["objects"] == [
        ("red", "circle", "right")]


@pytest.mark.parametrize("caption, match", [
    ("a red circle moving right", "background"),
    ("a red circle moving right on a pink background", "background 'pink'"),
    ("a pink circle moving right on a white background", "colour 'pink'"),
    ("a red hexagon moving right on a white background", "shape 'hexagon'"),
    ("a red circle moving sideways on a white background", "direction 'sideways'"),
    ("a red circle on a white background", "moving"),
    ("", "background"),
])
def test_parse_caption_errors(caption, match):
    with pytest.raises(ValueError, match=match):
        parse_caption(caption)


def test_eval_prompts():
    p = eval_prompts()
    assert p == eval_prompts(8, 1234) and len(p) == 8 and len(set(p)) == 8
    counts = [len(parse_caption(x)["objects"]) for x in p]
    assert set(counts) == {1, 2}
    assert eval_prompts(3) == p[:3] and eval_prompts(8, seed=7) != p


def test_bad_arguments():
    with pytest.raises(ValueError, match="height and width"):
        ProceduralVideos(1, 0, 8, 48, 5)
    with pytest.raises(ValueError, match="max_objects"):
        ProceduralVideos(1, 0, H, W, 5, max_objects=0)
    with pytest.raises(IndexError):
        ProceduralVideos(2, 0, H, W, 5)[2]


# ---------------------------------------------------------------------------------------------
# VideoFolder
# ---------------------------------------------------------------------------------------------


def _write_pair(root, name, video, caption):
    from asd_deploy.video import write_mp4

    write_mp4(video, root / f"{name}.mp4")
    (root / f"{name}.txt").write_text(caption)


def test_video_folder_round_trip(tmp_path):
    src = ProceduralVideos(2, seed=4, height=H, width=W, frames=8)
    for i in range(2):
        _write_pair(tmp_path, f"clip{i}", src[i]["video"], src[i]["caption"] + "\n")
    ds = VideoFolder(tmp_path, frames=6, height=H, width=W)
    assert len(ds) == 2
    for i in range(2):
        it = ds[i]
        assert it["caption"] == src[i]["caption"] and it["path"].endswith(f"clip{i}.mp4")
        assert it["video"].dtype == np.uint8 and it["video"].shape == (6, H, W, 3)
        got, want = it["video"].astype(float), src[i]["video"].astype(float)
        err = np.abs(got - want[:6]).mean()
        assert err < 12, f"mp4 round trip differs by {err:.1f} on average"
        # frame t is the source's frame t, not a neighbour: a one-frame offset would pass the bound above
        errs = np.array([[np.abs(got[t] - want[s]).mean() for s in range(8)] for t in range(6)])
        assert (errs.argmin(axis=1) == np.arange(6)).all(), errs.round(1)
    small = VideoFolder(tmp_path, frames=6, height=H // 2, width=W // 2)[0]["video"]
    assert small.shape == (6, H // 2, W // 2, 3)
    ref = src[0]["video"][:6].astype(float).reshape(6, H // 2, 2, W // 2, 2, 3).mean(axis=(2, 4))
    assert np.abs(small - ref).mean() < 15


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolder(tmp_path / "nope", 4, H, W)
    with pytest.raises(ValueError, match="no .mp4"):
        VideoFolder(tmp_path, 4, H, W)
    video = ProceduralVideos(1, 0, H, W, 4)[0]["video"]
    _write_pair(tmp_path, "a", video, "a red circle moving right on a white background")
    (tmp_path / "b.mp4").write_bytes((tmp_path / "a.mp4").read_bytes())
    with pytest.raises(FileNotFoundError, match="b.txt"):
        VideoFolder(tmp_path, 4, H, W)
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(ValueError, match="b.txt is empty"):
        VideoFolder(tmp_path, 4, H, W)
    (tmp_path / "b.txt").write_text("anything")
    ds = VideoFolder(tmp_path, 5, H, W)
    with pytest.raises(ValueError, match=r"a\.mp4 has 4 frames; need at least 5"):
        ds[0]
