"""ONNX export of the runtime: static-shape graphs per (ModelConfig, StreamConfig) with all state as explicit I/O.

Shape vocabulary: F window frames (L*B latent frames), B block frames, W history frames (0 without a temporal
anchor), S_f tokens per latent frame, N_L layers, N_h heads, D head dim, C model width, A audio feature width,
h/w latent size, H/W pixel size. The graph catalogue (`graph_specs`), one directory per graph:

    dit_main    the steady main pass: F frames over [anchor | W history | window], no mask -> flow
    dit_cache   the steady cache pass: B frames, same prefix -> k_new, v_new (no flow: the exporter prunes the
                head and the last layer's attention output and FFN, which only the flow needs)
    dit_masked  every other DiT call (the anchor pass, ramp-up and tail windows, the first cache pass): up to
                F frames padded with zeros, plus a key mask over [anchor | history | window] -> flow, k_new, v_new
    vae_first   the decoder step for a stream's first latent (1 video frame), decoder state in and out
    vae_step    the decoder step for one later latent (4 video frames), decoder state in and out
    audio_pack  AudioPack + the per-layer audio projections: rows [1, 4F, A] -> tokens [P, 1, F, C]
    text_kv     text context [1, text_len, text_dim] -> per-layer cross-attention K/V

What a DiT graph takes (positions are inputs, so one graph serves every step of its shape at any stream
position): window latents x and conditioning y, the per-frame timestep sinusoid (computed on the host in float64
and cast, as the runtime does: float64 has no place in a TensorRT engine), the audio feature rows, the per-layer
text K/V, the style anchor and history K/V of all layers *before* RoPE (the cache layout, `DualAnchorCache`), and
float32 cos/sin tables for the window, anchor and history positions. The K/V outputs are the window's K after
RMSNorm and before RoPE, and V: exactly what the cache stores. x0 = x - sigma * flow stays on the host (float64).
A padded frame of `dit_masked` changes nothing for the real frames: every op but self-attention is per token or per
frame, and its keys are masked out.

Each graph is exported with the dynamo exporter at opset 23 (SDPA becomes one `Attention` node, the RMSNorms
`RMSNormalization`), falling back to the TorchScript exporter at opset 20 only if dynamo fails (recorded in
config.json), with external data once the weights pass the 2 GB protobuf limit. `config.json` beside every
`model.onnx` holds the model and stream configs and the graph's I/O names, shapes and dtypes; loaders read it
(`ExportedGraph.load`) instead of guessing from file names.

Not here: running the graphs (backend.py: ONNX Runtime, parity), TensorRT (trt.py), the command line
(build_engine.py). Batch is 1 everywhere, as in the session.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from runtime.config import ModelConfig, StreamConfig, load_json, save_json
from runtime.dit import AvatarDiT, sinusoidal_embedding
from runtime.rope import apply_rope, grid_positions, rope_cos_sin
from runtime.tiny_decoder import TAEHV

try:
    import onnx
    HAS_ONNX = True
except ImportError:          # the `export` extra is optional
    onnx = None
    HAS_ONNX = False

OPSET = 23                   # first opset with the fused `Attention` op
LEGACY_OPSET = 20            # the highest the TorchScript exporter writes
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"
# Protobuf refuses messages past 2 GiB; stay clear of it (wan-1.3b's DiT is 2.8 GB in fp16).
EXTERNAL_DATA_BYTES = 1_800_000_000
DIT_GRAPHS = ("dit_main", "dit_cache", "dit_masked")
DECODER_GRAPHS = ("vae_first", "vae_step")
ALL_GRAPHS = DIT_GRAPHS + DECODER_GRAPHS + ("audio_pack", "text_kv")


# ------------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str                    # torch dtype name without "torch.": float32, float16, bfloat16, bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """Name, kind ("dit", "decoder", "audio_pack", "text_kv"), ordered I/O and the kind's options."""
    name: str
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    options: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def empty_inputs(self, device="meta") -> list[Tensor]:
        """Uninitialised inputs of the right shapes (on the meta device: shape checks without memory)."""
        return [torch.empty(t.shape, dtype=t.torch_dtype, device=device) for t in self.inputs]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "options": self.options}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in items)
        return cls(d["name"], d["kind"], tensors(d["inputs"]), tensors(d["outputs"]), dict(d.get("options", {})))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def history_frames(stream: StreamConfig) -> int:
    """W: history frames a steady call attends to (none without the temporal anchor)."""
    return stream.history_frames if stream.use_temporal_anchor else 0


