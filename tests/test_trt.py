"""export/trt.py against a fake `tensorrt` module (TensorRT cannot be installed here): the builder gets the strongly
typed flag, a static optimization profile, the workspace, the timing cache (loaded, then saved) and the ONNX path;
the plan and config.json are written; the runner binds torch tensors by address and the fake engine really reads
and writes through those addresses. Without TensorRT every entry point says so."""
import ctypes
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from export import trt as trt_backend  # noqa: E402
from export.onnx import ExportedGraph, GraphSpec, TensorSpec  # noqa: E402
from runtime import ModelConfig, StreamConfig  # noqa: E402

ONNX_TO_NAME = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.BOOL: "BOOL"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "BOOL": np.bool_}


# ---------------------------------------------------------------------------------------------- the fake
class FakeTensor(SimpleNamespace):
    pass


class FakeNetwork:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs = flags, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class FakeParser:
    def __init__(self, fake, network, logger):
        self.fake, self.network, self.errors = fake, network, []

    def parse_from_file(self, path):
        self.fake.calls.append(("parse_from_file", path))
        if self.fake.parse_error:
            self.errors = [self.fake.parse_error]
            return False
        graph = onnx.load(path).graph
        for values, out in ((graph.input, self.network.inputs), (graph.output, self.network.outputs)):
            for v in values:
                shape = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
                out.append(FakeTensor(name=v.name, shape=shape, dtype=ONNX_TO_NAME[v.type.tensor_type.elem_type]))
        return True

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTimingCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data + b"+timed"


