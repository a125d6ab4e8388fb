"""`--backend auto`: candidates built, timed side by side, the fastest kept with every
candidate's record and the CPU's features; `generate --backend auto` runs it. The timings are
injected (selection logic and manifest contents are under test, not this machine's speed)."""
import json
import subprocess
import sys

import pytest

from asd_deploy.backends.auto import find_auto_engine, make_auto
from asd_deploy.backends.manifest import EngineError, read_manifest
from asd_deploy.registry import load_dit
from export.auto import CANDIDATES, build_auto, choose, chunk_seconds, cpu_features, time_candidates

CANDS = [c for c in CANDIDATES if c["backend"] == "ort"] + [{"name": "broken", "backend": "aoti", "opset": 18}]
# ort-op23 has the faster step but the slower VAE decoder: at 1 step a chunk is 2 step calls + 1
# decode, so op18 wins with the VAE (the primary decoder) and op23 with the tiny decoder
FAKE = {"ort-op18": {"step_s": 0.002, "decode_s": 0.005, "decoders_s": {"vae": 0.005, "tiny": 0.003}},
        "ort-op23": {"step_s": 0.001, "decode_s": 0.009, "decoders_s": {"vae": 0.009, "tiny": 0.001}}}


@pytest.fixture(scope="module")
def auto_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    seen = {}

    def timer(folders, config, batch):
        seen.update(folders)
        assert all((f / "manifest.json").is_file() for f in folders.values())  # built before timing
        return {k: FAKE[k] for k in folders}
    folder = build_auto(out=out, candidates=CANDS, timer=timer, log=lambda m: None)
    return folder, out, seen


@pytest.mark.slow  # builds and times every candidate engine (~50 s)
def test_fastest_whole_chunk_is_kept(auto_engine):
    folder, out, seen = auto_engine
    assert folder.name.startswith(f"{load_dit('default').config.name}-s1f4-auto-fp32-") and set(seen) == {"ort-op18", "ort-op23"}
    m = read_manifest(folder)
    a = m["auto"]
    assert a["chosen"] == "ort-op18" and m["backend"] == "ort" and m["opset"] == 18
    rec = {c["name"]: c for c in a["candidates"]}
    assert set(rec) == {"ort-op18", "ort-op23", "broken"}
    assert rec["ort-op18"]["chunk_s"] == pytest.approx(2 * 0.002 + 0.005)
    assert rec["ort-op23"]["chunk_s"] == pytest.approx(2 * 0.001 + 0.009)
    assert a["best_by_decoder"] == {"tiny": "ort-op23", "vae": "ort-op18"}
    assert "opset" in rec["broken"]["error"] and "step_s" not in rec["broken"]
    assert a["cpu"] == cpu_features() and a["cpu"]["model"] and isinstance(a["cpu"]["flags"], list)
    assert m["decoder"]["kind"] == "vae" and "decode_next" in m["runtime"]
    assert "--backend auto" in m["rebuild"]
    assert [p.name for p in out.iterdir()] == [folder.name]  # the losers are gone


@pytest.mark.slow  # builds and times every candidate engine (~50 s)
def test_rerun_is_up_to_date(auto_engine):
    folder, out, _ = auto_engine
    logs = []

    def timer(*a):
        raise AssertionError("an up-to-date auto engine is not re-timed")
    assert build_auto(out=out, candidates=CANDS, timer=timer, log=logs.append) == folder
    assert any("up to date" in line for line in logs)


@pytest.mark.slow  # builds and times every candidate engine (~50 s)
def test_generate_with_auto_runs_the_chosen_engine(auto_engine):
    from asd_deploy.pipeline import Pipeline

    folder, out, _ = auto_engine
    loaded = load_dit("default")
    assert find_auto_engine(loaded.config, loaded.weights_hash, engines_dir=out) == folder
    step = make_auto(loaded, engines_dir=out)
    assert step.name == "auto (ort-op18)" and step.engine_dir == folder
    pipe = Pipeline.from_pretrained("default", backend="auto", engine=str(folder))
    assert pipe.info["backend"] == "auto (ort-op18)" and pipe.info["decoder"] == "vae (ort engine)"
    video, _ = pipe("a red circle moving right", frames=9)
    assert video.shape == (9, pipe.config.height, pipe.config.width, 3)
    # decoding with the tiny decoder, for which another candidate was faster: said, with the rebuild
    with pytest.warns(UserWarning, match=r"candidate ort-op23 was faster.*--decoder tiny,vae"):
        pipe = Pipeline.from_pretrained("default", backend="auto", engine=str(folder), decoder="tiny")
    assert pipe.info["decoder"] == "tiny (ort engine)"


