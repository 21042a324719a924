"""The static-shape engine: a stream's steady-state steps with fixed buffers, CUDA graphs, three streams, pinned copies.

Same math as the reference step (step.py `ReferenceStep.run` + `decode`), arranged so that a steady-state step has
fixed shapes, reads and writes only preallocated tensors and never waits for the device:

    window  [1, 16, L*B, h, w]   noisy latents of the L blocks; shifted by one block after each step
    eps     [draws, L*B, 16, h, w]  the step's re-noise draws (official randn_like(window) shapes), drawn in
                                    the reference order from the stream's generator straight into this buffer
    audio   [1, 4*L*B, A]        the window's feature rows, written on the audio stream
    pos     anchor / ring frame positions (float64 device scalars, set with fill_: no host sync); cos/sin
            tables are computed from them on the device, so a stream at frame 10^6 needs no table and no copy
    ring_idx  token rows of the ring slots the cache pass writes this step

One step = N main passes + re-noising + the cache pass (`_dit_step`), and one decode of the emitted block +
uint8 conversion (`_decode_step`). On CUDA each runs eagerly for its first WARMUP calls (on a side stream: Triton
compiles and autotunes, cuBLAS sizes its workspaces), is then captured as a CUDA graph (capture records, it runs
nothing) and replayed from then on, the capture's own step included; the DiT runs on the stream that created the
engine, the decode of block i on a second stream overlapping DiT step i + 1, audio features on a third; events
order them, frames come back through pinned buffers with async copies. On a CPU the same step runs eagerly or
under `torch.compile(fullgraph=True, dynamic=False)` (what the CPU tests check).

The engine is an executor, like the reference step (`reset`, `audio`, `run`, `decode`): it works on the stream's
StreamState and hands the windows it does not handle (ramp-up and tail shapes) and the first latent's decode to
the reference step, moving the noisy blocks between its window buffer and `state.noisy` when it does.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from .dit import Prefix
from .media import frames_to_uint8
from .rope import Rope, axis_pairs, axis_tables, inv_freqs
from .scheduler import sigma_for, step_plan
from .step import PINNED_SLOTS, Frames

WARMUP = 2          # eager calls of a step before its CUDA graph is captured


class _DeviceRope:
    """RoPE tables for frames whose positions live in a float64 device tensor (row/col tables are constant)."""

    def __init__(self, num_frames: int, grid_hw, head_dim: int, device):
        self.pos = torch.zeros(num_frames, dtype=torch.float64, device=device)
        pt = axis_pairs(head_dim)[0]
        self.omega_t = inv_freqs(head_dim)[:pt].to(device)
        _, _, self.cos_h, self.sin_h, self.cos_w, self.sin_w = axis_tables([0], grid_hw, head_dim, device)
        gh, gw = grid_hw
        tok = torch.arange(num_frames * gh * gw, device=device)
        self.frame_of, self.row_of, self.col_of = tok // (gh * gw), (tok // gw) % gh, tok % gw

    def set(self, positions) -> None:
        for i, p in enumerate(positions):
            self.pos[i].fill_(float(p))          # a fill kernel with a host scalar: no synchronisation

    def rope(self) -> Rope:
        theta = torch.outer(self.pos, self.omega_t)                      # float64 angles, as the reference
        cos_t, sin_t = theta.cos().float(), theta.sin().float()
        full_cos = torch.cat([cos_t[self.frame_of], self.cos_h[self.row_of], self.cos_w[self.col_of]], -1)
        full_sin = torch.cat([sin_t[self.frame_of], self.sin_h[self.row_of], self.sin_w[self.col_of]], -1)
        return Rope(full=(full_cos, full_sin), axes=(cos_t, sin_t, self.cos_h, self.sin_h, self.cos_w, self.sin_w))


class Engine:
    audio_on_device = False      # set per instance: True on CUDA (rows stay where the audio stream made them)

    def __init__(self, state, reference, dit, decoder, *, compile: bool = False, cuda_graphs: bool | None = None):
        self.state, self.reference, self.dit, self.decoder = state, reference, dit, decoder
        cfg, st = state.cfg, state.stream
        self.L, self.B, self.N = st.window_blocks, st.block_frames, st.passes
        self.F = self.L * self.B
        self.W = st.history_frames if st.use_temporal_anchor else 0
        dev, dt = state.device, state.dtype
        h, w = cfg.latent_hw
        self.cuda = dev.type == "cuda"
        self.use_graphs = self.cuda if cuda_graphs is None else cuda_graphs
        self.audio_on_device = self.cuda
        # the first steady window: full window, full history, a cache pass
        wi = self.L - 1 + math.ceil(self.W / self.B)
        self.template = step_plan(st, wi, None, state.levels_t)
        main = self.template.passes[0]
        # -- static inputs --
        self.window = torch.zeros(1, cfg.vae_z_dim, self.F, h, w, dtype=dt, device=dev)
        # (pass, position of the block in the window, next level) of every re-noise draw, in draw order
        self.draws = [(n, self.template.blocks.index(b), level) for n, r in enumerate(self.template.renoise)
                      for b, level in r]
        self.eps = torch.zeros(len(self.draws), self.F, cfg.vae_z_dim, h, w, dtype=dt, device=dev)
        self.audio_rows = torch.zeros(1, cfg.audio_frames_per_latent * self.F, cfg.audio_input_dim, dtype=dt,
                                      device=dev)
        self.t = [torch.tensor([pp.timesteps], dtype=torch.float32, device=dev) for pp in self.template.passes]
        self.sigma = [torch.tensor([sigma_for(x, st.shift) for x in pp.timesteps], dtype=torch.float64,
                                   device=dev).view(1, 1, -1, 1, 1) for pp in self.template.passes]
        self.renoise_sigma = [torch.tensor(sigma_for(state.levels_t[level], st.shift), dtype=torch.float32,
                                           device=dev) for _, _, level in self.draws]
        self.t_cache = torch.full((1, self.B), float(st.cache_pass_t), device=dev)
        # -- positions (relative to the main pass's anchor; constant except the official cache-pass anchor) --
        grid, hd = cfg.grid_hw, cfg.head_dim
        self.rope_window = Rope([main.relative(f) for f in main.frames], grid, hd, dev)
        self.rope_block = Rope([main.relative(f) for f in self.template.cache_pass.frames], grid, hd, dev)
        for rope in (self.rope_window, self.rope_block):     # build the tables now, not inside a traced step
            rope.full, rope.axes
        self.anchor_main = _DeviceRope(1, grid, hd, dev)
        self.anchor_main.set([0])
        self.anchor_cache = _DeviceRope(1, grid, hd, dev)
        self.ring_pos = _DeviceRope(max(self.W, 1), grid, hd, dev)
        s_f = cfg.tokens_per_frame
        self.n_write = min(self.B, self.W)
        self.ring_idx = torch.zeros(self.n_write * s_f, dtype=torch.long, device=dev)
        self.slot_rows = torch.arange(max(self.W, 1) * s_f, device=dev).view(max(self.W, 1), s_f)
        self.out_block = torch.zeros(1, cfg.vae_z_dim, self.B, h, w, dtype=dt, device=dev)
        self.y_window, self.y_block = state.y(self.F), state.y(self.B)
        # -- decode: the emitted block in, uint8 frames out (static, so the decode graph reads and writes them) --
        self.z_static = torch.zeros_like(self.out_block)
        frames = cfg.audio_frames_per_latent * self.B
        self.frames_u8 = torch.zeros(frames, cfg.height, cfg.width, 3, dtype=torch.uint8, device=dev)
        self._dit_fn = torch.compile(self._dit_step, fullgraph=True, dynamic=False) if compile else self._dit_step
        # on a CPU the decode is compiled too (it has no graph to replay there); on CUDA it is captured
        self._decode_fn = torch.compile(self._decode_step, fullgraph=True, dynamic=False) \
            if compile and not self.cuda else None
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._eager_calls: dict[str, int] = defaultdict(int)
        if self.cuda:
            self.dit_stream = torch.cuda.current_stream(dev)
            self.vae_stream = torch.cuda.Stream(dev)
            self.audio_stream = torch.cuda.Stream(dev)
            self.side_stream = torch.cuda.Stream(dev)          # warm-up and capture
            self.pinned = [torch.empty(self.frames_u8.shape, dtype=torch.uint8, pin_memory=True)
                           for _ in range(PINNED_SLOTS)]
        self.live = False            # whether `window` holds the stream's noisy blocks (else state.noisy does)
        self.steps = self.decoded = 0

    # ------------------------------------------------------------------ the executor interface
    def reset(self) -> None:
        """A new stream: the noisy blocks start in state.noisy again (buffers and graphs stay)."""
        self.live = False

    def audio(self, rows):
        """The window's feature rows, computed on the audio stream on CUDA (the DiT stream waits for them)."""
        if not self.cuda:
            return rows()
        with torch.cuda.stream(self.audio_stream):
            out = rows()
        self.dit_stream.wait_stream(self.audio_stream)
        out.record_stream(self.dit_stream)         # allocated on the audio stream, read on the DiT stream
        return out

    def handles(self, sp) -> bool:
        """Steady-state windows only: same shapes and relative positions as the template."""
        t, main = self.template, sp.passes[0]
        return (sp.cache_pass is not None and sp.fresh_block is not None and len(sp.blocks) == self.L
                and len(main.history) == len(t.passes[0].history)
                and [main.relative(f) for f in main.frames] == list(self.rope_window.frames))

    def run(self, sp, rows: Tensor) -> Tensor | None:
        """One step: steady windows here (returns the emitted block's x0 [1, 16, B, h, w], a view of a static
        buffer), others on the reference step."""
        st = self.state
        if not self.handles(sp):
            if self.live:                 # back to the reference path (the tail): hand the blocks back
                self.store_window(st.noisy, [b for b in sp.blocks if b != sp.fresh_block])
                self.live = False
            return self.reference.run(sp, rows)
        if not self.live:
            self.load_window(st.noisy, sp.blocks)
            st.noisy.clear()
            self.live = True
        with st.timed("engine_step"):
            self.prepare(sp)
            self.audio_rows.copy_(rows, non_blocking=True)
            self._replay("dit", self._dit_fn, self.dit_stream if self.cuda else None)
            if self.W:
                st.cache.end_history_write()
        st.counts["steps"] += 1
        st.counts["main"] += self.N
        st.counts["cache"] += 1
        self.steps += 1
        return self.out_block

    def decode(self, latents: Tensor) -> Frames:
        """Decode an emitted block: uint8 frames [4B, H, W, 3] (on CUDA through the decode graph on its own stream,
        copied to a pinned buffer; `wait()` on the result; compiled on a CPU when the step is). A stream's first
        latent, and every block on a CPU without compile, go to the reference step."""
        if not self.state.decode_cache.first_done or not (self.cuda or self._decode_fn):
            return self.reference.decode(latents)
        if not self.cuda:
            with self.state.timed("decode"):
                self.z_static.copy_(latents)
                self._decode_fn()
                return Frames(self.frames_u8.clone())
        self.vae_stream.wait_stream(self.dit_stream)
        with torch.cuda.stream(self.vae_stream):
            self.z_static.copy_(latents)
        self.dit_stream.wait_stream(self.vae_stream)       # the next DiT step may overwrite out_block afterwards
        with torch.cuda.stream(self.vae_stream):
            self._replay("vae", self._decode_step, self.vae_stream)
            host = self.pinned[self.decoded % len(self.pinned)]   # the session waits before a slot comes round
            self.decoded += 1
            host.copy_(self.frames_u8, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.vae_stream)
        return Frames(host, done)

    # ------------------------------------------------------------------ per-step host work (no syncs)
    def prepare(self, sp) -> None:
        """Stage the step's noise, positions and ring-write slots in the static buffers (reference RNG order)."""
        st, B = self.state, self.B
        self.window[:, :, -B:].copy_(st.fresh_block(sp.fresh_block))        # drawn first, as the reference does
        for k in range(len(self.draws)):
            torch.randn(self.eps[k].shape, generator=st.generator, out=self.eps[k])
        main, cp = sp.passes[0], sp.cache_pass
        if st.stream.use_style_anchor:
            self.anchor_cache.set([main.relative(cp.anchor_position)])
        if self.W:
            self.ring_pos.set([main.relative(f) for f in st.cache.slot_frame])
            s_f = st.cfg.tokens_per_frame
            for j, (slot, _) in enumerate(st.cache.begin_history_write(cp.frames)):   # device to device copies
                self.ring_idx[j * s_f:(j + 1) * s_f].copy_(self.slot_rows[slot])

    # ------------------------------------------------------------------ the captured computations
    def _prefix(self, anchor: _DeviceRope):
        st, use_anchor = self.state, self.state.stream.use_style_anchor
        anchor_rope = anchor.rope() if use_anchor else None
        ring_rope = self.ring_pos.rope() if self.W else None
        cache, cap = st.cache, st.cache.tokens_per_frame * self.W
        rotate = _rotate(self.dit.use_kernels)

        def prefix(i):
            a = (rotate(cache.anchor_k[i], anchor_rope), cache.anchor_v[i]) if use_anchor else None
            r = (rotate(cache.ring_k[i], ring_rope), cache.ring_v[i]) if self.W else None
            return Prefix(anchor=a, ring=r, ring_start=0, ring_len=cap if self.W else 0)
        return prefix

    def _dit_step(self) -> None:
        st, B, dit = self.state, self.B, self.dit
        x = self.window
        k = 0
        prefix = self._prefix(self.anchor_main)
        for n in range(self.N):
            flow = dit(x, self.y_window, self.t[n], self.audio_rows, st.context_kv, self.rope_window, prefix=prefix)
            x0 = (x.double() - self.sigma[n] * flow.double()).to(x.dtype)
            blocks = []
            for draw_pass, pos, _ in self.draws:
                if draw_pass != n:
                    continue
                eps = self.eps[k].permute(1, 0, 2, 3).unsqueeze(0)[:, :, pos * B:(pos + 1) * B]
                sig = self.renoise_sigma[k]
                blocks.append(((1 - sig) * x0[:, :, pos * B:(pos + 1) * B].float() + sig * eps.float()).to(x.dtype))
                k += 1
            if n < self.N - 1:
                x = torch.cat(blocks, dim=2)
        self.out_block.copy_(x0[:, :, :B])
        self.window[:, :, :-B].copy_(torch.cat(blocks, dim=2))      # blocks 1 .. L-1 move one place left
        rows = self.audio_rows[:, :st.cfg.audio_frames_per_latent * B]
        sink = self._ring_sink if self.W else None
        dit(self.out_block, self.y_block, self.t_cache, rows, st.context_kv, self.rope_block,
            prefix=self._prefix(self.anchor_cache), kv_sink=sink)

    def _ring_sink(self, layer: int, k: Tensor, v: Tensor) -> None:
        src = (self.B - self.n_write) * self.state.cfg.tokens_per_frame          # the block's last W frames
        self.state.cache.ring_k[layer].index_copy_(1, self.ring_idx, k[:, src:])
        self.state.cache.ring_v[layer].index_copy_(1, self.ring_idx, v[:, src:])

    def _decode_step(self) -> None:
        st = self.state
        frames = st.decode_cache.step(self.decoder, self.z_static.to(st.vae_dtype))
        self.frames_u8.copy_(frames_to_uint8(frames))

    # ------------------------------------------------------------------ CUDA graphs
    def _replay(self, name: str, fn, stream) -> None:
        """Run a step on `stream`: eagerly without graphs; on CUDA eagerly for WARMUP calls (on the side stream),
        then captured once and replayed. Every call computes the step on the current inputs."""
        if not self.use_graphs:
            fn()
            return
        graph = self._graphs.get(name)
        if graph is None:
            side = self.side_stream
            side.wait_stream(stream)
            if self._eager_calls[name] < WARMUP:
                self._eager_calls[name] += 1
                with torch.cuda.stream(side):
                    fn()
                stream.wait_stream(side)
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):        # records the step; nothing runs yet
                fn()
            stream.wait_stream(side)
            self._graphs[name] = graph
        with torch.cuda.stream(stream):
            graph.replay()

    # ------------------------------------------------------------------ hand-over with the reference path
    def load_window(self, noisy: dict, blocks) -> None:
        """Take the first L - 1 noisy blocks of the next window (after reference steps)."""
        B = self.B
        for i, b in enumerate(blocks[:-1]):
            self.window[:, :, i * B:(i + 1) * B].copy_(noisy[b])

    def store_window(self, noisy: dict, blocks) -> None:
        """Give the noisy blocks back (before a reference step, e.g. the tail)."""
        B = self.B
        for i, b in enumerate(blocks):
            noisy[b] = self.window[:, :, i * B:(i + 1) * B].clone()


def _rotate(use_kernels: bool):
    if use_kernels:
        from .kernels.rope import rope_rotate
        return lambda k, rope: rope_rotate(k, rope.axes)
    from .rope import apply_rope
    return lambda k, rope: apply_rope(k, *rope.full)
