"""Decoders behind the one decode-chunk signature: the VAE's decoder chunk at once with a static
cache against diffusers' own streaming decode, the tiny decoder's causal streaming and folder
format, and both as ONNX Runtime engines. fp32, CPU, tiny random-weight VAEs."""
import json

import pytest
import torch

from asd_deploy.decoders import DecodeStream, make_decoder, pipeline_decoder
from asd_deploy.decoders.engine import (EngineDecodeNet, decode_signatures, decoder_hash, decoder_section,
                                        engine_decoder)
from asd_deploy.decoders.tiny import TINY_DECODER_ARCHS, TinyDecoder, TinyDecoderConfig
from asd_deploy.decoders.vae import VaeDecodeNet
from asd_deploy.vae import VideoVAE

from conftest import assert_close

TOL = 1e-4  # the issue's bar for the streaming decoder against diffusers' streaming decode


@pytest.fixture(scope="module")
def vae():
    return VideoVAE.tiny(seed=0)


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 16, 9, 4, 6, generator=g)  # 3 chunks of 3 latent frames -> 33 pixel frames


@pytest.fixture(scope="module")
def engine_latents():
    """Latents at the default model's size: what its engines' decoders take (static shapes)."""
    from asd_deploy.registry import default_config

    cfg = default_config()
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, cfg.in_channels, 9, cfg.latent_height, cfg.latent_width, generator=g)


def _stream(dec, latents, split):
    return torch.cat([dec.decode_chunk(c) for c in latents.split(split, dim=2)], dim=2)


@pytest.mark.parametrize("split", [[3, 3, 3], [1, 2, 3, 3], [2, 1, 6], [9]])
def test_vae_net_equals_diffusers_streaming(vae, latents, split):
    """Chunk at once with a static cache == diffusers' frame-by-frame streaming decode
    (StreamDecoder) == diffusers' one-shot decode, for any split, first chunks of 1-3 frames."""
    net = VaeDecodeNet(vae)
    ref = _stream(vae.stream_decoder(), latents, split)
    got = _stream(net.stream(), latents, split)
    assert got.shape == (1, 3, 33, 32, 48)
    assert_close(got, ref, TOL, f"VaeDecodeNet split {split} vs StreamDecoder")
    with torch.no_grad():
        assert_close(got, vae.vae.decode(vae.denormalize(latents)).sample, TOL, "vs diffusers one-shot decode")


def test_vae_net_cache_is_static(vae, latents):
    """Every cache tensor keeps its shape from the first chunk on: what an engine's I/O needs."""
    net = VaeDecodeNet(vae)
    shapes = net.cache_shapes(1, 4, 6)
    _, c1 = net.first(latents[:, :, :1])
    _, c2 = net.next(latents[:, :, 1:4], c1)
    assert [tuple(c.shape) for c in c1] == [tuple(c.shape) for c in c2] == shapes
    assert sum(rep for *_, rep in net.slots) == 2  # two temporal upsamplers (stride 4)


def test_vae_net_rejects_wan22_layout():
    from diffusers import AutoencoderKLWan

    from asd_deploy.vae import TINY_CONFIG
    v = VideoVAE(AutoencoderKLWan(z_dim=16, **dict(TINY_CONFIG, is_residual=True)))
    with pytest.raises(ValueError, match="is_residual"):
        VaeDecodeNet(v)


@pytest.mark.parametrize("arch", ["tiny", "demo", "demo-lite"])
def test_tiny_decoder_streams_causally(latents, arch):
    """Any split of the latents gives the one-shot frames (the cache carries time exactly); frame
    counts follow Wan's 1 + 4k layout; a later chunk never changes earlier frames."""
    torch.manual_seed(0)
    net = TinyDecoder(TINY_DECODER_ARCHS[arch]).eval()
    whole = net.stream().decode_chunk(latents)
    assert whole.shape == (1, 3, 33, 32, 48) and whole.abs().max() <= 1
    for split in ([3, 3, 3], [1, 1, 7]):
        s = net.stream()
        outs = [s.decode_chunk(c) for c in latents.split(split, dim=2)]
        assert [o.shape[2] for o in outs] == [4 * n - (3 if i == 0 else 0) for i, n in enumerate(split)]
        assert_close(torch.cat(outs, 2), whole, 1e-5, f"tiny {arch} split {split}")
    changed = latents.clone()
    changed[:, :, 6:] += 1.0
    again = net.stream().decode_chunk(changed)
    assert torch.equal(again[:, :, :21], whole[:, :, :21]) and not torch.equal(again, whole)


def test_tiny_decoder_config_checks():
    assert TinyDecoderConfig().temporal_stride == 4 and TinyDecoderConfig().spatial_stride == 8
    with pytest.raises(ValueError, match="one entry per resolution"):
        TinyDecoderConfig(channels=(8, 8))
    with pytest.raises(ValueError, match="unknown tiny decoder config fields"):
        TinyDecoderConfig.from_dict({"chanels": [1]})


