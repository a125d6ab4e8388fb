"""Per-chunk consistency of long videos: real videos stay high, a video that loses its object or
its background drops at those chunks; the CLI runs both cache settings."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.data import BACKGROUNDS, ProceduralVideos
from training.longvideo import chunk_scores

ROOT = Path(__file__).resolve().parents[1]


def test_chunk_scores_follow_what_each_chunk_shows():
    it = ProceduralVideos(1, seed=2, height=64, width=96, frames=1 + 4 * 26, max_objects=1)[0]
    sizes = [9] + [12] * 8
    real = chunk_scores(it["video"], it["caption"], sizes)
    assert len(real) == 9 and min(c["consistency"] for c in real) > 0.95, real
    video = it["video"].copy()
    video[9 + 12 * 5:] = BACKGROUNDS[it["background"]]          # the object is gone from chunk 6 on
    lost = chunk_scores(video, it["caption"], sizes)
    assert all(c["consistency"] > 0.95 for c in lost[:6]) and all(c["consistency"] == 0 for c in lost[6:])
    other = next(b for b in BACKGROUNDS if b != it["background"])
    video = it["video"].copy()
    video[:9][(video[:9] == BACKGROUNDS[it["background"]]).all(-1)] = BACKGROUNDS[other]
    assert chunk_scores(video, it["caption"], sizes)[0]["consistency"] == 0.0   # chunk 0 on the wrong background


@pytest.mark.slow  # a CLI subprocess over a long video (~12 s)
def test_cli_compares_the_rolling_window_with_the_whole_cache(tmp_path):
    out = tmp_path / "long"
    r = subprocess.run([sys.executable, "-m", "training.longvideo", "--chunks", "5", "--prompts", "1", "--seeds", "0",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    assert len(res["settings"]) == 2
    for s in res["settings"].values():
        assert len(s["consistency"]) == 5 and all(0 <= v <= 1 for v in s["consistency"])
    assert "| 4 |" in out.with_suffix(".md").read_text()
