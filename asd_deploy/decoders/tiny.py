"""The tiny decoder: a small causal convolutional decoder from Wan-layout latents to frames.

Owns: `TinyDecoderConfig` + presets (`TINY_DECODER_ARCHS`), `TinyDecoder` (a `DecodeNet`; its
differentiable core `decode` is what training distils), and its folder format (config.json +
model.safetensors, written atomically). Does not own training (`training/tiny_decoder.py`).

The idea (that of TAEHV, written here from the description, not from its code): most of a video
VAE decoder's cost is wide 3-D convolutions at high resolution over every pixel frame. This one
works per frame with 2-D 3x3 convolutions, widest at the latent resolution and narrow at the
pixel one, and carries time in two cheap ways:
  - memory blocks: a residual block whose first conv sees the frame and the previous frame's
    input to the block (one cached frame per block: the causal cache);
  - temporal growth: a 1x1 conv to k x channels, read as k consecutive frames (k = 2, twice:
    stride 4 in time), so each latent frame yields 4 pixel frames with no look-ahead.
A linear colour base (a 1x1 conv of the latents, upsampled bilinearly, held over the latent
frame's 4 pixel frames) is added to the output (`latent_skip`): the network learns the residual
(seen here: a faster start than without it).
A video's first latent frame decodes to 4 frames like any other; the last of them is pixel
frame 0 (Wan's 1 + 4k layout) and the other 3 are dropped.

Layout: latents [B, C, f, h, w] are carried as [B, T, C, H, W] (frames next to the batch, so
every conv is one 2-D conv over B*T images); caches are [B, 1, C_block, H_block, W_block], one
per memory block, zero at a video's start.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass(frozen=True)
class TinyDecoderConfig:
    z_dim: int = 16
    # channels at the latent resolution, then after each 2x spatial upsampling (len = levels + 1)
    channels: tuple[int, ...] = (64, 48, 32, 16)
    # memory blocks at each resolution (len = levels + 1)
    memory_blocks: tuple[int, ...] = (2, 1, 1, 0)
    # which spatial upsamplings also double time (two Trues: temporal stride 4)
    temporal_up: tuple[bool, ...] = (True, True, False)
    # a linear colour base from the latents added to the output (the network learns the residual)
    latent_skip: bool = True
    # the output conv makes 3 x s x s channels at 1/s of the pixel resolution, rearranged into
    # s x s pixels (pixel shuffle): the last, costliest resolution is never convolved (1: off)
    shuffle_out: int = 1
    name: str = dataclasses.field(default="custom", compare=False)

    def __post_init__(self):
        for f in ("channels", "memory_blocks", "temporal_up"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        levels = len(self.temporal_up)
        if len(self.channels) != levels + 1 or len(self.memory_blocks) != levels + 1:
            raise ValueError(f"tiny decoder config: channels {self.channels} and memory_blocks {self.memory_blocks} "
                             f"need one entry per resolution ({levels + 1}: latent + {levels} upsamplings)")
        if self.z_dim < 1 or min(self.channels) < 1 or min(self.memory_blocks) < 0 or self.shuffle_out < 1:
            raise ValueError(f"tiny decoder config: z_dim, channels, shuffle_out must be >= 1, memory_blocks >= 0; "
                             f"got {self}")

    @property
    def spatial_stride(self) -> int:
        return 2 ** len(self.temporal_up) * self.shuffle_out

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_up)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyDecoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tiny decoder config fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)


# "demo": the default model's 64x96; "wan2.1": Wan2.1's latent space at 480x832 (16 channels,
# stride 4x8x8), wider, for decoders trained against a real Wan VAE.
TINY_DECODER_ARCHS = {
    "tiny": TinyDecoderConfig(channels=(32, 24, 16, 8), memory_blocks=(1, 1, 0, 0), name="tiny"),
    "demo": TinyDecoderConfig(name="demo"),
    # 4.8x fewer FLOPs than "demo" (0.59 against 2.85 GFLOP a 64x96 chunk): the pixel resolution only
    # by pixel shuffle
    "demo-lite": TinyDecoderConfig(channels=(64, 32, 16), memory_blocks=(2, 1, 0), temporal_up=(True, True),
                                   shuffle_out=2, name="demo-lite"),
    "wan2.1": TinyDecoderConfig(channels=(128, 96, 64, 32), memory_blocks=(3, 2, 1, 0), name="wan2.1"),
}


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class MemoryBlock(nn.Module):
    """x + conv(relu(conv(cat(x_t, x_{t-1})))): the previous frame's input is the cache."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = _conv(2 * c, c), _conv(c, c)

    def forward(self, x, cache):
        # x [B, T, C, H, W], cache [B, 1, C, H, W] -> (y like x, new cache)
        b, t = x.shape[:2]
        prev = torch.cat([cache, x[:, :-1]], dim=1)
        h = torch.cat([x, prev], dim=2).flatten(0, 1)
        h = self.conv2(F.relu(self.conv1(h)))
        return F.relu(x + h.view_as(x)), x[:, -1:]