def graph_specs(cfg: ModelConfig, stream: StreamConfig, dtype: torch.dtype = torch.float32,
                decoder: nn.Module | None = None) -> list[GraphSpec]:
    """The whole catalogue for this model and stream (see the module docstring). `decoder`: the module whose
    state shapes are used (default: built from cfg on the meta device)."""
    if cfg.patch_size[0] != 1:
        raise ValueError(f"export needs a temporal patch of 1 (per-frame timesteps), got patch_size={cfg.patch_size}")
    F, B, W = stream.window_blocks * stream.block_frames, stream.block_frames, history_frames(stream)
    anchor = stream.use_style_anchor
    specs = [
        _dit_spec("dit_main", cfg, dtype, F, W, anchor, masked=False, flow=True, kv=False),
        _dit_spec("dit_cache", cfg, dtype, B, W, anchor, masked=False, flow=False, kv=True),
        _dit_spec("dit_masked", cfg, dtype, F, W, anchor, masked=True, flow=True, kv=True),
    ]
    decoder = decoder if decoder is not None else _meta_decoder(cfg)
    state = decoder.init_decode_cache(1, dtype, "meta", cfg.height, cfg.width).tensors
    for name, first in (("vae_first", True), ("vae_step", False)):
        specs.append(_decoder_spec(name, cfg, dtype, [tuple(t.shape) for t in state], first, type(decoder).__name__))
    if cfg.num_audio_projs:                    # a model under 4 layers injects no audio
        specs.append(_audio_pack_spec(cfg, dtype, F))
    specs.append(_text_kv_spec(cfg, dtype))
    return specs


def _dit_spec(name, cfg, dtype, frames, history, anchor, *, masked, flow, kv) -> GraphSpec:
    dt, f32 = dtype_name(dtype), "float32"
    h, w = cfg.latent_hw
    s_f, half = cfg.tokens_per_frame, cfg.head_dim // 2
    heads = (cfg.num_heads, cfg.head_dim)
    ins = [TensorSpec("x", (1, cfg.vae_z_dim, frames, h, w), dt),
           TensorSpec("y", (1, cfg.in_dim - cfg.vae_z_dim, frames, h, w), dt),
           TensorSpec("t_sinusoid", (1, frames, cfg.freq_dim), dt),
           TensorSpec("audio", (1, cfg.audio_frames_per_latent * frames, cfg.audio_input_dim), dt),
           TensorSpec("context_k", (cfg.num_layers, 1, cfg.text_len, *heads), dt),
           TensorSpec("context_v", (cfg.num_layers, 1, cfg.text_len, *heads), dt)]
    if anchor:
        ins += [TensorSpec("anchor_k", (cfg.num_layers, 1, s_f, *heads), dt),
                TensorSpec("anchor_v", (cfg.num_layers, 1, s_f, *heads), dt)]
    if history:
        ins += [TensorSpec("ring_k", (cfg.num_layers, 1, history * s_f, *heads), dt),
                TensorSpec("ring_v", (cfg.num_layers, 1, history * s_f, *heads), dt)]
    ins += [TensorSpec("rope_cos", (frames * s_f, half), f32), TensorSpec("rope_sin", (frames * s_f, half), f32)]
    if anchor:
        ins += [TensorSpec("anchor_cos", (s_f, half), f32), TensorSpec("anchor_sin", (s_f, half), f32)]
    if history:
        ins += [TensorSpec("ring_cos", (history * s_f, half), f32),
                TensorSpec("ring_sin", (history * s_f, half), f32)]
    if masked:
        ins.append(TensorSpec("key_mask", ((int(anchor) + history + frames) * s_f,), "bool"))
    outs = []
    if flow:
        outs.append(TensorSpec("flow", (1, cfg.out_dim, frames, h, w), dt))
    if kv:
        outs += [TensorSpec("k_new", (cfg.num_layers, 1, frames * s_f, *heads), dt),
                 TensorSpec("v_new", (cfg.num_layers, 1, frames * s_f, *heads), dt)]
    options = dict(frames=frames, history_frames=history, anchor=anchor, masked=masked, flow=flow, kv=kv)
    return GraphSpec(name, "dit", tuple(ins), tuple(outs), options)


