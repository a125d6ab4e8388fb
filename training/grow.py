"""Grow a trained DiT deeper without changing what it computes: the starting point of a bigger teacher.

Owns: `grow_depth` and `python -m training.grow`. Each new block is a copy of the block before it
whose three residual branches (self-attention output, cross-attention output, FFN output) are
zeroed, so it adds nothing until training moves those weights: the grown network's outputs equal
the original's at step 0 (tested), and the teacher continues from what it knew instead of from
random weights. Does not own training (`train.py`: `--set teacher.init=GROWN --set
model_overrides.num_layers=N`) or the model (`asd_deploy/model.py`).

    python -m training.grow --checkpoint training/checkpoints/teacher-curriculum/checkpoint.pt \\
        --layers 8 --out out/grown/teacher-8.safetensors
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from asd_deploy.checkpoint import atomic_write, read_state_dict

ZEROED = ("self_attn.o.", "cross_attn.o.", "ffn.2.")  # the residual branches' last linear layers
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def grow_depth(sd: dict, layers: int) -> dict:
    """A state dict with `layers` blocks from one with fewer: the original blocks spread evenly,
    each new block inserted after an original one, copied from it, its residual outputs zeroed."""
    have = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    if have == 0:
        raise ValueError("the state dict has no blocks.N.* keys: expected a Wan DiT state dict")
    if layers < have:
        raise ValueError(f"--layers {layers} is fewer than the checkpoint's {have} blocks; growing only adds blocks")
    # new block j of the grown net copies original block src[j]; fresh[j]: it is a new (zeroed) copy
    extra = layers - have
    src, fresh = [], []
    for i in range(have):
        src.append(i)
        fresh.append(False)
        for _ in range(extra // have + (i < extra % have)):
            src.append(i)
            fresh.append(True)
    out = {k: v for k, v in sd.items() if not _BLOCK.match(k)}
    for j, (i, new) in enumerate(zip(src, fresh)):
        prefix = f"blocks.{i}."
        for k, v in sd.items():
            if k.startswith(prefix):
                rest = k[len(prefix):]
                t = v.clone()
                if new and rest.startswith(ZEROED):
                    t.zero_()
                out[f"blocks.{j}.{rest}"] = t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.grow", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint.pt, .safetensors or diffusers folder")
    p.add_argument("--layers", type=int, required=True, help="blocks in the grown network")
    p.add_argument("--prefer", default="generator_ema", help="which network of a training checkpoint to grow")
    p.add_argument("--out", required=True, help="where to write the grown weights (.safetensors)")
    a = p.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        p.error(f"--out {a.out}: expected a path ending in .safetensors")
    sd = grow_depth(read_state_dict(a.checkpoint, prefer=a.prefer), a.layers)
    sd = {k: v.contiguous() for k, v in sd.items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, lambda tmp: save_file(sd, str(tmp)))
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {a.out}: {a.layers} blocks, {n / 1e6:.2f}M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