class FakeBuilderConfig:
    def __init__(self, fake):
        self.fake, self.flags, self.profiles, self.pools = fake, [], [], {}
        self.builder_optimization_level, self.timing_cache = None, None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):                      # strongly typed builds must never set precision flags
        self.flags.append(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        self.fake.calls.append(("create_timing_cache", bytes(data)))
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache

    def get_timing_cache(self):
        return self.timing_cache


class FakeBuilder:
    def __init__(self, fake, logger):
        self.fake = fake

    def create_network(self, flags):
        self.fake.network = FakeNetwork(flags)
        return self.fake.network

    def create_builder_config(self):
        self.fake.config = FakeBuilderConfig(self.fake)
        return self.fake.config

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        if self.fake.build_fails:
            return None
        io = [(t.name, list(t.shape), t.dtype, mode) for mode, ts in (("INPUT", network.inputs),
                                                                       ("OUTPUT", network.outputs)) for t in ts]
        return b"PLAN" + json.dumps(io).encode()


class FakeEngine:
    def __init__(self, io):
        self.io = {name: (tuple(shape), dtype, mode) for name, shape, dtype, mode in io}
        self.names = [name for name, *_ in io]

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][2]

    def get_tensor_shape(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def create_execution_context(self):
        return FakeContext(self)


def _view(ptr, shape, dtype):
    """A numpy array over raw (CPU) memory at `ptr`: what a real engine does with a bound address."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * n).from_address(ptr), dtype=dtype).reshape(shape)


class FakeContext:
    """Computes y = x + 1 and state_out = 2 * state through the bound addresses."""

    def __init__(self, engine):
        self.engine, self.addresses, self.input_shapes, self.streams = engine, {}, {}, []

    def set_input_shape(self, name, shape):
        self.input_shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        self.streams.append(stream)
        io = self.engine.io
        arr = {n: _view(self.addresses[n], io[n][0], NUMPY[io[n][1]]) for n in io}
        arr["y"][...] = arr["x"] + 1
        arr["state_out"][...] = arr["state"] * 2
        return True


class FakeRuntime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, plan):
        assert plan.startswith(b"PLAN")
        return FakeEngine(json.loads(plan[4:]))


def make_fake(version="10.99.0", strongly_typed=True):
    fake = SimpleNamespace(__version__=version, calls=[], parse_error=None, build_fails=False)
    fake.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda self, level: None})
    flags = {"STRONGLY_TYPED": 1} if strongly_typed else {}
    fake.NetworkDefinitionCreationFlag = SimpleNamespace(**flags)
    fake.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    fake.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    fake.DataType = SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BOOL="BOOL")
    fake.Builder = lambda logger: FakeBuilder(fake, logger)
    fake.OnnxParser = lambda network, logger: FakeParser(fake, network, logger)
    fake.Runtime = FakeRuntime
    return fake


@pytest.fixture
def fake(monkeypatch):
    fake = make_fake()
    monkeypatch.setattr(trt_backend, "trt", fake)
    monkeypatch.setattr(trt_backend, "HAS_TRT", True)
    return fake


SPEC = GraphSpec("toy", "decoder",
                 (TensorSpec("x", (2, 3), "float32"), TensorSpec("state", (4,), "float16")),
                 (TensorSpec("y", (2, 3), "float32"), TensorSpec("state_out", (4,), "float16")),
                 {"state": [["state", "state_out"]]})


def write_graph(directory, spec=SPEC):
    """A hand-made ONNX graph (y = x + 1, state_out = 2 state) with the config.json export.onnx would write."""
    directory.mkdir(parents=True, exist_ok=True)
    one, two = (helper.make_tensor(n, dt, [], [v]) for n, dt, v in (("one", TensorProto.FLOAT, 1.0),
                                                                      ("two", TensorProto.FLOAT16, 2.0)))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]), helper.make_node("Mul", ["state", "two"], ["state_out"])],
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT16, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT16, [4])],
        initializer=[one, two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), directory / "model.onnx")
    ExportedGraph(directory, spec, ModelConfig.preset("tiny"), StreamConfig.preset("official"),
                  dict(file="model.onnx", dtype="float32", opset=23, exporter="dynamo", external_data=[])).save_config()
    return directory


# ---------------------------------------------------------------------------------------------- without TensorRT
def test_every_entry_point_says_tensorrt_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_backend, "trt", None)
    monkeypatch.setattr(trt_backend, "HAS_TRT", False)
    graph_dir = write_graph(tmp_path / "toy")
    for call in (lambda: trt_backend.build_engine(graph_dir), lambda: trt_backend.build_engines(tmp_path),
                 lambda: trt_backend.EngineRunner(graph_dir, device="cpu"), lambda: trt_backend.load_engines(tmp_path)):
        with pytest.raises(trt_backend.TensorRTUnavailable, match="TensorRT is not installed"):
            call()


# ---------------------------------------------------------------------------------------------- build
def test_build_uses_strong_typing_static_profile_workspace_and_writes_plan(fake, tmp_path):
    graph_dir = write_graph(tmp_path / "toy")
    plan = trt_backend.build_engine(graph_dir, workspace_gib=2, opt_level=4)
    assert fake.network.flags == 1 << 1                              # STRONGLY_TYPED == 1 in the fake enum
    assert ("parse_from_file", str(graph_dir / "model.onnx")) in fake.calls
    config = fake.config
    assert config.pools == {"WORKSPACE": 2 << 30} and config.builder_optimization_level == 4
    assert config.flags == []                                         # no FP16/BF16 flags: precision is in the ONNX
    assert len(config.profiles) == 1
    assert config.profiles[0].shapes == {"x": ((2, 3),) * 3, "state": ((4,),) * 3}
    assert plan == graph_dir / "model.plan" and plan.read_bytes().startswith(b"PLAN")
    built = ExportedGraph.load(graph_dir)
    assert built.spec == SPEC and built.info["engine"]["tensorrt"] == "10.99.0"
    assert built.info["engine"]["strongly_typed"] is True and built.info["engine"]["file"] == "model.plan"
    assert not list(graph_dir.glob("*.tmp"))


def test_timing_cache_is_loaded_then_saved(fake, tmp_path):
    graph_dir = write_graph(tmp_path / "toy")
    cache = tmp_path / "timing.cache"
    trt_backend.build_engine(graph_dir, timing_cache=cache)
    assert ("create_timing_cache", b"") in fake.calls and cache.read_bytes() == b"+timed"
    trt_backend.build_engine(graph_dir, timing_cache=cache)          # the second build starts from the first's
    assert ("create_timing_cache", b"+timed") in fake.calls and cache.read_bytes() == b"+timed+timed"


def test_tensorrt_11_without_the_strongly_typed_enum(tmp_path, monkeypatch):
    fake = make_fake(version="11.4.0", strongly_typed=False)
    monkeypatch.setattr(trt_backend, "trt", fake)
    monkeypatch.setattr(trt_backend, "HAS_TRT", True)
    trt_backend.build_engine(write_graph(tmp_path / "toy"))
    assert fake.network.flags == 0
    assert ExportedGraph.load(tmp_path / "toy").info["engine"]["strongly_typed"] is False


def test_parse_and_build_failures_are_reported(fake, tmp_path):
    graph_dir = write_graph(tmp_path / "toy")
    fake.parse_error = "node 3: unsupported op Foo"
    with pytest.raises(RuntimeError, match="unsupported op Foo"):
        trt_backend.build_engine(graph_dir)
    fake.parse_error, fake.build_fails = None, True
    with pytest.raises(RuntimeError, match="failed to build"):
        trt_backend.build_engine(graph_dir)
    assert not (graph_dir / "model.plan").exists()


def test_network_io_must_match_config(fake, tmp_path):
    spec = GraphSpec("toy", "decoder", (TensorSpec("x", (2, 4), "float32"), SPEC.inputs[1]), SPEC.outputs,
                     SPEC.options)
    graph_dir = write_graph(tmp_path / "toy", spec)
    with pytest.raises(RuntimeError, match="re-export"):
        trt_backend.build_engine(graph_dir)


def test_build_engines_into_another_directory_and_load_them(fake, tmp_path):
    export_dir = tmp_path / "onnx"
    write_graph(export_dir / "toy")
    (export_dir / "config.json").write_text(json.dumps({"export": {"graphs": ["toy"]}}))
    plans = trt_backend.build_engines(export_dir, tmp_path / "engines")
    assert plans == {"toy": tmp_path / "engines/toy/model.plan"}
    assert (tmp_path / "engines/timing.cache").is_file()             # one shared timing cache
    built = ExportedGraph.load(tmp_path / "engines/toy")
    assert built.onnx_path.resolve() == (export_dir / "toy/model.onnx").resolve()
    runners = trt_backend.load_engines(tmp_path / "engines", device="cpu")
    assert list(runners) == ["toy"]


# ---------------------------------------------------------------------------------------------- run
def test_runner_binds_torch_tensors_by_address(fake, tmp_path):
    graph_dir = write_graph(tmp_path / "toy")
    trt_backend.build_engine(graph_dir)
    runner = trt_backend.EngineRunner(graph_dir, device="cpu")
    assert runner.context.input_shapes == {"x": (2, 3), "state": (4,)}
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    state = torch.tensor([1, 2, 3, 4], dtype=torch.float16)
    out = runner.run({"x": x, "state": state})
    addr = runner.context.addresses
    assert addr["x"] == x.data_ptr() and addr["state"] == state.data_ptr()
    assert addr["y"] == runner.outputs["y"].data_ptr()               # the runner's preallocated buffers
    assert torch.equal(out["y"], x + 1) and torch.equal(out["state_out"], state * 2)
    assert runner.context.streams == [0]                              # CPU fake: no CUDA stream
    # explicit state buffers: the caller binds its own tensor for the next state
    next_state = torch.zeros(4, dtype=torch.float16)
    out = runner.run({"x": x, "state": state}, outputs={"state_out": next_state})
    assert out["state_out"] is next_state and addr["state_out"] == next_state.data_ptr()
    assert torch.equal(next_state, state * 2)
    assert runner.run({"x": out["y"], "state": next_state})["y"][0, 0] == 2   # outputs feed the next call


def test_runner_checks_inputs_and_versions(fake, tmp_path):
    graph_dir = write_graph(tmp_path / "toy")
    trt_backend.build_engine(graph_dir)
    runner = trt_backend.EngineRunner(graph_dir, device="cpu")
    state = torch.zeros(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="'x' must be float32"):
        runner.run({"x": torch.zeros(2, 3, dtype=torch.float64), "state": state})
    with pytest.raises(ValueError, match="'state' is missing"):
        runner.run({"x": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="contiguous"):
        runner.run({"x": torch.zeros(3, 2).t(), "state": state})
    fake.__version__ = "10.100.0"
    with pytest.raises(RuntimeError, match="built with TensorRT 10.99.0"):
        trt_backend.EngineRunner(graph_dir, device="cpu")


def test_trtexec_command_matches_the_python_build(tmp_path):
    cmd = trt_backend.trtexec_command(tmp_path / "dit_main", workspace_gib=4, timing_cache=tmp_path / "t.cache")
    assert cmd.startswith("trtexec ") and "--stronglyTyped" in cmd
    assert f"--onnx={tmp_path / 'dit_main/model.onnx'}" in cmd
    assert f"--saveEngine={tmp_path / 'dit_main/model.plan'}" in cmd
    assert "--memPoolSize=workspace:4096M" in cmd and f"--timingCacheFile={tmp_path / 't.cache'}" in cmd
