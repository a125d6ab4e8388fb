"""`training.grow`: a DiT grown deeper computes what it computed before (new blocks' residual
branches start at zero), loads into the deeper config, and refuses what it cannot grow."""
import pytest
import torch

from asd_deploy.checkpoint import check_state_dict, read_state_dict
from asd_deploy.config import ModelConfig
from asd_deploy.model import build_model
from training.grow import grow_depth, main


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = 2 * cfg.frames_per_chunk
    h, w = cfg.height // cfg.vae_stride[1], cfg.width // cfg.vae_stride[2]
    x = torch.randn(2, cfg.in_channels, f, h, w, generator=g)
    t = torch.rand(2, f, generator=g) * 1000
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("layers", [3, 5])
def test_grown_model_computes_the_same(tiny_cfg, layers):
    small = build_model(tiny_cfg, seed=3)
    grown_cfg = ModelConfig.preset("tiny", num_layers=layers)
    sd = grow_depth(small.state_dict(), layers)
    check_state_dict(sd, grown_cfg)
    big = build_model(grown_cfg, seed=4)
    big.load_state_dict(sd, strict=True)
    x, t, ctx = _inputs(tiny_cfg)
    with torch.no_grad():
        ref, out = small.forward_train(x, t, ctx), big.forward_train(x, t, ctx)
    assert torch.equal(out, ref)
    # the new blocks are real blocks: once their outputs move, the network changes
    with torch.no_grad():
        big.blocks[1].ffn[2].bias.fill_(0.1)
        assert (big.forward_train(x, t, ctx) - ref).abs().max() > 1e-3


def test_grow_refuses_and_cli_writes(tiny_cfg, tmp_path):
    sd = build_model(tiny_cfg).state_dict()
    with pytest.raises(ValueError, match="fewer than"):
        grow_depth(sd, tiny_cfg.num_layers - 1)
    with pytest.raises(ValueError, match="no blocks"):
        grow_depth({"head.head.weight": torch.zeros(1)}, 4)
    src = tmp_path / "small.pt"
    torch.save(sd, src)
    out = tmp_path / "grown.safetensors"
    assert main(["--checkpoint", str(src), "--layers", str(tiny_cfg.num_layers + 2), "--out", str(out)]) == 0
    check_state_dict(read_state_dict(out), ModelConfig.preset("tiny", num_layers=tiny_cfg.num_layers + 2))
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(src), "--layers", "4", "--out", str(tmp_path / "x.pt")])
