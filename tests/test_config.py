import pytest

from asd_deploy.config import ConfigError, ModelConfig


def test_wan_preset_constants_and_derived():
    c = ModelConfig.preset("wan2.1-1.3b")
    assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers) == (1536, 8960, 12, 30)
    assert (c.in_channels, c.out_channels, c.patch_size, c.text_dim, c.text_len, c.freq_dim) == \
        (16, 16, (1, 2, 2), 4096, 512, 256)
    assert c.eps == 1e-6 and c.qk_norm and c.cross_attn_norm and c.num_train_timesteps == 1000
    assert c.head_dim == 128 and c.rope_dims == (44, 42, 42)
    assert (c.latent_height, c.latent_width) == (60, 104) and c.grid_hw == (30, 52)
    assert c.tokens_per_frame == 1560 and c.tokens_per_chunk == 3 * 1560
    assert c.cache_tokens == 21 * 1560
    assert c.latent_frames_for(81) == 21 and c.pixel_frames_for(21) == 81
    assert c.cache_shape(1) == (30, 1, 21 * 1560, 12, 128)


@pytest.mark.parametrize("kw, needle", [
    (dict(height=470), "height=470 is not a positive multiple of VAE stride x patch = 16"),
    (dict(width=100), "nearest valid values: 96, 112"),
    (dict(num_heads=7), "not divisible by num_heads=7"),
    (dict(max_cache_frames=10), "multiples of frames_per_chunk=3"),
    (dict(sink_frames=21), "sink_frames=21 must be in [0, max_cache_frames=21)"),
])
def test_bad_geometry_names_valid_values(kw, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig.preset("wan2.1-1.3b", **kw)
    assert needle in str(e.value)


def test_frames_must_be_1_plus_4k_and_whole_chunks():
    c = ModelConfig.preset("tiny")
    assert c.latent_frames_for(9) == 3 and c.latent_frames_for(33) == 9
    with pytest.raises(ConfigError, match=r"frames=10 is not 1\+4k; valid frame counts include \[9, 21"):
        c.latent_frames_for(10)
    with pytest.raises(ConfigError, match="not a whole number of 3-frame chunks"):
        c.latent_frames_for(13)


def test_unknown_preset_and_roundtrip():
    with pytest.raises(ConfigError, match="valid presets: .*tiny"):
        ModelConfig.preset("huge")
    c = ModelConfig.preset("small")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})
