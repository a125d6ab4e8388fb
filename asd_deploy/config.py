"""Model and video geometry configuration.

Owns: `ModelConfig` (the architecture constants of a Wan2.1-style causal DiT plus the video
geometry it runs at) and its named presets. Every size, token count and chunk length elsewhere is
derived from here. Does not own: the denoising schedule (`schedule.py`) or anything about weights.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration or geometry that cannot work, with the valid values named."""


@dataclass(frozen=True)
class ModelConfig:
    # architecture (names as in Wan2.1)
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    num_train_timesteps: int = 1000
    # video geometry: pixel size, and the causal cache
    height: int = 480
    width: int = 832
    frames_per_chunk: int = 3          # latent frames denoised together
    vae_stride: tuple[int, int, int] = (4, 8, 8)  # (time, height, width)
    max_cache_frames: int = 21         # latent frames the KV cache holds
    sink_frames: int = 3               # first latent frames never evicted by the rolling window
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "vae_stride", tuple(self.vae_stride))
        if self.dim % self.num_heads:
            divisors = [h for h in range(1, self.dim + 1) if self.dim % h == 0 and (self.dim // h) % 2 == 0]
            raise ConfigError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                              f"valid num_heads for this dim: {divisors[:12]}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head_dim={self.head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.patch_size[0] != 1:
            raise ConfigError(f"patch_size={self.patch_size}: the causal model needs a temporal patch of 1")
        for what, size, stride in (("height", self.height, self.pixel_multiple[0]),
                                   ("width", self.width, self.pixel_multiple[1])):
            if size <= 0 or size % stride:
                raise ConfigError(f"{what}={size} is not a positive multiple of VAE stride x patch = {stride}; "
                                  f"nearest valid values: {max(stride, size // stride * stride)}, "
                                  f"{(size // stride + 1) * stride}")
        fpc = self.frames_per_chunk
        if self.max_cache_frames % fpc or self.sink_frames % fpc:
            raise ConfigError(f"max_cache_frames={self.max_cache_frames} and sink_frames={self.sink_frames} "
                              f"must be multiples of frames_per_chunk={fpc}")
        if not 0 <= self.sink_frames < self.max_cache_frames:
            raise ConfigError(f"sink_frames={self.sink_frames} must be in [0, max_cache_frames="
                              f"{self.max_cache_frames})")

    # ---- derived architecture -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Rotary dims (time, height, width) of one head, as Wan splits them (44/42/42 at 128)."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_volume(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def pixel_multiple(self) -> tuple[int, int]:
        return (self.vae_stride[1] * self.patch_size[1], self.vae_stride[2] * self.patch_size[2])

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_stride[1]

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_stride[2]

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Token grid of one latent frame (after patchify)."""
        return (self.latent_height // self.patch_size[1], self.latent_width // self.patch_size[2])

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.grid_hw
        return h * w

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk

    @property
    def cache_tokens(self) -> int:
        return self.tokens_per_frame * self.max_cache_frames

    @property
    def cache_chunks(self) -> int:
        return self.max_cache_frames // self.frames_per_chunk

    @property
    def sink_chunks(self) -> int:
        return self.sink_frames // self.frames_per_chunk

    def chunk_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        """Latent shape of one chunk, [B, C, F, H, W]."""
        return (batch, self.in_channels, self.frames_per_chunk, self.latent_height, self.latent_width)

    def cache_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of the key (or value) cache of all layers, [layers, B, cache_tokens, heads, head_dim]."""
        return (self.num_layers, batch, self.cache_tokens, self.num_heads, self.head_dim)

    def cross_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of the per-prompt cross-attention keys (or values), [layers, B, text_len, heads, head_dim]."""
        return (self.num_layers, batch, self.text_len, self.num_heads, self.head_dim)

    # ---- frames ------------------------------------------------------------------------------
    def latent_frames_for(self, pixel_frames: int) -> int:
        """1 + 4k pixel frames map to 1 + k latent frames; the count must fill whole chunks."""
        st = self.vae_stride[0]
        fpc = self.frames_per_chunk
        valid = [1 + st * (fpc * n - 1) for n in range(1, 6)]
        if pixel_frames < 1 or (pixel_frames - 1) % st:
            raise ConfigError(f"frames={pixel_frames} is not 1+{st}k; valid frame counts include {valid}")
        latent = 1 + (pixel_frames - 1) // st
        if latent % fpc:
            raise ConfigError(f"frames={pixel_frames} gives {latent} latent frames, not a whole number of "
                              f"{fpc}-frame chunks; valid frame counts include {valid}")
        return latent

    def pixel_frames_for(self, latent_frames: int) -> int:
        return 1 + self.vae_stride[0] * (latent_frames - 1)

    # ---- presets and serialisation ----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown config preset {name!r}; valid presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], name=name, **overrides) if overrides else PRESETS[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS: dict[str, ModelConfig] = {
    # Wan2.1-T2V-1.3B, exactly.
    "wan2.1-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, name="wan2.1-1.3b"),
    # Tests: 2 layers, 3x... tokens. text_dim 384 matches the default sentence encoder.
    "tiny": ModelConfig(dim=64, ffn_dim=160, num_heads=2, num_layers=2, text_dim=384, text_len=32,
                        freq_dim=32, height=32, width=48, max_cache_frames=9, sink_frames=3, name="tiny"),
    # The embedded default model: 64x96 pixels, 4x6 = 24 tokens per latent frame, so a shape
    # (radius 15-25% of the height) spans 2-3 tokens; sized so a 2-core CPU trains its teacher.
    "demo": ModelConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, text_dim=384, text_len=32,
                        freq_dim=64, height=64, width=96, max_cache_frames=9, sink_frames=3, name="demo"),
    # Benchmarks: geometry and width big enough that matmuls dominate on a CPU.
    "small": ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=384, text_len=32,
                         freq_dim=64, height=64, width=96, max_cache_frames=9, sink_frames=3, name="small"),
    "medium": ModelConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=8, text_dim=384, text_len=32,
                          freq_dim=128, height=128, width=192, max_cache_frames=9, sink_frames=3,
                          name="medium"),
}
