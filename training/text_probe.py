"""Which caption words a model listens to: its chunk-0 flow loss on real latents with the true
caption, against the same caption with one attribute changed (the direction to its opposite or
turned 90 degrees, the colour, the shape) or the null context. A word the model ignores leaves
the loss where it was.

    python -m training.text_probe --checkpoint CKPT [CKPT ...] [--latents out/latents/demo]
                                  [--samples 64] [--sigmas 0.5 0.7 0.85 0.95] [--config demo]
                                  [--clean-frames 1] [--motion --vae out/vae-demo]
                                  [--out training/reports/text_probe]

`--motion`: the same question asked of the picture. Chunk 0's first latent frame given clean, the
rest noised to sigma, the model's one-shot x0 prediction decoded (VAE) and the object tracked as
ToyBench tracks it: how often it moves within ToyBench's tolerance of the caption's direction over
the first frames, with the true caption and with the opposite direction named. If the two shares
are equal, the motion came from the noisy frames, not from the word.

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
from asd_deploy.model import build_model

from .ablation import model_config
from .data import DIRECTIONS, PALETTE, SHAPES, make_caption, parse_caption
from .rollout import TrainNet, teacher_forcing_inputs, teacher_forcing_mask

ATTRIBUTES = ("direction", "turn", "colour", "shape")


def swap_attribute(caption: str, kind: str) -> str:
    """A one-object caption with `kind` changed: the direction to its opposite ("direction") or
    turned 90 degrees ("turn": another axis, so a model that knows the axis but not the sign still
    notices), the colour to the next palette colour, the shape to the next shape."""
    spec = parse_caption(caption)
    if len(spec["objects"]) != 1:
        raise ValueError(f"swap_attribute takes one-object captions; got {caption!r}")
    (colour, shape, direction), = spec["objects"]
    if kind in ("direction", "turn"):
        eighths = 4 if kind == "direction" else 2  # DIRECTIONS are 45 degrees apart
        direction = DIRECTIONS[(DIRECTIONS.index(direction) + eighths) % len(DIRECTIONS)]
    elif kind == "colour":
        names = list(PALETTE)
        colour = names[(names.index(colour) + 1) % len(names)]
    elif kind == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    else:
        raise ValueError(f"kind={kind!r}; expected one of {ATTRIBUTES}")
    return make_caption(spec["background"], [(colour, shape, direction)])


def _chunk0(latents: torch.Tensor, fpc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk 0 of clean latents [B, C, F, h, w] and its seeded noise, both [B, C, fpc, h, w]."""
    x0 = latents[:, :, :fpc].float()
    return x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))


def _noisy_chunk0(cfg, x0, eps, sigma: float, clean_frames: int):
    """x_t, per-frame sigma [1, 1, fpc, 1, 1] and the teacher-forcing inputs (seq, t, positions) of
    chunk 0 at `sigma`, its first `clean_frames` frames left clean (t = 0)."""
    b, fpc = x0.shape[0], x0.shape[2]
    s = torch.full((fpc,), float(sigma))
    s[:clean_frames] = 0.0
    s5 = s[None, None, :, None, None]
    x_t = (1 - s5) * x0 + s5 * eps
    seq, t, pos = teacher_forcing_inputs(x0, x_t, cfg.num_train_timesteps * s.expand(b, fpc))
    return x_t, s5, seq, t, pos


