"""VideoVAE: streaming decode == one-shot decode == diffusers' own decode; shapes; normalization;
independent stream caches; save/load; clear errors. All on the tiny random-weight VAE (fp32, CPU)."""
import threading

import numpy as np
import pytest
import torch

from asd_deploy.vae import VideoVAE, to_uint8_frames

# Streaming runs the same decoder ops frame by frame as diffusers' _decode; only the 1x1x1
# post_quant_conv sees a different frame count, so fp32 results agree to rounding.
STREAM_ATOL = 1e-5
H, W = 32, 48  # pixels; latents 4 x 6


def max_err(a, b):
    assert a.shape == b.shape, f"shape {list(a.shape)} != {list(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def vae():
    return VideoVAE.tiny(seed=0)


@pytest.fixture(scope="module")
def latents(vae):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, vae.z_dim, 6, H // 8, W // 8, generator=g)  # 6 latent frames -> 21 pixel frames


@pytest.fixture(scope="module")
def reference(vae, latents):
    """diffusers' own one-shot decode of the raw (denormalized) latents."""
    with torch.no_grad():
        return vae.vae.decode(vae.denormalize(latents)).sample


def test_strides_and_config(vae):
    assert (vae.temporal_stride, vae.spatial_stride, vae.z_dim) == (4, 8, 16)
    assert vae.vae.config.scale_factor_temporal == 4 and vae.vae.config.scale_factor_spatial == 8
    assert vae.latent_shape(2, 9, H, W) == (2, 16, 3, 4, 6)
    assert [vae.num_pixel_frames(f) for f in (0, 1, 3, 21)] == [0, 1, 9, 81]


def test_decode_matches_diffusers_raw_decode(vae, latents, reference):
    """decode() takes normalized latents: decode((z - mean)/std) == diffusers decode(z)."""
    out = vae.decode(latents)
    assert out.shape == (1, 3, 21, H, W) and out.dtype == torch.float32
    assert max_err(out, reference) <= STREAM_ATOL
    # and the normalization is not the identity (else the check above would be vacuous)
    with torch.no_grad():
        unnormalized = vae.vae.decode(latents).sample
    assert max_err(out, unnormalized) > 1e-2


@pytest.mark.parametrize("split", [[3, 3], [1, 3, 2], [1, 1, 1, 1, 1, 1], [6]])
def test_stream_equals_one_shot(vae, latents, reference, split):
    dec = vae.stream_decoder(batch_size=1)
    outs = [dec.decode_chunk(c) for c in latents.split(split, dim=2)]
    # first latent frame -> 1 pixel frame, each later one -> 4
    expected_t = [4 * n - (3 if i == 0 else 0) for i, n in enumerate(split)]
    assert [o.shape[2] for o in outs] == expected_t
    assert max_err(torch.cat(outs, dim=2), reference) <= STREAM_ATOL, f"split {split}"
    assert (dec.latent_frames, dec.pixel_frames) == (6, 21)


def test_reset_starts_a_new_video(vae, latents, reference):
    dec = vae.stream_decoder()
    dec.decode_chunk(latents[:, :, :3] + 1.0)  # some other video first
    dec.reset()
    out = torch.cat([dec.decode_chunk(c) for c in latents.split(3, dim=2)], dim=2)
    assert max_err(out, reference) <= STREAM_ATOL


def test_two_streams_interleaved_and_threaded(vae, latents, reference):
    other = torch.flip(latents, dims=[2]) * 0.5
    ref_other = vae.decode(other)
    a, b = vae.stream_decoder(), vae.stream_decoder()
    outs_a, outs_b = [], []
    for ca, cb in zip(latents.split([1, 3, 2], dim=2), other.split([1, 3, 2], dim=2)):
        outs_a.append(a.decode_chunk(ca))
        outs_b.append(b.decode_chunk(cb))
    assert max_err(torch.cat(outs_a, 2), reference) <= STREAM_ATOL
    assert max_err(torch.cat(outs_b, 2), ref_other) <= STREAM_ATOL

    results, errors = {}, []

    def run(name, lat):
        try:
            d = vae.stream_decoder()
            results[name] = torch.cat([d.decode_chunk(c) for c in lat.split(1, dim=2)], 2)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", latents)), threading.Thread(target=run, args=("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max_err(results["a"], reference) <= STREAM_ATOL
    assert max_err(results["b"], ref_other) <= STREAM_ATOL


