"""Where engines come from and what a manifest may say: the engine cache, trust, the schema,
folder names, rebuild hints, the build lock and leftovers of killed builds. No engine is built
here (fast): engine folders are written by hand with real artifact records, which is all that
discovery and validation read. Building and loading real engines is tests/test_export.py."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from asd_deploy.backends import EngineError, find_engine
from asd_deploy.backends.manifest import (FORMAT, MANIFEST_NAME, engine_cache_dir, engine_dir_name, file_record,
                                          find_engines, read_manifest, validate_manifest)
from asd_deploy.backends.signature import signatures
from asd_deploy.config import ModelConfig
from asd_deploy.schedule import Schedule
from export.build import _parser as build_parser
from export.build import build, build_lock, remove_stale_temps

CFG = ModelConfig.preset("tiny")
HASH = "ab" * 32


def fake_engine(folder: Path, cfg=CFG, weights_hash=HASH, backend="ort", **changes) -> Path:
    """An engine folder whose manifest and artifact records are exactly what a build writes (the
    artifacts themselves are placeholders: nothing here runs them)."""
    folder.mkdir(parents=True, exist_ok=True)
    arts = {}
    for name in ("step.opt.onnx", "cross_kv.opt.onnx"):
        (folder / name).write_bytes(os.urandom(64))
        arts[name] = file_record(folder / name, "optimize", "k")
    m = {"format": FORMAT, "complete": True, "name": folder.name, "backend": backend, "backend_version": "1",
         "precision": "fp32", "dtype": "float32", "opset": 18, "batch": 1, "device": "cpu",
         "model": {"config": cfg.to_dict(), "config_name": cfg.name, "checkpoint": "default",
                   "weights_hash": weights_hash, "trained": True},
         "schedule": Schedule(1, True).to_dict(), "shapes": {k: s.to_dict() for k, s in signatures(cfg).items()},
         "artifacts": arts, "runtime": {"step": "step.opt.onnx", "cross_kv": "cross_kv.opt.onnx"},
         "torch_version": "x", "host": {}, "build": {"args": {"checkpoint": "default", "backend": backend,
                                                              "steps": 1, "ffe": True, "ffe_steps": 4},
                                                     "finished": "2026-01-01T00:00:00"}}
    m.update(changes)
    (folder / MANIFEST_NAME).write_text(json.dumps(m))
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private engine cache via $XDG_CACHE_HOME, an empty working directory."""
    monkeypatch.delenv("ASD_DEPLOY_ENGINES", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = engine_cache_dir()
    assert root == tmp_path / "xdg" / "asd-deploy" / "engines"
    root.mkdir(parents=True, mode=0o700)
    return root


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("ASD_DEPLOY_ENGINES", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert engine_cache_dir() == tmp_path / ".cache" / "asd-deploy" / "engines"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # XDG says: ignore a relative path
    assert engine_cache_dir() == tmp_path / ".cache" / "asd-deploy" / "engines"
    monkeypatch.setenv("ASD_DEPLOY_ENGINES", str(tmp_path / "mine"))
    assert engine_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("ASD_DEPLOY_ENGINES", "engines")  # would trust whatever folder a command runs in
    with pytest.raises(EngineError, match="relative path"):
        engine_cache_dir()


def test_planted_engine_in_working_directory_is_never_used(cache, tmp_path):
    """An engine is code. A complete, matching engine under ./engines/ is not picked up; the same
    folder in the user's cache is (the positive control)."""
    planted = fake_engine(Path("engines") / engine_dir_name("tiny", 1, True, 4, "ort", "fp32", 18, 1, HASH))
    with pytest.raises(EngineError) as e:
        find_engine("ort", CFG, HASH)
    assert "is not searched" in str(e.value) and "--engine" in str(e.value)
    mine = fake_engine(cache / planted.name)
    assert find_engine("ort", CFG, HASH) == mine


def test_discovery_skips_folders_others_can_write_and_keeps_neighbours(cache):
    good = fake_engine(cache / "good")
    shared = fake_engine(cache / "shared", weights_hash=HASH)
    os.chmod(shared, 0o777)
    broken = fake_engine(cache / "broken")
    m = json.loads((broken / MANIFEST_NAME).read_text())
    del m["model"]["weights_hash"]
    m["batch"] = "1"
    (broken / MANIFEST_NAME).write_text(json.dumps(m))
    (cache / "notjson").mkdir()
    (cache / "notjson" / MANIFEST_NAME).write_text("[1, 2")
    skipped = []
    found = [d for d, _ in find_engines(cache, skipped=skipped)]
    assert found == [good]
    text = " ".join(skipped)
    assert "shared (not loaded: writable by every user)" in text
    assert "broken" in text and "notjson" in text
    assert find_engine("ort", CFG, HASH) == good


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["model"].pop("weights_hash"), "manifest.model.weights_hash is missing"),
    (lambda m: m.update(batch="1"), "manifest.batch is str"),
    (lambda m: m.update(batch=True), "manifest.batch is True"),
    (lambda m: m.update(runtime={"step": "../../outside.onnx", "cross_kv": "cross_kv.opt.onnx"}),
     "manifest.runtime.step is '../../outside.onnx', expected a plain file name"),
    (lambda m: m["artifacts"].update({"/etc/passwd": {"bytes": 1, "sha256": "x"}}), "names '/etc/passwd'"),
    (lambda m: m.update(shapes=[]), "manifest.shapes is list"),
    (lambda m: m["model"].update(config={"dim": "big"}), "not a model config"),
    (lambda m: m.pop("schedule"), "manifest.schedule is missing"),
])
def test_manifest_schema(tmp_path, edit, needle):
    d = fake_engine(tmp_path / "e")
    m = json.loads((d / MANIFEST_NAME).read_text())
    edit(m)
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(EngineError) as e:
        read_manifest(d)
    assert "does not follow the manifest schema" in str(e.value) and needle in str(e.value), str(e.value)
    assert "rebuild: python -m export.build" in str(e.value)


