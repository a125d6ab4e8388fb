"""Decoder engines: a decode net exported into an engine folder, run by ONNX Runtime or AOTInductor.

Owns: the decoder graphs' I/O contract (`decode_signatures`: names, static shapes, dtypes of
`decode_first` and `decode_next`), a decode net's weights identity (`decoder_hash`), and
`EngineDecodeNet` (the two graphs behind the `DecodeNet` signature) with `engine_decoder`, which
picks it from an engine's manifest when it was built from the same decoder weights (an engine may
carry several decoders: `decoder_section`; see `export/decoder.py`). Does not own
export or the manifest's other fields (`export/`, `backends/manifest.py`).

Graphs (float32 always: the decoder is exported at fp32 whatever the DiT's precision):
  decode_first: latents [B, C, Fc, h, w] -> video [B, 3, 1 + 4(Fc-1), H, W], new_cache_i
  decode_next:  latents [B, C, Fc, h, w], cache_i -> video [B, 3, 4 Fc, H, W], new_cache_i
with cache_i the net's `cache_shapes(B, h, w)`; Fc = the model's frames_per_chunk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backends.signature import Signature, TensorSpec, check_inputs

DECODE_GRAPHS = ("decode_first", "decode_next")


def decode_signatures(net, batch: int, frames: int, h: int, w: int) -> dict[str, Signature]:
    """The static I/O of both decoder graphs for chunks of `frames` latent frames of h x w."""
    s, ts = net.spatial_stride, net.temporal_stride
    lat = TensorSpec("latents", (batch, net.z_dim, frames, h, w), "float32")
    caches = [tuple(c) for c in net.cache_shapes(batch, h, w)]
    cin = tuple(TensorSpec(f"cache_{i}", c, "float32") for i, c in enumerate(caches))
    cout = tuple(TensorSpec(f"new_cache_{i}", c, "float32") for i, c in enumerate(caches))
    first = TensorSpec("video", (batch, 3, 1 + ts * (frames - 1), h * s, w * s), "float32")
    nxt = TensorSpec("video", (batch, 3, ts * frames, h * s, w * s), "float32")
    return {"decode_first": Signature((lat,), (first, *cout)), "decode_next": Signature((lat, *cin), (nxt, *cout))}


def signature_record(sig: Signature) -> dict:
    """A signature as JSON that keeps the order (manifests are written with sorted keys)."""
    def rows(specs):
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in specs]
    return {"inputs": rows(sig.inputs), "outputs": rows(sig.outputs)}


def signature_from_record(rec: dict) -> Signature:
    def specs(rows):
        return tuple(TensorSpec(r["name"], tuple(r["shape"]), r["dtype"]) for r in rows)
    return Signature(specs(rec["inputs"]), specs(rec["outputs"]))


def decoder_hash(net) -> str:
    """The decode net's weights identity (the VAE's mean/std included): what a manifest records."""
    from ..checkpoint import state_dict_hash

    sd = dict(net.state_dict())
    for name in ("mean", "std"):
        if hasattr(net, name):
            sd[f"_{name}"] = getattr(net, name)
    return state_dict_hash(sd)


def decoder_graphs(kind: str, primary: bool) -> dict[str, str]:
    """{graph role: runtime entry} of one decoder of an engine: the primary (first built) keeps the
    plain names, the others' are prefixed with their kind (`tiny_decode_first`, ...)."""
    return {g: g if primary else f"{kind}_{g}" for g in DECODE_GRAPHS}


def decoder_sections(manifest: dict) -> dict[str, dict]:
    """{kind: manifest section} of every decoder the engine carries, the primary first. Engines
    built before several decoders existed have only the `decoder` section."""
    primary = manifest.get("decoder")
    return manifest.get("decoders") or ({primary["kind"]: primary} if primary else {})


def decoder_section(manifest: dict, kind: str | None = None) -> dict | None:
    """The manifest section of the engine's decoder `kind` (None: its primary decoder), or None."""
    return manifest.get("decoder") if kind is None else decoder_sections(manifest).get(kind)


