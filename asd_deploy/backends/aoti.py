"""AOTInductor backend: `.pt2` packages (step and cross_kv) behind the chunk-step signature.

Owns: `AotiStep`. The packages come from `torch._inductor.aoti_compile_and_package` (see
`export/aoti_export.py`), weights included, so no eager model is needed; a C++ runtime loads the
same files with libtorch's `AOTIModelPackageLoader(path, "model")`. A package runs only on the
torch version that built it and, on CPU, needs the SIMD level it was compiled for; the manifest
records both and validation refuses a mismatch. Does not own export or validation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from .manifest import EngineError
from .signature import broadcast_positions, check_inputs, precision_dtype, signatures


class AotiStep:
    """An AOTInductor engine folder (step.pt2 + cross_kv.pt2) as a chunk step."""
    name = "aoti"

    def __init__(self, engine_dir, manifest: dict, config: ModelConfig, device="cpu"):
        from torch._inductor import aoti_load_package

        self.engine_dir = Path(engine_dir)
        built_on = torch.device(manifest.get("device", "cpu"))
        want = torch.device(device)
        if want.type != built_on.type:
            raise EngineError(f"AOTI engine {self.engine_dir} was compiled for {built_on}, {want} was requested; "
                              f"rebuild: {manifest.get('rebuild')}")
        self.config, self.batch, self.device = config, manifest["batch"], built_on
        self.dtype = precision_dtype(manifest["precision"])
        rt = manifest["runtime"]
        try:
            self._step = aoti_load_package(str(self.engine_dir / rt["step"]))
            self._cross = aoti_load_package(str(self.engine_dir / rt["cross_kv"]))
        except Exception as e:  # a damaged package that passed a size-only check
            raise EngineError(f"could not load the AOTI packages in {self.engine_dir} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); rebuild: {manifest.get('rebuild')}") from None
        self._sig = signatures(config, self.batch, self.dtype)
        self._where = f"aoti engine {self.engine_dir.name}"

    def cross_kv(self, context):
        context = context.to(self.device, self.dtype).contiguous()
        check_inputs(self._where + " (cross_kv)", self._sig["cross_kv"].inputs, (context,), self.device)
        k, v = self._cross(context)
        return k, v

    def __call__(self, x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len):
        args = broadcast_positions((x, t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len), self.batch)
        check_inputs(self._where, self._sig["step"].inputs, args, self.device)
        flow, k_new, v_new = self._step(*(a.contiguous() for a in args))
        return flow, k_new, v_new