def test_artifact_may_not_be_a_link_out_of_its_folder(tmp_path):
    d = fake_engine(tmp_path / "e")
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((d / "step.opt.onnx").read_bytes())
    (d / "step.opt.onnx").unlink()
    (d / "step.opt.onnx").symlink_to(outside)  # same bytes, same sha256: only the location is wrong
    with pytest.raises(EngineError, match="is a link to"):
        validate_manifest(d, read_manifest(d))


def test_folder_names_carry_the_weights_hash():
    a = engine_dir_name("tiny", 1, True, 4, "ort", "fp32", 18, 1, "11" * 32)
    b = engine_dir_name("tiny", 1, True, 4, "ort", "fp32", 18, 1, "22" * 32)
    assert a == "tiny-s1f4-ort-fp32-op18-11111111" and a != b


def _hint_folder(message: str) -> Path:
    """The folder the rebuild command in an error message would build."""
    cmd = shlex.split(message.split("rebuild: ")[-1].split("build it: ")[-1])
    assert cmd[:3] == ["python", "-m", "export.build"], cmd
    args = build_parser().parse_args(cmd[3:])
    if args.engine:
        return Path(args.engine)
    from asd_deploy.registry import load_dit
    loaded = load_dit(args.checkpoint, args.config)
    return Path(args.out or engine_cache_dir()) / engine_dir_name(
        loaded.config.name, args.steps, args.ffe, args.ffe_steps, args.backend, args.precision,
        args.opset if args.opset is not None else 18, args.batch, loaded.weights_hash)