class EngineDecodeNet:
    """The decoder graphs of an engine folder as a `DecodeNet` (CPU; static chunk size and batch).
    `kind`: which of the engine's decoders (None: its primary one)."""

    def __init__(self, engine_dir, manifest: dict, kind: str | None = None):
        meta = decoder_section(manifest, kind)
        if meta is None:
            what = f"{kind!r} decoder" if kind else "decoder"
            raise ValueError(f"engine {Path(engine_dir).name} has no {what} graphs")
        self.engine_dir, self.meta = Path(engine_dir), meta
        self.backend = manifest["backend"]
        self.name = f"{meta['kind']} ({self.backend} engine)"
        self.z_dim = meta["z_dim"]
        self.temporal_stride, self.spatial_stride = meta["temporal_stride"], meta["spatial_stride"]
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.batch, self.frames = meta["batch"], meta["frames"]
        self.h, self.w = meta["latent_hw"]
        names = meta.get("graphs") or decoder_graphs(meta["kind"], primary=True)  # role -> runtime entry
        self._sig = {g: signature_from_record(meta["shapes"][g]) for g in DECODE_GRAPHS}  # by role
        self._caches = [t.shape for t in self._sig["decode_next"].inputs[1:]]
        rt = manifest["runtime"]
        paths = {g: self.engine_dir / rt[names[g]] for g in DECODE_GRAPHS}
        if self.backend == "ort":
            import onnxruntime as ort
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions = {g: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                        for g, p in paths.items()}
            self._run = {g: self._ort_runner(s) for g, s in sessions.items()}
        elif self.backend == "aoti":
            from torch._inductor import aoti_load_package
            self._run = {g: self._aoti_runner(aoti_load_package(str(p))) for g, p in paths.items()}
        else:
            raise ValueError(f"decoder engines run on ort or aoti; this engine is {self.backend!r}")

    @staticmethod
    def _ort_runner(sess):
        names = [i.name for i in sess.get_inputs()]

        def run(*tensors):
            outs = sess.run(None, {n: np.ascontiguousarray(t.numpy()) for n, t in zip(names, tensors)})
            return [torch.from_numpy(o) for o in outs]
        return run

    @staticmethod
    def _aoti_runner(pkg):
        def run(*tensors):
            return list(pkg(*(t.contiguous() for t in tensors)))
        return run

    def __repr__(self) -> str:
        return f"EngineDecodeNet({self.engine_dir.name}: {self.name}, chunks of {self.frames} latent frames)"

    def cache_shapes(self, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
        return list(self._caches)

    def stream(self, batch_size: int = 1):
        from . import DecodeStream
        return DecodeStream(self, batch_size)

    def _check(self, graph, args):
        lat = args[0]
        if tuple(lat.shape) != self._sig[graph].inputs[0].shape:
            raise ValueError(f"decoder engine {self.engine_dir.name} decodes chunks of latents "
                             f"{list(self._sig[graph].inputs[0].shape)} (static shapes); got {list(lat.shape)}. "
                             f"Use the eager decoder for other chunk sizes")
        check_inputs(f"decoder engine {self.engine_dir.name} ({graph})", self._sig[graph].inputs, args, self.device)

    def first(self, latents):
        args = (latents.float().contiguous(),)
        self._check("decode_first", args)
        video, *caches = self._run["decode_first"](*args)
        return video, tuple(caches)

    def next(self, latents, caches):
        args = (latents.float().contiguous(), *caches)
        self._check("decode_next", args)
        video, *new = self._run["decode_next"](*args)
        return video, tuple(new)


def engine_decoder(engine_dir, manifest: dict, kind: str, weights_hash: str) -> tuple[EngineDecodeNet | None, str]:
    """The engine's decoder if it was built from `kind` with these weights, else (None, why not)."""
    if not manifest.get("decoder"):
        return None, "the engine has no decoder graphs (built with --decoder none, or before they existed)"
    meta = decoder_section(manifest, kind)
    if meta is None:
        have = ",".join(sorted(decoder_sections(manifest)))
        return None, (f"the engine's decoders are {have!r}, {kind!r} was asked for (build it with "
                      f"--decoder {have},{kind} to run both from the engine)")
    if meta["weights_hash"] != weights_hash:
        return None, (f"the engine's {kind} decoder was built from other weights ({meta.get('source')}); rebuild "
                      f"the engine to export this one")
    if manifest.get("device", "cpu") != "cpu" or manifest["backend"] not in ("ort", "aoti"):
        return None, f"decoder engines run on the CPU through ort or aoti; this engine is {manifest['backend']}"
    return EngineDecodeNet(engine_dir, manifest, kind), ""
