"""training.text_probe: the caption changed in one attribute only, losses that move with the text
alone (the same noise for every context), and the CLI on a latent cache folder."""
import json

import pytest
import torch

from asd_deploy.config import ModelConfig
from asd_deploy.model import build_model
from training import text_probe as P
from training.data import DIRECTIONS, parse_caption
from training.rollout import TrainNet, teacher_forcing_inputs, teacher_forcing_mask


@pytest.mark.parametrize("caption", ["a red circle moving right on a white background",
                                     "an orange triangle moving up-left on a gray background",
                                     "a purple square moving down on a black background"])
def test_swap_changes_exactly_one_attribute(caption):
    base = parse_caption(caption)
    (c, s, d), = base["objects"]
    for kind, slot in (("colour", 0), ("shape", 1), ("direction", 2)):
        new = parse_caption(P.swap_attribute(caption, kind))
        assert new["background"] == base["background"]
        got = new["objects"][0]
        assert [got[i] == base["objects"][0][i] for i in range(3)] == [i != slot for i in range(3)], (kind, got)
    assert abs(DIRECTIONS.index(parse_caption(P.swap_attribute(caption, "direction"))["objects"][0][2])
               - DIRECTIONS.index(d)) == 4  # the opposite heading
    with pytest.raises(ValueError, match="one-object"):
        P.swap_attribute("a red circle moving up and a blue square moving left on a white background", "shape")


def test_sensitivity_is_the_chunk_0_flow_loss_and_moves_with_the_text_alone():
    cfg = ModelConfig.preset("tiny")
    net = TrainNet(build_model(cfg, seed=0)).eval()
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(5, cfg.in_channels, 2 * cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width, generator=g)
    ctx = torch.randn(5, cfg.text_len, cfg.text_dim, generator=g)
    res = P.caption_sensitivity(net, lat, {"true": ctx, "same": ctx.clone(), "other": ctx.flip(0)}, [0.3, 0.9],
                                seed=7, batch=2)
    for sigma, loss in res.items():
        assert loss["same"] == pytest.approx(loss["true"], rel=1e-6) and loss["other"] != pytest.approx(loss["true"])
    # the number itself: the flow-matching MSE of chunk 0 alone under the teacher-forcing layout
    fpc, x0 = cfg.frames_per_chunk, lat[:, :, :cfg.frames_per_chunk]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    seq, t, pos = teacher_forcing_inputs(x0, 0.7 * x0 + 0.3 * eps, torch.full((5, fpc), 300.0))
    with torch.no_grad():
        pred = net(seq, t, ctx, teacher_forcing_mask(cfg, 1), pos)[:, :, fpc:]
    assert res[0.3]["true"] == pytest.approx(float((pred - (eps - x0)).square().mean()), rel=1e-5)
    # frame 0 given clean: the loss over frames 1.. only, frame 0 at t = 0 in the input
    one = P.caption_sensitivity(net, lat, {"true": ctx}, [0.3], seed=7, clean_frames=1)
    s = torch.tensor([0.0] + [0.3] * (fpc - 1))[None, None, :, None, None]
    seq, t, pos = teacher_forcing_inputs(x0, (1 - s) * x0 + s * eps, 1000.0 * s.view(1, fpc).expand(5, fpc))
    with torch.no_grad():
        pred = net(seq, t, ctx, teacher_forcing_mask(cfg, 1), pos)[:, :, fpc + 1:]
    assert one[0.3]["true"] == pytest.approx(float((pred - (eps - x0)[:, :, 1:]).square().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="clean_frames"):
        P.caption_sensitivity(net, lat, {"true": ctx}, [0.3], clean_frames=fpc)


def test_cli_writes_the_report_and_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    cfg = ModelConfig.preset("tiny")
    cache = tmp_path / "cache"
    cache.mkdir()
    caps = ["a red circle moving right on a white background", "a blue square moving up and a red circle moving "
            "left on a black background", "a green triangle moving down-left on a gray background"]
    torch.save({"latents": torch.randn(3, cfg.in_channels, cfg.frames_per_chunk, cfg.latent_height, cfg.latent_width)},
               cache / "latents.pt")
    (cache / "captions.json").write_text(json.dumps(caps))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in build_model(cfg, seed=0).state_dict().items()}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "r" / "probe"
    assert P.main(["--checkpoint", str(tmp_path / "m.safetensors"), "--latents", str(cache), "--config", "tiny",
                   "--sigmas", "0.5", "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["samples"] == 2  # the two-object caption is left out
    loss = rep["rows"][str(tmp_path / "m.safetensors")]["0.5"]
    assert set(loss) == {"true", "direction", "colour", "shape", "null"}
    assert "| 0.5 |" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert P.main(["--checkpoint", str(tmp_path / "m.safetensors"), "--latents", str(tmp_path), "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected a latent cache" in err and "Traceback" not in err
