"""Which caption words a model listens to: its chunk-0 flow loss on real latents with the true
caption, against the same caption with one attribute changed (the direction to its opposite, the
colour, the shape) or the null context. A word the model ignores leaves the loss where it was.

    python -m training.text_probe --checkpoint CKPT [CKPT ...] [--latents out/latents/demo]
                                  [--samples 64] [--sigmas 0.5 0.7 0.85 0.95] [--config demo]
                                  [--out training/reports/text_probe]

Chunk 0 is the one only the text conditions: a later chunk can read the motion off the clean
chunks before it (teacher forcing), so a teacher may fit its loss there without ever reading the
direction. ToyBench's motion is measured over the first frames, inside chunk 0.

Owns: `swap_attribute`, `caption_sensitivity` and the CLI. Does not own the caption grammar
(`data.py`), the latent cache (`train.LatentCache` writes it) or the training loss (`losses.py`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from asd_deploy.checkpoint import atomic_write, read_state_dict
from asd_deploy.cli import positive_int, run_command
from asd_deploy.config import ModelConfig
from asd_deploy.model import build_model

from .data import DIRECTIONS, PALETTE, SHAPES, make_caption, parse_caption
from .rollout import TrainNet, teacher_forcing_inputs, teacher_forcing_mask

ATTRIBUTES = ("direction", "colour", "shape")


def swap_attribute(caption: str, kind: str) -> str:
    """A one-object caption with `kind` changed: the direction to its opposite, the colour to the
    next palette colour, the shape to the next shape."""
    spec = parse_caption(caption)
    if len(spec["objects"]) != 1:
        raise ValueError(f"swap_attribute takes one-object captions; got {caption!r}")
    (colour, shape, direction), = spec["objects"]
    if kind == "direction":
        direction = DIRECTIONS[(DIRECTIONS.index(direction) + 4) % len(DIRECTIONS)]
    elif kind == "colour":
        names = list(PALETTE)
        colour = names[(names.index(colour) + 1) % len(names)]
    elif kind == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    else:
        raise ValueError(f"kind={kind!r}; expected one of {ATTRIBUTES}")
    return make_caption(spec["background"], [(colour, shape, direction)])


@torch.no_grad()
def caption_sensitivity(net: TrainNet, latents: torch.Tensor, contexts: dict[str, torch.Tensor],
                        sigmas: list[float], seed: int = 0, batch: int = 16,
                        clean_frames: int = 0) -> dict[float, dict[str, float]]:
    """{sigma: {context name: chunk-0 flow loss}}: latents [B, C, F, h, w] (clean; chunk 0 is used),
    every context [B, text_len, text_dim]; the same noise for every context, so differences are
    the text's alone. `clean_frames` > 0: chunk 0's first frames are given clean (t = 0) and the
    loss is over the rest: where the object starts is known, where it goes is the text's."""
    cfg = net.config
    fpc = cfg.frames_per_chunk
    x0 = latents[:, :, :fpc].float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    mask = teacher_forcing_mask(cfg, 1, x0.device)
    out = {}
    if not 0 <= clean_frames < fpc:
        raise ValueError(f"clean_frames={clean_frames}; expected 0..{fpc - 1} (frames of chunk 0 given clean)")
    k = clean_frames
    for sigma in sigmas:
        s = torch.full((len(x0), fpc), float(sigma))
        s[:, :k] = 0.0
        x_t = (1 - s[:, None, :, None, None]) * x0 + s[:, None, :, None, None] * eps
        seq, t, pos = teacher_forcing_inputs(x0, x_t, cfg.num_train_timesteps * s)
        out[sigma] = {}
        for name, ctx in contexts.items():
            err = [(net(seq[i:i + batch], t[i:i + batch], ctx[i:i + batch].float(), mask, pos)[:, :, fpc + k:]
                    - (eps - x0)[i:i + batch, :, k:]).square().mean(dim=(1, 2, 3, 4)) for i in range(0, len(x0), batch)]
            out[sigma][name] = float(torch.cat(err).mean())
    return out