def test_tiny_decoder_save_load(tmp_path, latents):
    net = TinyDecoder(TINY_DECODER_ARCHS["tiny"]).eval()
    net.save(tmp_path / "td", extra={"train_report.json": "{}"})
    net.save(tmp_path / "td")  # overwrite in place
    loaded = make_decoder("tiny", tiny=tmp_path / "td")
    assert loaded.config == net.config and decoder_hash(loaded) == decoder_hash(net)
    assert torch.equal(loaded.stream().decode_chunk(latents), net.stream().decode_chunk(latents))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["td"]
    with pytest.raises(FileNotFoundError, match="training.tiny_decoder"):
        TinyDecoder.from_pretrained(tmp_path / "nothing")
    (tmp_path / "td" / "config.json").write_text(json.dumps({"config": {"channels": [8, 8, 8, 8, 8]}}))
    with pytest.raises(ValueError, match="one entry per resolution"):
        TinyDecoder.from_pretrained(tmp_path / "td")


def test_stream_errors(vae):
    s = DecodeStream(VaeDecodeNet(vae))
    with pytest.raises(ValueError, match="C=16"):
        s.decode_chunk(torch.zeros(1, 4, 1, 4, 6))
    with pytest.raises(ValueError, match="add the frame axis"):
        s.decode_chunk(torch.zeros(1, 16, 4, 6))
    s.decode_chunk(torch.zeros(1, 16, 1, 4, 6))
    with pytest.raises(ValueError, match="reset"):
        s.decode_chunk(torch.zeros(1, 16, 1, 5, 6))
    with pytest.raises(ValueError, match="unknown decoder"):
        make_decoder("big")
    with pytest.raises(FileNotFoundError, match="training.tiny_decoder"):
        pipeline_decoder("tiny", vae, "/nonexistent/tiny")


def test_decode_signatures_match_the_net(vae):
    net = VaeDecodeNet(vae)
    sig = decode_signatures(net, 1, 3, 4, 6)
    assert sig["decode_first"].outputs[0].shape == (1, 3, 9, 32, 48)
    assert sig["decode_next"].outputs[0].shape == (1, 3, 12, 32, 48)
    assert [s.shape for s in sig["decode_next"].inputs[1:]] == net.cache_shapes(1, 4, 6)
    assert [s.shape for s in sig["decode_next"].outputs[1:]] == net.cache_shapes(1, 4, 6)


def test_decoder_kinds_of_a_build():
    from export.decoder import decoder_kinds

    assert decoder_kinds("vae,tiny") == ("vae", "tiny") and decoder_kinds("tiny") == ("tiny",)
    assert decoder_kinds("tiny, vae") == ("tiny", "vae") and decoder_kinds("none") == ()
    assert decoder_kinds(None, "default") == ("vae", "tiny")  # the default model ships a tiny decoder
    assert decoder_kinds(None, "random") == ("vae",) and decoder_kinds(None, "random", "some/folder") == ("vae", "tiny")
    for bad in ("vae,vae", "none,vae", "big", "", "vae,"):
        with pytest.raises(ValueError, match="comma list"):
            decoder_kinds(bad)


@pytest.fixture(scope="module")
def ort_engines(tmp_path_factory, default_engines):
    """The default model's ORT engine with its VAE decoder (the session's), and one with a tiny
    decoder."""
    from export.build import build

    tmp = tmp_path_factory.mktemp("dec")
    td = TinyDecoder(TINY_DECODER_ARCHS["tiny"]).eval()
    td.save(tmp / "tiny_decoder")
    quiet = lambda m: None  # noqa: E731
    return (default_engines[0]("ort"),
            build(backend="ort", out=tmp / "t", log=quiet, decoder="tiny", tiny_decoder=str(tmp / "tiny_decoder")),
            tmp / "tiny_decoder")


@pytest.mark.slow  # builds two ORT engines with decoders (~25 s)
def test_ort_vae_decoder_engine_equals_diffusers_streaming(ort_engines, engine_latents):
    from asd_deploy.backends.manifest import read_manifest
    from asd_deploy.registry import ASSETS

    folder = ort_engines[0]
    m = read_manifest(folder)
    assert m["decoder"]["kind"] == "vae" and m["decoder"]["validation"]["max_abs_err"] <= TOL
    assert {"decode_first", "decode_next"} <= set(m["runtime"]) and m["runtime"]["decode_next"] in m["artifacts"]
    vae = VideoVAE.from_pretrained(ASSETS / "vae")
    assert m["decoder"]["weights_hash"] == decoder_hash(VaeDecodeNet(vae))
    eng = EngineDecodeNet(folder, m)
    assert_close(_stream(eng.stream(), engine_latents, [3, 3, 3]), _stream(vae.stream_decoder(), engine_latents, [3, 3, 3]),
                 TOL, "ORT VAE decoder engine vs diffusers streaming")
    with pytest.raises(ValueError, match="static shapes"):
        eng.stream().decode_chunk(engine_latents[:, :, :2])


