"""Running the session's DiT and decoder calls on exported graphs, and checking them against PyTorch.

A *runner* executes one exported graph: `runner.graph` (its `ExportedGraph`) and `runner.run(feeds)` mapping input
names to tensors -> output names to tensors. `OrtGraph` runs an ONNX file on ONNX Runtime; `export.trt.EngineRunner`
runs a TensorRT plan. On top of any runners:

    sess = pipe.session(image, **ort_backends(DIR))        # or trt_backends(DIR): TensorRT engines built there
    dit = ExportedDiT.from_onnx(DIR)            # dit_main / dit_cache / dit_masked
    flow = dit(x, y, t, audio, context_kv, cache=cache, frames=[...], anchor=a, ring=[...], kv_sink=sink)
    dec = ExportedDecoder.from_onnx(DIR)        # vae_first / vae_step
    cache = dec.init_decode_cache(1, dtype, device, H, W); video = dec.decode_step(z, cache)

`ExportedDiT` is a DiT backend (runtime/step.py): positions are plain ints relative to the call's origin
(`PassPlan.relative`), and it picks the graph: the steady graphs when the call has their exact shape (full window,
every history slot attended), `dit_masked` for everything else. `ExportedDecoder` has the decoders' streaming
interface (runtime/decoder.py: `init_decode_cache`, `decode_step`, the pure step), one graph call per latent.

`check_parity` compares a graph on ONNX Runtime (CPUExecutionProvider unless told otherwise) with the PyTorch
module it came from, on the same random inputs: max abs error, max error relative to the output's largest
magnitude, and cosine similarity, per output. fp32 graphs must agree to 1e-4 abs; reduced precision is compared
with the fp32 PyTorch module (relative and cosine, as elementwise atol means little there). ONNX Runtime's CPU
provider has no bfloat16 kernels, so bf16 graphs are reported as skipped.

Not here: exporting (onnx.py), TensorRT (trt.py), the session itself (runtime/session.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.rope import grid_positions, rope_cos_sin
from runtime.decoder import DecodeCache

from .onnx import (DECODER_GRAPHS, DIT_GRAPHS, ExportedGraph, build_module, listed_graphs, load_export,
                   sample_inputs, time_sinusoid)

try:
    import onnxruntime as ort
    HAS_ORT = True
except ImportError:            # the `export` extra is optional
    ort = None
    HAS_ORT = False

# Parity limits. fp32: elementwise max abs (ISSUE: <= 1e-4). Reduced precision against the fp32 module: max abs error
# relative to the output's largest magnitude, and cosine similarity (fp16 keeps ~3 decimal digits).
FP32_MAX_ABS = 1e-4
LOW_PRECISION_MAX_REL = 1e-2
LOW_PRECISION_MIN_COSINE = 0.9999
ROPE_TABLE_CACHE = 64         # cached position tables; official cache passes move the anchor every step


class OrtGraph:
    """One exported graph on an ONNX Runtime InferenceSession; inputs are checked against config.json."""

    def __init__(self, directory: str | Path, providers=None):
        if not HAS_ORT:
            raise ImportError("running exported graphs needs onnxruntime: pip install -e '.[export]'")
        self.graph = ExportedGraph.load(directory)
        if self.graph.dtype == torch.bfloat16 and not _has_gpu_provider(providers):
            raise ValueError(f"{directory}: ONNX Runtime's CPU provider has no bfloat16 kernels; export in fp32 or "
                             "fp16 (--fp16), or run the graph with TensorRT")
        options = ort.SessionOptions()
        options.log_severity_level = 3              # errors only
        # ORT's pool threads spin after each run by default; between the session's many small calls that spinning
        # takes the cores from PyTorch in the same process (measured: a tiny stream 5x slower on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.graph.onnx_path), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        names = [i.name for i in self.session.get_inputs()]
        if names != self.graph.spec.input_names:
            raise ValueError(f"{self.graph.onnx_path} inputs {names} differ from its config.json "
                             f"{self.graph.spec.input_names}; re-export the graph")

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """feeds: every input by name (shape and dtype as config.json says) -> outputs as CPU tensors."""
        arrays = {}
        for ts in self.graph.spec.inputs:
            if ts.name not in feeds:
                raise ValueError(f"{self.graph.spec.name}: input {ts.name!r} is missing")
            t = feeds[ts.name]
            if tuple(t.shape) != ts.shape or t.dtype != ts.torch_dtype:
                raise ValueError(f"{self.graph.spec.name}: input {ts.name!r} must be {ts.dtype} {list(ts.shape)}, "
                                 f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
            arrays[ts.name] = t.detach().cpu().contiguous().numpy()
        outs = self.session.run(self.graph.spec.output_names, arrays)
        return {name: torch.from_numpy(np.ascontiguousarray(o)) for name, o in zip(self.graph.spec.output_names, outs)}


def _has_gpu_provider(providers) -> bool:
    return any(p != "CPUExecutionProvider" for p in (providers or []))


def ort_runners(directory: str | Path, names, providers=None) -> dict[str, OrtGraph]:
    """ORT runners for those of `names` that DIR/config.json lists."""
    graphs = load_export(directory, _present(directory, names))
    return {n: OrtGraph(g.directory, providers) for n, g in graphs.items()}


def ort_backends(directory: str | Path, providers=None) -> dict:
    """The session backends on the exported ONNX graphs in DIR, run by ONNX Runtime:
    `pipe.session(image, **ort_backends(DIR))`."""
    return dict(dit=ExportedDiT.from_onnx(directory, providers), decoder=ExportedDecoder.from_onnx(directory))


def trt_backends(directory: str | Path, device="cuda") -> dict:
    """The session backends on TensorRT engines built in DIR (`export.trt.build_engines`):
    `pipe.session(image, **trt_backends(DIR))`."""
    return dict(dit=ExportedDiT.from_engines(directory, device), decoder=ExportedDecoder.from_engines(directory, device))


def _present(directory: str | Path, names) -> list[str]:
    """Those of `names` that DIR/config.json lists."""
    listed = listed_graphs(directory)
    return [n for n in names if n in listed]


# ------------------------------------------------------------------------------------------------ DiT
class ExportedDiT:
    """The session's DiT calls on exported DiT graphs (any runners: ONNX Runtime or TensorRT)."""

    def __init__(self, runners: dict):
        self.main, self.cache, self.masked = (runners.get(n) for n in DIT_GRAPHS)
        present = [r for r in (self.main, self.cache, self.masked) if r is not None]
        if not present:
            raise ValueError(f"no DiT graph among {sorted(runners)}; expected some of {DIT_GRAPHS}")
        first = present[0].graph
        self.cfg, self.stream, self.dtype = first.model, first.stream, first.dtype
        self.opts = first.spec.options               # anchor and history are the same in every DiT graph
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._context: tuple | None = None

    @classmethod
    def from_onnx(cls, directory: str | Path, providers=None) -> "ExportedDiT":
        return cls(ort_runners(directory, DIT_GRAPHS, providers))

    @classmethod
    def from_engines(cls, directory: str | Path, device="cuda") -> "ExportedDiT":
        from .trt import load_engines
        return cls(load_engines(directory, _present(directory, DIT_GRAPHS), device))

    def __call__(self, x: Tensor, y: Tensor, t: Tensor, audio: Tensor, context_kv, *, cache, frames,
                 anchor: int | None = None, ring=(), kv_sink=None) -> Tensor | None:
        """One DiT call, as `AvatarDiT.forward` with the session's prefix and sink.

        x [1, 16, n, h, w], y [1, 17, n, h, w], t [1, n], audio [1, 4n, A], context_kv: per-layer (k, v) list;
        cache: the `DualAnchorCache` (anchor_k/v, ring_k/v pre-RoPE); frames: the n query frames' positions;
        anchor: the style anchor's position, or None to leave it out; ring: one entry per ring slot, its position
        or None when the slot is not attended; kv_sink(layer, k_pre [1, n S_f, N_h, D], v): receives the window's
        K/V. Returns the flow [1, 16, n, h, w] in x's dtype, or None when only K/V were asked for and the steady
        cache graph (which computes nothing else) served the call.
        """
        n, ring = len(frames), list(ring)
        if not self.opts["history_frames"]:
            if any(p is not None for p in ring):
                raise ValueError("these DiT graphs were exported without a temporal anchor (history_frames=0)")
            ring = []
        runner = self._pick(n, anchor, ring, kv_sink is not None)
        feeds = self._feeds(runner.graph.spec, x, y, t, audio, context_kv, cache, frames, anchor, ring)
        device = getattr(runner, "device", torch.device("cpu"))
        out = runner.run({k: v.to(device) for k, v in feeds.items()})
        if kv_sink is not None:
            s = n * self.cfg.tokens_per_frame
            for i in range(self.cfg.num_layers):
                kv_sink(i, out["k_new"][i, :, :s].to(device=x.device, dtype=x.dtype),
                        out["v_new"][i, :, :s].to(device=x.device, dtype=x.dtype))
        if "flow" not in out:
            return None
        return out["flow"][:, :, :n].to(device=x.device, dtype=x.dtype)

    def _pick(self, n: int, anchor, ring, want_kv: bool):
        anchor_ok = (anchor is not None) == self.opts["anchor"]
        full_ring = all(p is not None for p in ring)
        if anchor is not None and not self.opts["anchor"]:
            raise ValueError("these DiT graphs were exported without a style anchor (use_style_anchor=False)")
        if self.opts["history_frames"] and len(ring) != self.opts["history_frames"]:
            raise ValueError(f"ring has {len(ring)} slots; the graphs hold {self.opts['history_frames']} frames")
        steady = self.cache if want_kv else self.main
        if steady is not None and anchor_ok and full_ring and steady.graph.spec.options["frames"] == n:
            return steady
        if self.masked is not None and n <= self.masked.graph.spec.options["frames"]:
            return self.masked
        raise ValueError(f"no exported DiT graph runs a {n}-frame call (anchor {anchor is not None}, "
                         f"{sum(p is not None for p in ring)} history frames, K/V out {want_kv}); "
                         f"export 'dit_masked' for ramp-up and tail calls")

    def _feeds(self, spec, x, y, t, audio, context_kv, cache, frames, anchor, ring) -> dict[str, Tensor]:
        cfg, dt = self.cfg, self.dtype
        n, total = len(frames), spec.options["frames"]
        pad = total - n                                    # zero frames after the real ones (dit_masked only)
        feeds = {
            "x": _pad(x.to(dt), 2, pad), "y": _pad(y.to(dt), 2, pad),
            "t_sinusoid": time_sinusoid(_pad(t.float().cpu(), 1, pad), cfg.freq_dim, dt),
            "audio": _pad(audio.to(dt), 1, pad * cfg.audio_frames_per_latent),
        }
        feeds["context_k"], feeds["context_v"] = self._stacked_context(context_kv)
        feeds["rope_cos"], feeds["rope_sin"] = self._table(tuple(frames) + (0,) * pad)
        if self.opts["anchor"]:
            feeds["anchor_k"], feeds["anchor_v"] = cache.anchor_k.to(dt), cache.anchor_v.to(dt)
            feeds["anchor_cos"], feeds["anchor_sin"] = self._table((anchor if anchor is not None else 0,))
        if self.opts["history_frames"]:
            feeds["ring_k"], feeds["ring_v"] = cache.ring_k.to(dt), cache.ring_v.to(dt)
            feeds["ring_cos"], feeds["ring_sin"] = self._table(tuple(p if p is not None else 0 for p in ring))
        if spec.options["masked"]:
            valid = [anchor is not None] * int(self.opts["anchor"]) + [p is not None for p in ring]
            valid += [i < n for i in range(total)]
            feeds["key_mask"] = torch.tensor(valid).repeat_interleave(cfg.tokens_per_frame)
        return feeds

    def _table(self, positions: tuple) -> tuple[Tensor, Tensor]:
        """float32 cos/sin [len * S_f, D/2] from float64 angles (`Rope.full`), cached by positions."""
        if positions not in self._tables:
            if len(self._tables) > ROPE_TABLE_CACHE:
                self._tables.clear()
            self._tables[positions] = rope_cos_sin(grid_positions(positions, self.cfg.grid_hw), self.cfg.head_dim)
        return self._tables[positions]

    def _stacked_context(self, context_kv) -> tuple[Tensor, Tensor]:
        """Per-layer text K/V stacked to [N_L, 1, text_len, N_h, D], once per context list."""
        if self._context is None or self._context[0] is not context_kv:
            k = torch.stack([k for k, _ in context_kv]).to(self.dtype)
            v = torch.stack([v for _, v in context_kv]).to(self.dtype)
            self._context = (context_kv, k, v)
        return self._context[1], self._context[2]


