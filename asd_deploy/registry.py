"""Where a DiT comes from: the embedded default model or a user's checkpoint.

Owns: resolving `--checkpoint default|PATH` plus `--config NAME` into a config and a loaded
eager model, and the checkpoint's content hash that engine manifests record. Does not own: the
file formats (`checkpoint.py`) or the text encoder / VAE that go with a model (`pipeline.py`).

The default model: when `asd_deploy/assets/default/` holds a trained checkpoint (shipped by the
training recipe) it is that; otherwise it is the `tiny` config with RANDOM weights (seed 0),
which exercises every code path but generates noise-like video.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, state_dict_hash
from .config import ModelConfig
from .model import CausalWanDiT, build_model

ASSETS = Path(__file__).parent / "assets" / "default"
DEFAULT_RANDOM_SEED = 0


@dataclass
class LoadedDiT:
    config: ModelConfig
    model: CausalWanDiT
    checkpoint: str          # "default" or the path given
    weights_hash: str
    trained: bool            # False for the random-weight stand-in


def default_is_trained() -> bool:
    return (ASSETS / "dit.safetensors").exists() and (ASSETS / "config.json").exists()


def default_config() -> ModelConfig:
    if default_is_trained():
        return ModelConfig.from_dict(json.loads((ASSETS / "config.json").read_text())["model"])
    return ModelConfig.preset("tiny")


def load_dit(checkpoint: str = "default", config: str | ModelConfig | None = None, device="cpu",
             dtype=torch.float32) -> LoadedDiT:
    """`checkpoint`: "default", "random" (seeded random weights) or a path; `config`: preset name / ModelConfig (default: the
    default model's config for "default", `wan2.1-1.3b` for a path)."""
    if isinstance(config, str):
        config = ModelConfig.preset(config)
    if checkpoint == "default":
        cfg = default_config()
        if config is not None and config != cfg:
            raise ValueError(f"the default model has config {cfg.name!r}; got --config {config.name!r}. "
                             f"Use --checkpoint PATH for other configs, or drop --config.")
        if default_is_trained():
            model = load_checkpoint(ASSETS / "dit.safetensors", cfg, device, dtype)
            trained = True
        else:
            model = build_model(cfg, device, dtype, seed=DEFAULT_RANDOM_SEED)
            trained = False
    elif checkpoint == "random":  # benchmarks and tests: any config, seeded random weights
        cfg = config or default_config()
        model = build_model(cfg, device, dtype, seed=DEFAULT_RANDOM_SEED)
        trained = False
    else:
        cfg = config or ModelConfig.preset("wan2.1-1.3b")
        model = load_checkpoint(checkpoint, cfg, device, dtype)
        trained = True
    return LoadedDiT(cfg, model, str(checkpoint), state_dict_hash(model.state_dict()), trained)
