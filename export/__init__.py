"""Engine export: turn the eager causal DiT into deployable artifacts with a manifest.

`spec.py` (what each graph is traced as: names, static shapes, sample inputs), `onnx_export.py`
(ONNX via the dynamo exporter, opset 18 / 23, ORT offline optimization), `aoti_export.py`
(AOTInductor `.pt2` packages), `artifacts.py` (atomic writes) and `build.py`, the
`python -m export.build` command that runs the stages and writes the engine folder. Loading and
validating engines lives in `asd_deploy.backends`.
"""
