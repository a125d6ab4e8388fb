"""The causal DiT against independent references: its own full-sequence path, diffusers, Wan keys."""
import pytest
import torch

from asd_deploy import model as model_mod
from asd_deploy.cache import KVCache, attention_mask, chunk_visible
from asd_deploy.checkpoint import diffusers_kwargs, to_diffusers_model
from asd_deploy.config import ModelConfig
from asd_deploy.model import CausalWanDiT, build_model

from conftest import ODD, assert_close, rand_context


def _latents(cfg, batch, frames, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, frames, cfg.latent_height, cfg.latent_width, generator=g)


@pytest.mark.parametrize("cfg_name", ["tiny", "odd"])
def test_cache_loop_equals_forward_train_across_rolling_window(cfg_name):
    """Chunk-by-chunk steps against the cache give forward_train's per-chunk flow (fp32, 1e-5).

    5 chunks run past the window (tiny: 3-chunk cache with a 1-chunk sink; odd: 2 chunks, no
    sink), so chunks 3 and 4 check eviction against the mask the window semantics define."""
    cfg = ModelConfig.preset("tiny") if cfg_name == "tiny" else ODD
    m = build_model(cfg, seed=1)
    n, fpc, batch = 5, cfg.frames_per_chunk, 2
    x = _latents(cfg, batch, n * fpc, seed=2)
    t = torch.rand(batch, n * fpc, generator=torch.Generator().manual_seed(3)) * 1000
    ctx = rand_context(cfg, batch)
    with torch.no_grad():
        ref = m.forward_train(x, t, ctx)
        ck, cv = m.cross_kv(ctx)
        cache = KVCache(cfg, batch)
        for c in range(n):
            sl = slice(c * fpc, (c + 1) * fpc)
            flow, k, v = m.forward_step(x[:, :, sl], t[:, sl], ck, cv, cache.k, cache.v,
                                        cache.frame_index, cache.cache_len)
            assert_close(flow, ref[:, :, sl], 1e-5, f"chunk {c} flow")
            cache.append(k, v)
    assert cache.frame_index.tolist() == [n * fpc]
    assert cache.cache_len.tolist() == [cfg.cache_tokens]


def test_clean_pass_loop_equals_teacher_forcing_sequence(tiny_cfg, tiny_model):
    """The generation semantics: a noisy chunk attends to the CLEAN (t=0) keys of earlier chunks.
    Reference: forward_train on [clean chunks..., noisy chunk] with t = [0, ..., 0, t_c]."""
    cfg, m = tiny_cfg, tiny_model
    fpc, n = cfg.frames_per_chunk, 4
    clean = _latents(cfg, 1, n * fpc, seed=4)
    noisy = _latents(cfg, 1, n * fpc, seed=5)
    ctx = rand_context(cfg)
    with torch.no_grad():
        ck, cv = m.cross_kv(ctx)
        cache = KVCache(cfg)
        for c in range(n):
            sl = slice(c * fpc, (c + 1) * fpc)
            tc = torch.full((1, fpc), 700.0)
            flow, _, _ = m.forward_step(noisy[:, :, sl], tc, ck, cv, cache.k, cache.v, cache.frame_index,
                                        cache.cache_len)
            seq = torch.cat([clean[:, :, :c * fpc], noisy[:, :, sl]], dim=2)
            tseq = torch.cat([torch.zeros(1, c * fpc), tc], dim=1)
            assert_close(flow, m.forward_train(seq, tseq, ctx)[:, :, -fpc:], 1e-5, f"chunk {c}")
            _, k, v = m.forward_step(clean[:, :, sl], torch.zeros(1, fpc), ck, cv, cache.k, cache.v,
                                     cache.frame_index, cache.cache_len)
            cache.append(k, v)


def test_window_semantics(tiny_cfg):
    # tiny: 3 cached chunks, 1 sink -> 2 recent chunks besides the sink
    vis = [[int(chunk_visible(tiny_cfg, i, j)) for j in range(6)] for i in range(6)]
    assert vis == [[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0],
                   [1, 0, 1, 1, 1, 0],
                   [1, 0, 0, 1, 1, 1]]
    m = attention_mask(tiny_cfg, 6 * tiny_cfg.frames_per_chunk)
    tpc = tiny_cfg.tokens_per_chunk
    assert m.shape == (6 * tpc, 6 * tpc) and not m[4 * tpc, tpc] and m[4 * tpc, 0]


