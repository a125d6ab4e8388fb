"""ONNX export of an `ExportSpec` (torch.onnx dynamo exporter) and ONNX Runtime offline optimization.

Owns: `export_onnx` (trace -> `.onnx`, static shapes, named I/O, checked after writing),
`check_onnx_io`, `consumed_inputs` (which graph inputs some node reads: an input nobody reads
was dropped or baked by the exporter) and `optimize_onnx` (ORT's offline graph optimization to
`*.opt.onnx`, which the CPU runtime loads). Does not own the specs or the build stages.

Opset 18 lowers attention to MatMul/Softmax; opset 23 to the fused `Attention` op (and RMSNorm to
`RMSNormalization`), for which the spec expands the boolean mask to [B, 1, Lq, Lk].
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import torch

from .artifacts import write_atomically
from .spec import ExportSpec

MIN_OPSET = 18  # the dynamo exporter's minimum; 23 adds the fused Attention op
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to `<name>.onnx.data` (protobuf caps a file at 2 GB)

_ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
         onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}


@contextlib.contextmanager
def _quiet():
    """The exporter logs optional-dependency notes (torchvision) and deprecation warnings."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _weights_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(spec: ExportSpec, path: Path, opset: int) -> list[Path]:
    """Export `spec` to `path` at `opset`; returns the files written (the .onnx, maybe its .data)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: the dynamo exporter needs opset >= {MIN_OPSET} "
                         f"(use 18, or 23 for the fused Attention op)")
    with _quiet(), spec.tracing(), torch.no_grad():
        program = torch.onnx.export(spec.module, spec.sample_inputs, dynamo=True, opset_version=opset,
                                    input_names=spec.input_names, output_names=spec.output_names,
                                    optimize=True, verbose=False)
    external = _weights_bytes(spec.module) > EXTERNAL_DATA_BYTES

    def write(tmp: Path):
        with _quiet():
            program.save(str(tmp), external_data=external)
        check_onnx_io(tmp, spec)

    return write_atomically(Path(path), write)


def _shape(value_info) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in
                 value_info.type.tensor_type.shape.dim)


def check_onnx_io(path: Path, spec: ExportSpec):
    """The graph's inputs and outputs are exactly the spec's names, static shapes and dtypes, and
    every input is read by some node (an unread input means the exporter baked or dropped it)."""
    model = onnx.load(str(path), load_external_data=False)
    got = ([(i.name, _shape(i), _ELEM.get(i.type.tensor_type.elem_type)) for i in model.graph.input],
           [(o.name, _shape(o), _ELEM.get(o.type.tensor_type.elem_type)) for o in model.graph.output])
    want = ([(s.name, s.shape, s.dtype) for s in spec.signature.inputs],
            [(s.name, s.shape, s.dtype) for s in spec.signature.outputs])
    if got != want:
        raise RuntimeError(f"exported {spec.name} graph I/O {got} differs from its spec {want}")
    unread = [n for n in spec.input_names if n not in consumed_inputs(model)]
    if unread:
        raise RuntimeError(f"exported {spec.name} graph never reads inputs {unread}: the exporter baked or dropped "
                           f"them (an in-place buffer or a constant-folded position?)")


def consumed_inputs(model: onnx.ModelProto) -> set[str]:
    """Names read by any node of the graph, its subgraphs or its local functions."""
    names: set[str] = set()

    def visit(nodes):
        for node in nodes:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g.node)

    visit(model.graph.node)
    for fn in model.functions:
        visit(fn.node)
    return names


def optimize_onnx(src: Path, dst: Path, level: str = "extended") -> list[Path]:
    """ONNX Runtime's offline graph optimization (CPU provider) of `src` into `dst`.

    "extended" fuses LayerNorm/GELU/attention patterns into ORT ops for the provider it ran
    with, so the result is for the CPU provider; GPU sessions load the plain `.onnx`."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise ValueError(f"ORT optimization level must be one of {sorted(levels)}; got {level!r}")
    external = Path(str(src) + ".data").exists()

    def write(tmp: Path):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = levels[level]
        opts.optimized_model_filepath = str(tmp)
        if external:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          tmp.name + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                          "1024")
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])

    return write_atomically(Path(dst), write)
