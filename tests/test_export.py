"""ONNX export: the tiny preset's graphs through `python -m export.build_engine`, ONNX Runtime parity (fp32 to 1e-4
abs, fp16 to 1e-2 of the output's range with cosine >= 0.9999), config.json read back, I/O names and shapes, the
ORT DiT against the runtime's own DiT call, a whole stream through the ORT DiT + ORT decoder against the PyTorch
session, the wan-1.3b graph shapes on the meta device, external data and the exporter fallback."""
import collections
import contextlib
import io
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from export import build_engine, trt as trt_backend  # noqa: E402
from export.backend import (FP32_MAX_ABS, LOW_PRECISION_MAX_REL, LOW_PRECISION_MIN_COSINE,  # noqa: E402
                            ExportedDecoder, ExportedDiT, OrtGraph, check_parity, ort_runners)
from export.onnx import (ALL_GRAPHS, DECODER_GRAPHS, DIT_GRAPHS, ExportedGraph, build_module,  # noqa: E402
                         export_all, graph_specs, load_export)
from runtime import AvatarPipeline, ModelConfig, StreamConfig  # noqa: E402
from runtime.kv_cache import DualAnchorCache  # noqa: E402
from runtime.rope import Rope  # noqa: E402
from runtime.session import StreamSession  # noqa: E402

ONNX_DOUBLE = 11          # onnx.TensorProto.DOUBLE: TensorRT has no float64


