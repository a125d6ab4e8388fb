"""ONNX Runtime backend: the exported step and cross_kv graphs behind the chunk-step signature.

Owns: `OrtStep` and provider selection. Inputs (the chunk, timesteps, cross K/V, the two cache
buffers, the positions) are bound by address with I/O binding, so ORT reads the caller's cache
in place instead of copying it through numpy each call; the step's three outputs are allocated
once per thread and bound once. Works on the CPU provider here; with onnxruntime-gpu the CUDA
provider gets the same binding on device memory, computes on a stream of its own that waits on
torch's current stream and is waited on by it (ORT takes stream handle 0, the legacy default
stream, as "none" and would race torch's pending writes), with TF32 off for fp32 engines, and
`cpu_fallback=False` makes a node without a CUDA kernel an error instead of a hidden CPU round
trip (written from the ORT docs and sources, NOT RUN HERE: this machine has no GPU). Which provider actually runs is read back from
`session.get_providers()`, never assumed from the request. Does not own export or validation
(`export/`, `manifest.py`).

Outputs are reused by the next call on the same thread (as a captured graph's are): consume
them before calling again, as the generation loop does (flow -> x0, k/v -> cache.append).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from .manifest import EngineError
from .signature import broadcast_positions, check_inputs, precision_dtype, signatures

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def check_ort_precision(precision: str, device: str = "cpu"):
    """bf16: the Python I/O binding takes numpy element types, and numpy has no bf16; on the CPU,
    ORT's provider also has no bf16 Gemm/MatMul kernels (checked with onnxruntime 1.32)."""
    if precision == "bf16":
        why = ("ONNX Runtime's CPU execution provider has no bf16 kernel for Gemm/MatMul and its I/O binding "
               "has no bf16 element type" if torch.device(device).type == "cpu" else
               "ONNX Runtime's Python I/O binding takes numpy element types and numpy has no bf16")
        alt = "--backend aoti" if torch.device(device).type == "cpu" else "--backend trt, compile or aoti"
        raise ValueError(f"precision bf16 is not supported by the ort backend on {device}: {why}. Use --precision "
                         f"fp32 or fp16, or {alt} for bf16.")


def _providers_for(device: torch.device, requested: list | None, stream, precision: str) -> list:
    import onnxruntime as ort

    if requested:
        return list(requested)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(f"the ort backend on {device} needs onnxruntime-gpu (CUDAExecutionProvider); this "
                          f"onnxruntime offers {available}. Install it in place of onnxruntime (README, GPU "
                          f"section): pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
    # ORT computes on our own stream (never the legacy default stream, whose handle 0 ORT reads
    # as "no stream"); OrtStep orders it after torch's stream and torch's after it
    opts = {"device_id": str(device.index or 0), "user_compute_stream": str(stream.cuda_stream),
            "use_tf32": "0" if precision == "fp32" else "1"}  # fp32 engines compute in fp32
    return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]