def _decoder_spec(name, cfg, dtype, state_shapes, first: bool, decoder: str) -> GraphSpec:
    dt = dtype_name(dtype)
    h, w = cfg.latent_hw
    frames_out = 1 if first else cfg.audio_frames_per_latent
    names = [(f"cache_{i:02d}", f"cache_out_{i:02d}") for i in range(len(state_shapes))]
    ins = [TensorSpec("z", (1, cfg.vae_z_dim, 1, h, w), dt)]
    ins += [TensorSpec(n_in, shape, dt) for (n_in, _), shape in zip(names, state_shapes)]
    outs = [TensorSpec("frames", (1, 3, frames_out, cfg.height, cfg.width), dt)]
    outs += [TensorSpec(n_out, shape, dt) for (_, n_out), shape in zip(names, state_shapes)]
    options = dict(first=first, frames_out=frames_out, decoder=decoder, state=[list(p) for p in names])
    return GraphSpec(name, "decoder", tuple(ins), tuple(outs), options)


def _audio_pack_spec(cfg, dtype, frames) -> GraphSpec:
    dt = dtype_name(dtype)
    ins = (TensorSpec("audio", (1, cfg.audio_frames_per_latent * frames, cfg.audio_input_dim), dt),)
    outs = (TensorSpec("audio_tokens", (cfg.num_audio_projs, 1, frames, cfg.dim), dt),)
    return GraphSpec("audio_pack", "audio_pack", ins, outs, dict(frames=frames))


def _text_kv_spec(cfg, dtype) -> GraphSpec:
    dt = dtype_name(dtype)
    kv = (cfg.num_layers, 1, cfg.text_len, cfg.num_heads, cfg.head_dim)
    ins = (TensorSpec("context", (1, cfg.text_len, cfg.text_dim), dt),)
    return GraphSpec("text_kv", "text_kv", ins, (TensorSpec("context_k", kv, dt), TensorSpec("context_v", kv, dt)))


def _meta_decoder(cfg: ModelConfig) -> nn.Module:
    from runtime.pipeline import codec_class
    with torch.device("meta"):
        return TAEHV(cfg) if cfg.decoder == "taehv" else codec_class(cfg)(cfg)


# ------------------------------------------------------------------------------------------------ wrappers
def time_sinusoid(t: Tensor, freq_dim: int, dtype: torch.dtype) -> Tensor:
    """Per-frame timesteps [1, F] -> the sinusoid [1, F, freq_dim] in `dtype`: float64 on the host, then cast,
    exactly as `AvatarDiT.time_embed` computes it before its MLP."""
    return sinusoidal_embedding(t.flatten(), freq_dim).to(dtype).view(1, -1, freq_dim)


