"""Export of the runtime to ONNX and TensorRT, and execution of the exported graphs.

    export.onnx          graph catalogue (`graph_specs`), wrapper modules, `export_all`, config.json I/O
    export.backend       `OrtGraph`, `ExportedDiT` / `ExportedDecoder` (the session's calls on any runners),
                         `check_parity` (ONNX Runtime vs PyTorch)
    export.trt           TensorRT engine build (`build_engine`, `build_engines`) and `EngineRunner`; `HAS_TRT`
    export.build_engine  the command line: python -m export.build_engine --out DIR [--trt]

Nothing is imported here, so `import export.trt` works without onnx and `import export.onnx` without tensorrt.
Not here: anything the runtime needs to run (runtime/ never imports export/).
"""