@pytest.fixture(scope="module")
def pipe():
    return AvatarPipeline.from_preset("tiny", device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CLI on the tiny preset (fp32, random weights, seed 0 = the `pipe` fixture's weights)."""
    out = tmp_path_factory.mktemp("onnx")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = build_engine.main(["--preset", "tiny", "--stream", "official", "--out", str(out)])
    return out, rc, printed.getvalue()


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_exports_every_graph_with_parity_report(exported):
    out, rc, printed = exported
    assert rc == 0
    report = json.loads((out / "parity.json").read_text())
    assert [g["graph"] for g in report["graphs"]] == list(ALL_GRAPHS)
    for g in report["graphs"]:
        assert g["ok"] is True and g["dtype"] == "float32"
        for name, stats in g["outputs"].items():
            assert stats["max_abs"] <= FP32_MAX_ABS, (g["graph"], name, stats)
    lines = printed.strip().splitlines()
    summary = json.loads(lines[-1])                       # one JSON line last
    assert summary["parity_ok"] is True and summary["graphs"] == list(ALL_GRAPHS)
    assert any(line.startswith("dit_main") and "flow" in line for line in lines)
    assert any("trtexec --onnx=" in line and "--stronglyTyped" in line for line in lines)
    for name in ALL_GRAPHS:
        assert (out / name / "model.onnx").is_file() and (out / name / "config.json").is_file()


def test_trt_flag_without_tensorrt_exits_2_before_exporting(tmp_path, capsys):
    if trt_backend.HAS_TRT:
        pytest.skip("TensorRT is installed here")
    assert build_engine.main(["--out", str(tmp_path / "x"), "--trt"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- config + I/O
TINY_SHAPES = {        # hand-computed: F = 16, B = 4, W = 2, S_f = 6, N_L = 6, N_h = 2, D = 32, h x w = 4 x 6
    "dit_main": {"x": (1, 16, 16, 4, 6), "ring_k": (6, 1, 12, 2, 32), "rope_cos": (96, 16), "flow": (1, 16, 16, 4, 6)},
    "dit_cache": {"x": (1, 16, 4, 4, 6), "anchor_k": (6, 1, 6, 2, 32), "k_new": (6, 1, 24, 2, 32)},
    "dit_masked": {"audio": (1, 64, 224), "key_mask": (6 + 12 + 96,), "v_new": (6, 1, 96, 2, 32)},
    "vae_first": {"z": (1, 16, 1, 4, 6), "frames": (1, 3, 1, 32, 48)},
    "vae_step": {"z": (1, 16, 1, 4, 6), "frames": (1, 3, 4, 32, 48), "cache_31": (1, 8, 2, 32, 48)},
    "audio_pack": {"audio": (1, 64, 224), "audio_tokens": (2, 1, 16, 64)},
    "text_kv": {"context": (1, 8, 32), "context_k": (6, 1, 8, 2, 32)},
}


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_config_read_back_and_graph_io(exported, name):
    out = exported[0]
    graph = ExportedGraph.load(out / name)
    assert graph.model == ModelConfig.preset("tiny") and graph.stream == StreamConfig.preset("official")
    expected = {s.name: s for s in graph_specs(graph.model, graph.stream)}[name]
    assert graph.spec == expected                         # what the loader reads is what the catalogue says
    io_shapes = {t.name: t.shape for t in (*graph.spec.inputs, *graph.spec.outputs)}
    for tensor, shape in TINY_SHAPES[name].items():
        assert io_shapes[tensor] == shape, tensor
    model = onnx.load(str(graph.onnx_path))
    assert [i.name for i in model.graph.input] == graph.spec.input_names
    assert [o.name for o in model.graph.output] == graph.spec.output_names
    for value, spec in zip([*model.graph.input, *model.graph.output], [*graph.spec.inputs, *graph.spec.outputs]):
        assert tuple(d.dim_value for d in value.type.tensor_type.shape.dim) == spec.shape, spec.name
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 23
    assert graph.info["exporter"] == "dynamo"
    if name.startswith("vae"):
        assert len(graph.spec.options["state"]) == 32      # the Wan VAE decoder's cache slots


@pytest.mark.parametrize("name", ["dit_main", "dit_cache", "dit_masked"])
def test_dit_graphs_use_fused_attention_and_no_float64(exported, name):
    model = onnx.load(str(exported[0] / name / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    layers = ModelConfig.preset("tiny").num_layers
    # self + cross attention per layer; the cache graph needs no attention output in its last layer
    assert ops.count("Attention") == (2 * layers - 2 if name == "dit_cache" else 2 * layers)
    assert "ScatterND" not in ops                          # RoPE in the stack form
    casts = [a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert ONNX_DOUBLE not in casts
    assert all(t.data_type != ONNX_DOUBLE for t in model.graph.initializer)


def test_loader_errors_are_clear(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ExportedGraph.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="build_engine"):
        load_export(tmp_path)
    runner = OrtGraph(exported[0] / "audio_pack")
    with pytest.raises(ValueError, match="must be float32"):
        runner.run({"audio": torch.zeros(1, 64, 224, dtype=torch.float64)})


# ---------------------------------------------------------------------------------------------- ORT DiT vs runtime
def _random_cache(cfg, slot_frames, seed):
    cache = DualAnchorCache(num_layers=cfg.num_layers, batch=1, grid_hw=cfg.grid_hw, history_frames=2,
                            num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(seed)
    for t in (cache.anchor_k, cache.anchor_v, cache.ring_k, cache.ring_v):
        t.copy_(torch.randn(t.shape, generator=g))
    cache.slot_frame = list(slot_frames)
    return cache


def _call_inputs(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_hw
    x, y = torch.randn(1, 16, n, h, w, generator=g), torch.randn(1, 17, n, h, w, generator=g)
    t = torch.rand(1, n, generator=g) * 1000
    audio = torch.randn(1, 4 * n, cfg.audio_input_dim, generator=g)
    ctx = [(torch.randn(1, cfg.text_len, cfg.num_heads, cfg.head_dim, generator=g),
            torch.randn(1, cfg.text_len, cfg.num_heads, cfg.head_dim, generator=g)) for _ in range(cfg.num_layers)]
    return x, y, t, audio, ctx


@pytest.mark.parametrize("case", ["steady_main", "steady_cache", "ramp_partial_history"])
def test_ort_dit_equals_the_runtime_dit_call(pipe, exported, case):
    """ExportedDiT (padding, masks, tables, graph choice) against `AvatarDiT.forward` with the cache's Prefix."""
    cfg = pipe.config
    dit = ExportedDiT.from_onnx(exported[0])
    n, want_kv, slots = {"steady_main": (16, False, [7, 8]), "steady_cache": (4, True, [8, 7]),
                         "ramp_partial_history": (8, True, [None, 8])}[case]
    cache = _random_cache(cfg, slots, seed=1)
    x, y, t, audio, ctx = _call_inputs(cfg, n, seed=2)
    origin = 6                                             # anchor at frame 6 = relative 0
    frames = [f - origin for f in range(9, 9 + n)]
    ring = [None if f is None else f - origin for f in cache.slot_frame]
    got_kv, ref_kv = {}, {}
    flow = dit(x, y, t, audio, ctx, cache=cache, frames=frames, anchor=0, ring=ring,
               kv_sink=(lambda i, k, v: got_kv.__setitem__(i, (k, v))) if want_kv else None)
    valid = [s for s, f in enumerate(cache.slot_frame) if f is not None]
    ring_rope = Rope([p if p is not None else 0 for p in ring], cfg.grid_hw, cfg.head_dim)
    with torch.no_grad():
        ref = pipe.dit(x, y, t, audio, ctx, Rope(frames, cfg.grid_hw, cfg.head_dim),
                       prefix=lambda i: cache.prefix(i, Rope([0], cfg.grid_hw, cfg.head_dim), ring_rope,
                                                     (valid[0], len(valid))),
                       kv_sink=lambda i, k, v: ref_kv.__setitem__(i, (k, v)))
    if case == "steady_cache":
        assert flow is None                                # served by dit_cache, which computes only K/V
    else:
        assert flow.shape == ref.shape and (flow - ref).abs().max() <= FP32_MAX_ABS
    if want_kv:
        for i in range(cfg.num_layers):
            for got, want in zip(got_kv[i], ref_kv[i]):
                assert got.shape == want.shape and (got - want).abs().max() <= FP32_MAX_ABS


def test_ort_dit_rejects_calls_no_graph_serves(pipe, exported):
    cfg = pipe.config
    dit = ExportedDiT.from_onnx(exported[0])
    x, y, t, audio, ctx = _call_inputs(cfg, 20, seed=3)
    with pytest.raises(ValueError, match="no exported DiT graph runs a 20-frame call"):
        dit(x, y, t, audio, ctx, cache=_random_cache(cfg, [1, 2], 0), frames=list(range(20)), anchor=0, ring=[1, 2])


# ---------------------------------------------------------------------------------------------- whole stream
class _Counted:
    """A runner that counts its calls by graph name."""

    def __init__(self, runner, counter):
        self.runner, self.graph, self.counter = runner, runner.graph, counter

    def run(self, feeds):
        self.counter[self.graph.spec.name] += 1
        return self.runner.run(feeds)


def _stream(pipe, image, feats, **backends):
    sess = StreamSession(pipe, image, stream=StreamConfig.preset("official"), seed=3, engine=False, **backends)
    latents = {}
    sess.on_block = lambda b, x0: latents.__setitem__(b, x0.clone())
    with torch.inference_mode():
        frames = torch.cat([sess.push_features(feats[:40]), sess.push_features(feats[40:]), sess.flush()])
    return latents, frames


def test_ort_stream_equals_pytorch_session(pipe, image, exported):
    # 6 blocks of 16 rows: ramp-up (dit_masked), two steady windows (dit_main, dit_cache), the tail (dit_masked)
    feats = torch.randn(96, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(1))
    ref_latents, ref_frames = _stream(pipe, image, feats)

    used = collections.Counter()
    dit = ExportedDiT({n: _Counted(r, used) for n, r in ort_runners(exported[0], DIT_GRAPHS).items()})
    latents, frames = _stream(pipe, image, feats, dit=dit, decoder=ExportedDecoder.from_onnx(exported[0]))

    assert sorted(latents) == sorted(ref_latents) == list(range(6))
    assert max((latents[b] - ref_latents[b]).abs().max().item() for b in ref_latents) <= FP32_MAX_ABS
    assert frames.shape == ref_frames.shape == (97, 32, 48, 3)
    # uint8 rounding: an fp32 difference of ~1e-6 may flip a value that sits on a rounding edge by one level
    assert (frames.int() - ref_frames.int()).abs().max() <= 1 and (frames != ref_frames).float().mean() < 1e-3
    assert (used["dit_main"], used["dit_cache"], used["dit_masked"]) == (2, 4, 9)    # 9: anchor, ramp-up, tail


def test_ort_taehv_decoder_streams_like_the_torch_decoder(tmp_path):
    """The TAEHV decoder's graphs (9 memories; vae_first drops its startup frames), fed in two chunks, equal the
    torch decoder's offline decode."""
    pipe = AvatarPipeline.from_preset("tiny", device="cpu", dtype=torch.float32, seed=0, decoder="taehv")
    export_all(pipe, StreamConfig.preset("official"), tmp_path, names=list(DECODER_GRAPHS))
    decoder = ExportedDecoder.from_onnx(tmp_path)
    assert len(decoder.state) == 9
    z = torch.randn(1, 16, 5, *pipe.config.latent_hw, generator=torch.Generator().manual_seed(4))
    cache = decoder.init_decode_cache(1, torch.float32, "cpu", pipe.config.height, pipe.config.width)
    got = torch.cat([decoder.decode_step(z[:, :, :2], cache), decoder.decode_step(z[:, :, 2:], cache)], dim=2)
    with torch.no_grad():
        ref = pipe.decoder.decode(z)
    assert got.shape == ref.shape == (1, 3, 17, 32, 48)
    assert (got - ref).abs().max() <= FP32_MAX_ABS


# ---------------------------------------------------------------------------------------------- fp16, external data
def test_fp16_export_parity(pipe, tmp_path):
    """fp16 graphs on ORT's CPU provider against the fp32 PyTorch modules: within 1e-2 of each output's range
    and cosine >= 0.9999 (measured: ~3e-3 and 0.9999995); clearly not an fp32 graph in disguise."""
    graphs = export_all(pipe, StreamConfig.preset("official"), tmp_path, dtype=torch.float16,
                        names=["dit_masked", "vae_step"])
    for graph in graphs.values():
        assert all(t.dtype in ("float16", "float32", "bool") for t in graph.spec.inputs)
        result = check_parity(graph, pipe.dit, pipe.decoder)
        assert result["ok"], result
        worst = max(s["max_rel"] for s in result["outputs"].values())
        assert worst <= LOW_PRECISION_MAX_REL
        assert min(s["cosine"] for s in result["outputs"].values()) >= LOW_PRECISION_MIN_COSINE
        assert max(s["max_abs"] for s in result["outputs"].values()) > 1e-5     # fp32 graphs agree to ~1e-6


def test_external_data_is_written_and_loaded(pipe, tmp_path):
    graphs = export_all(pipe, StreamConfig.preset("official"), tmp_path, names=["audio_pack"], external_data=True)
    graph = ExportedGraph.load(tmp_path / "audio_pack")
    assert graph.info["external_data"] == ["model.onnx.data"] and (tmp_path / "audio_pack/model.onnx.data").is_file()
    assert check_parity(graphs["audio_pack"], pipe.dit, pipe.decoder)["ok"]


def test_exporter_falls_back_to_torchscript(pipe, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with pytest.warns(UserWarning, match="falling back to the TorchScript exporter"):
        graphs = export_all(pipe, StreamConfig.preset("official"), tmp_path, names=["audio_pack"])
    graph = graphs["audio_pack"]
    assert graph.info["exporter"] == "torchscript" and graph.info["opset"] == 20
    assert check_parity(graph, pipe.dit, pipe.decoder)["ok"]


# ---------------------------------------------------------------------------------------------- wan-1.3b on meta
def test_wan_graph_shapes_on_the_meta_device():
    """The real preset's catalogue: shapes from the config, and the wrappers produce exactly them (no memory)."""
    wan = AvatarPipeline.from_preset("wan-1.3b", device="meta", dtype=torch.float16)
    specs = {s.name: s for s in graph_specs(wan.config, StreamConfig.preset("official"), torch.float16, wan.decoder)}
    io_shapes = {(n, t.name): t.shape for n, s in specs.items() for t in (*s.inputs, *s.outputs)}
    assert io_shapes["dit_main", "x"] == (1, 16, 16, 60, 104)
    assert io_shapes["dit_main", "rope_cos"] == (24_960, 64)            # 16 frames x 1,560 tokens
    assert io_shapes["dit_main", "ring_k"] == (30, 1, 3_120, 12, 128)   # 2 history frames
    assert io_shapes["dit_cache", "k_new"] == (30, 1, 6_240, 12, 128)
    assert io_shapes["dit_masked", "key_mask"] == (1_560 + 3_120 + 24_960,)
    assert io_shapes["vae_step", "frames"] == (1, 3, 4, 480, 832) and len(specs["vae_step"].options["state"]) == 32
    assert io_shapes["audio_pack", "audio_tokens"] == (14, 1, 16, 1536)
    for spec in specs.values():
        if spec.name == "dit_main":
            continue                       # same code path as dit_masked; one 24,960-token meta pass is enough
        module = build_module(spec, wan.dit, wan.decoder)
        with torch.no_grad():
            outs = module(*spec.empty_inputs("meta"))
        assert [(tuple(o.shape), o.dtype) for o in outs] == [(t.shape, t.torch_dtype) for t in spec.outputs], spec.name
