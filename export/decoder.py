"""The decoder part of an engine build: which decoder, its export stages, its validation.

Owns: `decoder_kinds` (which decoders a build exports: `--decoder vae,tiny`; by default the
model's VAE, and its tiny decoder when the model ships one), `resolve_decoder` (the decode net of
one kind: the model's VAE, or its tiny decoder, resolved the way `Pipeline` resolves them, so an
engine's decoder serves that pipeline), `build_decoder` (the stages that export `decode_first` /
`decode_next` beside the DiT graphs, and the manifest section of that decoder) and
`validate_decoder` (a 3-chunk stream through the engine against the eager reference: diffusers'
frame-by-frame decode for the VAE). Does not own the decode nets (`asd_deploy/decoders/`) or the
DiT stages (`build.py`).

An engine may carry several decoders. The first one listed is the engine's primary decoder: its
graphs are `decode_first` / `decode_next` and its section is the manifest's `decoder` (what the C++
runtime runs); every decoder, the primary included, has its section under `decoders[kind]`, whose
`graphs` names its runtime entries (`tiny_decode_first`, ... for the others).
"""
from __future__ import annotations

from pathlib import Path

import torch

DECODER_CHOICES = ("vae", "tiny", "none")
VALIDATE_TOL = 1e-4  # fp32 engine vs eager, max abs error on frames in [-1, 1]


def decoder_kinds(spec: str | None, checkpoint: str = "default", tiny: str | None = None) -> tuple[str, ...]:
    """The decoders a build exports, in order (the first is the primary): `spec` a comma list of
    vae / tiny, or "none" (no decoder: an empty tuple). None: the VAE, and the tiny decoder too when
    one is given (`tiny`) or the default model ships one."""
    if spec is None:
        from asd_deploy.registry import ASSETS, default_is_trained
        has_tiny = tiny is not None or (checkpoint == "default" and default_is_trained()
                                        and (ASSETS / "tiny_decoder" / "config.json").is_file())
        return ("vae", "tiny") if has_tiny else ("vae",)
    kinds = tuple(k.strip() for k in str(spec).split(","))
    bad = [k for k in kinds if k not in DECODER_CHOICES]
    if bad or not kinds or len(set(kinds)) != len(kinds) or ("none" in kinds and len(kinds) > 1):
        raise ValueError(f"--decoder takes a comma list of {list(DECODER_CHOICES[:2])} without repeats, or 'none'; "
                         f"got {spec!r}")
    return () if kinds == ("none",) else kinds


def resolve_decoder(kind: str, checkpoint: str, config, vae: str | None = None, tiny: str | None = None):
    """(decode net, source description) for `kind`, or (None, why) for "none"."""
    from asd_deploy.decoders import make_decoder
    from asd_deploy.registry import ASSETS, default_is_trained
    from asd_deploy.vae import VideoVAE

    if kind not in DECODER_CHOICES:
        raise ValueError(f"--decoder must be one of {list(DECODER_CHOICES)}; got {kind!r}")
    if kind == "none":
        return None, "none"
    if kind == "vae":
        if vae is None and checkpoint == "default" and default_is_trained():
            vae = str(ASSETS / "vae")
        v = VideoVAE.from_pretrained(vae) if vae else VideoVAE.tiny(seed=0, z_dim=config.in_channels)
        return make_decoder("vae", v), vae or "tiny random VAE (seed 0)"
    if tiny is None and checkpoint == "default":
        tiny = str(ASSETS / "tiny_decoder")
    if tiny is None or not Path(tiny).is_dir():
        raise FileNotFoundError(f"--decoder tiny: no tiny decoder at {tiny} (give --tiny-decoder FOLDER); train one "
                                f"with: python -m training.tiny_decoder --vae VAE_FOLDER --out FOLDER [--model MODEL]")
    return make_decoder("tiny", tiny=tiny), str(tiny)


