"""TensorRT engines from the exported ONNX graphs, and a runner that executes them on torch tensors.

Written against the TensorRT 10.x and 11.x Python API (named I/O tensors, `execute_async_v3`):
- build: `create_network` with the STRONGLY_TYPED flag where the enum has it (TRT 11 types every network strongly
  and drops BuilderFlag.FP16/BF16, so precision always comes from the ONNX: export with --fp16 for an fp16 engine),
  `OnnxParser.parse_from_file` (external data beside the .onnx is found that way), one optimization profile with
  min = opt = max = the graph's static shapes from config.json, a timing cache loaded before and saved after the
  build, the serialized plan written atomically as `model.plan` with config.json (graph + "engine" section).
- run: `EngineRunner` deserializes the plan, checks its I/O against config.json, preallocates every output once,
  binds torch tensors with `set_tensor_address` and enqueues `execute_async_v3` on the current CUDA stream. The
  buffers are explicit: a caller may bind its own output tensors (e.g. the next decoder state) per call. Outputs
  are the runner's buffers, valid until its next call.

TensorRT is detected once at import (`HAS_TRT`). It cannot be installed in this workplace (see the reference notes:
the PyPI wheels are stubs that download from NVIDIA's index), so every entry point raises `TensorRTUnavailable`
with what to do, and tests/test_trt.py checks this logic against a fake `tensorrt` module that records the calls.

Not here: ONNX export (onnx.py), mapping session calls to graphs (backend.py: `ExportedDiT(load_engines(DIR))`),
CUDA-graph capture of engine calls, refit, INT8/FP8 quantization (needs ModelOpt Q/DQ in the ONNX).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch
from torch import Tensor

from runtime.config import load_json, save_json

from .onnx import CONFIG_FILE, ExportedGraph, load_export

try:
    import tensorrt as trt
    HAS_TRT = True
except (ImportError, OSError):   # OSError: bindings present but libnvinfer missing
    trt = None
    HAS_TRT = False

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
DEFAULT_WORKSPACE_GIB = 8       # builder scratch memory; tactics needing more are skipped
DEFAULT_OPT_LEVEL = 3           # TensorRT's default builder optimization level (0 fastest build .. 5 most tactics)

TRT_MISSING = ("TensorRT is not installed (import tensorrt failed). Engines need a CUDA machine with TensorRT "
               ">= 10.15 (the ONNX Attention and RMSNormalization ops): pip install tensorrt-cu12 (or -cu13) "
               "there, or build with trtexec from the ONNX files (python -m export.build_engine prints the commands).")


class TensorRTUnavailable(RuntimeError):
    """Raised by every TensorRT entry point when `tensorrt` cannot be imported."""


def require_trt():
    """The tensorrt module, or TensorRTUnavailable (read at call time so tests can swap in a fake)."""
    if not HAS_TRT or trt is None:
        raise TensorRTUnavailable(TRT_MISSING)
    return trt


def network_flags(trt_mod) -> int:
    """1 << STRONGLY_TYPED where the enum has it (TRT 10: makes precision follow the ONNX; TRT 11: a no-op)."""
    flag = getattr(trt_mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


# ------------------------------------------------------------------------------------------------ build
def build_engine(graph_dir: str | Path, out_dir: str | Path | None = None, *,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, timing_cache: str | Path | None = None,
                 opt_level: int = DEFAULT_OPT_LEVEL, verbose: bool = False) -> Path:
    """Build graph_dir/model.onnx into out_dir/model.plan (out_dir defaults to graph_dir) and write
    out_dir/config.json with an "engine" section. `timing_cache`: file read before and written after the build."""
    t = require_trt()
    graph = ExportedGraph.load(graph_dir)
    out_dir = Path(out_dir) if out_dir is not None else graph.directory
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = t.Logger(t.Logger.VERBOSE if verbose else t.Logger.WARNING)
    builder = t.Builder(logger)
    network = builder.create_network(network_flags(t))
    parser = t.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {graph.onnx_path}: " + "; ".join(errors or ["no details"]))
    check_network_io(network, graph)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(t.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = opt_level
    profile = builder.create_optimization_profile()
    for ts in graph.spec.inputs:                    # static graphs: one shape is min, opt and max
        profile.set_shape(ts.name, ts.shape, ts.shape, ts.shape)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)           # False: a cache from another device/version is an error
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {graph.onnx_path} (see the log above; try a larger "
                           f"--workspace-gib or a newer TensorRT)")
    if cache_path is not None:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    _write_atomic(out_dir / PLAN_FILE, bytes(plan))
    engine_info = dict(file=PLAN_FILE, tensorrt=str(getattr(t, "__version__", "unknown")),
                       strongly_typed=bool(network_flags(t)), workspace_gib=workspace_gib, opt_level=opt_level,
                       timing_cache=str(cache_path) if cache_path else None, device=_device_name())
    built = ExportedGraph(out_dir, graph.spec, graph.model, graph.stream, {**graph.info, "engine": engine_info})
    if out_dir != graph.directory:                  # the plan's config must still find the ONNX it came from
        built.info["file"] = os.path.relpath(graph.onnx_path, out_dir)
    built.save_config()
    return out_dir / PLAN_FILE


def check_network_io(network, graph: ExportedGraph) -> None:
    """The parsed network's inputs and outputs must be config.json's, with the same static shapes."""
    got_in = [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]
    got_out = [(network.get_output(i).name, tuple(network.get_output(i).shape)) for i in range(network.num_outputs)]
    want_in = [(ts.name, ts.shape) for ts in graph.spec.inputs]
    want_out = [(ts.name, ts.shape) for ts in graph.spec.outputs]
    if got_in != want_in or got_out != want_out:
        raise RuntimeError(f"{graph.onnx_path}: TensorRT sees inputs {got_in} and outputs {got_out}, but config.json "
                           f"says {want_in} and {want_out}; re-export the graph")


def build_engines(export_dir: str | Path, out_dir: str | Path | None = None, names=None, *,
                  progress: bool = False, **kwargs) -> dict[str, Path]:
    """Every exported graph (or `names`) -> out_dir/<name>/model.plan, sharing one timing cache."""
    require_trt()
    from tqdm import tqdm
    export_dir = Path(export_dir)
    out_dir = Path(out_dir) if out_dir is not None else export_dir
    kwargs.setdefault("timing_cache", out_dir / TIMING_CACHE_FILE)
    graphs = load_export(export_dir, names)
    plans = {name: build_engine(g.directory, out_dir / name, **kwargs)
             for name, g in tqdm(graphs.items(), desc="tensorrt", unit="engine", disable=not progress)}
    if out_dir.resolve() != export_dir.resolve():     # the engine directory gets its own manifest
        manifest = load_json(export_dir / CONFIG_FILE)
        manifest["export"] = {**manifest.get("export", {}), "graphs": list(plans)}
        save_json(out_dir / CONFIG_FILE, **manifest)
    return plans


def trtexec_command(graph_dir: str | Path, *, workspace_gib: float = DEFAULT_WORKSPACE_GIB,
                    timing_cache: str | Path | None = None, opt_level: int = DEFAULT_OPT_LEVEL) -> str:
    """The trtexec line equivalent to `build_engine` (static shapes need no --shapes)."""
    graph_dir = Path(graph_dir)
    args = ["trtexec", f"--onnx={graph_dir / 'model.onnx'}", f"--saveEngine={graph_dir / PLAN_FILE}",
            "--stronglyTyped", f"--builderOptimizationLevel={opt_level}",
            f"--memPoolSize=workspace:{int(workspace_gib * 1024)}M"]
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: never a half-written plan or cache."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------ run
def _torch_dtypes(t) -> dict:
    """trt.DataType -> torch dtype, for the members this TensorRT has."""
    pairs = (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("BOOL", torch.bool),
             ("INT32", torch.int32), ("INT64", torch.int64), ("INT8", torch.int8), ("UINT8", torch.uint8))
    return {getattr(t.DataType, name): dt for name, dt in pairs if hasattr(t.DataType, name)}


class EngineRunner:
    """One engine (DIR/model.plan + DIR/config.json) executed on torch tensors; the runner interface of
    backend.py (`graph`, `device`, `run(feeds) -> outputs`)."""

    def __init__(self, directory: str | Path, device="cuda"):
        t = require_trt()
        self.graph = ExportedGraph.load(directory)
        self.device = torch.device(device)
        engine_info = self.graph.info.get("engine", {})
        built_with = engine_info.get("tensorrt")
        if built_with and built_with != str(getattr(t, "__version__", built_with)):
            raise RuntimeError(f"{directory}: the engine was built with TensorRT {built_with}, this is "
                               f"{t.__version__}; engines are tied to one version and GPU: rebuild it")
        plan_path = self.graph.directory / engine_info.get("file", PLAN_FILE)
        if not plan_path.is_file():
            raise FileNotFoundError(f"{plan_path} not found; build it: python -m export.build_engine --trt, or "
                                    f"trtexec (see export.trt.trtexec_command)")
        self._logger = t.Logger(t.Logger.WARNING)
        self._runtime = t.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path} (other TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._check_engine_io(t)
        for ts in self.graph.spec.inputs:
            self.context.set_input_shape(ts.name, ts.shape)
        # explicit output buffers, allocated once: the same addresses every call (what a CUDA graph needs)
        self.outputs = {ts.name: torch.empty(ts.shape, dtype=ts.torch_dtype, device=self.device)
                        for ts in self.graph.spec.outputs}

    def _check_engine_io(self, t) -> None:
        dtypes = _torch_dtypes(t)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        for ts, mode in [(x, t.TensorIOMode.INPUT) for x in self.graph.spec.inputs] + \
                        [(x, t.TensorIOMode.OUTPUT) for x in self.graph.spec.outputs]:
            if ts.name not in names or self.engine.get_tensor_mode(ts.name) != mode:
                raise RuntimeError(f"engine {self.graph.directory} has no {mode} tensor {ts.name!r} (it has {names})")
            shape = tuple(self.engine.get_tensor_shape(ts.name))
            dtype = dtypes.get(self.engine.get_tensor_dtype(ts.name))
            if shape != ts.shape or dtype != ts.torch_dtype:
                raise RuntimeError(f"engine tensor {ts.name!r} is {dtype} {shape}, config.json says "
                                   f"{ts.dtype} {ts.shape}; rebuild the engine from this export")

    def run(self, feeds: dict[str, Tensor], outputs: dict[str, Tensor] | None = None,
            stream=None) -> dict[str, Tensor]:
        """Bind `feeds` (every input) and the output buffers (the runner's, or `outputs` where given), enqueue on
        `stream` (default: torch's current stream on the device), return the outputs without synchronizing."""
        out = dict(self.outputs)
        for name, tensor in (outputs or {}).items():
            self._check(self.graph.spec.outputs, name, tensor)
            out[name] = tensor
        for ts in self.graph.spec.inputs:
            if ts.name not in feeds:
                raise ValueError(f"{self.graph.spec.name}: input {ts.name!r} is missing")
            self._check(self.graph.spec.inputs, ts.name, feeds[ts.name])
            self.context.set_tensor_address(ts.name, feeds[ts.name].data_ptr())
        for name, tensor in out.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(self._stream_handle(stream)):
            raise RuntimeError(f"TensorRT failed to enqueue {self.graph.spec.name}")
        return out

    def _check(self, specs, name: str, tensor: Tensor) -> None:
        ts = next((s for s in specs if s.name == name), None)
        if ts is None:
            raise ValueError(f"{self.graph.spec.name} has no tensor {name!r}")
        if tuple(tensor.shape) != ts.shape or tensor.dtype != ts.torch_dtype:
            raise ValueError(f"{self.graph.spec.name}: {name!r} must be {ts.dtype} {list(ts.shape)}, got "
                             f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}")
        if tensor.device != self.device or not tensor.is_contiguous():
            raise ValueError(f"{self.graph.spec.name}: {name!r} must be a contiguous tensor on {self.device}, got "
                             f"{'a non-contiguous ' if not tensor.is_contiguous() else ''}tensor on {tensor.device}")

    def _stream_handle(self, stream) -> int:
        if stream is not None:
            return stream.cuda_stream
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0


def load_engines(directory: str | Path, names=None, device="cuda") -> dict[str, EngineRunner]:
    """Runners for the engines under DIR (DIR/config.json lists the graphs; each DIR/<name> holds a plan)."""
    require_trt()
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory / CONFIG_FILE} not found; build engines with "
                                f"python -m export.build_engine --trt --out {directory}")
    return {name: EngineRunner(g.directory, device) for name, g in load_export(directory, names).items()}