def test_attention_implementations_agree(tiny_cfg, tiny_model, monkeypatch):
    x = _latents(tiny_cfg, 1, 6, seed=6)
    t = torch.tensor([[999.0, 500, 20, 0, 0, 300]])
    ctx = rand_context(tiny_cfg)
    with torch.no_grad():
        a = tiny_model.forward_train(x, t, ctx)
        monkeypatch.setattr(model_mod, "attention_impl", "math")
        b = tiny_model.forward_train(x, t, ctx)
    assert_close(a, b, 1e-5, "sdpa vs math attention")


@pytest.mark.parametrize("cfg_name", ["tiny", "odd"])
def test_matches_diffusers_wan_transformer(cfg_name):
    """Independent reference: diffusers' bidirectional WanTransformer3DModel on one chunk (full
    attention inside a chunk) with weights converted by to_diffusers. Equal per-frame timesteps,
    and also unequal ones via diffusers' per-token timestep path."""
    cfg = ModelConfig.preset("tiny") if cfg_name == "tiny" else ODD
    m = build_model(cfg, seed=3)
    ref = to_diffusers_model(m)
    x = _latents(cfg, 2, cfg.frames_per_chunk, seed=7)
    ctx = rand_context(cfg, 2)
    t = torch.tensor([300.0, 870.0])
    tf = t[:, None].expand(2, cfg.frames_per_chunk).contiguous()
    with torch.no_grad():
        expected = ref(x, t, ctx, return_dict=False)[0]
        assert_close(m.forward_train(x, tf, ctx), expected, 1e-5, "forward_train vs diffusers")
        ck, cv = m.cross_kv(ctx)
        cache = KVCache(cfg, 2)
        flow, _, _ = m.forward_step(x, tf, ck, cv, cache.k, cache.v, cache.frame_index, cache.cache_len)
        assert_close(flow, expected, 1e-5, "forward_step (empty cache) vs diffusers")
        per_frame = torch.tensor([[100.0, 500.0, 900.0], [0.0, 250.0, 999.0]])
        expected2 = ref(x, per_frame.repeat_interleave(cfg.tokens_per_frame, 1), ctx, return_dict=False)[0]
        assert_close(m.forward_train(x, per_frame, ctx), expected2, 1e-5, "per-frame timesteps vs diffusers")


WAN_TOP_KEYS = {"patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight",
                "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
                "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight",
                "time_embedding.2.bias", "time_projection.1.weight", "time_projection.1.bias",
                "head.head.weight", "head.head.bias", "head.modulation"}
WAN_BLOCK_KEYS = {"modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight",
                  "ffn.2.bias"} | {f"{a}.{p}.{s}" for a in ("self_attn", "cross_attn") for p in "qkvo"
                                   for s in ("weight", "bias")} | {
    f"{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"}


def test_wan_1_3b_on_meta_has_exact_wan_keys_and_diffusers_param_count():
    from diffusers import WanTransformer3DModel

    cfg = ModelConfig.preset("wan2.1-1.3b")
    with torch.device("meta"):
        ours = CausalWanDiT(cfg)
        theirs = WanTransformer3DModel(**diffusers_kwargs(cfg))
    sd = ours.state_dict()
    expected = WAN_TOP_KEYS | {f"blocks.{i}.{k}" for i in range(30) for k in WAN_BLOCK_KEYS}
    assert set(sd) == expected
    assert sd["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert sd["blocks.0.modulation"].shape == (1, 6, 1536) and sd["head.modulation"].shape == (1, 2, 1536)
    assert sd["blocks.0.ffn.0.weight"].shape == (8960, 1536) and sd["head.head.weight"].shape == (64, 1536)
    assert sd["text_embedding.0.weight"].shape == (1536, 4096)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())
    assert 1.2e9 < n_ours < 1.5e9


def test_bad_shapes_are_named(tiny_cfg, tiny_model):
    ctx = rand_context(tiny_cfg)
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, F, 4, 6\]"):
        tiny_model.forward_train(torch.zeros(1, 16, 3, 5, 6), torch.zeros(1, 3), ctx)
    with pytest.raises(ValueError, match=r"timesteps must be per frame, \[B, F\] = \[1, 3\]"):
        tiny_model.forward_train(torch.zeros(1, 16, 3, 4, 6), torch.zeros(1), ctx)
    with pytest.raises(ValueError, match="whole chunks of 3"):
        tiny_model.forward_train(torch.zeros(1, 16, 4, 4, 6), torch.zeros(1, 4), ctx)