def build_decoder(stage, folder: Path, net, source: str, kind: str, config, batch: int, backend: str, base: dict,
                  opset: int | None, inductor_configs: dict | None, primary: bool = True) -> tuple[dict, dict]:
    """Run the decoder's export stages through `stage` (build.py's cached, atomic stage runner);
    returns (its manifest section without validation, runtime entries). `primary`: the engine's
    first decoder (plain graph names); the others' graphs are prefixed with their kind."""
    from asd_deploy.backends.manifest import stage_key
    from asd_deploy.decoders.engine import decoder_graphs, decoder_hash, signature_record

    from .spec import decoder_specs

    if net.z_dim != config.in_channels:
        raise ValueError(f"the {kind} decoder takes {net.z_dim} latent channels; the DiT makes {config.in_channels}")
    names = decoder_graphs(kind, primary)
    specs = {names[s.name]: s for s in decoder_specs(net, config, batch)}
    whash = decoder_hash(net)
    meta = {"kind": kind, "source": source, "weights_hash": whash, "precision": "fp32", "batch": batch,
            "frames": config.frames_per_chunk, "latent_hw": [config.latent_height, config.latent_width],
            "z_dim": net.z_dim, "temporal_stride": net.temporal_stride, "spatial_stride": net.spatial_stride,
            "shapes": {s.name: signature_record(s.signature) for s in specs.values()}, "graphs": names}
    key_base = dict(base, decoder=kind, decoder_hash=whash, decoder_shapes=meta["shapes"])
    runtime = {}
    for g, spec in specs.items():
        if backend == "ort":
            from .onnx_export import export_onnx, optimize_onnx
            stage("export", f"{g}.onnx", stage_key(stage="export", graph=g, **key_base),
                  lambda p, spec=spec: export_onnx(spec, p, opset))
            src = folder / f"{g}.onnx"
            stage("optimize", f"{g}.opt.onnx", stage_key(stage="optimize", graph=g, src=_sha(folder, g), **key_base),
                  lambda p, src=src: optimize_onnx(src, p))
            runtime[g] = f"{g}.opt.onnx"
        elif backend == "aoti":
            from .aoti_export import export_aoti
            stage("build", f"{g}.pt2", stage_key(stage="build", graph=g, **key_base),
                  lambda p, spec=spec: export_aoti(spec, p, inductor_configs))
            runtime[g] = f"{g}.pt2"
        else:
            raise ValueError(f"decoder engines are built for ort and aoti, not {backend!r}")
    return meta, runtime


def _sha(folder: Path, graph: str) -> str:
    from asd_deploy.backends.manifest import sha256_file
    return sha256_file(folder / f"{graph}.onnx")


def validate_decoder(folder: Path, manifest: dict, net, chunks: int = 3, seed: int = 1,
                     kind: str | None = None) -> dict:
    """A `chunks`-chunk stream through the engine's decoder `kind` (None: the primary) against the
    eager reference (for the VAE: diffusers' own frame-by-frame streaming decode,
    `VideoVAE.stream_decoder`)."""
    from asd_deploy.backends.manifest import EngineError
    from asd_deploy.decoders.engine import EngineDecodeNet, decoder_section

    meta = decoder_section(manifest, kind)
    b, f, (h, w) = meta["batch"], meta["frames"], meta["latent_hw"]
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, net.z_dim, f * chunks, h, w, generator=g)
    engine = EngineDecodeNet(folder, manifest, kind).stream(b)
    ref = net.vae.stream_decoder(b) if meta["kind"] == "vae" else net.stream(b)
    worst = 0.0
    for c in lat.split(f, dim=2):
        worst = max(worst, (engine.decode_chunk(c) - ref.decode_chunk(c)).abs().max().item())
    reference = "diffusers frame-by-frame streaming decode" if meta["kind"] == "vae" else "eager tiny decoder"
    if not worst <= VALIDATE_TOL:
        raise EngineError(f"engine {folder}: its {meta['kind']} decoder differs from the {reference} by {worst:.2e} "
                          f"(tolerance {VALIDATE_TOL}); its manifest stays incomplete so it will not load")
    return {"chunks": chunks, "reference": reference, "max_abs_err": worst, "tolerance": VALIDATE_TOL}
