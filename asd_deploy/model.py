"""The causal Wan2.1 diffusion transformer.

Owns: `CausalWanDiT`, whose parameter names and shapes are exactly the Wan2.1 / Self-Forcing
layout, and its two entry points:
  - `forward_train(x, t, context)`: the whole latent sequence under a block-causal mask;
  - `forward_step(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len)`: one chunk
    against a static key/value cache; pure (the cache is an input, the chunk's keys/values are
    outputs), so exporters see every tensor it depends on;
  - `forward_step_live(...)`: the same step attending to the cache in place (the chunk's keys
    written into a work area after the cache instead of concatenated to a copy of it): the
    inference path of the torch backends on a GPU.
Does not own: the cache bookkeeping (`cache.py`), the schedule, or the loop (`generator.py`).

Shapes: latents [B, C, F, H, W]; per-frame timesteps [B, F] (0..1000); tokens [B, L, dim] with
L = F * HW in frame-major order; keys/values [B, L, heads, head_dim].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import attention_mask
from .config import ModelConfig

# ---------------------------------------------------------------------------------------------
# attention: two implementations, one switch (tests run both and compare)
# ---------------------------------------------------------------------------------------------


def attention_sdpa(q, k, v, mask):
    """q [B, Lq, H, D], k/v [B, Lk, H, D], mask bool broadcastable to [B, H, Lq, Lk] or None."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def attention_math(q, k, v, mask):
    """Reference: explicit softmax(q k^T / sqrt(D)) v in fp32."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).type_as(q)


ATTENTION = {"sdpa": attention_sdpa, "math": attention_math}
attention_impl = "sdpa"  # module-level override, e.g. `model.attention_impl = "math"` in a test


def attention(q, k, v, mask):
    return ATTENTION[attention_impl](q, k, v, mask)


# ---------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [N] timesteps -> [N, dim] as [cos, sin] (Wan's layout), fp32."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half)
    args = t.float()[:, None] * exponent.exp()[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm over the full feature dim (Wan's qk_norm spans all heads), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def layer_norm(x, eps, weight=None, bias=None):
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).type_as(x)


def modulate(x, shift, scale, frames: int):
    """x [B, F*HW, D]; shift/scale [B, F, D] applied to every token of their frame."""
    xf = x.unflatten(1, (frames, -1))
    return (xf * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gate(x, y, g, frames: int):
    """x + g * y with g [B, F, D] per frame."""
    return x + (y.unflatten(1, (frames, -1)) * g[:, :, None]).flatten(1, 2)


def rope_tables(config: ModelConfig, frame_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim/2] for the tokens of frames at `frame_positions` ([F], device tensor),
    or [B, L, head_dim/2] for per-sample positions [B, F] (batched streams at different frames).

    Wan's 3D RoPE: the head dim splits into (time, height, width) rotary parts (44/42/42 at
    head_dim 128), each with frequencies theta^(-2i/part). The time index is the absolute latent
    frame, so a chunk's keys are placed where they sit in the video whatever cache slot they use.
    """
    gh, gw = config.grid_hw
    device = frame_positions.device
    pos_t = frame_positions.float().reshape(-1, frame_positions.shape[-1])  # [B or 1, F]
    parts = []
    for dim, pos in zip(config.rope_dims, (pos_t,
                                           torch.arange(gh, device=device, dtype=torch.float32)[None],
                                           torch.arange(gw, device=device, dtype=torch.float32)[None])):
        # frequencies made on the device (float64 as Python's `theta ** (-2i/dim)`, then rounded):
        # no host->device copy, which CUDA-graph capture forbids; constant-folded by exporters
        exponent = torch.arange(dim // 2, device=device, dtype=torch.float64) * -2 / dim
        inv = (config.rope_theta ** exponent).float()
        parts.append(pos[:, :, None] * inv)  # [b, n, dim/2]
    b, f = pos_t.shape
    t, h, w = parts
    angles = torch.cat([t[:, :, None, None].expand(b, f, gh, gw, -1),
                        h[:, None, :, None].expand(b, f, gh, gw, -1),
                        w[:, None, None, :].expand(b, f, gh, gw, -1)], dim=-1).reshape(b, f * gh * gw, -1)
    if frame_positions.ndim == 1:
        angles = angles[0]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; rotate adjacent pairs (2i, 2i+1) by the angle of cos/sin [L, D/2] (or
    [B, L, D/2], per sample)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    c, s = (cos[None, :, None], sin[None, :, None]) if cos.ndim == 2 else (cos[:, :, None], sin[:, :, None])
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# modules (names are Wan's state-dict names)
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def qkv(self, x, cos, sin):
        """x [B, L, dim] -> q, k (RoPE applied), v, each [B, L, H, D]."""
        if kernels.use_triton(x.device) and isinstance(self.norm_q, RMSNorm) and cos.ndim == 2:  # fused
            q = kernels.qk_norm_rope(self.q(x), self.norm_q.weight, cos, sin, self.num_heads, self.norm_q.eps)
            k = kernels.qk_norm_rope(self.k(x), self.norm_k.weight, cos, sin, self.num_heads, self.norm_k.eps)
        else:
            q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
            k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        return q, k, self.v(x).unflatten(-1, (self.num_heads, -1))


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def kv(self, ctx):
        """ctx [B, text_len, dim] (embedded text) -> k, v [B, text_len, H, D]; once per prompt."""
        k = self.norm_k(self.k(ctx)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(ctx).unflatten(-1, (self.num_heads, -1))

    def forward(self, x, k, v):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, k, v, None).flatten(-2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))

    def forward(self, x, e0, cos, sin, cross_k, cross_v, mask, prefix_k=None, prefix_v=None, live=False):
        """x [B, L, dim]; e0 [B, F, 6, dim]; prefix_k/v [B, Lp, H, D] are cached keys/values seen
        before the chunk's own; mask is bool over (prefix + own) keys. Returns x and the chunk's
        own k, v [B, L, H, D] (what a cache stores). `live`: prefix_k/v are [B, Lp + L, H, D]
        buffers whose last L slots are a work area; the chunk's k, v are written there and the
        attention reads the buffer in place (no concatenated copy of the cache)."""
        frames = e0.shape[1]
        shift, scale, g, c_shift, c_scale, c_g = (self.modulation[:, None].float() + e0.float()).unbind(2)
        fused = kernels.use_triton(x.device)  # Triton kernels (ASD_KERNELS), else plain torch
        h = (kernels.adaln(x, shift, scale, self.eps) if fused
             else modulate(layer_norm(x, self.eps), shift, scale, frames).type_as(x))
        q, k, v = self.self_attn.qkv(h, cos, sin)
        if live:
            prefix_k[:, -k.shape[1]:].copy_(k)
            prefix_v[:, -v.shape[1]:].copy_(v)
            ks, vs = prefix_k, prefix_v
        else:
            ks = k if prefix_k is None else torch.cat([prefix_k, k], dim=1)
            vs = v if prefix_v is None else torch.cat([prefix_v, v], dim=1)
        y = self.self_attn.o(attention(q, ks, vs, mask).flatten(-2))
        x = kernels.gated_residual(x, y, g) if fused else gate(x.float(), y.float(), g, frames).type_as(x)
        x = x + self.cross_attn(self.norm3(x), cross_k, cross_v)
        h = (kernels.adaln(x, c_shift, c_scale, self.eps) if fused
             else modulate(layer_norm(x, self.eps), c_shift, c_scale, frames).type_as(x))
        y = self.ffn(h)
        x = kernels.gated_residual(x, y, c_g) if fused else gate(x.float(), y.float(), c_g, frames).type_as(x)
        return x, k, v


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * cfg.patch_volume)

    def forward(self, x, e):
        """x [B, L, dim]; e [B, F, dim] -> [B, L, out_channels * patch_volume]."""
        shift, scale = (self.modulation[:, None].float() + e.float()[:, :, None]).unbind(2)
        return self.head(modulate(layer_norm(x, self.eps), shift, scale, e.shape[1]).type_as(x))


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class CausalWanDiT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    # ---- pieces shared by both entry points ------------------------------------------------
    def patchify(self, x):
        """[B, C, F, H, W] -> tokens [B, F*h*w, dim]. Conv3d with stride == kernel, as a matmul."""
        b, c, f, hh, ww = x.shape
        _, ph, pw = self.config.patch_size
        x = x.reshape(b, c, f, hh // ph, ph, ww // pw, pw).permute(0, 2, 3, 5, 1, 4, 6)
        w = self.patch_embedding.weight.reshape(self.config.dim, -1)  # [dim, C*1*ph*pw]
        return F.linear(x.reshape(b, -1, c * ph * pw), w, self.patch_embedding.bias)

    def unpatchify(self, x, frames: int):
        """[B, F*h*w, C*ph*pw] (channel innermost, as Wan) -> [B, C, F, H, W]."""
        cfg = self.config
        (gh, gw), (_, ph, pw) = cfg.grid_hw, cfg.patch_size
        x = x.reshape(x.shape[0], frames, gh, gw, ph, pw, cfg.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(x.shape[0], cfg.out_channels, frames, gh * ph, gw * pw)

    def time_embed(self, t):
        """t [B, F] -> e [B, F, dim] (head), e0 [B, F, 6, dim] (blocks)."""
        b, f = t.shape
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sinusoidal_embedding(t.reshape(-1), self.config.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e.reshape(b, f, -1), e0.reshape(b, f, 6, -1)

    def cross_kv(self, context):
        """context [B, text_len, text_dim] -> cross k, v [layers, B, text_len, H, D]; once per prompt."""
        ctx = self.text_embedding(context)
        kvs = [blk.cross_attn.kv(ctx) for blk in self.blocks]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])

    def _check_latents(self, x, t, frames_expected=None):
        cfg = self.config
        want = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
        if x.ndim != 5 or (x.shape[1], x.shape[3], x.shape[4]) != want:
            raise ValueError(f"latents must be [B, {want[0]}, F, {want[1]}, {want[2]}] for config "
                             f"{cfg.name!r}; got {list(x.shape)}")
        if frames_expected is not None and x.shape[2] != frames_expected:
            raise ValueError(f"a chunk has {frames_expected} latent frames; got {x.shape[2]}")
        if t.shape != x.shape[:1] + x.shape[2:3]:
            raise ValueError(f"timesteps must be per frame, [B, F] = {list(x.shape[:1] + x.shape[2:3])}; "
                             f"got {list(t.shape)}")

    # ---- entry point 1: whole sequence --------------------------------------------------------
    def forward_train(self, x, t, context, mask=None, positions=None):
        """Whole sequence: x [B, C, F, H, W], t [B, F], context [B, text_len, text_dim] -> flow.

        mask: bool [L, L] over tokens (True = may attend); default block-causal by chunk
        (`cache.attention_mask`). positions: int64 [F] RoPE time index of each frame, default
        0..F-1 (teacher forcing places a noisy copy at its clean copy's positions)."""
        frames = x.shape[2]
        if frames % self.config.frames_per_chunk:
            raise ValueError(f"forward_train needs whole chunks of {self.config.frames_per_chunk} "
                             f"latent frames; got F={frames}")
        if mask is None and frames > self.config.frames_per_chunk:  # one chunk: full attention, no mask
            mask = attention_mask(self.config, frames, device=x.device)
        h, e = self.hidden_states(x, t, context, mask, positions)
        return self.unpatchify(self.head(h, e), frames)

    def hidden_states(self, x, t, context, mask, positions=None, upto: int | None = None,
                      collect: tuple[int, ...] = ()):
        """The blocks' output [B, F*HW, dim] (after block `upto`, default the last) and the
        head's time embedding e [B, F, dim]; arguments as `forward_train`, mask as given. With
        `collect`, the first item is instead the list of those blocks' outputs (running up to the
        deepest one): what a discriminator on several depths reads."""
        if collect:
            upto = max(collect)
        self._check_latents(x, t)
        frames = x.shape[2]
        if positions is None:
            positions = torch.arange(frames, device=x.device)
        elif positions.shape != (frames,):
            raise ValueError(f"positions must be [F] = [{frames}]; got {list(positions.shape)}")
        cross_k, cross_v = self.cross_kv(context)
        e, e0 = self.time_embed(t)
        cos, sin = rope_tables(self.config, positions)
        h = self.patchify(x)
        outs = []
        for i, blk in enumerate(self.blocks[:None if upto is None else upto + 1]):
            h, _, _ = blk(h, e0, cos, sin, cross_k[i], cross_v[i], mask)
            if i in collect:
                outs.append(h)
        return (outs if collect else h), e

    # ---- entry point 2: one chunk against the static cache ------------------------------------
    def forward_step(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        """One chunk against the cache.

        x [B, C, Fc, H, W] noisy chunk; t [B, Fc]; cross_k/v [layers, B, text_len, H, D];
        cache_k/v [layers, B, cache_tokens, H, D]; frame_index int64 [1] absolute latent frame of
        the chunk's first frame (RoPE); cache_len int64 [1] valid cache tokens (slots
        [0, cache_len) are attended). Either may instead be [B]: one position per sample, so
        streams at different frames share one call (serving's batched slots). Returns flow
        [B, C, Fc, H, W] and the chunk's keys/values k_new, v_new [layers, B, tokens_per_chunk, H, D].
        """
        return self._step(x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len, live=False)

    # ---- entry point 3: the same, attending to the cache in place -------------------------------
    def forward_step_live(self, x, t, cross_k, cross_v, kv_k, kv_v, frame_index, cache_len):
        """`forward_step` without copying the cache: kv_k/v [layers, B, cache_tokens +
        tokens_per_chunk, H, D] are a `KVCache(work_chunk=True)`'s buffers, the cache followed by
        a one-chunk work area. Each layer writes the chunk's keys/values into the work area and
        attends to its whole buffer under forward_step's mask (valid cache slots, then the
        chunk), where forward_step concatenates the chunk to a copy of the cache in every layer.
        Same keys in the same order, so the same result. Returns flow and k_new/v_new as views
        of the work area (overwritten by the next call on these buffers). It writes its inputs,
        so it is for inference and graph capture, not for export (ONNX has no in-place update:
        exporters trace forward_step) nor for gradients through the cache."""
        cfg = self.config
        want = cfg.cache_tokens + cfg.tokens_per_chunk
        if kv_k.shape[2] != want or kv_v.shape[2] != want:
            raise ValueError(f"forward_step_live needs cache buffers with {want} slots (cache_tokens + one chunk, "
                             f"KVCache(work_chunk=True)); got {kv_k.shape[2]} and {kv_v.shape[2]}")
        return self._step(x, t, cross_k, cross_v, kv_k, kv_v, frame_index, cache_len, live=True)

    def _step(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len, live: bool):
        cfg = self.config
        self._check_latents(x, t, cfg.frames_per_chunk)
        frames = cfg.frames_per_chunk
        for name, pos in (("frame_index", frame_index), ("cache_len", cache_len)):
            if pos.ndim != 1 or pos.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"{name} must be int64 [1] or [B={x.shape[0]}]; got {list(pos.shape)}")
        slots = torch.arange(cfg.cache_tokens, device=x.device)
        own = torch.ones(cache_len.shape[0], cfg.tokens_per_chunk, dtype=torch.bool, device=x.device)
        mask = torch.cat([slots[None] < cache_len[:, None], own], 1)[:, None, None]  # [1 or B, 1, 1, Lc + Lq]
        e, e0 = self.time_embed(t)
        positions = frame_index[:, None] + torch.arange(frames, device=x.device)  # [1 or B, Fc]
        cos, sin = rope_tables(cfg, positions[0] if positions.shape[0] == 1 else positions)
        h = self.patchify(x)
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            h, k, v = blk(h, e0, cos, sin, cross_k[i], cross_v[i], mask, cache_k[i], cache_v[i], live=live)
            ks.append(k)
            vs.append(v)
        flow = self.unpatchify(self.head(h, e), frames)
        if live:  # the work areas already hold every layer's k, v
            return flow, cache_k[:, :, cfg.cache_tokens:], cache_v[:, :, cfg.cache_tokens:]
        return flow, torch.stack(ks), torch.stack(vs)


def build_model(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int | None = 0) -> CausalWanDiT:
    """A randomly initialised model (seeded), e.g. the untrained default or a test model."""
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = CausalWanDiT(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(device=device, dtype=dtype).eval()
