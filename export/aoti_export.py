"""AOTInductor export of an `ExportSpec`: torch.export, then a compiled `.pt2` package.

Owns: `export_aoti`. The package holds the compiled kernels and the weights, so it runs without
the eager model; Python loads it with `torch._inductor.aoti_load_package`, C++ with libtorch's
`AOTIModelPackageLoader(path, "model")`. It runs only on the torch version that built it and
(CPU) on machines with the SIMD level it was compiled for: the manifest records both. Compiling
the tiny step takes ~20-45 s on 2 CPU cores. Does not own the specs or the build stages.

`INDUCTOR_CONFIGS` turns on freezing: the weights become constants of the graph, so on CPU
Inductor replaces every linear by a oneDNN linear on a prepacked weight, with GELU and the
residual adds fused into it. torch's own fp32 GEMM (MKL) runs at less than half that rate on the
AMD EPYC of our CI (MKL dispatches its AVX2 kernels there; oneDNN uses AVX-512): measured by
`python -m benchmarks.latency`, which reports both GEMM rates. Freezing is silently skipped
while autograd is on, so the compile runs under `torch.no_grad()`. The prepacked weights are laid
out for the building CPU's ISA, one more reason to build engines on the CPU type they serve (the
loaders refuse a package whose recorded ISA this machine lacks).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .artifacts import write_atomically
from .spec import ExportSpec


INDUCTOR_CONFIGS = {"freezing": True}


def export_program(spec: ExportSpec) -> torch.export.ExportedProgram:
    """The spec traced by torch.export (non-strict), static shapes, inputs in signature order."""
    with spec.tracing(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.export.export(spec.module, spec.sample_inputs, strict=False)


def export_aoti(spec: ExportSpec, path: Path, inductor_configs: dict | None = None) -> list[Path]:
    """torch.export + `aoti_compile_and_package` into `path` (must end in .pt2), with
    `INDUCTOR_CONFIGS` unless `inductor_configs` is given."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package must end in .pt2; got {path.name}")
    program = export_program(spec)

    configs = dict(INDUCTOR_CONFIGS if inductor_configs is None else inductor_configs)  # a copy: torch adds keys

    def write(tmp: Path):
        with warnings.catch_warnings(), torch.no_grad():  # freezing only happens without autograd
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)

    return write_atomically(path, write)