class DiTGraph(nn.Module):
    """One DiT call with explicit state: the runtime's blocks, fed the graph inputs of `spec` by name.

    `AvatarDiT.forward` itself, with the time embedding started from the host-computed sinusoid and the prefix K/V
    rotated here from the pre-RoPE cache (what `DualAnchorCache.prefix` does in the session).
    """

    def __init__(self, dit: AvatarDiT, spec: GraphSpec):
        super().__init__()
        self.dit, self.names = dit, spec.input_names
        self.opts = spec.options

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        a = dict(zip(self.names, tensors))
        dit, cfg = self.dit, self.dit.cfg
        e = dit.time_embedding(a["t_sinusoid"])                              # [1, F, C]
        e0 = dit.time_projection(e).unflatten(-1, (6, cfg.dim))              # [1, F, 6, C]
        mask = None
        if self.opts["masked"]:
            # [S_q, S_k]: ONNX Runtime 1.32's Attention rejects a mask broadcast over the queries
            mask = a["key_mask"].unsqueeze(0).expand(a["x"].shape[2] * cfg.tokens_per_frame, -1)
        ks, vs = [], []
        context = [(a["context_k"][i], a["context_v"][i]) for i in range(cfg.num_layers)]
        flow = dit(a["x"], a["y"], None, a["audio"], context, (a["rope_cos"], a["rope_sin"]),
                   prefix=lambda i: self._prefix(a, i), kv_sink=lambda i, k, v: (ks.append(k), vs.append(v)),
                   mask=mask, time_embeddings=(e, e0))
        outs = [flow] if self.opts["flow"] else []                           # unused outputs are pruned
        if self.opts["kv"]:
            outs += [torch.stack(ks), torch.stack(vs)]                       # [N_L, 1, F * S_f, N_h, D]
        return tuple(outs)

    def _prefix(self, a: dict, layer: int):
        """[anchor | history] keys rotated to their positions, and values, of one layer (or None)."""
        ks, vs = [], []
        if self.opts["anchor"]:
            ks.append(apply_rope(a["anchor_k"][layer], a["anchor_cos"], a["anchor_sin"]))
            vs.append(a["anchor_v"][layer])
        if self.opts["history_frames"]:
            ks.append(apply_rope(a["ring_k"][layer], a["ring_cos"], a["ring_sin"]))
            vs.append(a["ring_v"][layer])
        if not ks:
            return None
        return (torch.cat(ks, 1), torch.cat(vs, 1)) if len(ks) > 1 else (ks[0], vs[0])