def _pad(x: Tensor, dim: int, count: int) -> Tensor:
    """Zero-pad `count` entries at the end of `dim` (contiguous either way: graph inputs must be dense)."""
    if count == 0:
        return x.contiguous()
    pads = [0, 0] * (x.ndim - 1 - dim) + [0, count]
    return F.pad(x, pads)


# ------------------------------------------------------------------------------------------------ decoder
class ExportedDecoder:
    """The torch decoders' streaming interface on the vae_first / vae_step graphs (one call per latent)."""

    def __init__(self, runners: dict):
        missing = [n for n in DECODER_GRAPHS if n not in runners]
        if missing:
            raise ValueError(f"decoder graphs {missing} are missing; export {DECODER_GRAPHS}")
        self.first, self.step = (runners[n] for n in DECODER_GRAPHS)
        graph = self.step.graph
        self.cfg, self.dtype = graph.model, graph.dtype
        self.state = [tuple(pair) for pair in graph.spec.options["state"]]      # (input, output) names

    @classmethod
    def from_onnx(cls, directory: str | Path, providers=None) -> "ExportedDecoder":
        return cls(ort_runners(directory, DECODER_GRAPHS, providers))

    @classmethod
    def from_engines(cls, directory: str | Path, device="cuda") -> "ExportedDecoder":
        from .trt import load_engines
        return cls(load_engines(directory, DECODER_GRAPHS, device))

    def init_decode_cache(self, batch: int, dtype: torch.dtype, device, height: int, width: int) -> DecodeCache:
        """Zero decoder state in the graphs' dtype (whatever `dtype` asks: the graphs fix it)."""
        if (batch, height, width) != (1, self.cfg.height, self.cfg.width):
            raise ValueError(f"the decoder graphs decode batch 1 at {self.cfg.width}x{self.cfg.height}, asked for "
                             f"batch {batch} at {width}x{height}; re-export for that size")
        spec = self.step.graph.spec
        tensors = [torch.zeros(spec.input(name).shape, dtype=self.dtype, device=device) for name, _ in self.state]
        return DecodeCache(tensors, batch, height, width)

    def decode_step(self, z_frames: Tensor, cache: DecodeCache) -> Tensor:
        """Normalised latents [1, 16, T, h, w] -> frames [1, 3, n, H, W] in [-1, 1] (n = 1 for a stream's first
        latent, 4 for every later one), updating `cache` in place; output in z's dtype and device."""
        want = self.step.graph.spec.input("z").shape
        if z_frames.ndim != 5 or tuple(z_frames.shape[:2]) != want[:2] or tuple(z_frames.shape[3:]) != want[3:]:
            raise ValueError(f"the decoder graphs take latents [1, {want[1]}, T, {want[3]}, {want[4]}], "
                             f"got {list(z_frames.shape)}")
        return cache.step(self, z_frames)

    def __call__(self, z_frames: Tensor, state: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        """The pure decoder step of decoder.py on the graphs: one graph call per latent (vae_first for a stream's
        first latent, vae_step for the others)."""
        frames = []
        for i in range(z_frames.shape[2]):
            runner = self.first if first and i == 0 else self.step
            feeds = {"z": z_frames[:, :, i:i + 1].to(self.dtype).contiguous()}
            feeds.update({name: t for (name, _), t in zip(self.state, state)})
            out = runner.run(feeds)
            # clone: a TensorRT runner hands back its own output buffers, reused by the next call
            state = [out[name].to(t.device).clone() for (_, name), t in zip(self.state, state)]
            frames.append(out["frames"].to(device=z_frames.device, dtype=z_frames.dtype).clone())
        return torch.cat(frames, dim=2), state


# ------------------------------------------------------------------------------------------------ parity
def compare(got: Tensor, ref: Tensor) -> dict:
    """max abs error, max abs error / max |ref|, cosine similarity (float64), and whether shapes agree."""
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        return dict(max_abs=float("inf"), max_rel=float("inf"), cosine=0.0, shape_ok=False)
    diff = (got - ref).abs()
    scale = ref.abs().max().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0, eps=1e-30)
    return dict(max_abs=float(diff.max()), max_rel=float(diff.max() / scale), cosine=float(cos), shape_ok=True)