@pytest.mark.slow  # builds and times every candidate engine (~50 s)
def test_real_timer_times_every_graph(auto_engine):
    folder, _, _ = auto_engine
    t = time_candidates({"x": folder}, load_dit("default").config, 1, repeats=1, warmup=0)
    assert t["x"]["step_s"] > 0 and t["x"]["decode_s"] == t["x"]["decoders_s"]["vae"] > 0
    assert set(t["x"]["decoders_s"]) == {"vae", "tiny"} and t["x"]["decoders_s"]["tiny"] > 0
    # each decoder also timed the way the pipeline runs it, and that is what a chunk then costs
    assert t["x"]["primary"] == "vae" and set(t["x"]["pipelined_s"]) == {"vae", "tiny"}
    assert all(v > 0 for v in t["x"]["pipelined_s"].values())
    assert chunk_seconds(t["x"], 1) == t["x"]["pipelined_s"]["vae"]
    assert chunk_seconds(t["x"], 1, "tiny") == t["x"]["pipelined_s"]["tiny"]


def test_auto_key_follows_the_decoders_weights_not_their_path(tmp_path):
    """A tiny decoder retrained in place (same folder, new weights) makes the auto engine stale: it
    carries the decoders it was built with, so their weights are part of its key."""
    import torch

    from asd_deploy.decoders.tiny import TINY_DECODER_ARCHS, TinyDecoder
    from export.auto import auto_key

    loaded, folder = load_dit("default"), tmp_path / "td"
    keys = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        TinyDecoder(TINY_DECODER_ARCHS["demo-lite"]).save(folder)
        keys.append(auto_key(loaded, tiny_decoder=str(folder), cpu={}))
    assert keys[0] != keys[1] and keys[0] == keys[2]
    assert auto_key(loaded, decoder="vae", tiny_decoder=str(folder), cpu={}) != keys[0]  # another decoder set


def test_choose_and_errors(tmp_path):
    assert choose([{"name": "a", "step_s": 1.0, "decode_s": None}, {"name": "b", "error": "x"}], 1)["name"] == "a"
    # the pipelined chunk decides where it was timed (a is faster stage by stage, slower pipelined);
    # a decoder without a pipelined timing falls back to the stages' sum
    a = {"name": "a", "step_s": 0.001, "decode_s": 0.002, "decoders_s": {"vae": 0.002, "tiny": 0.003},
         "primary": "vae", "pipelined_s": {"vae": 0.05}}
    b = {"name": "b", "step_s": 0.002, "decode_s": 0.004, "decoders_s": {"vae": 0.004, "tiny": 0.0005},
         "primary": "vae", "pipelined_s": {"vae": 0.01}}
    assert choose([a, b], 1)["name"] == "b" and chunk_seconds(a, 1) == 0.05
    assert choose([a, b], 1, "tiny")["name"] == "b" and chunk_seconds(a, 1, "tiny") == pytest.approx(0.005)
    with pytest.raises(RuntimeError, match="no --backend auto candidate"):
        choose([{"name": "b", "error": "no onnxruntime"}], 1)
    loaded = load_dit("default")
    with pytest.raises(EngineError, match="export.build --backend auto"):
        find_auto_engine(loaded.config, loaded.weights_hash, engines_dir=tmp_path)
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--backend", "auto", "--frames", "9",
                        "--out", str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "ASD_DEPLOY_ENGINES": str(tmp_path)})
    assert r.returncode == 2 and "export.build --backend auto" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # builds and times every candidate engine (~50 s)
def test_auto_refuses_a_plain_engine(auto_engine, tmp_path):
    folder, _, _ = auto_engine
    import shutil
    plain = shutil.copytree(folder, tmp_path / "plain")
    m = json.loads((plain / "manifest.json").read_text())
    del m["auto"]
    (plain / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="not chosen by --backend auto"):
        make_auto(load_dit("default"), engine=plain)