class OrtStep:
    """An ONNX Runtime engine folder (step + cross_kv graphs) as a chunk step."""
    name = "ort"

    def __init__(self, engine_dir, manifest: dict, config: ModelConfig, device="cpu", providers=None,
                 threads: int | None = None, spin: bool = False, cpu_fallback: bool = True):
        import onnxruntime as ort

        want = torch.device(device)
        check_ort_precision(manifest["precision"], want)
        self.config, self.batch = config, manifest["batch"]
        self.dtype = precision_dtype(manifest["precision"])
        self.engine_dir = Path(engine_dir)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:  # idle ORT threads would busy-wait, stealing the cores torch needs (VAE, loop)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not cpu_fallback:  # a node without a GPU kernel fails the session instead of running on the CPU
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        self._stream = None
        if want.type == "cuda":
            with torch.cuda.device(want):
                self._stream = torch.cuda.Stream(want)
        prov = _providers_for(want, providers, self._stream, manifest["precision"])
        # *.opt.onnx is optimized for the CPU provider; GPU providers load the plain graphs
        rt = manifest["runtime"] if want.type == "cpu" else manifest.get("portable", manifest["runtime"])
        try:
            self._step = ort.InferenceSession(str(self.engine_dir / rt["step"]), opts, providers=prov)
            self._cross = ort.InferenceSession(str(self.engine_dir / rt["cross_kv"]), opts, providers=prov)
        except Exception as e:
            if cpu_fallback:
                raise
            raise EngineError(f"ONNX Runtime cannot place every node of {self.engine_dir} on {want} "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); with cpu_fallback "
                              f"those nodes run on the CPU with a copy each way") from None
        self.providers = self._step.get_providers()
        on_gpu = self.providers[0] in GPU_PROVIDERS
        if want.type == "cuda" and not on_gpu:
            raise EngineError(f"asked ONNX Runtime for {want}, but the session runs on {self.providers} (the GPU "
                              f"provider failed to load); install onnxruntime-gpu matching this CUDA: "
                              f"pip install .[gpu]")
        self.device = torch.device("cuda", want.index or 0) if on_gpu else torch.device("cpu")
        self._bind_device = ("cuda", self.device.index) if on_gpu else ("cpu", 0)
        self._sig = signatures(config, self.batch, self.dtype)
        for graph, sess in (("step", self._step), ("cross_kv", self._cross)):
            self._check_session(graph, sess)
        self._where = f"ort engine {self.engine_dir.name}"
        self._local = threading.local()  # per-thread I/O binding and step outputs

    def _check_session(self, graph: str, sess):
        sig = self._sig[graph]
        got = [(i.name, tuple(i.shape)) for i in sess.get_inputs()], [(o.name, tuple(o.shape))
                                                                       for o in sess.get_outputs()]
        want = [(s.name, s.shape) for s in sig.inputs], [(s.name, s.shape) for s in sig.outputs]
        if got != want:
            raise EngineError(f"{self.engine_dir / graph}: graph inputs/outputs {got} differ from the engine "
                              f"signature {want}; rebuild with python -m export.build ... --force")

    def _state(self):
        st = self._local
        if not hasattr(st, "binding"):
            st.binding = self._step.io_binding()
            st.outputs = self._bind_outputs(st.binding, self._sig["step"].outputs)
        return st

    def _bind_outputs(self, binding, specs) -> tuple:
        """Allocate output buffers once and bind them by address."""
        outs = tuple(torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in specs)
        for s, buf in zip(specs, outs):
            binding.bind_output(s.name, *self._bind_device, _NP[buf.dtype], s.shape, buf.data_ptr())
        return outs

    def _bind_inputs(self, binding, specs, tensors):
        kept = [a.contiguous() for a in tensors]  # no copy for the (contiguous) cache buffers
        for s, a in zip(specs, kept):
            binding.bind_input(s.name, *self._bind_device, _NP[a.dtype], s.shape, a.data_ptr())
        return kept  # the caller holds these until the run returns

    def _run(self, session, binding):
        """Run on our stream, ordered after torch's pending work and before its next (CUDA)."""
        if self._stream is None:
            session.run_with_iobinding(binding)
            return
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        session.run_with_iobinding(binding)
        current.wait_stream(self._stream)

    def cross_kv(self, context):
        context = context.to(self.device, self.dtype)
        sig = self._sig["cross_kv"]
        check_inputs(self._where + " (cross_kv)", sig.inputs, (context,), self.device)
        binding = self._cross.io_binding()
        kept = self._bind_inputs(binding, sig.inputs, (context,))
        outs = self._bind_outputs(binding, sig.outputs)
        self._run(self._cross, binding)
        del kept
        return outs

    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        args = broadcast_positions((x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len), self.batch)
        sig = self._sig["step"]
        check_inputs(self._where, sig.inputs, args, self.device)
        st = self._state()
        kept = self._bind_inputs(st.binding, sig.inputs, args)
        self._run(self._step, st.binding)
        del kept
        return st.outputs
