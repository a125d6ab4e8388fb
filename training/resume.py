"""Resumable state of the single-network recipes (`training.vae`, `training.tiny_decoder`).

Owns: `save_state` / `load_state`: the network, its optimizer and LR schedule, the batch
generator, the step, the seconds trained so far and the loss history, in one file written
atomically (`<out>.state.pt`), so an interrupted run continues bit for bit. Does not own the
DiT trainer's checkpoints (`train.py`, Self-Forcing format with a separate optimizer file).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from asd_deploy.checkpoint import atomic_write


def state_path(out) -> Path:
    return Path(str(out) + ".state.pt")


def save_state(path: Path, net, opt, sched, gen: torch.Generator, step: int, train_s: float, history: list):
    st = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
          "step": step, "train_s": train_s, "history": json.dumps(history)}
    atomic_write(path, lambda tmp: torch.save(st, tmp))


def load_state(path: Path, net, opt, sched, gen: torch.Generator) -> tuple[int, float, list]:
    """Restore in place; returns (step, seconds trained, history)."""
    st = torch.load(path, weights_only=True)
    net.load_state_dict(st["net"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    gen.set_state(st["gen"])
    return int(st["step"]), float(st["train_s"]), json.loads(st["history"])