def test_rebuild_hint_builds_the_folder_that_failed(tmp_path):
    """A renamed, damaged engine folder: the hint rebuilds that very folder, not a fresh one
    somewhere else (whose absence would repeat the error forever)."""
    d = fake_engine(tmp_path / "renamed-by-user")
    (d / "step.opt.onnx").write_bytes(b"damaged")
    with pytest.raises(EngineError) as e:
        validate_manifest(d, read_manifest(d))
    assert _hint_folder(str(e.value)) == d
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["complete"] = False
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(EngineError) as e:
        read_manifest(d)
    assert _hint_folder(str(e.value)) == d


def test_missing_engine_hint_builds_where_discovery_looks(tmp_path, monkeypatch):
    """With $ASD_DEPLOY_ENGINES set, the build command in the error writes where lookup reads."""
    from asd_deploy.registry import load_dit

    monkeypatch.setenv("ASD_DEPLOY_ENGINES", str(tmp_path / "custom"))
    loaded = load_dit("default")
    with pytest.raises(EngineError) as e:
        find_engine("ort", loaded.config, loaded.weights_hash)
    assert _hint_folder(str(e.value)).parent == tmp_path / "custom"


def test_stale_temporaries_are_removed(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    (d / ".step.onnx.tmp.abc123").mkdir()
    (d / ".step.onnx.tmp.abc123" / "step.onnx").write_bytes(b"half")
    (d / ".manifest.tmp.x1y2.json").write_text("{")
    (d / ".e.old-1234").mkdir()
    (d / "step.onnx").write_bytes(b"kept")
    assert remove_stale_temps(d) == [".e.old-1234", ".manifest.tmp.x1y2.json", ".step.onnx.tmp.abc123"]
    assert sorted(p.name for p in d.iterdir()) == ["step.onnx"]


_HOLD = """
import sys, time
from pathlib import Path
from export.build import build_lock
with build_lock(Path(sys.argv[1]), log=lambda m: None):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_concurrent_builds_of_one_folder_are_serialised(tmp_path):
    """While another process builds a folder, a second build of it waits (here: gives up after
    the timeout, naming the holder) instead of writing into the same files."""
    d = tmp_path / "engine"
    d.mkdir()
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert holder.stdout.readline().strip() == "locked"
        logs = []
        with pytest.raises(EngineError, match=rf"another build of .* \(pid {holder.pid}\)"):
            build(engine=d, lock_timeout=0.5, log=logs.append)
        assert any("waiting" in line for line in logs)
        assert not (d / MANIFEST_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    with build_lock(d, timeout=5, log=lambda m: None):  # the OS released the killed holder's lock
        pass


def test_build_out_errors_are_clear(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(EngineError, match="is a file"):
        build(out=f, log=lambda m: None)
    with pytest.raises(EngineError, match="is a file"):
        build(out=f / "sub", log=lambda m: None)
    r = subprocess.run([sys.executable, "-m", "export.build", "--out", "/proc/asd-engines"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "error: cannot build into /proc/asd-engines" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow  # an ONNX export and optimisation: ~25 s on 2 cores
def test_readme_command_one_builds_into_the_cache_and_generate_finds_it(tmp_path):
    """`python -m export.build --steps 1 && python -m asd_deploy generate --backend ort ...` with
    no --engine anywhere: the build goes to the user's cache, generate finds it there, and
    nothing is written to (or read from) the working directory's engines/."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "ASD_DEPLOY_ENGINES"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(root))
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "export.build", "--steps", "1", "--quiet"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "xdg" / "asd-deploy" / "engines"
    (folder,) = cache.iterdir()
    assert r.stdout.startswith(f"engine: {folder}\n") and r.stderr == ""
    assert not cache.stat().st_mode & 0o077  # the cache is private
    r = subprocess.run([sys.executable, "-m", "asd_deploy", "generate", "--backend", "ort", "--steps", "1",
                        "--frames", "9", "--out", "out.mp4", "--quiet"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "backend ort" in r.stdout and (work / "out.mp4").stat().st_size > 0
    assert sorted(p.name for p in work.iterdir()) == ["out.mp4"]
