"""Shared fixtures: tiny configs and models, seeded; helpers for comparing tensors."""
import pytest
import torch

from asd_deploy.config import ModelConfig
from asd_deploy.model import build_model


def assert_close(actual, expected, atol, what="output"):
    """Max-abs comparison whose failure message reports max and mean error."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    err = (actual - expected).abs()
    assert err.max().item() <= atol, (f"{what}: max abs error {err.max().item():.3e} > {atol:.0e} "
                                      f"(mean {err.mean().item():.3e}, ref scale {expected.abs().mean().item():.3e})")


# An odd head count, non-square latents (h != w), no sink, a 2-chunk window.
ODD = ModelConfig(dim=96, ffn_dim=128, num_heads=3, num_layers=2, text_dim=24, text_len=7, freq_dim=16,
                  height=48, width=32, max_cache_frames=6, sink_frames=0, name="odd")


@pytest.fixture(scope="session")
def tiny_cfg():
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    return build_model(tiny_cfg, seed=0)


def rand_context(cfg, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
