"""The video VAE: pixels <-> normalized latents, one-shot and streamed chunk by chunk.

Owns: `VideoVAE` (a wrapper around diffusers' `AutoencoderKLWan`, eval mode, no grad), the latent
normalization `z_norm = (z - latents_mean) / latents_std` (per channel, from the VAE config),
`StreamDecoder` (decodes each finished latent chunk as it arrives, carrying the decoder's causal
temporal cache across chunks) and `to_uint8_frames`.

Does not own: the VAE network itself (diffusers' code runs it; nothing here re-implements a
layer), generating latents (`generator.py`), writing frames to files (`video.py`).

Conventions:
    latents  [B, C, F, H/8, W/8]   normalized; C = z_dim (16 for Wan2.1)
    video    [B, 3, T, H, W]       float in [-1, 1]; T = 1 + 4 * (F - 1)
Wan's VAE is causal in time: latent frame 0 decodes to 1 pixel frame, every later one to 4.

Why the decoder cache is ours and not diffusers': `AutoencoderKLWan._decode` keeps its causal cache
on the module (`self._feat_map`, `self._conv_idx`) and its `clear_cache()` wipes the encoder's
cache as well, so two decodes (or a decode and an encode) in two threads corrupt each other. The
decoder's submodules are stateless and take the cache as an argument (`feat_cache`, `feat_idx`),
so each `StreamDecoder` passes its own list and nothing is shared. `encode` still goes through
diffusers' `encode` (module state), under a lock.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_dir

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# A tiny random-weight VAE with Wan2.1's layout and strides (time 4, space 8) for plumbing tests and
# speed checks: 4 levels (3 spatial downsamples), the last two also temporal.
TINY_CONFIG = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
# Architectures `python -m training.vae --arch` trains. "demo": the default model's VAE (64x96):
# twice the tiny width at full resolution, 4x it at the two coarsest levels, where the shapes'
# colours and layout are encoded and a channel costs 1/16-1/64 of a full-resolution one.
# "demo2": demo with two residual blocks per level (the depth of Wan2.1's own VAE), grown from a
# trained demo VAE by `training.vae --init DEMO --arch demo2` (`training.vae.deepen`).
VAE_ARCHS = {"tiny": TINY_CONFIG,
             "demo": dict(TINY_CONFIG, base_dim=16, dim_mult=[1, 2, 4, 4]),
             "demo2": dict(TINY_CONFIG, base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)}


def _causal_conv_cls():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    return WanCausalConv3d


class VideoVAE:
    """Wan VAE with normalized latents. Thread-safe: `decode` and stream decoders share no state."""

    def __init__(self, vae, source: str = "custom"):
        vae.eval().requires_grad_(False)
        vae.use_tiling = False  # streaming decodes whole frames; tiling would bypass our cache
        self.vae, self.source = vae, source
        cfg = vae.config
        self.z_dim: int = int(cfg.z_dim)
        # Strides come from the architecture, not the config's scale_factor_* fields (which a
        # hand-made config may leave at their defaults): each True in temperal_downsample halves
        # time; every level but the last halves space; a patchified VAE (Wan2.2) folds in more.
        self.temporal_stride: int = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_stride: int = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        mean, std = list(cfg.latents_mean), list(cfg.latents_std)
        if len(mean) != self.z_dim or len(std) != self.z_dim:
            raise ValueError(f"VAE config has z_dim={self.z_dim} but {len(mean)} latents_mean and {len(std)} "
                             f"latents_std entries; expected one per latent channel")
        # [1, C, 1, 1, 1], float32 master copies; cast to the VAE's dtype/device where used
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._num_convs = sum(isinstance(m, _causal_conv_cls()) for m in vae.decoder.modules())
        self._encode_lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "VideoVAE":
        """A diffusers `AutoencoderKLWan` folder on local disk (config.json + weights); never downloads."""
        root = Path(path)
        expected = (f"expected a local diffusers AutoencoderKLWan folder with config.json and "
                    f"{WEIGHT_FILES[0]} (e.g. the vae/ folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers), "
                    f"copied there beforehand: nothing is downloaded at run time")
        if not root.is_dir():
            raise FileNotFoundError(f"VAE folder {root} does not exist; {expected}")
        if not (root / "config.json").is_file():
            hint = f" ({root / 'vae'} looks like one: pass that)" if (root / "vae" / "config.json").is_file() else ""
            raise FileNotFoundError(f"VAE folder {root} has no config.json{hint}; {expected}")
        if not any((root / w).is_file() for w in WEIGHT_FILES):
            found = sorted(p.name for p in root.iterdir())
            raise FileNotFoundError(f"VAE folder {root} has no weights file (found {found}); {expected}")
        from diffusers import AutoencoderKLWan

        from .checkpoint import CheckpointError, check_finite

        try:  # low_cpu_mem_usage=False: what diffusers falls back to without accelerate, minus its advice
            vae = AutoencoderKLWan.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype,
                                                   low_cpu_mem_usage=False)
        except Exception as e:  # an unsafe pickle (.bin), truncated safetensors, a config of another model
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"VAE folder {root} does not load ({type(e).__name__}: {first}); "
                                  f"{expected}") from None
        check_finite(vae.state_dict(), f"VAE {root}")
        return cls(vae.to(device), source=str(root))

    @classmethod
    def tiny(cls, seed: int = 0, z_dim: int = 16, device: str | torch.device = "cpu") -> "VideoVAE":
        """Random weights, Wan2.1 strides (4, 8, 8): a few hundred k parameters, fast on CPU."""
        from diffusers import AutoencoderKLWan

        g = torch.Generator().manual_seed(seed + 1)
        if z_dim == 16:  # Wan2.1's own statistics (the diffusers defaults)
            stats = {}
        else:  # seeded, non-trivial statistics, so normalization is exercised
            stats = dict(latents_mean=(0.5 * torch.randn(z_dim, generator=g)).tolist(),
                         latents_std=(0.5 + 1.5 * torch.rand(z_dim, generator=g)).tolist())
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(z_dim=z_dim, **TINY_CONFIG, **stats)
        return cls(vae.to(device), source=f"tiny random (seed {seed})")

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Writes a diffusers folder atomically (`atomic_dir`), with `extra` text files {name: text}
        (e.g. a training report) inside it, so they appear together or not at all."""
        def fill(tmp: Path):
            self.vae.save_pretrained(str(tmp), safe_serialization=True)
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)
        return atomic_dir(path, fill)

    def to(self, device=None, dtype=None) -> "VideoVAE":
        self.vae.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def __repr__(self) -> str:
        return (f"VideoVAE({self.source}, z_dim={self.z_dim}, stride=({self.temporal_stride}, "
                f"{self.spatial_stride}, {self.spatial_stride}), {self.dtype}, {self.device})")

    # ---- shapes -------------------------------------------------------------------------------
    def num_pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_stride * (latent_frames - 1) if latent_frames > 0 else 0

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        """[B, C, F, h, w] for a video of `frames` (1 + 4k) pixel frames at height x width."""
        return (batch, self.z_dim, 1 + (frames - 1) // self.temporal_stride,
                height // self.spatial_stride, width // self.spatial_stride)

    # ---- normalization ------------------------------------------------------------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the DiT's latents: (z - mean) / std per channel."""
        return (z - self._mean.to(z.device, z.dtype)) / self._std.to(z.device, z.dtype)

    def denormalize(self, z_norm: torch.Tensor) -> torch.Tensor:
        return z_norm * self._std.to(z_norm.device, z_norm.dtype) + self._mean.to(z_norm.device, z_norm.dtype)

    # ---- encode / decode ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalized latents [B, C, 1 + k, H/8, W/8] (posterior mode)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video [B, 3, T, H, W]; got shape {list(video.shape)}")
        _, _, t, h, w = video.shape
        ts, ss = self.temporal_stride, self.spatial_stride
        if (t - 1) % ts:
            # diffusers would silently drop the trailing frames
            raise ValueError(f"encode expects 1 + {ts}k frames; got T={t}: trim to {1 + (t - 1) // ts * ts} "
                             f"or pad to {1 + -(-(t - 1) // ts) * ts}")
        if h % ss or w % ss:
            raise ValueError(f"encode expects height and width divisible by {ss}; got {h}x{w}")
        x = video.to(self.device, self.dtype)
        with self._encode_lock:  # diffusers' encoder cache lives on the module
            posterior = self.vae.encode(x).latent_dist
        return self.normalize(posterior.mode().float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, F, h, w] -> video [B, 3, 1 + 4(F-1), 8h, 8w] float32 in [-1, 1]."""
        return self.stream_decoder(batch_size=latents.shape[0]).decode_chunk(latents)

    def stream_decoder(self, batch_size: int = 1) -> "StreamDecoder":
        return StreamDecoder(self, batch_size)


class StreamDecoder:
    """Decodes one video chunk by chunk, carrying the causal cache; owns its cache (one per stream).

    Feeding the latent frames of a video in any split gives the frames of a one-shot decode: the
    first latent frame yields 1 pixel frame, each later one `temporal_stride`. Not for use by two
    threads at once (a stream is sequential); two decoders in two threads are independent.
    """

    def __init__(self, vae: VideoVAE, batch_size: int = 1):
        self.vae, self.batch_size = vae, batch_size
        self.reset()

    def reset(self) -> None:
        """Start a new video: forget the causal cache and the spatial size."""
        # One slot per causal conv of the decoder: that conv's last (up to 2) input frames
        # [B, C_l, <=2, h_l, w_l], or "Rep" for a temporal upsampler that has seen frame 0 only.
        self._cache: list = [None] * self.vae._num_convs
        self._hw: tuple[int, int] | None = None
        self.latent_frames = 0  # latent frames decoded since reset
        self.pixel_frames = 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, f, h, w] -> video [B, 3, t, 8h, 8w] float32 in [-1, 1];
        t = 1 + 4(f-1) for the first chunk after reset, 4f after it."""
        v = self.vae
        if latents.ndim != 5 or latents.shape[1] != v.z_dim or latents.shape[0] != self.batch_size:
            raise ValueError(f"decode_chunk expects latents [B={self.batch_size}, C={v.z_dim}, f, h, w]; got "
                             f"shape {list(latents.shape)}" + (" (a 4-D tensor: add the frame axis)"
                                                               if latents.ndim == 4 else ""))
        b, _, f, h, w = latents.shape
        if f == 0:
            return latents.new_zeros(b, 3, 0, h * v.spatial_stride, w * v.spatial_stride, dtype=torch.float32)
        if self._hw is not None and self._hw != (h, w):
            raise ValueError(f"decode_chunk got latent size {h}x{w} but this stream started at "
                             f"{self._hw[0]}x{self._hw[1]}; call reset() to start a new video")
        self._hw = (h, w)
        z = v.denormalize(latents.to(v.device, v.dtype))
        x = v.vae.post_quant_conv(z)  # 1x1x1 conv: no temporal context, so whole-chunk is exact
        outs = []
        for i in range(f):
            # One latent frame at a time, exactly as diffusers' _decode does; feat_idx walks the
            # decoder's causal convs in call order and must restart at 0 for every frame.
            outs.append(v.vae.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=[0],
                                      first_chunk=self.latent_frames == 0))
            self.latent_frames += 1
        out = torch.cat(outs, dim=2)  # [B, 3 (or 3*p*p), t, H, W]
        patch = v.vae.config.patch_size
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=patch)
        self.pixel_frames += out.shape[2]
        return out.clamp_(-1.0, 1.0).float()


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1] (what `VideoVAE.encode` takes); the
    inverse of `to_uint8_frames` up to its rounding."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def to_uint8_frames(video: torch.Tensor, batch_index: int | None = 0) -> np.ndarray:
    """[B, 3, T, H, W] (or [3, T, H, W]) in [-1, 1] -> uint8 [T, H, W, 3] for one batch entry,
    or [B, T, H, W, 3] with batch_index=None."""
    if video.ndim == 4:
        video = video.unsqueeze(0)
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"to_uint8_frames expects video [B, 3, T, H, W] or [3, T, H, W]; got {list(video.shape)}")
    if batch_index is not None:
        video = video[batch_index].unsqueeze(0)
    u8 = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = u8.permute(0, 2, 3, 4, 1).cpu().numpy()  # [B, T, H, W, 3]
    return frames[0] if batch_index is not None else frames