def within_tolerance(dtype: str, stats: dict) -> bool:
    if not stats["shape_ok"]:
        return False
    if dtype == "float32":
        return stats["max_abs"] <= FP32_MAX_ABS
    return stats["max_rel"] <= LOW_PRECISION_MAX_REL and stats["cosine"] >= LOW_PRECISION_MIN_COSINE


def check_parity(graph: ExportedGraph, dit, decoder, *, seed: int = 0, providers=None) -> dict:
    """Run `graph` on ONNX Runtime and its fp32 PyTorch module (built from `dit` / `decoder`, which must be fp32)
    on the same random inputs; returns {graph, dtype, ok, outputs: {name: stats}} or a skip reason."""
    dtype = graph.info["dtype"]
    result = dict(graph=graph.spec.name, dtype=dtype)
    if not HAS_ORT:
        return {**result, "ok": None, "skipped": "onnxruntime is not installed"}
    if dtype == "bfloat16" and not _has_gpu_provider(providers):
        return {**result, "ok": None, "skipped": "ONNX Runtime's CPU provider has no bfloat16 kernels"}
    inputs = sample_inputs(graph.spec, graph.model, seed)
    got = OrtGraph(graph.directory, providers).run(dict(zip(graph.spec.input_names, inputs)))
    reference = build_module(graph.spec, dit, decoder)
    with torch.no_grad():
        ref = reference(*[x.float() if x.is_floating_point() else x for x in inputs])
    stats = {name: compare(got[name], r) for name, r in zip(graph.spec.output_names, ref)}
    ok = all(within_tolerance(dtype, s) for s in stats.values())
    return {**result, "ok": ok, "outputs": stats}
