"""StreamSession: the readable reference loop. Audio in, uint8 video frames out, one window step at a time.

A session is created by `AvatarPipeline.session(image, stream=, text=, seed=)`. At creation it encodes the
reference image, runs the anchor pass (reference latent at t = 0, zero audio, mask 0) once to fill the style anchor,
and computes the text cross-attention K/V once. Then:

    frames = sess.push_audio(pcm)   # any chunk size; runs every step the audio allows; uint8 [T, H, W, 3]
    frames = sess.flush()           # end of audio: pads the last block with silence, runs the tail windows
    sess.stats()                    # counters and per-stage wall time

Frame contract (see the README): video frame 0 is the decoded reference latent; video frame v >= 1 is driven by
audio frame v - 1 (samples [640(v-1), 640 v) at 16 kHz / 25 fps); a stream of A audio frames (the last partial one
zero-padded) yields 1 + A video frames. A frame is returned as soon as the window that finalises it has run; that
window needs audio up to (L - 1) blocks past the frame's own block: the look-ahead.

Noise comes from one seeded torch.Generator on the compute device, drawn in the model dtype: a fresh block's noise
[B, 16, h, w] when it enters the window, then per re-noised block one draw shaped like the whole window's x0
(official `randn_like`), in increasing block order. With `noise="official"` and a known length, all fresh noise is
drawn up front as one tensor, which is the official draw order (`generate(audio_mode="clip")` uses it).

This file is the reference; engine.py is the same math with static buffers, CUDA graphs and streams.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .config import StreamConfig, check_seed
from .kv_cache import DualAnchorCache
from .media import check_sample_rate, frames_to_uint8, prepare_image, validate_pcm
from .rope import Rope
from .scheduler import StepPlan, build_plan, sigma_for, step_plan, warped_timesteps

# Frames in flight to pinned host memory before the session waits for the oldest (engine.py allocates as many).
PINNED_SLOTS = 8


# Largest |value| accepted in a pushed feature row. Real encoder output stays far below it: the toy-talker's
# normalised log-mel rows peak at 3.2 (full-scale clipped noise; 2.3 on speech), and wav2vec2-base's rows are
# LayerNorm outputs of width 768, so |x| <= sqrt(767) |gain| + |bias| (27.7 at unit gain; 5.0 measured with
# random weights on speech): reaching 1e3 takes a LayerNorm gain near 36. And it stays below the overflow of the
# model dtype: the rows are cast to it, float16 tops out at 65504, and the toy-talker's first audio Linear
# overflows float16 from max |x| = 65504 / max_j ||W_j||_1 = 3701 on rows of one sign (black frames measured at
# 1e4, correct frames at 1e3); float32 and bfloat16 held up to 1e10 and broke by 1e20. Beyond: a scaling bug.
FEATURE_LIMIT = 1e3


def check_features(feats, width: int) -> Tensor:
    """Feature rows [T, width] (tensor, numpy array or nested lists of real numbers) -> a tensor, or a clear error."""
    if isinstance(feats, (str, bytes)):
        raise TypeError(f"features must be numbers [T, {width}] (a tensor or numpy array), got a "
                        f"{type(feats).__name__}: {feats[:40]!r}")
    if not isinstance(feats, Tensor):
        try:
            array = np.asarray(feats)
        except ValueError as err:                       # ragged nested lists
            raise ValueError(f"features must be a rectangular [T, {width}] array: {err}") from None
        if array.dtype.kind not in "iuf":
            held = {"U": "strings", "S": "bytes", "O": "Python objects", "b": "booleans", "c": "complex numbers"}
            raise TypeError(f"features must be real numbers [T, {width}], got a {type(feats).__name__} of "
                            f"{held.get(array.dtype.kind, array.dtype.name)} (numpy dtype {array.dtype}); pass a float "
                            f"tensor or numpy array")
        feats = torch.tensor(array)                     # a copy: read-only or strided arrays are fine
    if feats.dtype == torch.bool or feats.is_complex():
        raise TypeError(f"features must be real numbers [T, {width}], got dtype {feats.dtype}; pass float rows")
    if not feats.is_floating_point():
        feats = feats.double()                          # integer rows: exact, and abs() works on every int type
    if feats.ndim != 2 or feats.shape[1] != width:
        raise ValueError(f"features must be [T, {width}], got {tuple(feats.shape)}")
    if not feats.numel():
        return feats.float()
    peak = float(feats.abs().max())      # in the given dtype (1e300 in float64 is no inf); NaN propagates
    if not math.isfinite(peak):
        raise ValueError(f"features contain NaN or inf ({int((~torch.isfinite(feats)).sum())} values); check the "
                         f"encoder's input and output")
    if peak > FEATURE_LIMIT:
        raise ValueError(f"features reach |x| = {peak:.4g}, beyond {FEATURE_LIMIT:g}: far above any audio encoder's "
                         f"output (wav2vec2 hidden states and the toy-talker's normalised log-mel stay within ~30). "
                         f"Pass the encoder's rows unscaled (e.g. hidden states, not logits or squared values)")
    return feats.float()


class FeatureTable:
    """Feature rows given up front (clip mode) or pushed by the caller; row r >= 1 is audio frame r - 1."""

    def __init__(self, width: int):
        self.width = width
        self.table = torch.zeros(0, width)
        self.offset = 0                    # absolute audio frame of table[0] (earlier rows were released)

    @property
    def available_frames(self) -> int:
        return self.offset + self.table.shape[0]

    def push(self, rows: Tensor) -> None:
        self.table = torch.cat([self.table, rows.to(self.table.dtype)])

    def pad_to(self, frames: int) -> None:
        if frames > self.available_frames:
            self.push(torch.zeros(frames - self.available_frames, self.width))

    def rows(self, start: int, stop: int) -> Tensor:
        return self.table[start - 1 - self.offset:stop - 1 - self.offset]

    def release(self, before_frame: int) -> None:
        drop = before_frame - self.offset
        if drop > 0:
            self.table = self.table[drop:].clone()
            self.offset = before_frame


class StreamingFeatures:
    """Per-window features from a streaming audio encoder: each window's rows come from the audio up to its end."""

    def __init__(self, streaming_audio):
        self.audio = streaming_audio
        self.width = streaming_audio.width

    @property
    def available_frames(self) -> int:
        return self.audio.available_frames

    def push_pcm(self, pcm) -> None:
        self.audio.push(pcm)

    def pad_to(self, frames: int) -> None:
        self.audio.pad_to(frames)

    def rows(self, start: int, stop: int) -> Tensor:
        return self.audio.features(start - 1, stop - 1)

    def release(self, before_frame: int) -> None:
        self.audio.release(before_frame)


