"""One stream's step state, and the reference step: the readable official computation, on any DiT backend.

    state = StreamState(pipe, image, stream, text=, seed=, ...)   # reference latent, text K/V, caches, noise
    step  = ReferenceStep(state, dit=TorchDiT(pipe.dit), decoder=pipe.decoder)
    block = step.run(sp, rows)       # one window step (a StepPlan): N main passes, re-noise, cache pass
    frames = step.decode(block)      # Frames: uint8 [4B, H, W, 3] on their way to the host

A *DiT backend* is a callable with one signature, whatever runs it (TorchDiT here; ExportedDiT in export/backend.py
for ONNX Runtime and TensorRT graphs):

    flow = dit(x, y, t, audio, context_kv, *, cache, frames, anchor, ring, kv_sink)
    x [1, 16, n, h, w], y [1, 17, n, h, w], t [1, n], audio [1, 4n, A]; cache: the DualAnchorCache; frames: the n
    query frames' positions, anchor: the style anchor's position or None, ring: per ring slot its position or None
    (not attended), all relative to the call's origin; kv_sink(layer, k, v) receives the window's K (pre-RoPE) / V.
    Returns the flow [1, 16, n, h, w], or None when the backend computed only the K/V the sink asked for.

A *decoder* is any object with the interface of decoder.py. The engine (engine.py) runs the same steps with static
buffers and CUDA graphs on the state of this file; the session (session.py) owns the audio and the schedule.

Noise comes from the state's seeded generator on the compute device, in the model dtype: a fresh block's noise
[B, 16, h, w] when it enters the window, then per re-noised block one draw shaped like the whole window's x0
(official `randn_like`), in increasing block order; with `noise="official"` all fresh noise is drawn up front as one
tensor (the official order for a clip of known length).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import Tensor

from .config import StreamConfig
from .kv_cache import DualAnchorCache
from .media import frames_to_uint8, prepare_image
from .rope import Rope
from .scheduler import PassPlan, StepPlan, sigma_for, warped_timesteps

ROPE_TABLES = 64     # cached position tables; official cache passes move the anchor every step
PINNED_SLOTS = 8     # frames in flight to pinned host memory before the session waits for the oldest


class StreamState:
    """Everything a window step reads or writes for one stream, in public attributes.

    Fixed for the session: cfg, stream, device, dtype, vae_dtype, levels_t (warped timesteps per noise level), z_ref
    [1, 16, 1, h, w] (the reference latent), context_kv (per-layer text K/V), cache (DualAnchorCache: style anchor
    and history ring), decode_cache (the decoder's DecodeCache). Per stream (`reset`): generator, noisy (block ->
    its noisy latents [1, 16, B, h, w] while it is in the window), counts and timings.
    """

    def __init__(self, pipe, image, stream: StreamConfig, *, text, seed: int, fit: str, decoder,
                 noise: str = "stream", num_latent_frames: int | None = None):
        self.cfg, self.stream, self.seed = pipe.config, stream, seed
        self.device, self.dtype, self.vae_dtype = pipe.device, pipe.dtype, pipe.vae_dtype
        self.noise, self.num_latent_frames = noise, num_latent_frames
        self.levels_t = warped_timesteps(stream)
        self.counts: dict[str, int] = defaultdict(int)
        self.timings: dict[str, float] = defaultdict(float)
        with self.timed("setup"):
            pixels = prepare_image(image, self.cfg.height, self.cfg.width, fit=fit)         # [3, H, W] in [-1, 1]
            video = pixels.to(device=self.device, dtype=self.vae_dtype)[None, :, None]     # [1, 3, 1, H, W]
            self.z_ref = pipe.vae.encode(video).to(self.dtype)                              # [1, 16, 1, h, w]
            self._y_one = torch.cat([self.z_ref, torch.ones_like(self.z_ref[:, :1])], dim=1)   # + mask 1
            self.context_kv = pipe.dit.context_kv(pipe.encode_text(text).unsqueeze(0))
            cfg = self.cfg
            self.cache = DualAnchorCache(num_layers=cfg.num_layers, batch=1, grid_hw=cfg.grid_hw,
                                         history_frames=stream.history_frames, num_heads=cfg.num_heads,
                                         head_dim=cfg.head_dim, dtype=self.dtype, device=self.device)
            self.decode_cache = decoder.init_decode_cache(1, self.vae_dtype, self.device, cfg.height, cfg.width)
        self.anchor_done = False
        self.reset()

    def reset(self) -> None:
        """A new stream: empty history and window, the generator re-seeded, the decoder state zeroed in place."""
        self.cache.reset()
        self.decode_cache.reset()
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.noisy: dict[int, Tensor] = {}
        self.counts.clear()
        self._fresh_noise = None
        if self.noise == "official":                # official: randn([N - 1, 16, h, w]) before the loop
            n = self.num_latent_frames - 1
            self._fresh_noise = self.randn((n, self.cfg.vae_z_dim, *self.cfg.latent_hw))

    def y(self, frames: int) -> Tensor:
        """Conditioning for `frames` window frames (all >= 1): the reference latent and mask 1 [1, 17, F, h, w]."""
        return self._y_one.expand(-1, -1, frames, -1, -1)

    def randn(self, shape) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def fresh_block(self, block: int) -> Tensor:
        """The noise of a block entering the window [1, 16, B, h, w] (drawn now, or cut from the official draw)."""
        B = self.stream.block_frames
        if self._fresh_noise is not None:
            eps = self._fresh_noise[B * block:B * (block + 1)]
        else:
            eps = self.randn((B, self.cfg.vae_z_dim, *self.cfg.latent_hw))
        return eps.permute(1, 0, 2, 3).unsqueeze(0)

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - start


class TorchDiT:
    """The DiT backend over the PyTorch AvatarDiT: RoPE tables per set of positions (cached) and the cache's
    rotated prefix (Triton kernels where the model uses them)."""

    def __init__(self, dit, device):
        self.dit, self.device = dit, torch.device(device)
        self._tables: dict[tuple, Rope] = {}

    def rope(self, positions) -> Rope:
        key = tuple(positions)
        if key not in self._tables:
            if len(self._tables) > ROPE_TABLES:
                self._tables.clear()
            self._tables[key] = Rope(key, self.dit.cfg.grid_hw, self.dit.cfg.head_dim, self.device)
        return self._tables[key]

    def __call__(self, x, y, t, audio, context_kv, *, cache, frames, anchor=None, ring=(), kv_sink=None) -> Tensor:
        ring = list(ring)
        span = ring_span(ring)
        anchor_rope = self.rope([anchor]) if anchor is not None else None
        ring_rope = self.rope([p if p is not None else 0 for p in ring]) if span[1] else None
        kernels = self.dit.use_kernels
        return self.dit(x, y, t, audio, context_kv, self.rope(frames),
                        prefix=lambda i: cache.prefix(i, anchor_rope, ring_rope, span, kernels), kv_sink=kv_sink)


def ring_span(ring) -> tuple[int, int]:
    """(first slot, count) of the attended ring slots (those with a position), oldest first. The history is always
    the most recent writes, so the attended slots are contiguous modulo the capacity."""
    attended = sorted((p, slot) for slot, p in enumerate(ring) if p is not None)
    if not attended:
        return 0, 0
    first = attended[0][1]
    if [slot for _, slot in attended] != [(first + i) % len(ring) for i in range(len(attended))]:
        raise RuntimeError(f"attended ring slots {[slot for _, slot in attended]} are not contiguous in the ring")
    return first, len(attended)


class Frames:
    """uint8 frames [T, H, W, 3] on their way to the host; `wait()` returns a CPU tensor the caller owns."""

    def __init__(self, frames: Tensor, event=None):
        self.frames, self.event = frames, event

    def wait(self) -> Tensor:
        if self.event is None:
            return self.frames
        self.event.synchronize()
        return self.frames.clone()          # the pinned buffer is reused for later blocks


class ReferenceStep:
    """The readable step: any window shape, any DiT backend, exactly the official plan."""

    audio_on_device = False      # feature rows come as CPU tensors and are moved by the session

    def __init__(self, state: StreamState, dit, decoder):
        self.state, self.dit, self.decoder = state, dit, decoder

    def reset(self) -> None:
        """Nothing of its own to reset: the stream's state is StreamState's."""

    def audio(self, rows):
        """The window's feature rows: `rows()` called here (the engine runs it on its audio stream)."""
        return rows()

    # ------------------------------------------------------------------ the step
    def run(self, sp: StepPlan, rows: Tensor) -> Tensor | None:
        """One window step: `rows` [1, R, A] the window's audio feature rows; returns the emitted block's x0
        [1, 16, B, h, w], or None while the window is still filling."""
        st, B = self.state, self.state.stream.block_frames
        st.counts["steps"] += 1
        if sp.fresh_block is not None:
            st.noisy[sp.fresh_block] = st.fresh_block(sp.fresh_block)
        start = sp.passes[0].audio_rows[0]
        x = torch.cat([st.noisy[b] for b in sp.blocks], dim=2)                       # [1, 16, F, h, w]
        for n, pp in enumerate(sp.passes):
            with st.timed("dit_main"):
                x0 = self.dit_pass(x, pp, rows)
            st.counts["main"] += 1
            for b, level in sp.renoise[n]:                                           # official: fresh eps per block
                eps = st.randn((x0.shape[2], *x0.shape[1:2], *x0.shape[3:])).permute(1, 0, 2, 3).unsqueeze(0)
                i = sp.blocks.index(b) * B
                st.noisy[b] = self._add_noise(x0[:, :, i:i + B], eps[:, :, i:i + B], st.levels_t[level])
            if n < len(sp.passes) - 1:
                x = torch.cat([st.noisy[b] for b in sp.blocks], dim=2)
        if sp.emit is None:
            return None
        block = x0[:, :, :B]
        st.noisy.pop(sp.emit, None)
        if sp.cache_pass is not None:
            cp = sp.cache_pass
            st.cache.begin_history_write(cp.frames)
            with st.timed("dit_cache"):
                self.dit_pass(block, cp, rows[:, cp.audio_rows[0] - start:cp.audio_rows[1] - start],
                              sink=st.cache.write_history)
            st.cache.end_history_write()
            st.counts["cache"] += 1
        return block

    def dit_pass(self, x: Tensor, pp: PassPlan, audio: Tensor, sink=None) -> Tensor | None:
        """One DiT call; returns x0 = x_t - sigma(t) v, computed in float64 and cast back (official), or None when
        the backend computed only the K/V the sink takes."""
        st = self.state
        st.cache.ring_window(pp.history)          # raises if the plan's history is not what the ring holds
        t = torch.tensor([pp.timesteps], dtype=torch.float32, device=st.device)
        anchor = pp.relative(pp.anchor_position) if st.stream.use_style_anchor else None
        ring = [pp.relative(f) if f is not None and f in pp.history else None for f in st.cache.slot_frame]
        flow = self.dit(x, st.y(len(pp.frames)), t, audio, st.context_kv, cache=st.cache,
                        frames=[pp.relative(f) for f in pp.frames], anchor=anchor, ring=ring, kv_sink=sink)
        if flow is None:
            return None
        sigma = torch.tensor([sigma_for(s, st.stream.shift) for s in pp.timesteps], dtype=torch.float64,
                             device=st.device).view(1, 1, len(pp.frames), 1, 1)
        return (x.double() - sigma * flow.double()).to(st.dtype)

    def anchor_pass(self, audio_rows: Tensor) -> None:
        """The reference latent at t = 0, mask 0, attending to itself; fills the style anchor K/V."""
        st = self.state
        y = torch.cat([st.z_ref, torch.zeros_like(st.z_ref[:, :1])], dim=1)
        t = torch.zeros(1, 1, device=st.device)
        audio = audio_rows.to(device=st.device, dtype=st.dtype).reshape(1, -1, st.cfg.audio_input_dim)
        self.dit(st.z_ref, y, t, audio, st.context_kv, cache=st.cache, frames=[0], anchor=None,
                 ring=[None] * st.cache.capacity, kv_sink=st.cache.write_anchor)
        st.anchor_done = True

    def _add_noise(self, x0: Tensor, eps: Tensor, t: float) -> Tensor:
        """(1 - sigma) x0 + sigma eps in float32, cast to the noise dtype (official add_noise)."""
        s = torch.tensor(sigma_for(t, self.state.stream.shift), dtype=torch.float32, device=self.state.device)
        return ((1 - s) * x0.float() + s * eps.float()).to(eps.dtype)

    # ------------------------------------------------------------------ decode
    def decode(self, latents: Tensor) -> Frames:
        st = self.state
        with st.timed("decode"):
            video = self.decoder.decode_step(latents.to(st.vae_dtype), st.decode_cache)
            return Frames(frames_to_uint8(video).cpu())
