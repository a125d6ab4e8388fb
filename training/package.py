"""Package a trained student as a model folder: the embedded default, or any `Pipeline` folder.

Owns: `package_model` and `python -m training.package`: the student's weights (the EMA
generator of a Self-Forcing-format checkpoint by default) as `dit.safetensors`, the VAE folder,
the tiny decoder folder when given (`tiny_decoder/`, for `--decoder tiny`), and `config.json` (model config, text encoder, fps, and where it came from: recipe, checkpoint
hash, reports), written into a temp folder and renamed into place, with the size checked against
a budget. Does not own training (`train.py`, `vae.py`) or loading (`asd_deploy/pipeline.py`).

    python -m training.package --checkpoint out/train/default/distill/checkpoint.pt \\
        --vae out/vae --out asd_deploy/assets/default
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from asd_deploy.checkpoint import atomic_dir, check_state_dict, read_state_dict, state_dict_hash
from asd_deploy.config import ModelConfig

DEFAULT_BUDGET_MB = 25.0


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2 ** 20


def package_model(checkpoint: Path, vae: Path, out: Path, prefer: str = "generator_ema",
                  info: dict | None = None, budget_mb: float = DEFAULT_BUDGET_MB, tiny_decoder: Path | None = None) -> Path:
    checkpoint, vae, out = Path(checkpoint), Path(vae), Path(out)
    run_cfg = checkpoint.parent / "config.json"
    if not run_cfg.is_file():
        raise FileNotFoundError(f"{run_cfg} not found: expected a checkpoint written by `python -m training.train`, "
                                f"whose run folder holds config.json beside checkpoint.pt")
    from .config import TrainConfig
    run = json.loads(run_cfg.read_text())  # {"model": ModelConfig fields, "train": TrainConfig, "stage"}
    train_cfg = TrainConfig.from_dict(run["train"])
    mcfg = ModelConfig.from_dict(run["model"])
    sd = {k: v.float().contiguous() for k, v in read_state_dict(checkpoint, prefer).items()}
    check_state_dict(sd, mcfg)
    if not (vae / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {vae} has no config.json (expected `python -m training.vae` output)")
    te = train_cfg.data.text_encoder
    # a model trained on MiniLM's embeddings is served by the grammar encoder distilled from them
    # (the "default", torch only); its error on the grammar is in asd_deploy/assets/text_encoder
    meta = {"model": mcfg.to_dict(), "text_encoder": "default" if te in ("minilm", "default") else te, "fps": 16,
            "checkpoint": "dit.safetensors", "trained": True,
            "source": {"checkpoint": str(checkpoint), "weights": prefer, "weights_hash": state_dict_hash(sd),
                       "train_config": train_cfg.name, **(info or {})}}

    def fill(tmp: Path):
        save_file(sd, str(tmp / "dit.safetensors"))
        shutil.copytree(vae, tmp / "vae")
        if tiny_decoder is not None:
            from asd_deploy.decoders.tiny import TinyDecoder
            TinyDecoder.from_pretrained(tiny_decoder)  # loads, or says what is wrong
            shutil.copytree(tiny_decoder, tmp / "tiny_decoder")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        size = folder_mb(tmp)
        if size > budget_mb:
            raise ValueError(f"the packaged model is {size:.1f} MB, over the {budget_mb} MB budget")

    atomic_dir(out, fill)
    return out


def main(argv=None) -> int:
    from asd_deploy.cli import run_command

    p = argparse.ArgumentParser(prog="python -m training.package", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint.pt (Self-Forcing format)")
    p.add_argument("--vae", required=True, help="the VAE folder (python -m training.vae --out ...)")
    p.add_argument("--out", default="asd_deploy/assets/default", help="model folder to write")
    p.add_argument("--weights", default="generator_ema", choices=("generator_ema", "generator"))
    p.add_argument("--budget-mb", type=float, default=DEFAULT_BUDGET_MB)
    p.add_argument("--tiny-decoder", default=None, help="a tiny decoder folder (python -m training.tiny_decoder)")
    a = p.parse_args(argv)

    def run():
        out = package_model(a.checkpoint, a.vae, a.out, a.weights, budget_mb=a.budget_mb,
                            tiny_decoder=Path(a.tiny_decoder) if a.tiny_decoder else None)
        print(f"wrote {out} ({folder_mb(out):.2f} MB)")
        return 0
    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