class DecoderGraph(nn.Module):
    def __init__(self, decoder: nn.Module, first: bool):
        super().__init__()
        self.decoder, self.first = decoder, first

    def forward(self, z: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        frames, new = self.decoder(z, list(state), self.first)
        return (frames, *new)


class AudioPackGraph(nn.Module):
    def __init__(self, dit: AvatarDiT):
        super().__init__()
        self.dit = dit

    def forward(self, audio: Tensor) -> tuple[Tensor]:
        return (torch.stack(self.dit.audio_tokens(audio)),)            # [P, 1, F, C]


class TextKVGraph(nn.Module):
    def __init__(self, dit: AvatarDiT):
        super().__init__()
        self.dit = dit

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.dit.context_kv(context)
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def build_module(spec: GraphSpec, dit: AvatarDiT, decoder: nn.Module) -> nn.Module:
    """The wrapper module that computes graph `spec` from the runtime's modules."""
    if spec.kind == "dit":
        return DiTGraph(dit, spec)
    if spec.kind == "decoder":
        return DecoderGraph(decoder, spec.options["first"])
    if spec.kind == "audio_pack":
        return AudioPackGraph(dit)
    if spec.kind == "text_kv":
        return TextKVGraph(dit)
    raise ValueError(f"unknown graph kind {spec.kind!r}")


# ------------------------------------------------------------------------------------------------ inputs
def sample_inputs(spec: GraphSpec, cfg: ModelConfig, seed: int = 0) -> list[Tensor]:
    """Deterministic inputs in realistic ranges: N(0, 1) latents, caches and features; sinusoids of timesteps in
    [0, 1000]; cos/sin of real positions (anchor at 0, history 1..W, window after it); a ramp-up-like key mask."""
    g = torch.Generator().manual_seed(seed)
    opts = spec.options
    frames, hist = opts.get("frames", 0), opts.get("history_frames", 0)
    positions = {"rope": range(hist + 1, hist + 1 + frames), "anchor": [0], "ring": range(1, hist + 1)}
    out = []
    for ts in spec.inputs:
        dt = ts.torch_dtype
        if ts.name == "t_sinusoid":
            t = torch.rand(1, frames, generator=g) * 1000
            out.append(time_sinusoid(t, cfg.freq_dim, dt))
        elif ts.name.endswith(("_cos", "_sin")):
            prefix, part = ts.name.rsplit("_", 1)
            cos, sin = rope_cos_sin(grid_positions(positions[prefix], cfg.grid_hw), cfg.head_dim)
            out.append(cos if part == "cos" else sin)
        elif ts.name == "key_mask":
            out.append(_sample_mask(opts, cfg.tokens_per_frame))
        else:
            x = torch.randn(ts.shape, generator=g)
            if ts.name == "y":
                x[:, -1] = 1.0                         # the mask channel: 1 on window frames
            out.append(x.to(dt))
    return out


def _sample_mask(opts: dict, s_f: int) -> Tensor:
    """Anchor valid, the oldest history slot empty (as in ramp-up), the first half of the window real."""
    frames, hist = opts["frames"], opts["history_frames"]
    per_frame = [True] * int(opts["anchor"]) + [i > 0 or hist == 1 for i in range(hist)]
    per_frame += [i < (frames + 1) // 2 for i in range(frames)]
    return torch.tensor(per_frame).repeat_interleave(s_f)


# ------------------------------------------------------------------------------------------------ export
@dataclass
class ExportedGraph:
    """One exported graph as read back from its directory's config.json."""
    directory: Path
    spec: GraphSpec
    model: ModelConfig
    stream: StreamConfig
    info: dict                 # file, dtype, opset, exporter, external_data, torch, onnx; "engine" after a build

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.info.get("file", ONNX_FILE)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.info["dtype"])

    @classmethod
    def load(cls, directory: str | Path) -> "ExportedGraph":
        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not an exported graph (or its export did not "
                                    f"finish); run `python -m export.build_engine --out DIR` to create one")
        data = load_json(path)
        if "graph" not in data or "model" not in data or "stream" not in data:
            raise ValueError(f"{path} lacks the model/stream/graph entries that export.onnx writes")
        graph = data["graph"]
        spec = GraphSpec.from_dict(graph)
        info = {k: v for k, v in graph.items() if k not in spec.to_dict()}
        return cls(directory, spec, data["model"], data["stream"], info)

    def save_config(self) -> None:
        """config.json: {"model": ..., "stream": ..., "graph": {name, kind, inputs, outputs, options, file, ...}}."""
        save_json(self.directory / CONFIG_FILE, model=self.model, stream=self.stream,
                  graph={**self.spec.to_dict(), **self.info})


def listed_graphs(directory: str | Path) -> list[str]:
    """The graph names DIR/config.json (the export's manifest) lists."""
    manifest = Path(directory) / CONFIG_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found; export first: python -m export.build_engine --out {directory}")
    return list(load_json(manifest).get("export", {}).get("graphs", []))


def load_export(directory: str | Path, names=None) -> dict[str, ExportedGraph]:
    """Every graph listed in DIR/config.json (or just `names`), read from its own config.json."""
    directory = Path(directory)
    listed = listed_graphs(directory)
    names = listed if names is None else list(names)
    missing = sorted(set(names) - set(listed))
    if missing:
        raise ValueError(f"{directory} has no graphs {missing}; it holds {listed}")
    return {name: ExportedGraph.load(directory / name) for name in names}


def export_graph(module: nn.Module, spec: GraphSpec, directory: str | Path, *, model: ModelConfig,
                 stream: StreamConfig, external_data: bool | None = None, seed: int = 0) -> ExportedGraph:
    """Export `module` (a wrapper from `build_module`) as graph `spec` into `directory`: model.onnx (+ external
    data), checked against the spec, then config.json (written last, so its presence marks a finished export)."""
    _require_onnx()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    for stale in directory.glob(ONNX_FILE + "*"):
        stale.unlink()
    module = module.eval()
    inputs = sample_inputs(spec, model, seed)
    if external_data is None:
        external_data = _param_bytes(module) > EXTERNAL_DATA_BYTES
    path = directory / ONNX_FILE
    exporter, opset = _export(module, spec, inputs, path, external_data)
    check_onnx_io(path, spec)
    data_files = sorted(p.name for p in directory.iterdir() if p.name.startswith(ONNX_FILE) and p != path)
    info = dict(file=ONNX_FILE, dtype=spec.inputs[0].dtype, opset=opset, exporter=exporter,
                external_data=data_files, torch=torch.__version__, onnx=onnx.__version__)
    graph = ExportedGraph(directory, spec, model, stream, info)
    graph.save_config()
    return graph


def _export(module, spec, inputs, path: Path, external_data: bool) -> tuple[str, int]:
    """dynamo at opset 23; the TorchScript exporter at opset 20 only if dynamo raises."""
    kwargs = dict(input_names=spec.input_names, output_names=spec.output_names)
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(module, tuple(inputs), dynamo=True, opset_version=OPSET, verbose=False,
                                        optimize=True, **kwargs)
            program.save(str(path), external_data=external_data)
            return "dynamo", OPSET
        except Exception as err:                   # noqa: BLE001 - any exporter failure: try the other one
            warnings.warn(f"{spec.name}: the dynamo exporter failed ({type(err).__name__}: {str(err)[:300]}); "
                          f"falling back to the TorchScript exporter at opset {LEGACY_OPSET}", stacklevel=3)
            torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=LEGACY_OPSET, **kwargs)
            return "torchscript", LEGACY_OPSET


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' own deprecation chatter and torchvision notices say nothing about our graphs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


_ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
                "float64": 11, "bfloat16": 16}        # onnx.TensorProto enum values


def check_onnx_io(path: str | Path, spec: GraphSpec) -> None:
    """The saved graph's inputs and outputs must be the spec's, in order, with static shapes and dtypes."""
    _require_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph
    problems = []
    for kind, got, want in (("input", graph.input, spec.inputs), ("output", graph.output, spec.outputs)):
        got = [(v.name, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                              for d in v.type.tensor_type.shape.dim), v.type.tensor_type.elem_type) for v in got]
        want = [(t.name, tuple(t.shape), _ONNX_DTYPES[t.dtype]) for t in want]
        if got != want:
            diff = [f"{g} != {w}" for g, w in zip(got, want) if g != w][:4]
            problems.append(f"{kind}s differ ({len(got)} vs {len(want)}): {diff}")
    if problems:
        raise RuntimeError(f"{path}: the exported graph does not match spec {spec.name!r}: " + "; ".join(problems))


def export_all(pipe, stream: StreamConfig, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               names=None, external_data: bool | None = None, seed: int = 0,
               progress: bool = False) -> dict[str, ExportedGraph]:
    """Export the catalogue (or `names` of it) for `pipe`'s DiT and decoder, in `dtype`, under out_dir/<name>/,
    and list them in out_dir/config.json."""
    _require_onnx()
    from tqdm import tqdm
    cfg = pipe.config
    specs = graph_specs(cfg, stream, dtype, decoder=pipe.decoder)
    if names is not None:
        unknown = sorted(set(names) - set(ALL_GRAPHS))
        if unknown:
            raise ValueError(f"unknown graphs {unknown}; choose from {', '.join(ALL_GRAPHS)}")
        specs = [s for s in specs if s.name in names]
    dit, decoder = _in_dtype(pipe.dit, dtype), _in_dtype(pipe.decoder, dtype)
    out_dir = Path(out_dir)
    out: dict[str, ExportedGraph] = {}
    for spec in tqdm(specs, desc="export", unit="graph", disable=not progress):
        module = build_module(spec, dit, decoder)
        out[spec.name] = export_graph(module, spec, out_dir / spec.name, model=cfg, stream=stream,
                                      external_data=external_data, seed=seed)
    save_json(out_dir / CONFIG_FILE, model=cfg, stream=stream,
              export=dict(graphs=_listed(out_dir, cfg, stream, out), opset=OPSET, torch=torch.__version__))
    return out


def _listed(out_dir: Path, cfg: ModelConfig, stream: StreamConfig, new) -> list[str]:
    """Graph names for the manifest: the new ones plus those an earlier export of the same model and stream
    left in out_dir (exporting a subset adds to a directory instead of hiding what is there)."""
    names = set(new)
    path = out_dir / CONFIG_FILE
    if path.is_file():
        old = load_json(path)
        if old.get("model") == cfg and old.get("stream") == stream:
            names |= {n for n in old.get("export", {}).get("graphs", []) if (out_dir / n / CONFIG_FILE).is_file()}
    return [n for n in ALL_GRAPHS if n in names]


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module itself in its own dtype, else a converted copy (the caller keeps its fp32 reference)."""
    first = next(iter(module.parameters()), None)
    if first is None or first.dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype)


def _require_onnx() -> None:
    if not HAS_ONNX:
        raise ImportError("ONNX export needs the `onnx` and `onnxscript` packages: pip install -e '.[export]'")
