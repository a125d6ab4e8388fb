"""The VAE's own decoder as a decode net: a whole chunk at once, its causal cache as tensors.

Owns: `VaeDecodeNet` (the `DecodeNet` of a `VideoVAE`: the same diffusers layers, driven through
their `feat_cache` argument with cache tensors of static shape, so `first`/`next` are pure
functions an exporter can trace) and `decode_graphs` (the two export wrappers). Does not own the
layers (diffusers) or the frame-by-frame reference decode (`asd_deploy/vae.py` `StreamDecoder`).

Why a whole chunk at once gives diffusers' frame-by-frame result: each causal conv of kernel 3 in
time sees its last 2 input frames from the cache, then this chunk's frames; run over f frames in
one call it computes, for each frame, the same 3-frame window the frame loop does. Every other
layer (RMS norm, spatial attention, 2-D convs, the nearest upsampling) acts per frame.
Why a static cache reproduces diffusers' growing one: diffusers starts each slot at None (zero
padding), then holds 1 frame, then 2; a cache of 2 zero frames, shifted as frames arrive, pads the
same way. The temporal upsamplers are the exception: on a video's first latent frame they skip
their time conv (one output frame, not two) and mark their slot "Rep", which later acts as zero
padding. `first` therefore runs frame 0 alone and then the chunk's other frames (two calls of the
diffusers decoder, one traced graph); `next` runs the chunk in one call.

Cache layout (from a probe at a 1x1 latent, scaled by h, w): one tensor per causal conv slot in
diffusers' call order, [B, C_slot, 2, h * s_slot, w * s_slot] (s_slot: the slot's spatial
upsampling so far).
"""
from __future__ import annotations

import torch
from torch import nn

from ..vae import VideoVAE

CACHE_FRAMES = 2  # diffusers' CACHE_T: the causal convs have kernel 3 in time


def _probe_slots(vae: VideoVAE) -> list[tuple[int, int, bool]]:
    """(channels, spatial scale, is a temporal upsampler) per cache slot, in call order: two latent
    frames of 1x1 through diffusers' own frame loop."""
    dec, dtype, dev = vae.vae.decoder, vae.dtype, vae.device
    cache: list = [None] * vae._num_convs
    x = torch.zeros(1, vae.vae.config.z_dim, 1, 1, 1, dtype=dtype, device=dev)
    with torch.no_grad():
        idx = [0]
        dec(x, feat_cache=cache, feat_idx=idx, first_chunk=True)
        used = idx[0]
        rep = [c == "Rep" for c in cache[:used]]
        dec(x, feat_cache=cache, feat_idx=[0])
    slots = []
    for c, is_rep in zip(cache[:used], rep):
        if not isinstance(c, torch.Tensor) or c.shape[2] != CACHE_FRAMES or c.shape[3] != c.shape[4]:
            raise RuntimeError(f"unexpected diffusers decoder cache entry {getattr(c, 'shape', c)!r}; "
                               f"this diffusers version's AutoencoderKLWan cache protocol is not the one known here")
        slots.append((int(c.shape[1]), int(c.shape[3]), is_rep))
    return slots


class VaeDecodeNet(nn.Module):
    """A `VideoVAE`'s decoder as a `DecodeNet` (eval, no grad; shares the VAE's weights)."""
    name = "vae"

    def __init__(self, vae: VideoVAE):
        super().__init__()
        cfg = vae.vae.config
        if getattr(cfg, "is_residual", False):
            raise ValueError("the streaming decode net supports Wan2.1-style VAEs; this VAE has is_residual=True "
                             "(Wan2.2), whose first-chunk upsampling differs")
        self.vae = vae
        self.decoder, self.post_quant_conv = vae.vae.decoder, vae.vae.post_quant_conv
        self.z_dim, self.temporal_stride, self.spatial_stride = vae.z_dim, vae.temporal_stride, vae.spatial_stride
        self.patch = cfg.patch_size
        self.register_buffer("mean", vae._mean.clone(), persistent=False)  # [1, C, 1, 1, 1]
        self.register_buffer("std", vae._std.clone(), persistent=False)
        self.slots = _probe_slots(vae)
        self.to(vae.device)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def __repr__(self) -> str:
        return f"VaeDecodeNet({self.vae!r}, {len(self.slots)} cache slots)"

    def cache_shapes(self, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
        return [(batch, c, CACHE_FRAMES, h * s, w * s) for c, s, _ in self.slots]

    def stream(self, batch_size: int = 1):
        from . import DecodeStream
        return DecodeStream(self, batch_size)

    # ---- the two pure functions ----------------------------------------------------------------
    def _pre(self, latents):
        z = latents.to(self.dtype) * self.std.to(self.dtype) + self.mean.to(self.dtype)  # denormalize
        return self.post_quant_conv(z)  # 1x1x1: no temporal context

    def _post(self, out):
        if self.patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=self.patch)
        return out.clamp(-1.0, 1.0).float()

    @torch.no_grad()
    def first(self, latents):
        b, _, f, h, w = latents.shape
        x = self._pre(latents)
        # zeros pad like diffusers' empty slots; the temporal upsamplers start at None -> "Rep"
        cache = [None if rep else torch.zeros(s, dtype=x.dtype, device=x.device)
                 for (_, _, rep), s in zip(self.slots, self.cache_shapes(b, h, w))]
        outs = [self.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)]
        if f > 1:
            outs.append(self.decoder(x[:, :, 1:], feat_cache=cache, feat_idx=[0]))
        shapes = self.cache_shapes(b, h, w)
        caches = tuple(c if isinstance(c, torch.Tensor) else torch.zeros(s, dtype=x.dtype, device=x.device)
                       for c, s in zip(cache, shapes))  # a "Rep" slot (f == 1) pads with zeros
        return self._post(torch.cat(outs, dim=2)), caches

    @torch.no_grad()
    def next(self, latents, caches):
        cache = list(caches)
        out = self.decoder(self._pre(latents), feat_cache=cache, feat_idx=[0])
        return self._post(out), tuple(cache)