def test_batch_of_two(vae, latents, reference):
    both = torch.cat([latents, latents * 0.5], dim=0)
    dec = vae.stream_decoder(batch_size=2)
    out = torch.cat([dec.decode_chunk(c) for c in both.split(3, dim=2)], 2)
    assert max_err(out[:1], reference) <= STREAM_ATOL
    assert max_err(out[1:], vae.decode(latents * 0.5)) <= STREAM_ATOL


@pytest.mark.parametrize("t", [1, 5, 9])
def test_encode_decode_shapes_and_normalization(vae, t):
    g = torch.Generator().manual_seed(t)
    video = torch.rand(1, 3, t, H, W, generator=g) * 2 - 1
    z = vae.encode(video)
    k = (t - 1) // 4
    assert z.shape == (1, 16, 1 + k, H // 8, W // 8) and z.dtype == torch.float32
    with torch.no_grad():
        raw = vae.vae.encode(video).latent_dist.mode()
    assert max_err(z, (raw - vae._mean) / vae._std) <= 1e-5  # z_norm = (z - mean) / std
    assert max_err(vae.denormalize(z), raw) <= 1e-5
    out = vae.decode(z)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(vae.encode(video), z), "encode must be deterministic (posterior mode)"


def test_encode_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match="1 \\+ 4k frames; got T=6"):
        vae.encode(torch.zeros(1, 3, 6, H, W))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 5, 30, W))
    dec = vae.stream_decoder(batch_size=1)
    with pytest.raises(ValueError, match="C=16"):
        dec.decode_chunk(torch.zeros(1, 4, 1, 4, 6))
    dec.decode_chunk(torch.zeros(1, 16, 1, 4, 6))
    with pytest.raises(ValueError, match="reset"):
        dec.decode_chunk(torch.zeros(1, 16, 1, 5, 6))


def test_other_z_dim_has_its_own_stats():
    v = VideoVAE.tiny(seed=3, z_dim=8)
    assert v.z_dim == 8 and v._std.numel() == 8 and not torch.allclose(v._std, torch.ones(8))
    assert v.decode(torch.zeros(1, 8, 2, 2, 2)).shape == (1, 3, 5, 16, 16)


def test_to_uint8_frames(vae, latents):
    video = vae.decode(latents[:, :, :2])
    frames = to_uint8_frames(video)
    assert frames.shape == (5, H, W, 3) and frames.dtype == np.uint8
    edge = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1, 1).expand(2, 3, 1, 1, 1)
    assert to_uint8_frames(edge)[0, 0, 0].tolist() == [0, 128, 255]
    assert to_uint8_frames(edge, batch_index=None).shape == (2, 1, 1, 1, 3)


def test_save_then_load(vae, latents, reference, tmp_path):
    dst = tmp_path / "vae"
    vae.save(dst)
    vae.save(dst)  # overwriting an existing folder works too
    assert (dst / "config.json").is_file() and (dst / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"], "temp folders left behind"
    loaded = VideoVAE.from_pretrained(dst)
    assert loaded.z_dim == 16 and torch.equal(loaded._mean, vae._mean)
    assert max_err(loaded.decode(latents), reference) <= STREAM_ATOL


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
        VideoVAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VideoVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        VideoVAE.from_pretrained(tmp_path)


def test_damaged_nan_and_malicious_vae_folders_are_refused(vae, tmp_path):
    """A VAE folder loads only if its weights are whole, finite and plain tensors; each refusal is
    a CheckpointError naming the folder (the CLI turns it into one line), never a traceback."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from asd_deploy.checkpoint import CheckpointError

    good = tmp_path / "good"
    vae.save(good)
    weights = good / "diffusion_pytorch_model.safetensors"

    nan = shutil.copytree(good, tmp_path / "nan")
    sd = load_file(str(weights))
    name = sorted(k for k in sd if k.startswith("decoder."))[0]
    sd[name] = torch.full_like(sd[name], float("nan"))
    save_file(sd, str(nan / weights.name))
    with pytest.raises(CheckpointError, match=f"VAE {nan}: 1 tensors hold NaN or Inf: \\['{name}'\\]"):
        VideoVAE.from_pretrained(nan)

    trunc = shutil.copytree(good, tmp_path / "trunc")
    (trunc / weights.name).write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"VAE folder {trunc} does not load"):
        VideoVAE.from_pretrained(trunc)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/asd_deploy_pwned_vae",))
    evil = shutil.copytree(good, tmp_path / "evil")
    (evil / weights.name).unlink()
    torch.save({"x": Evil()}, evil / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"VAE folder {evil} does not load"):
        VideoVAE.from_pretrained(evil)
    assert not os.path.exists("/tmp/asd_deploy_pwned_vae")
