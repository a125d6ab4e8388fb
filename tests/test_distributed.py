"""FSDP2 over 2 gloo processes gives the update of 1 process on the same global batch.

Both runs go through the CLI (`python -m training.train`): 2 teacher steps, then 2 distillation
steps (step 0 updates generator, critic and discriminator; step 1 the critic and discriminator).
They must agree on the weights (generator, critic, EMA, discriminator) and on every logged number
(losses, and the pre-clipping gradient norms, since Adam's update would hide a gradient scale error).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.train import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--recipe", "micro", "--stage", "all", "--quiet", "--set", "teacher.steps=2",
        "--set", "distill.steps=2"]


def _torchrun(out: Path) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found beside the interpreter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training.train", *ARGS, "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two torchrun processes (~13 s)
def test_fsdp2_two_processes_match_one(tmp_path):
    proc = _torchrun(tmp_path / "fsdp")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    main(ARGS + ["--out", str(tmp_path / "single")])
    for stage in ("teacher", "distill"):
        a = torch.load(tmp_path / "single" / stage / "checkpoint.pt", weights_only=True)
        b = torch.load(tmp_path / "fsdp" / stage / "checkpoint.pt", weights_only=True)
        assert a["world_size"] == 1 and b["world_size"] == 2
        keys = ["generator", "critic", "generator_ema", "discriminator"]
        for key in [k for k in keys if k in a]:
            for name, t in a[key].items():
                err = (t - b[key][name]).abs().max().item()
                # float reduction order only; a real sharding error moves weights by ~lr (1e-3)
                assert err <= 1e-5, f"{stage} {key}/{name}: 1 vs 2 processes differ by {err:.2e}"
        la = [json.loads(x) for x in (tmp_path / "single" / stage / "log.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (tmp_path / "fsdp" / stage / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in la] == [e["step"] for e in lb] == [0, 1]
        for ea, eb in zip(la, lb):  # losses, and grad norms: Adam would hide a gradient scale error
            assert set(ea) == set(eb)
            for k, v in ea.items():
                if k not in ("stage", "time_s"):
                    assert abs(v - eb[k]) <= 1e-5 * max(1.0, abs(v)), f"{stage} step {ea['step']} {k}: {v} vs {eb[k]}"