def _load_cache(folder: Path, samples: int) -> tuple[torch.Tensor, list[str]]:
    lat_file, cap_file = folder / "latents.pt", folder / "captions.json"
    if not (lat_file.is_file() and cap_file.is_file()):
        raise FileNotFoundError(f"--latents {folder}: expected a latent cache (latents.pt, captions.json) as "
                                f"`python -m training.train --recipe default --prepare-data` writes it")
    captions = json.loads(cap_file.read_text())
    keep = [i for i, c in enumerate(captions) if len(parse_caption(c)["objects"]) == 1][:samples]
    if not keep:
        raise ValueError(f"--latents {folder}: no one-object caption to probe")
    latents = torch.load(lat_file, map_location="cpu", weights_only=True, mmap=True)["latents"]
    return latents[keep].float(), [captions[i] for i in keep]


def to_markdown(rows: dict, meta: dict) -> str:
    L = [f"# Text probe: chunk-0 flow loss with one caption attribute changed, minus the true caption's",
         "", f"{meta['samples']} one-object training videos of `{meta['latents']}`, the same noise per context"
         + (f"; chunk 0's first {meta['clean_frames']} latent frame(s) given clean, the loss over the rest"
            if meta.get("clean_frames") else "") + ". Near 0: the model does not read that word.", "",
         "| checkpoint | sigma | true caption | direction opposite | colour changed | shape changed | null context |",
         "|---|---|---|---|---|---|---|"]
    for ckpt, by_sigma in rows.items():
        for sigma, loss in by_sigma.items():
            d = [f"{loss[k] - loss['true']:+.5f}" for k in (*ATTRIBUTES, "null")]
            L.append(f"| {ckpt} | {sigma} | {loss['true']:.4f} | " + " | ".join(d) + " |")
    return "\n".join(L) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.text_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="teacher or student checkpoints (EMA preferred)")
    p.add_argument("--latents", default="out/latents/demo", help="latent cache folder (latents.pt, captions.json)")
    p.add_argument("--config", default="demo", help="model config preset of the checkpoints")
    p.add_argument("--samples", type=positive_int, default=64, help="one-object videos probed")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.95])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-frames", type=int, default=0,
                   help="latent frames of chunk 0 given clean (the loss is over the others): 1 gives the start")
    p.add_argument("--out", default=None, help="writes OUT.md and OUT.json")
    return p.parse_args(argv)


def _main(a) -> int:
    from asd_deploy.text import load_text_encoder

    if any(not 0 < s <= 1 for s in a.sigmas):
        raise ValueError(f"--sigmas {a.sigmas}: each must be in (0, 1]")
    cfg = ModelConfig.preset(a.config)
    latents, captions = _load_cache(Path(a.latents), a.samples)
    text = load_text_encoder("default", cfg.text_len)
    contexts = {"true": text.encode(captions)}
    for kind in ATTRIBUTES:
        contexts[kind] = text.encode([swap_attribute(c, kind) for c in captions])
    contexts["null"] = torch.zeros_like(contexts["true"])
    rows = {}
    for ckpt in a.checkpoint:
        model = build_model(cfg, seed=0)
        model.load_state_dict(read_state_dict(ckpt, prefer="generator_ema"), strict=True)
        rows[ckpt] = caption_sensitivity(TrainNet(model).eval(), latents, contexts, a.sigmas, a.seed,
                                         clean_frames=a.clean_frames)
    meta = {"samples": len(captions), "latents": a.latents, "config": a.config, "seed": a.seed,
            "clean_frames": a.clean_frames}
    md = to_markdown(rows, meta)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({"rows": rows, **meta},
                                                                                           indent=1)))
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    print(md)
    return 0


def main(argv=None) -> int:
    return run_command(_main, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
