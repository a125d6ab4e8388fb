"""Engines against eager PyTorch, and the build's bookkeeping: manifests, staleness, corruption,
interrupted builds, forced rebuilds, rebuild hints that work. Engines are built once per session
into a temp folder shared with other modules (conftest.default_engines: about a minute and a half
on 2 cores: the module is `slow`; the manifest and discovery logic is checked without builds in
tests/test_engines.py)."""
import json
import shlex
import shutil
import subprocess
import sys

import onnx
import pytest
import torch

from asd_deploy.backends import EngineError, load_engine, make_backend
from asd_deploy.config import ModelConfig
from asd_deploy.generator import EagerStep, generate
from asd_deploy.registry import load_dit
from asd_deploy.schedule import Schedule
from export.build import build

from conftest import assert_close, rand_context, video_tol

pytestmark = pytest.mark.slow
ENGINES = [("ort", 18), ("ort", 23), ("aoti", None)]


@pytest.fixture(scope="module")
def loaded():
    return load_dit("default")


@pytest.fixture(scope="module")
def engines(default_engines):
    get, out = default_engines  # shared with the C++ runtime's and the decoders' tests
    return {(b, o): get(b, o) for b, o in ENGINES}, out


def _video(step, ctx, **kw):
    return torch.cat(list(generate(step, ctx, **kw)), dim=2)


@pytest.mark.parametrize("key", ENGINES + [("compile", None)], ids=lambda k: f"{k[0]}{k[1] or ''}")
def test_backend_matches_eager(key, engines, loaded):
    """Chunk step against eager at fp32 within 1e-4; whole videos (1-step, 2-step + FFE, 5 chunks
    through the rolling window) within fp32's own error over that video (`video_tol`: never
    below 1e-4)."""
    name, _ = key
    step = make_backend(name, loaded) if name == "compile" else make_backend(name, loaded, engine=engines[0][key])
    eager = EagerStep(loaded.model)
    cfg = loaded.config
    ctx = rand_context(cfg)
    ck, cv = eager.cross_kv(ctx)
    ck2, cv2 = step.cross_kv(ctx)
    assert_close(ck2, ck, 1e-4, f"{name} cross_k")
    assert_close(cv2, cv, 1e-4, f"{name} cross_v")
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(cfg.chunk_shape(), generator=g), torch.full((1, 3), 640.0), ck, cv,
            torch.randn(cfg.cache_shape(), generator=g), torch.randn(cfg.cache_shape(), generator=g),
            torch.tensor([6]), torch.tensor([2 * cfg.tokens_per_chunk]))
    for a, b, what in zip(step(*args), eager(*args), ("flow", "k_new", "v_new")):
        assert_close(a, b, 1e-4, f"{name} chunk step {what}")
    for sched in (Schedule(steps=1), Schedule(steps=2, ffe=True)):
        assert_close(_video(step, ctx, num_chunks=5, schedule=sched, seed=3),
                     _video(eager, ctx, num_chunks=5, schedule=sched, seed=3), video_tol(sched),
                     f"{name} {sched.describe()} video")


def test_exported_graph_depends_on_cache_input(engines):
    folder = engines[0][("ort", 18)]
    m = onnx.load(str(folder / "step.onnx"))
    inputs = [i.name for i in m.graph.input]
    assert "cache_k" in inputs and "cache_v" in inputs and "frame_index" in inputs and "cache_len" in inputs
    used = {n for node in m.graph.node for n in node.input}
    assert {"cache_k", "cache_v", "cache_len", "frame_index"} <= used
    assert not any(init.name.startswith("cache") for init in m.graph.initializer)  # never baked


