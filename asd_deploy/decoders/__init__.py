"""Decoders: every way to turn a chunk of latents into pixel frames, behind one signature.

Owns: the decode-chunk protocol (`DecodeNet`: a pure function of the chunk's latents and the
decoder's causal cache, which it returns updated), `DecodeStream` (one video's decode: holds the
cache between chunks, so the caller sees `decode_chunk(latents) -> frames` and `reset()`) and
`make_decoder` (a decoder by name). Decoders:
  vae     `VaeDecodeNet` (vae.py): the VAE's own decoder (diffusers' layers), chunk at once,
          with its causal-convolution cache as explicit tensors of static shape
  tiny    `TinyDecoder` (tiny.py): a small causal conv decoder distilled from the VAE's
  engine  `EngineDecodeNet` (engine.py): either of them exported into an engine folder
          (`python -m export.build`), run by ONNX Runtime or AOTInductor
Each net has `name`, `z_dim`, `temporal_stride`, `spatial_stride`, `device`, `dtype`,
`cache_shapes(batch, h, w)`, `first(latents) -> (video, caches)` (a video's first chunk, from
an empty cache) and `next(latents, caches) -> (video, caches)`, and `stream(batch)`. The
pipeline holds one net and never asks which.
Does not own the VAE wrapper or its reference streaming decode (`asd_deploy/vae.py`), export
(`export/`) or training the tiny decoder (`training/tiny_decoder.py`).

Conventions (as `asd_deploy/vae.py`):
    latents  [B, C, f, h, w]        normalized; C = z_dim
    video    [B, 3, t, H, W]        float32 in [-1, 1]; H = 8h, W = 8w
    t = 1 + 4(f - 1) for a video's first chunk (latent frame 0 decodes to one pixel frame),
    t = 4f after it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch

DECODERS = ("vae", "tiny")


class DecodeNet(Protocol):
    name: str
    z_dim: int
    temporal_stride: int
    spatial_stride: int
    device: torch.device
    dtype: torch.dtype

    def cache_shapes(self, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
        """Shapes of the causal cache tensors for latents of h x w (all static)."""

    def first(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A video's first chunk: latents [B, C, f, h, w] -> video [B, 3, 1 + 4(f-1), H, W], caches."""

    def next(self, latents: torch.Tensor, caches: tuple) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Any later chunk: latents [B, C, f, h, w] + caches -> video [B, 3, 4f, H, W], new caches."""


class DecodeStream:
    """One video decoded chunk by chunk: owns the causal cache (one per stream, so streams in
    different threads share nothing). Not for two threads at once (a video is sequential)."""

    def __init__(self, net: DecodeNet, batch_size: int = 1):
        self.net, self.batch_size = net, batch_size
        self.reset()

    def reset(self) -> None:
        """Start a new video: forget the cache and the latent size."""
        self._caches: tuple | None = None
        self._hw: tuple[int, int] | None = None
        self.latent_frames = 0
        self.pixel_frames = 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, f, h, w] -> video [B, 3, t, 8h, 8w] float32 in [-1, 1]."""
        net = self.net
        if latents.ndim != 5 or latents.shape[1] != net.z_dim or latents.shape[0] != self.batch_size:
            raise ValueError(f"decode_chunk expects latents [B={self.batch_size}, C={net.z_dim}, f, h, w]; got "
                             f"shape {list(latents.shape)}" + (" (a 4-D tensor: add the frame axis)"
                                                               if latents.ndim == 4 else ""))
        b, _, f, h, w = latents.shape
        s = net.spatial_stride
        if f == 0:
            return latents.new_zeros(b, 3, 0, h * s, w * s, dtype=torch.float32)
        if self._hw is not None and self._hw != (h, w):
            raise ValueError(f"decode_chunk got latent size {h}x{w} but this stream started at "
                             f"{self._hw[0]}x{self._hw[1]}; call reset() to start a new video")
        self._hw = (h, w)
        z = latents.to(net.device, net.dtype)
        if self._caches is None:
            video, self._caches = net.first(z)
        else:
            video, self._caches = net.next(z, self._caches)
        self.latent_frames += f
        self.pixel_frames += video.shape[2]
        return video.float()