@pytest.mark.slow  # builds two ORT engines with decoders (~25 s)
def test_ort_tiny_decoder_engine(ort_engines, engine_latents):
    from asd_deploy.backends.manifest import read_manifest

    folder, td = ort_engines[1], ort_engines[2]
    eng = EngineDecodeNet(folder, read_manifest(folder))
    assert eng.name == "tiny (ort engine)"
    net = TinyDecoder.from_pretrained(td)
    assert_close(_stream(eng.stream(), engine_latents, [3, 3, 3]), net.stream().decode_chunk(engine_latents), TOL, "ORT tiny")


@pytest.mark.slow  # builds two ORT engines with decoders (~25 s)
def test_pipeline_runs_the_engine_decoder_only_for_its_weights(ort_engines):
    from asd_deploy.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("default", backend="ort", engine=str(ort_engines[0]))
    assert pipe.info["decoder"] == "vae (ort engine)" and isinstance(pipe.decoder, EngineDecodeNet)
    eager = Pipeline.from_pretrained("default")
    a, _ = pipe("a red circle moving right", frames=21)
    b, _ = eager("a red circle moving right", frames=21)
    assert a.shape == b.shape and abs(a.astype(int) - b).max() <= 1  # uint8 rounding of a 1e-4 difference
    other = VideoVAE.tiny(seed=5)
    other.save(ort_engines[2].parent / "other_vae")
    p2 = Pipeline.from_pretrained("default", backend="ort", engine=str(ort_engines[0]),
                                  vae=str(ort_engines[2].parent / "other_vae"))
    assert p2.info["decoder"] == "vae" and "other weights" in p2.info["decoder_note"]
    p3 = Pipeline.from_pretrained("default", backend="ort", engine=str(ort_engines[1]), decoder="tiny",
                                  tiny_decoder=str(ort_engines[2]))
    assert p3.info["decoder"] == "tiny (ort engine)"


@pytest.mark.slow  # builds two ORT engines with decoders (~25 s)
def test_default_engine_carries_the_vae_and_the_tiny_decoder(ort_engines, engine_latents):
    """The default model ships a tiny decoder, so its engine carries both: the VAE first (the
    primary, what the C++ runtime runs), each validated against its eager reference, and a
    pipeline runs the one it is asked for from the engine."""
    from asd_deploy.backends.manifest import read_manifest
    from asd_deploy.pipeline import Pipeline
    from asd_deploy.registry import ASSETS

    folder = ort_engines[0]
    m = read_manifest(folder)
    assert set(m["decoders"]) == {"vae", "tiny"} and m["decoder"] == m["decoders"]["vae"]  # the VAE is primary
    tiny = m["decoders"]["tiny"]
    assert tiny["graphs"] == {"decode_first": "tiny_decode_first", "decode_next": "tiny_decode_next"}
    assert m["decoder"]["graphs"] == {"decode_first": "decode_first", "decode_next": "decode_next"}
    assert tiny["validation"]["max_abs_err"] <= TOL and m["runtime"]["tiny_decode_next"] in m["artifacts"]
    net = TinyDecoder.from_pretrained(ASSETS / "tiny_decoder")
    assert tiny["weights_hash"] == decoder_hash(net)
    eng = EngineDecodeNet(folder, m, "tiny")
    assert eng.name == "tiny (ort engine)"
    assert_close(_stream(eng.stream(), engine_latents, [3, 3, 3]), net.stream().decode_chunk(engine_latents), TOL,
                 "ORT tiny decoder beside the VAE")
    for kind in ("vae", "tiny"):
        pipe = Pipeline.from_pretrained("default", backend="ort", engine=str(folder), decoder=kind)
        assert pipe.info["decoder"] == f"{kind} (ort engine)", pipe.info
    # an engine built before engines carried several decoders has only the `decoder` section
    legacy = {k: v for k, v in m.items() if k != "decoders"}
    assert decoder_section(legacy) == decoder_section(legacy, "vae") == m["decoder"]
    assert decoder_section(legacy, "tiny") is None
    none, why = engine_decoder(folder, legacy, "tiny", tiny["weights_hash"])
    assert none is None and "--decoder vae,tiny" in why
    with pytest.raises(ValueError, match="no 'tiny' decoder graphs"):
        EngineDecodeNet(folder, legacy, "tiny")


def test_lite_tiny_decoder_exports_to_onnx(tmp_path):
    """demo-lite's pixel-shuffle output exports (DepthToSpace) and runs in ONNX Runtime like eager."""
    import onnxruntime as ort

    from asd_deploy.config import ModelConfig
    from export.onnx_export import export_onnx
    from export.spec import decoder_specs

    torch.manual_seed(0)
    net = TinyDecoder(TINY_DECODER_ARCHS["demo-lite"]).eval()
    spec = decoder_specs(net, ModelConfig.preset("demo"))[1]  # decode_next: latents + caches
    export_onnx(spec, tmp_path / "next.onnx", 18)
    sess = ort.InferenceSession(str(tmp_path / "next.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), spec.sample_inputs)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = spec.module(*spec.sample_inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(torch.from_numpy(g), w, 1e-5, "demo-lite decode_next ORT vs eager")