def test_opset23_graph_holds_the_fused_attention(engines, loaded):
    """What the opset-23 engine is named for: ONNX's own `Attention` op, one per self- and
    cross-attention of every block, kept through ORT's offline optimisation; opset 18 has none."""
    layers = loaded.config.num_layers
    for name in ("step.onnx", "step.opt.onnx"):
        m = onnx.load(str(engines[0][("ort", 23)] / name))
        att = [n for n in m.graph.node if n.op_type == "Attention"]
        assert len(att) == 2 * layers and all(n.domain in ("", "ai.onnx") for n in att), name
    m18 = onnx.load(str(engines[0][("ort", 18)] / "step.onnx"))
    assert not [n for n in m18.graph.node if n.op_type == "Attention"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_aoti_step_is_frozen(engines):
    """Freezing turns every linear into a oneDNN linear on a prepacked weight. It is silently
    skipped when the compile runs with autograd on, leaving torch's BLAS addmm (less than half
    the speed on an AMD EPYC), so the generated wrapper is checked, not the request."""
    import zipfile

    folder = engines[0][("aoti", None)]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["inductor_configs"] == {"freezing": True}
    with zipfile.ZipFile(folder / "step.pt2") as z:
        src = "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".wrapper.cpp"))
    assert src, "no AOTInductor wrapper source in step.pt2"
    layers = m["model"]["config"]["num_layers"]  # 8 linears per block
    assert src.count("aoti_torch_cpu__linear_pointwise") >= 8 * layers and "aoti_torch_cpu_addmm" not in src


def test_manifest_records_what_a_deployer_needs(engines, loaded):
    m = json.loads((engines[0][("ort", 23)] / "manifest.json").read_text())
    assert m["complete"] and m["backend"] == "ort" and m["opset"] == 23 and m["precision"] == "fp32"
    assert m["model"]["weights_hash"] == loaded.weights_hash and ModelConfig.from_dict(m["model"]["config"]) == loaded.config
    assert m["torch_version"] == torch.__version__ and m["backend_version"] and m["host"]
    assert m["schedule"]["steps"] == 1 and m["shapes"] and m["build"]["started"]
    assert m["validation"]["outputs"]["flow"]["max_abs_err"] < 1e-4


def test_rebuild_skips_stages_and_force_rebuilds(engines, loaded, tmp_path):
    _, out = engines
    logs = []
    build(backend="ort", out=out, log=logs.append)
    assert any("up to date, skipped" in l for l in logs) and any("engine is up to date" in l for l in logs)
    folder = shutil.copytree(engines[0][("ort", 18)], tmp_path / "forced")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    logs = []
    assert build(backend="ort", engine=folder, force=True, log=logs.append) == folder
    assert not any("skipped" in l or "up to date" in l for l in logs), logs
    for artifact in ("step.onnx", "cross_kv.onnx", "step.opt.onnx", "cross_kv.opt.onnx"):
        assert any(l.startswith(f"[") and f"] {artifact}: " in l for l in logs), artifact  # each stage ran
        assert (folder / artifact).stat().st_mtime_ns > before[artifact], f"{artifact} was not rewritten"
    make_backend("ort", loaded, engine=folder)  # and the rebuilt engine loads


def test_stale_manifest_is_detected(engines, loaded, tmp_path):
    from asd_deploy.model import build_model
    folder = engines[0][("ort", 18)]
    other = load_dit("random", "tiny")
    other.model = build_model(loaded.config, seed=9)
    from asd_deploy.checkpoint import state_dict_hash
    other.weights_hash = state_dict_hash(other.model.state_dict())
    with pytest.raises(EngineError, match="python -m export.build"):
        make_backend("ort", other, engine=folder)
    with pytest.raises(EngineError):
        load_engine(folder, expect_config=ModelConfig.preset("small"))


def _copy(folder, dest):
    import shutil
    return shutil.copytree(folder, dest)


def test_corrupt_truncated_and_missing_files_are_detected(engines, loaded, tmp_path):
    folder = engines[0][("ort", 18)]
    bad = _copy(folder, tmp_path / "corrupt")
    p = bad / "step.opt.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="python -m export.build"):
        make_backend("ort", loaded, engine=bad)
    trunc = _copy(folder, tmp_path / "trunc")
    (trunc / "step.opt.onnx").write_bytes((folder / "step.opt.onnx").read_bytes()[:1000])
    with pytest.raises(EngineError, match="python -m export.build"):
        make_backend("ort", loaded, engine=trunc)
    missing = _copy(folder, tmp_path / "missing")
    (missing / "cross_kv.opt.onnx").unlink()
    with pytest.raises(EngineError, match="python -m export.build"):
        make_backend("ort", loaded, engine=missing)
    with pytest.raises(EngineError, match="python -m export.build"):
        make_backend("ort", loaded, engine=tmp_path / "nothing-here")


def test_interrupted_build_never_loads(engines, loaded, tmp_path):
    folder = engines[0][("ort", 18)]
    half = _copy(folder, tmp_path / "half")
    m = json.loads((half / "manifest.json").read_text())
    m["complete"] = False                      # what a build killed between stages leaves
    (half / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="python -m export.build"):
        make_backend("ort", loaded, engine=half)


def test_rebuild_hint_fixes_a_damaged_renamed_engine(engines, loaded, tmp_path):
    """The command an error names, run as printed, makes the same request succeed."""
    folder = shutil.copytree(engines[0][("ort", 18)], tmp_path / "my-renamed-engine")
    (folder / "step.opt.onnx").write_bytes(b"damaged")
    with pytest.raises(EngineError) as e:
        make_backend("ort", loaded, engine=folder)
    cmd = shlex.split(str(e.value).split("rebuild: ")[-1])
    assert cmd[:3] == ["python", "-m", "export.build"]
    from export.build import main as build_main
    assert build_main(cmd[3:] + ["--quiet"]) == 0
    make_backend("ort", loaded, engine=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-renamed-engine"]  # nothing built elsewhere


def test_build_cli_end_to_end_on_default_model(tmp_path, loaded):
    from asd_deploy.backends.manifest import engine_dir_name
    folder = tmp_path / engine_dir_name(loaded.config.name, 1, True, 4, "ort", "fp32", 18, 1, loaded.weights_hash)
    assert folder.name == f"{loaded.config.name}-s1f4-ort-fp32-op18-{loaded.weights_hash[:8]}"
    (folder / ".step.onnx.tmp.killed").mkdir(parents=True)  # what a build killed mid-write leaves
    r = subprocess.run([sys.executable, "-m", "export.build", "--steps", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((folder / "manifest.json").read_text())
    assert m["complete"] and m["schedule"]["ffe"] and m["schedule"]["ffe_steps"] == 4  # --ffe is on by default
    assert f"generate with: python -m asd_deploy generate --backend ort --engine {folder}" in r.stdout
    assert not list(tmp_path.rglob("*.tmp*"))
    r = subprocess.run([sys.executable, "-m", "export.build", "--backend", "trt", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TensorRT" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key", ENGINES, ids=lambda k: f"{k[0]}{k[1] or ''}")
def test_decoder_engine_equals_diffusers_streaming(key, engines):
    """The engine's exported VAE decoder (decode_first, then decode_next with the cache it
    returned) against diffusers' own frame-by-frame streaming decode: max abs 1e-4 over 4 chunks."""
    from asd_deploy.backends.manifest import read_manifest
    from asd_deploy.decoders.engine import EngineDecodeNet
    from asd_deploy.registry import ASSETS
    from asd_deploy.vae import VideoVAE

    folder = engines[0][key]
    m = read_manifest(folder)
    assert m["decoder"]["kind"] == "vae" and m["decoder"]["validation"]["max_abs_err"] <= 1e-4
    eng = EngineDecodeNet(folder, m).stream()
    ref = VideoVAE.from_pretrained(ASSETS / "vae").stream_decoder()
    g = torch.Generator().manual_seed(7)
    cfg = ModelConfig.from_dict(m["model"]["config"])
    for c in torch.randn(1, 16, 12, cfg.latent_height, cfg.latent_width, generator=g).split(3, dim=2):
        assert_close(eng.decode_chunk(c), ref.decode_chunk(c), 1e-4, f"{key} decoder engine chunk")