def make_decoder(kind: str, vae=None, *, tiny: str | Path | None = None):
    """An eager decoder by name: "vae" (`vae`, a `VideoVAE`) or "tiny" (`tiny`: a folder written
    by `python -m training.tiny_decoder`, or a `TinyDecoder`)."""
    if kind == "vae":
        from .vae import VaeDecodeNet
        if vae is None:
            raise ValueError("decoder 'vae' needs the VAE (a VideoVAE)")
        return VaeDecodeNet(vae)
    if kind == "tiny":
        from .tiny import TinyDecoder
        if isinstance(tiny, TinyDecoder):
            return tiny
        if tiny is None:
            raise ValueError("decoder 'tiny' needs a tiny-decoder folder; train one with: python -m "
                             "training.tiny_decoder --vae VAE_FOLDER --out FOLDER [--model MODEL]")
        return TinyDecoder.from_pretrained(tiny)
    raise ValueError(f"unknown decoder {kind!r}; valid decoders: {list(DECODERS)}")


def pipeline_decoder(kind: str, vae, tiny=None, step=None):
    """(decode net, note) for a pipeline: `kind` "vae", "tiny" or a tiny-decoder folder. When the
    DiT step runs from an engine folder whose manifest carries this decoder with these weights,
    the engine's decoder graphs run it; otherwise the eager net, and `note` says why."""
    if kind not in DECODERS:
        if Path(str(kind)).is_dir():
            kind, tiny = "tiny", kind
        else:
            raise ValueError(f"unknown decoder {kind!r}; valid decoders: {list(DECODERS)} or a tiny-decoder folder")
    if kind == "tiny" and tiny is not None and not isinstance(tiny, torch.nn.Module) and not Path(tiny).is_dir():
        raise FileNotFoundError(f"decoder 'tiny': this model has no tiny decoder ({tiny} does not exist); train one "
                                f"with: python -m training.tiny_decoder --vae VAE_FOLDER --out FOLDER [--model MODEL], "
                                f"then pass it (--tiny-decoder FOLDER) or put it in the model folder as tiny_decoder/")
    net = make_decoder(kind, vae, tiny=tiny)
    if vae is not None and (net.z_dim, net.spatial_stride, net.temporal_stride) != \
            (vae.z_dim, vae.spatial_stride, vae.temporal_stride):
        raise ValueError(f"the {kind} decoder takes {net.z_dim}-channel latents at stride ({net.temporal_stride}, "
                         f"{net.spatial_stride}); the model's VAE makes {vae.z_dim} channels at stride "
                         f"({vae.temporal_stride}, {vae.spatial_stride})")
    engine_dir = getattr(step, "engine_dir", None)
    if engine_dir is None:
        return net, "eager"
    from ..backends.manifest import read_manifest
    from .engine import decoder_hash, engine_decoder

    manifest = read_manifest(engine_dir)
    eng, why = engine_decoder(engine_dir, manifest, kind, decoder_hash(net))
    if eng is None:
        return net, f"eager ({why})"
    auto = manifest.get("auto") or {}
    best = (auto.get("best_by_decoder") or {}).get(kind)
    if best and best != auto.get("chosen"):
        warnings.warn(f"engine {Path(engine_dir).name} was chosen by --backend auto for its primary decoder "
                      f"({manifest['decoder']['kind']}); decoding with {kind}, candidate {best} was faster here. "
                      f"Rebuild with the decoder you run listed first: python -m export.build --backend auto "
                      f"--decoder {kind},{manifest['decoder']['kind']} --force", stacklevel=2)
    return eng, f"engine {Path(engine_dir).name}"
