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
    turned = DIRECTIONS.index(parse_caption(P.swap_attribute(caption, "turn"))["objects"][0][2])
    assert (turned - DIRECTIONS.index(d)) % 8 == 2  # 90 degrees: another axis
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
    assert set(loss) == {"true", "direction", "turn", "colour", "shape", "null"}
    assert "| 0.5 |" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert P.main(["--checkpoint", str(tmp_path / "m.safetensors"), "--latents", str(tmp_path), "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected a latent cache" in err and "Traceback" not in err


class _Oracle:
    """A stand-in network whose flow is exact: v = (x_t - x0) / sigma, read off the teacher-forcing
    sequence [x0, x_t], so its one-shot prediction is x0 itself whatever the caption."""

    def __init__(self, config, zero: bool = False):
        self.config, self.zero = config, zero

    def __call__(self, seq, t, ctx, mask, pos):
        f = seq.shape[2] // 2
        x0, x_t = seq[:, :, :f], seq[:, :, f:]
        s = (t[:, f:] / self.config.num_train_timesteps).clamp_min(1e-6)[:, None, :, None, None]
        v = torch.zeros_like(x_t) if self.zero else (x_t - x0) / s
        return torch.cat([torch.zeros_like(x0), v], dim=2)


@pytest.mark.slow
def test_motion_agreement_scores_the_decoded_prediction():
    """An exact flow gives back the real clip, which moves the caption's way under either caption;
    a zero flow leaves the noise in, and the share drops."""
    from pathlib import Path

    from asd_deploy.text import load_text_encoder
    from asd_deploy.vae import VideoVAE
    from training.data import ProceduralVideos
    from training.train import _video_tensor

    vae_dir = Path(__file__).resolve().parent.parent / "training" / "checkpoints" / "vae-demo"
    cfg = ModelConfig.preset("demo")
    ds = ProceduralVideos(12, seed=3, height=cfg.height, width=cfg.width, frames=9, max_objects=1)
    vae = VideoVAE.from_pretrained(vae_dir)
    with torch.no_grad():
        lat = vae.encode(torch.stack([_video_tensor(ds[i]["video"]) for i in range(len(ds))]))
    caps = [ds[i]["caption"] for i in range(len(ds))]
    text = load_text_encoder("default", cfg.text_len)
    exact = P.motion_agreement(_Oracle(cfg), vae, lat, caps, text, sigma=0.9)
    assert exact["real latents"] == 1.0
    assert exact["true caption"] == exact["opposite direction named"] == 1.0
    noisy = P.motion_agreement(_Oracle(cfg, zero=True), vae, lat, caps, text, sigma=0.9)
    assert noisy["true caption"] < 0.75 and noisy["real latents"] == 1.0