@torch.no_grad()
def caption_sensitivity(net: TrainNet, latents: torch.Tensor, contexts: dict[str, torch.Tensor],
                        sigmas: list[float], seed: int = 0, batch: int = 16,
                        clean_frames: int = 0) -> dict[float, dict[str, float]]:
    """{sigma: {context name: chunk-0 flow loss}}: latents [B, C, F, h, w] (clean; chunk 0 is used),
    every context [B, text_len, text_dim]; the same noise for every context, so differences are
    the text's alone. `clean_frames` > 0: chunk 0's first frames are given clean (t = 0) and the
    loss is over the rest: where the object starts is known, where it goes is the text's."""
    fpc = net.config.frames_per_chunk
    if not 0 <= clean_frames < fpc:
        raise ValueError(f"clean_frames={clean_frames}; expected 0..{fpc - 1} (frames of chunk 0 given clean)")
    x0, eps = _chunk0(latents, fpc, seed)
    mask = teacher_forcing_mask(net.config, 1, x0.device)
    out = {}
    k = clean_frames
    for sigma in sigmas:
        x_t, _, seq, t, pos = _noisy_chunk0(net.config, x0, eps, sigma, k)
        out[sigma] = {}
        for name, ctx in contexts.items():
            err = [(net(seq[i:i + batch], t[i:i + batch], ctx[i:i + batch].float(), mask, pos)[:, :, fpc + k:]
                    - (eps - x0)[i:i + batch, :, k:]).square().mean(dim=(1, 2, 3, 4)) for i in range(0, len(x0), batch)]
            out[sigma][name] = float(torch.cat(err).mean())
    return out


@torch.no_grad()
def motion_agreement(net: TrainNet, vae, latents: torch.Tensor, captions: list[str], text, sigma: float,
                     seed: int = 0) -> dict:
    """{"true caption" | "opposite direction named" | "real latents": share of one-object videos whose
    object moves the caption's way (ToyBench's test over its first frames)} for the one-shot x0
    prediction of chunk 0 with its first latent frame clean and the others at `sigma`."""
    from asd_deploy.vae import to_uint8_frames

    from . import toybench

    fpc = net.config.frames_per_chunk
    x0, eps = _chunk0(latents, fpc, seed)
    x_t, s5, seq, t, pos = _noisy_chunk0(net.config, x0, eps, sigma, clean_frames=1)
    mask = teacher_forcing_mask(net.config, 1, x0.device)
    clips = {"real latents": x0}
    for name, caps in (("true caption", captions),
                       ("opposite direction named", [swap_attribute(c, "direction") for c in captions])):
        v = net(seq, t, text.encode(caps), mask, pos)[:, :, fpc:]
        clips[name] = torch.cat([x0[:, :, :1], (x_t - s5 * v)[:, :, 1:]], dim=2)  # x0 = x_t - sigma * v
    out = {}
    for name, lat in clips.items():
        frames = to_uint8_frames(vae.decode(lat), batch_index=None)  # [B, T, H, W, 3]
        out[name] = sum(toybench.score_video(f, c)["motion"] for f, c in zip(frames, captions)) / len(captions)
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