class TemporalGrow(nn.Module):
    """[B, T, C, H, W] -> [B, 2T, C, H, W]: a 1x1 conv to 2C channels, read as two frames."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        b, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).view(b, 2 * t, c, h, w)


class TinyDecoder(nn.Module):
    """A `DecodeNet`: small, causal, static-shape; `decode` is the differentiable core."""

    def __init__(self, config: TinyDecoderConfig = TinyDecoderConfig(), source: str = "random"):
        super().__init__()
        self.config, self.source = config, source
        c = config.channels
        self.name = "tiny"
        self.z_dim = config.z_dim
        self.temporal_stride, self.spatial_stride = config.temporal_stride, config.spatial_stride
        self.conv_in = _conv(config.z_dim, c[0])
        self.levels = nn.ModuleList()
        for i, n in enumerate(config.memory_blocks):
            level = nn.Module()
            if i > 0:
                level.grow = TemporalGrow(c[i - 1]) if config.temporal_up[i - 1] else None
                level.conv = _conv(c[i - 1], c[i])
            level.blocks = nn.ModuleList(MemoryBlock(c[i]) for _ in range(n))
            self.levels.append(level)
        self.conv_out = _conv(c[-1], 3 * config.shuffle_out ** 2)
        self.skip = nn.Conv2d(config.z_dim, 3, 1) if config.latent_skip else None

    # ---- DecodeNet ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"TinyDecoder({self.config.name}, {n / 1e3:.0f}k parameters, {self.source})"

    def cache_shapes(self, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
        shapes = []
        for i, n in enumerate(self.config.memory_blocks):
            s = 2 ** i
            shapes += [(batch, 1, self.config.channels[i], h * s, w * s)] * n
        return shapes

    def stream(self, batch_size: int = 1):
        from . import DecodeStream
        return DecodeStream(self, batch_size)

    def decode(self, latents, caches=None):
        """latents [B, C, f, h, w] -> (video [B, 3, 4f, H, W] unclamped, new caches); caches None:
        a video's start (zeros). Differentiable; the first chunk's 3 leading frames are kept."""
        b, _, f, h, w = latents.shape
        if caches is None:
            caches = [latents.new_zeros(s) for s in self.cache_shapes(b, h, w)]
        caches, new = list(caches), []
        x = latents.to(self.dtype).transpose(1, 2)  # [B, f, C, h, w]
        x = F.relu(self.conv_in(x.flatten(0, 1))).unflatten(0, (b, f))
        for i, level in enumerate(self.levels):
            if i > 0:
                if level.grow is not None:
                    x = level.grow(x)
                t = x.shape[1]
                y = F.interpolate(x.flatten(0, 1), scale_factor=2.0, mode="nearest")
                x = F.relu(level.conv(y)).unflatten(0, (b, t))
            for block in level.blocks:
                x, c = block(x, caches[len(new)])
                new.append(c)
        t = x.shape[1]
        out = self.conv_out(x.flatten(0, 1))
        if self.config.shuffle_out > 1:
            out = F.pixel_shuffle(out, self.config.shuffle_out)
        out = out.unflatten(0, (b, t))  # [B, T, 3, H, W], T = 4f
        if self.skip is not None:
            z = latents.to(self.dtype).transpose(1, 2).flatten(0, 1)  # [B*f, C, h, w]
            base = F.interpolate(self.skip(z), scale_factor=float(self.spatial_stride), mode="bilinear",
                                 align_corners=False).unflatten(0, (b, f))
            out = out + base.repeat_interleave(t // f, dim=1)
        return out.transpose(1, 2), tuple(new)

    @torch.no_grad()
    def first(self, latents):
        video, caches = self.decode(latents)
        return video[:, :, self.temporal_stride - 1:].clamp(-1.0, 1.0).float(), caches

    @torch.no_grad()
    def next(self, latents, caches):
        video, caches = self.decode(latents, caches)
        return video.clamp(-1.0, 1.0).float(), caches

    # ---- folder format --------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """config.json + model.safetensors (+ `extra` text files), atomically as one folder."""
        from safetensors.torch import save_file

        from ..checkpoint import atomic_dir

        meta = {"config": self.config.to_dict(), "format": 1}

        def fill(tmp: Path):
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS_NAME))
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)
        return atomic_dir(path, fill)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32) -> "TinyDecoder":
        from safetensors.torch import load_file

        root = Path(path)
        want = (f"expected a tiny-decoder folder with {CONFIG_NAME} and {WEIGHTS_NAME}, written by "
                f"python -m training.tiny_decoder --vae VAE_FOLDER --out FOLDER [--model MODEL]")
        if not (root / CONFIG_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"tiny decoder folder {root} is missing or incomplete; {want}")
        try:
            meta = json.loads((root / CONFIG_NAME).read_text())
            config = TinyDecoderConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{root / CONFIG_NAME} is not a tiny decoder config ({e}); {want}") from None
        model = cls(config, source=str(root))
        state = load_file(str(root / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{root / WEIGHTS_NAME} does not fit its config {config.name!r}: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}; {want}")
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
