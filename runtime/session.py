"""StreamSession: audio in, uint8 video frames out, one window step at a time.

A session is created by `AvatarPipeline.session(image, stream=, text=, seed=)`. At creation it encodes the
reference image, computes the text cross-attention K/V and runs the anchor pass (reference latent at t = 0, zero
audio, mask 0) once to fill the style anchor (step.py `StreamState`). Then:

    frames = sess.push_audio(pcm)   # any chunk size; runs every step the audio allows; uint8 [T, H, W, 3]
    frames = sess.flush()           # end of audio: pads the last block with silence, runs the tail windows
    sess.stats()                    # counters and per-stage wall time

Frame contract (see the README): video frame 0 is the decoded reference latent; video frame v >= 1 is driven by
audio frame v - 1 (samples [640(v-1), 640 v) at 16 kHz / 25 fps); a stream of A audio frames (the last partial one
zero-padded) yields 1 + A video frames. A frame is returned as soon as the window that finalises it has run; that
window needs audio up to (L - 1) blocks past the frame's own block: the look-ahead.

The session owns the audio (raw PCM through the pipeline's feature extractor, or feature rows given by the caller)
and the schedule (which window can run, which audio is no longer needed). Each step goes to its executor: the
reference step (step.py, any backend) or the static-shape engine (engine.py, CUDA graphs), which hands the
windows it does not handle to the reference step. One stream's data flows session -> executor -> backends.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import StreamConfig, check_seed
from .media import check_sample_rate, validate_pcm
from .scheduler import StepPlan, build_plan, step_plan
from .step import PINNED_SLOTS, Frames, ReferenceStep, StreamState, TorchDiT


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
                 inference: bool = True, dit=None, decoder=None):
        seed = check_seed(seed)
        if noise not in ("stream", "official"):
            raise ValueError(f"noise={noise!r}: expected 'stream' or 'official'")
        if noise == "official" and num_latent_frames is None:
            raise ValueError("noise='official' draws all noise up front and needs num_latent_frames")
        self.pipe, self.cfg, self.stream, self.seed = pipe, pipe.config, stream, seed
        # inference=False (training rollouts): plain no-grad steps and ordinary tensors, so that a caller can run
        # one more pass with autograd on over the session's caches; the default uses inference mode.
        self._no_grad = torch.inference_mode if inference else torch.no_grad
        self.fixed_frames = num_latent_frames
        if num_latent_frames is not None:
            build_plan(stream, num_latent_frames)            # validates the length early
            full = 1 + (num_latent_frames - 1) * self.cfg.audio_frames_per_latent
            self.frame_limit = full if frame_limit is None else min(frame_limit, full)
        self._features_given = features
        self.on_block = None        # optional hook(block index, x0 latents [1, 16, B, h, w]) for parity tools
        # Backends: the PyTorch DiT and decoder unless others are given (export.backend's ONNX Runtime / TensorRT
        # graphs: `pipe.session(image, **ort_backends(DIR))`); same plan, caches and noise either way.
        decoder = pipe.decoder if decoder is None else decoder
        torch_backends = dit is None and decoder is pipe.decoder
        self.dit = TorchDiT(pipe.dit, pipe.device) if dit is None else dit
        # Steady-state steps go through the static-shape engine (engine.py): by default on CUDA only. It runs the
        # PyTorch modules, so other backends run every step on the reference path.
        use_engine = (pipe.device.type == "cuda") if engine is None else bool(engine)
        if use_engine and not torch_backends:
            if engine:
                raise ValueError("engine=True runs the PyTorch DiT and decoder; it cannot run other backends")
            use_engine = False
        with self._no_grad():
            self.state = StreamState(pipe, image, stream, text=text, seed=seed, fit=fit, decoder=decoder,
                                     noise=noise, num_latent_frames=num_latent_frames)
            self.reference = ReferenceStep(self.state, self.dit, decoder)
            if stream.anchor_audio == "zero":
                zeros = torch.zeros(1, self.cfg.audio_frames_per_latent, self.cfg.audio_input_dim)
                self.reference.anchor_pass(zeros)
        self.engine = None
        if use_engine:
            from .engine import Engine
            self.engine = Engine(self.state, self.reference, pipe.dit, decoder, compile=compile)
        self.executor = self.engine or self.reference       # where each step and decode goes
        self.reset()

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        """Start a new stream from the same reference, text and seed (the style anchor is kept)."""
        with self._no_grad():                  # the session's buffers are inference tensors
            self.state.reset()
            self.executor.reset()
            self.source = None                 # created by the first push_audio / push_features
            self.audio_frames_in = self.samples_in = 0
            if self._features_given is not None:
                self.source = FeatureTable(self.cfg.audio_input_dim)
                self.source.push(self._features_given)
                self.audio_frames_in = self.frame_limit - 1
            self.next_window = self.frames_out = 0
            self.num_blocks: int | None = None
            self.flushed = False
            self._pending = [self.executor.decode(self.state.z_ref)]   # frame 0: the reference reconstruction

    def push_audio(self, pcm, sample_rate: int = 16000) -> Tensor:
        """Append float32 mono 16 kHz samples (any length; sample_rate an int in Hz); returns the frames finalised
        by them. Levels follow runtime.media.load_audio: peaks up to 4x full scale are clipped, beyond refused."""
        self._check_open()
        if check_sample_rate(sample_rate) != self.cfg.sample_rate:
            raise ValueError(f"push_audio got {sample_rate} Hz audio; the stream takes {self.cfg.sample_rate} Hz mono. "
                             "Resample first, e.g. runtime.media.load_audio(array, sample_rate=...)")
        pcm = validate_pcm(pcm, self.cfg.sample_rate, allow_empty=True)
        if self.source is None:
            audio = self.pipe.streaming_audio(self.stream)
            audio.keep_device = self.executor.audio_on_device    # the engine takes rows where they were computed
            self.source = StreamingFeatures(audio)
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
        st = self.state
        return dict(
            frames_out=self.frames_out, steps=st.counts["steps"], main_passes=st.counts["main"],
            cache_passes=st.counts["cache"], audio_frames_in=self.audio_frames_in,
            lookahead_frames=self.stream.lookahead_video_frames(self.cfg.audio_frames_per_latent),
            kv_bytes=st.cache.nbytes, decoder_cache_bytes=st.decode_cache.nbytes(),
            ms={k: round(v * 1e3, 3) for k, v in st.timings.items()},
        )

    def rows(self, start: int, stop: int) -> Tensor:
        """Feature rows [1, stop - start, A] of the zero-prefixed table (row r = audio frame r - 1), on the
        compute device in the model dtype: what a step with `audio_rows == (start, stop)` reads."""
        rows = self.source.rows(start, stop)
        if rows.shape[-1] != self.cfg.audio_input_dim:
            raise ValueError(f"audio features have width {rows.shape[-1]}, the model expects "
                             f"{self.cfg.audio_input_dim}")
        return rows.to(device=self.state.device, dtype=self.state.dtype).unsqueeze(0)

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
            sp = step_plan(self.stream, self.next_window, n_blocks, self.state.levels_t)
            if self.source is None or self.source.available_frames < sp.passes[0].audio_rows[1] - 1:
                break
            with self._no_grad():
                block = self._step(sp)
                if block is not None:
                    items.append(self.executor.decode(block))
                    if sum(i.event is not None for i in items) >= PINNED_SLOTS - 1:   # keep pinned slots free
                        items = [Frames(i.wait()) for i in items]
            self.next_window += 1
        out = [i.wait() for i in items]                      # waits for in-flight GPU frames
        frames = torch.cat(out) if out else torch.empty(0, self.cfg.height, self.cfg.width, 3, dtype=torch.uint8)
        self.frames_out += len(frames)
        return frames

    def _step(self, sp: StepPlan) -> Tensor | None:
        """One window: its audio rows, the step on the executor, the emitted block to the hook, audio released."""
        if self.stream.anchor_audio == "first" and not self.state.anchor_done:
            self.reference.anchor_pass(self.rows(1, 1 + self.cfg.audio_frames_per_latent))
        with self.state.timed("audio"):
            rows = self.executor.audio(lambda: self.rows(*sp.passes[0].audio_rows))
        block = self.executor.run(sp, rows)
        if block is not None and self.on_block is not None:
            self.on_block(sp.emit, block)
        self.source.release(self._first_needed_audio_frame(sp))
        return block

    def _first_needed_audio_frame(self, sp: StepPlan) -> int:
        """Audio frames before this one are never needed again (the next window starts later)."""
        next_first_block = max(0, sp.index + 2 - self.stream.window_blocks)
        first_frame = 1 + self.stream.block_frames * next_first_block
        return self.cfg.audio_frames_per_latent * (first_frame - 1)