def to_markdown(rows: dict, meta: dict, motion: dict | None = None) -> str:
    L = [f"# Text probe: chunk-0 flow loss with one caption attribute changed, minus the true caption's",
         "", f"{meta['samples']} one-object training videos of `{meta['latents']}`, the same noise per context"
         + (f"; chunk 0's first {meta['clean_frames']} latent frame(s) given clean, the loss over the rest"
            if meta.get("clean_frames") else "") + ". Near 0: the model does not read that word.", "",
         "| checkpoint | sigma | true caption | direction opposite | direction turned 90° | colour changed | shape changed | null context |",
         "|---|---|---|---|---|---|---|---|"]
    for ckpt, by_sigma in rows.items():
        for sigma, loss in by_sigma.items():
            d = [f"{loss[k] - loss['true']:+.5f}" for k in (*ATTRIBUTES, "null")]
            L.append(f"| {ckpt} | {sigma} | {loss['true']:.4f} | " + " | ".join(d) + " |")
    if motion:
        L += ["", f"Motion of the one-shot prediction (chunk 0's first latent frame clean, the rest at sigma "
              f"{meta['motion_sigma']}; share of videos moving the caption's way by ToyBench's test):", "",
              "| checkpoint | true caption | opposite direction named | real latents |", "|---|---|---|---|"]
        for ckpt, m in motion.items():
            L.append(f"| {ckpt} | {m['true caption']:.2f} | {m['opposite direction named']:.2f} | "
                     f"{m['real latents']:.2f} |")
    return "\n".join(L) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.text_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="teacher or student checkpoints (EMA preferred)")
    p.add_argument("--latents", default="out/latents/demo", help="latent cache folder (latents.pt, captions.json)")
    p.add_argument("--config", default="demo", help="model config preset, for checkpoints without the run's "
                                                    "config.json beside them")
    p.add_argument("--samples", type=positive_int, default=64, help="one-object videos probed")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.95])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", default="default",
                   help="what the checkpoints were trained with: 'default' (the grammar encoder), 'minilm' (every "
                        "model trained before 2026-12-07, whose configs say 'default') or a folder")
    p.add_argument("--clean-frames", type=int, default=0,
                   help="latent frames of chunk 0 given clean (the loss is over the others): 1 gives the start")
    p.add_argument("--motion", action="store_true", help="also the decoded motion test (needs --vae)")
    p.add_argument("--vae", default=None, help="VAE folder for --motion")
    p.add_argument("--motion-sigma", type=float, default=0.9, help="noise on chunk 0's later frames for --motion")
    p.add_argument("--out", default=None, help="writes OUT.md and OUT.json")
    return p.parse_args(argv)


def _main(a) -> int:
    from asd_deploy.text import load_text_encoder

    if any(not 0 < s <= 1 for s in a.sigmas):
        raise ValueError(f"--sigmas {a.sigmas}: each must be in (0, 1]")
    if a.motion and not a.vae:
        raise ValueError("--motion decodes the predictions: give the model's VAE folder with --vae")
    if not 0 < a.motion_sigma <= 1:
        raise ValueError(f"--motion-sigma {a.motion_sigma}: expected a value in (0, 1]")
    configs = {c: model_config([c], a.config) for c in a.checkpoint}  # the run's config.json beside each
    cfg = configs[a.checkpoint[0]]
    for c, m in configs.items():
        if (m.text_len, m.text_dim) != (cfg.text_len, cfg.text_dim):
            raise ValueError(f"{c} takes text [{m.text_len}, {m.text_dim}], {a.checkpoint[0]} takes "
                             f"[{cfg.text_len}, {cfg.text_dim}]: probe them in separate runs")
    latents, captions = _load_cache(Path(a.latents), a.samples)
    vae = None
    if a.motion:
        from asd_deploy.vae import VideoVAE
        vae = VideoVAE.from_pretrained(a.vae)
    text = load_text_encoder(a.text_encoder, cfg.text_len)
    contexts = {"true": text.encode(captions)}
    for kind in ATTRIBUTES:
        contexts[kind] = text.encode([swap_attribute(c, kind) for c in captions])
    contexts["null"] = torch.zeros_like(contexts["true"])
    rows, motion = {}, {}
    for ckpt in a.checkpoint:
        model = build_model(configs[ckpt], seed=0)
        model.load_state_dict(read_state_dict(ckpt, prefer="generator_ema"), strict=True)
        net = TrainNet(model).eval()
        rows[ckpt] = caption_sensitivity(net, latents, contexts, a.sigmas, a.seed, clean_frames=a.clean_frames)
        if vae is not None:
            motion[ckpt] = motion_agreement(net, vae, latents, captions, text, a.motion_sigma, a.seed)
    meta = {"samples": len(captions), "latents": a.latents, "config": a.config, "seed": a.seed,
            "clean_frames": a.clean_frames, "motion_sigma": a.motion_sigma if vae is not None else None}
    md = to_markdown(rows, meta, motion)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps({"rows": rows, "motion": motion, **meta},
                                                                                           indent=1)))
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    print(md)
    return 0


def main(argv=None) -> int:
    return run_command(_main, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