class StreamSession:
    def __init__(self, pipe, image, *, stream: StreamConfig, text="", seed: int = 0, fit: str = "error",
                 features: Tensor | None = None, num_latent_frames: int | None = None, noise: str = "stream",
                 frame_limit: int | None = None, engine: bool | None = None, compile: bool = False,
                 inference: bool = True, backend: str = "torch", onnx_dir=None):
        seed = check_seed(seed)
        if noise not in ("stream", "official"):
            raise ValueError(f"noise={noise!r}: expected 'stream' or 'official'")
        if noise == "official" and num_latent_frames is None:
            raise ValueError("noise='official' draws all noise up front and needs num_latent_frames")
        self.pipe, self.cfg, self.stream, self.seed = pipe, pipe.config, stream, seed
        # inference=False (training rollouts): plain no-grad steps and ordinary tensors, so that a caller can run
        # one more pass with autograd on over the session's caches; the default uses inference mode.
        self._no_grad = torch.inference_mode if inference else torch.no_grad
        self.device, self.dtype = pipe.device, pipe.dtype
        self.noise_order, self.fixed_frames = noise, num_latent_frames
        if num_latent_frames is not None:
            build_plan(stream, num_latent_frames)            # validates the length early
            full = 1 + (num_latent_frames - 1) * self.cfg.audio_frames_per_latent
            self.frame_limit = full if frame_limit is None else min(frame_limit, full)
        self.levels_t = warped_timesteps(stream)
        self._features_given = features
        self.on_block = None        # optional hook(block index, x0 latents [1, 16, B, h, w]) for parity tools
        # Steady-state steps go through the static-shape engine (engine.py): by default on CUDA only.
        self.use_engine = (pipe.device.type == "cuda") if engine is None else bool(engine)
        self.compile_engine = compile
        self.engine = None
        # backend "ort": the DiT calls and the decoder run on exported ONNX graphs (export/, `python -m
        # export.build_engine`) through ONNX Runtime; same plan, caches and noise as the PyTorch path.
        self.external_dit, self.decoder = None, pipe.decoder
        if backend == "ort":
            if onnx_dir is None:
                raise ValueError("backend='ort' needs onnx_dir: a directory written by `python -m export.build_engine`")
            from export.backend import ExportedDecoder, ExportedDiT       # optional extra: onnxruntime
            self.external_dit = ExportedDiT.from_onnx(onnx_dir)
            self.decoder = ExportedDecoder.from_onnx(onnx_dir)
            self.use_engine = False
        elif backend != "torch":
            raise ValueError(f"backend={backend!r}: expected 'torch' or 'ort'")
        self.timings: dict[str, float] = defaultdict(float)
        with self._no_grad(), self._timed("setup"):
            self._encode_reference(image, fit)
            self.context_kv = pipe.dit.context_kv(pipe.encode_text(text).unsqueeze(0))
            self.cache = DualAnchorCache(num_layers=self.cfg.num_layers, batch=1, grid_hw=self.cfg.grid_hw,
                                         history_frames=stream.history_frames, num_heads=self.cfg.num_heads,
                                         head_dim=self.cfg.head_dim, dtype=self.dtype, device=self.device)
            self._rope_cache: dict = {}
            self._anchor_done = False
            if stream.anchor_audio == "zero":
                self._anchor_pass(torch.zeros(1, self.cfg.audio_frames_per_latent, self.cfg.audio_input_dim))
        self.reset()

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        """Start a new stream from the same reference, text and seed (the style anchor is kept)."""
        with self._no_grad():                  # the session's buffers are inference tensors
            self._reset()

    def _reset(self) -> None:
        self.cache.reset()
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        if getattr(self, "decode_cache", None) is None:
            self.decode_cache = self.decoder.init_decode_cache(1, self.pipe.vae_dtype, self.device,
                                                               self.cfg.height, self.cfg.width)
        else:
            self.decode_cache.reset()          # same buffers: captured CUDA graphs stay valid
        self._engine_live = False              # whether the engine's window buffer holds the noisy blocks
        self.source = None                # created by the first push_audio / push_features
        self.audio_frames_in = self.samples_in = 0
        if self._features_given is not None:
            self.source = FeatureTable(self.cfg.audio_input_dim)
            self.source.push(self._features_given)
            self.audio_frames_in = self.frame_limit - 1
        self.noisy: dict[int, Tensor] = {}
        self.next_window = self.frames_out = 0
        self.num_blocks: int | None = None
        self.flushed = False
        self.counts = defaultdict(int)
        self._pending = [self._decode(self.z_ref)]       # frame 0: the reference reconstruction
        self._fresh_noise = None
        if self.noise_order == "official":
            n = self.fixed_frames - 1                      # official: randn([N-1, 16, h, w]) before the loop
            self._fresh_noise = self._randn((n, self.cfg.vae_z_dim, *self.cfg.latent_hw))

    def push_audio(self, pcm, sample_rate: int = 16000) -> Tensor:
        """Append float32 mono 16 kHz samples (any length; sample_rate an int in Hz); returns the frames finalised
        by them. Levels follow runtime.media.load_audio: peaks up to 4x full scale are clipped, beyond refused."""
        self._check_open()
        if check_sample_rate(sample_rate) != self.cfg.sample_rate:
            raise ValueError(f"push_audio got {sample_rate} Hz audio; the stream takes {self.cfg.sample_rate} Hz mono. "
                             "Resample first, e.g. runtime.media.load_audio(array, sample_rate=...)")
        pcm = validate_pcm(pcm, self.cfg.sample_rate, allow_empty=True)
        if self.source is None:
            self.source = StreamingFeatures(self.pipe.streaming_audio(self.stream))
        if not isinstance(self.source, StreamingFeatures):
            raise RuntimeError("this session takes features (push_features); it cannot also take raw audio")
        self.source.push_pcm(pcm)
        self.samples_in += len(pcm)
        self.audio_frames_in = math.ceil(self.samples_in / self.cfg.samples_per_frame)
        return self._advance()

    def push_features(self, feats: Tensor) -> Tensor:
        """Append feature rows [T, audio_input_dim] (one per audio frame) from the caller's own encoder: a real
        tensor or numpy array (or nested lists of numbers), finite, |x| <= FEATURE_LIMIT."""
        self._check_open()
        feats = check_features(feats, self.cfg.audio_input_dim)
        if self.source is None:
            self.source = FeatureTable(self.cfg.audio_input_dim)
        if not isinstance(self.source, FeatureTable):
            raise RuntimeError("this session takes raw audio (push_audio); it cannot also take features")
        self.source.push(feats.float())
        self.audio_frames_in += feats.shape[0]
        return self._advance()

    def flush(self) -> Tensor:
        """End of audio: run the remaining windows (the last block padded with silence) and return the rest."""
        self._check_open()
        if self.audio_frames_in == 0:
            raise ValueError("no audio was pushed before flush(); push at least one audio frame (40 ms)")
        per_block = self.stream.block_frames * self.cfg.audio_frames_per_latent
        if self.fixed_frames is None:
            self.num_blocks = math.ceil(self.audio_frames_in / per_block)
            limit = 1 + self.audio_frames_in          # the frames the audio drives, plus frame 0
        else:
            limit = self.frame_limit
        self.source.pad_to(self._known_blocks() * per_block)
        self.flushed = True
        before = self.frames_out
        frames = self._advance()[:max(0, limit - before)]   # frames driven only by the padding are dropped
        self.frames_out = before + len(frames)
        return frames

    def stats(self) -> dict:
        return dict(
            frames_out=self.frames_out, steps=self.counts["steps"], main_passes=self.counts["main"],
            cache_passes=self.counts["cache"], audio_frames_in=self.audio_frames_in,
            lookahead_frames=self.stream.lookahead_video_frames(self.cfg.audio_frames_per_latent),
            kv_bytes=self.cache.nbytes, decoder_cache_bytes=self.decode_cache.nbytes(),
            ms={k: round(v * 1e3, 3) for k, v in self.timings.items()},
        )

    # ------------------------------------------------------------------ scheduling
    def _check_open(self) -> None:
        if self.flushed:
            raise RuntimeError("this stream was flushed; call reset() to start a new one")

    def _known_blocks(self) -> int | None:
        if self.fixed_frames is not None:
            return (self.fixed_frames - 1) // self.stream.block_frames
        return self.num_blocks

    def _advance(self) -> Tensor:
        """Run every window whose audio is available; return the frames they finalise (plus pending ones)."""
        items, self._pending = list(self._pending), []
        n_blocks = self._known_blocks()
        last_window = None if n_blocks is None else n_blocks + self.stream.window_blocks - 2
        while last_window is None or self.next_window <= last_window:
            sp = step_plan(self.stream, self.next_window, n_blocks, self.levels_t)
            if self.source is None or self.source.available_frames < sp.passes[0].audio_rows[1] - 1:
                break
            with self._no_grad():
                block = self._run_step(sp)
                if block is not None:         # on CUDA every block decodes through the engine's graph
                    items.append(self.engine.decode(block) if self.engine is not None else self._decode(block))
                    if sum(not isinstance(i, Tensor) for i in items) >= PINNED_SLOTS - 1:
                        items = [i if isinstance(i, Tensor) else i.wait() for i in items]
            self.next_window += 1
        out = [i if isinstance(i, Tensor) else i.wait() for i in items]     # waits for in-flight GPU frames
        frames = torch.cat(out) if out else torch.empty(0, self.cfg.height, self.cfg.width, 3, dtype=torch.uint8)
        self.frames_out += len(frames)
        return frames

    # ------------------------------------------------------------------ the step
    def _run_step(self, sp: StepPlan) -> Tensor | None:
        self.counts["steps"] += 1
        if self.stream.anchor_audio == "first" and not self._anchor_done:
            self._anchor_pass(self._audio(1, 1 + self.cfg.audio_frames_per_latent))
        if self.use_engine and self._engine().handles(sp):
            return self._run_engine_step(sp)
        if self._engine_live:                 # back to the reference path (the tail): take the blocks back
            self.engine.store_window(self.noisy, [b for b in sp.blocks if b != sp.fresh_block])
            self._engine_live = False
        if sp.fresh_block is not None:
            self.noisy[sp.fresh_block] = self._fresh_block(sp.fresh_block)
        start, stop = sp.passes[0].audio_rows
        with self._timed("audio"):
            audio = self._audio(start, stop)
        x = torch.cat([self.noisy[b] for b in sp.blocks], dim=2)           # [1, 16, F, h, w]
        B = self.stream.block_frames
        for n, pp in enumerate(sp.passes):
            with self._timed("dit_main"):
                x0 = self._dit_pass(x, pp, audio)
            self.counts["main"] += 1
            for b, level in sp.renoise[n]:                                 # official: fresh eps per block
                eps = self._randn((x0.shape[2], *x0.shape[1:2], *x0.shape[3:])).permute(1, 0, 2, 3).unsqueeze(0)
                i = sp.blocks.index(b) * B
                self.noisy[b] = self._add_noise(x0[:, :, i:i + B], eps[:, :, i:i + B], self.levels_t[level])
            if n < len(sp.passes) - 1:
                x = torch.cat([self.noisy[b] for b in sp.blocks], dim=2)
        if sp.emit is None:
            return None
        block = x0[:, :, :B]
        if self.on_block is not None:
            self.on_block(sp.emit, block)
        self.noisy.pop(sp.emit, None)
        if sp.cache_pass is not None:
            cp = sp.cache_pass
            rows = audio[:, cp.audio_rows[0] - start:cp.audio_rows[1] - start]
            self.cache.begin_history_write(cp.frames)
            with self._timed("dit_cache"):
                self._dit_pass(block, cp, rows, sink=self.cache.write_history)
            self.cache.end_history_write()
            self.counts["cache"] += 1
        self.source.release(self._first_needed_audio_frame(sp))
        return block

    def _engine(self):
        if self.engine is None:
            from .engine import Engine
            self.engine = Engine(self, compile=self.compile_engine)
        return self.engine

    def _run_engine_step(self, sp: StepPlan) -> Tensor:
        """A steady-state step through the static-shape engine (same math as the lines below)."""
        if not self._engine_live:
            self.engine.load_window(self.noisy, sp.blocks)
            self.noisy.clear()
            self._engine_live = True
        start, stop = sp.passes[0].audio_rows
        with self._timed("audio"):
            audio = self._engine_audio(start, stop)
        with self._timed("engine_step"):
            block = self.engine.run(sp, audio)
        self.counts["main"] += len(sp.passes)
        self.counts["cache"] += 1
        if self.on_block is not None:
            self.on_block(sp.emit, block)
        self.source.release(self._first_needed_audio_frame(sp))
        return block

    def _engine_audio(self, start: int, stop: int) -> Tensor:
        """The window's feature rows; on CUDA computed on the engine's audio stream (features stay on the device)."""
        engine = self.engine
        if not engine.cuda:
            return self._audio(start, stop)
        if isinstance(self.source, StreamingFeatures):
            self.source.audio.keep_device = True
        with torch.cuda.stream(engine.audio_stream):
            audio = self._audio(start, stop)
        engine.dit_stream.wait_stream(engine.audio_stream)
        audio.record_stream(engine.dit_stream)     # allocated on the audio stream, read on the DiT stream
        return audio

    def _first_needed_audio_frame(self, sp: StepPlan) -> int:
        """Audio frames before this one are never needed again (the next window starts later)."""
        next_first_block = max(0, sp.index + 2 - self.stream.window_blocks)
        first_frame = 1 + self.stream.block_frames * next_first_block
        return self.cfg.audio_frames_per_latent * (first_frame - 1)

    def _dit_pass(self, x: Tensor, pp, audio: Tensor, sink=None) -> Tensor:
        """One DiT call; returns x0 = x_t - sigma(t) v, computed in float64 and cast back (official)."""
        frames = len(pp.frames)
        rope = self._rope([pp.relative(f) for f in pp.frames])
        anchor_rope = self._rope([pp.relative(pp.anchor_position)]) if self.stream.use_style_anchor else None
        ring = self.cache.ring_window(pp.history)
        ring_rope = self._rope([pp.relative(f) if f is not None else 0 for f in self.cache.slot_frame]) \
            if ring[1] else None
        kernels = self.pipe.dit.use_kernels
        t = torch.tensor([pp.timesteps], dtype=torch.float32, device=self.device)
        if self.external_dit is not None:
            flow = self.external_dit(
                x, self._y(frames), t, audio, self.context_kv, cache=self.cache,
                frames=[pp.relative(f) for f in pp.frames],
                anchor=pp.relative(pp.anchor_position) if self.stream.use_style_anchor else None,
                ring=[pp.relative(f) if f is not None and f in pp.history else None for f in self.cache.slot_frame],
                kv_sink=sink)
            if flow is None:              # a steady cache pass: the graph computed only the K/V it hands the sink
                return None
        else:
            flow = self.pipe.dit(x, self._y(frames), t, audio, self.context_kv, rope,
                                 prefix=lambda i: self.cache.prefix(i, anchor_rope, ring_rope, ring, kernels),
                                 kv_sink=sink)
        sigma = torch.tensor([sigma_for(s, self.stream.shift) for s in pp.timesteps], dtype=torch.float64,
                             device=self.device).view(1, 1, frames, 1, 1)
        return (x.double() - sigma * flow.double()).to(self.dtype)

    def _anchor_pass(self, audio_rows: Tensor) -> None:
        """The reference latent at t = 0, mask 0, attending to itself; fills the style anchor K/V."""
        rope = self._rope([0])
        y = torch.cat([self.z_ref, torch.zeros_like(self.z_ref[:, :1])], dim=1)
        t = torch.zeros(1, 1, device=self.device)
        audio = audio_rows.to(device=self.device, dtype=self.dtype).reshape(1, -1, self.cfg.audio_input_dim)
        if self.external_dit is not None:
            self.external_dit(self.z_ref, y, t, audio, self.context_kv, cache=self.cache, frames=[0], anchor=None,
                              ring=[None] * self.cache.capacity, kv_sink=self.cache.write_anchor)
        else:
            self.pipe.dit(self.z_ref, y, t, audio, self.context_kv, rope, kv_sink=self.cache.write_anchor)
        self._anchor_done = True

    # ------------------------------------------------------------------ helpers
    def _encode_reference(self, image, fit: str) -> None:
        pixels = prepare_image(image, self.cfg.height, self.cfg.width, fit=fit)          # [3, H, W] in [-1, 1]
        video = pixels.to(device=self.device, dtype=self.pipe.vae_dtype)[None, :, None]  # [1, 3, 1, H, W]
        self.z_ref = self.pipe.vae.encode(video).to(self.dtype)                          # [1, 16, 1, h, w]
        ones = torch.ones_like(self.z_ref[:, :1])
        self._y_one = torch.cat([self.z_ref, ones], dim=1)                               # [1, 17, 1, h, w]

    def _y(self, frames: int) -> Tensor:
        """Conditioning for window frames (all >= 1): reference latent + mask 1."""
        return self._y_one.expand(-1, -1, frames, -1, -1)

    def _rope(self, frames) -> Rope:
        """Rope tables for latent frames at these (relative) positions, cached: most steps repeat them."""
        key = tuple(frames)
        if len(self._rope_cache) > 64:
            # official mode puts the cache-pass anchor at absolute frame 0, so its relative position changes
            # every step: keep the table cache small instead of growing with the stream
            self._rope_cache.clear()
        if key not in self._rope_cache:
            self._rope_cache[key] = Rope(key, self.cfg.grid_hw, self.cfg.head_dim, self.device)
        return self._rope_cache[key]

    def _audio(self, start: int, stop: int) -> Tensor:
        rows = self.source.rows(start, stop)
        if rows.shape[-1] != self.cfg.audio_input_dim:
            raise ValueError(f"audio features have width {rows.shape[-1]}, the model expects "
                             f"{self.cfg.audio_input_dim}")
        return rows.to(device=self.device, dtype=self.dtype).unsqueeze(0)              # [1, rows, A]

    def _randn(self, shape) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def _fresh_block(self, block: int) -> Tensor:
        B = self.stream.block_frames
        if self._fresh_noise is not None:
            eps = self._fresh_noise[B * block:B * (block + 1)]
        else:
            eps = self._randn((B, self.cfg.vae_z_dim, *self.cfg.latent_hw))
        return eps.permute(1, 0, 2, 3).unsqueeze(0)                                        # [1, 16, B, h, w]

    def _add_noise(self, x0: Tensor, eps: Tensor, t: float) -> Tensor:
        """(1 - sigma) x0 + sigma eps in float32, cast to the noise dtype (official add_noise)."""
        s = torch.tensor(sigma_for(t, self.stream.shift), dtype=torch.float32, device=self.device)
        return ((1 - s) * x0.float() + s * eps.float()).to(eps.dtype)

    def _decode(self, latents: Tensor) -> Tensor:
        with self._timed("decode"), self._no_grad():
            video = self.decoder.decode_step(latents.to(self.pipe.vae_dtype), self.decode_cache)
            return frames_to_uint8(video).cpu()

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - start

