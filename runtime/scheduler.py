"""Flow-matching noise levels and the B_{L,N} window plan, as data.

Noise levels: the official `FlowMatchScheduler(shift, extra_one_step=True)` table of 1,000 float32 sigmas
sigma_i = s u / (1 + (s-1) u), u = linspace(1, 0, 1001)[:-1], timestep = 1000 sigma; the configured steps are
warped onto it (`cat(timesteps, [0])[1000 - step]`), so (1000, 800, 400, 200) with shift 5 becomes
(1000, 952.381, 769.231, 555.556). Any timestep t maps to the sigma of the nearest table entry (the official
argmin), which is what x0 = x_t - sigma v and the re-noising use.

The plan: latent frame 0 is the reference (the style anchor); block b holds latent frames 1 + B b .. B + B b.
Window wi = 0 .. n_blocks + L - 2 covers blocks max(0, wi - L + 1) .. min(n_blocks - 1, wi); block b sits at
level j = wi - b (0 = newest, noisiest). Each step runs N passes; pass n of a block at level j uses noise level
j N + n. After the last pass the oldest block (j = L - 1) is emitted and written to the temporal cache by a pass
at t = cache_pass_t; every other block is re-noised to its next level with fresh noise. Positions: the main pass
puts the anchor at u + d (u = first history frame), the history before the window; the cache pass does the same
or ("official") puts the anchor at absolute frame 0. All positions in the plan are absolute latent frames; the
session subtracts the anchor's main-pass position so that every computation is window-relative.

Dead work of the official loop is not planned: the cache passes before the first emission and after the last,
and the main pass's cache write (they never change the output).

Not here: tensors, models, caches. This file is pure Python so the plan can be printed, tested and exported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .config import StreamConfig


# ------------------------------------------------------------------------------------------ noise levels
@lru_cache(maxsize=8)
def _table(shift: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) float32 [steps], noisiest first, exactly as the official training table."""
    u = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = shift * u / (1 + (shift - 1) * u)
    return sigmas, sigmas * steps


def warped_timesteps(cfg: StreamConfig) -> tuple[float, ...]:
    """The stream's noise levels as model timesteps (float32 values as Python floats), noisiest first."""
    if not cfg.warp:
        return tuple(float(s) for s in cfg.denoise_steps)
    _, timesteps = _table(cfg.shift, cfg.num_train_timesteps)
    extended = torch.cat([timesteps, torch.zeros(1)])
    return tuple(float(extended[cfg.num_train_timesteps - s]) for s in cfg.denoise_steps)


def sigma_for(t: float, shift: float, steps: int = 1000) -> float:
    """sigma (float32 value) of the table entry nearest to timestep t (argmin in float64, as official)."""
    sigmas, timesteps = _table(shift, steps)
    idx = int(torch.argmin((timesteps.double() - float(t)).abs()))
    return float(sigmas[idx])


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class PassPlan:
    """One DiT call over consecutive latent frames."""
    frames: tuple[int, ...]          # absolute latent frames of the queries
    timesteps: tuple[float, ...]     # per query frame
    history: tuple[int, ...]         # absolute latent frames attended as temporal anchor (oldest first)
    anchor_position: int             # absolute RoPE frame of the style anchor
    origin: int                      # subtracted from every position (the main pass's anchor position)
    audio_rows: tuple[int, int]      # [start, stop) rows of the zero-prefixed feature table (row r = audio frame r-1)

    def relative(self, frame: int) -> int:
        return frame - self.origin


@dataclass(frozen=True)
class StepPlan:
    index: int                       # window index wi
    blocks: tuple[int, ...]          # blocks in the window, oldest first
    levels: tuple[int, ...]          # level j of each block (wi - b)
    fresh_block: int | None          # block entering the window with fresh noise this step
    passes: tuple[PassPlan, ...]     # N main passes
    # per pass: the (block, next noise-level index) pairs re-noised after it, in increasing block order
    renoise: tuple[tuple[tuple[int, int], ...], ...]
    emit: int | None                 # block whose x0 is final after this step
    cache_pass: PassPlan | None      # writes the emitted block's K/V into the temporal cache


@dataclass(frozen=True)
class Plan:
    config: StreamConfig
    num_latent_frames: int           # reference frame included
    timesteps: tuple[float, ...]     # the L*N noise levels as model timesteps
    steps: tuple[StepPlan, ...] = field(repr=False)

    @property
    def num_blocks(self) -> int:
        return (self.num_latent_frames - 1) // self.config.block_frames


def block_frames(cfg: StreamConfig, block: int) -> tuple[int, ...]:
    return tuple(range(1 + cfg.block_frames * block, 1 + cfg.block_frames * (block + 1)))


def audio_rows(frames, frames_per_latent: int = 4) -> tuple[int, int]:
    """Feature rows of consecutive latent frames: frame 0 -> row 0 (zero prefix), frame k -> 4k-3 .. 4k."""
    first, last = frames[0], frames[-1]
    start = 0 if first == 0 else frames_per_latent * (first - 1) + 1
    return start, frames_per_latent * last + 1


def history_for(cfg: StreamConfig, first_frame: int) -> tuple[int, ...]:
    """The clean frames before `first_frame` that the temporal anchor holds (at most history_frames)."""
    if not cfg.use_temporal_anchor:
        return ()
    w = min(cfg.history_frames, first_frame - 1)
    return tuple(range(first_frame - w, first_frame))


def step_plan(cfg: StreamConfig, wi: int, num_blocks: int | None, levels_t: tuple[float, ...]) -> StepPlan:
    """Plan of window `wi`. `num_blocks=None` means the stream's end is not known yet (no tail window)."""
    L, N, B = cfg.window_blocks, cfg.passes, cfg.block_frames
    last_block = wi if num_blocks is None else min(num_blocks - 1, wi)
    blocks = tuple(range(max(0, wi - L + 1), last_block + 1))
    levels = tuple(wi - b for b in blocks)
    frames = tuple(f for b in blocks for f in block_frames(cfg, b))
    history = history_for(cfg, frames[0])
    u = history[0] if history else frames[0]
    anchor = u + cfg.anchor_offset if cfg.reindex_anchor else 0
    passes, renoise = [], []
    for n in range(N):
        ts = tuple(levels_t[j * N + n] for j in levels for _ in range(B))
        passes.append(PassPlan(frames, ts, history, anchor, anchor, audio_rows(frames)))
        last_pass = n == N - 1
        # after the last pass the oldest block is final; every other block moves to its next level
        renoise.append(tuple((b, j * N + n + 1) for b, j in zip(blocks, levels)
                             if not (last_pass and j == L - 1)))
    emit = blocks[0] if levels[0] == L - 1 else None
    cache = None
    is_last = num_blocks is not None and emit == num_blocks - 1
    if emit is not None and not is_last:
        bf = block_frames(cfg, emit)
        cache_anchor = 0 if cfg.anchor_in_cache_pass == "official" or not cfg.reindex_anchor else anchor
        cache = PassPlan(bf, (float(cfg.cache_pass_t),) * B, history, cache_anchor, anchor, audio_rows(bf))
    fresh = last_block if levels[-1] == 0 else None
    return StepPlan(wi, blocks, levels, fresh, tuple(passes), tuple(renoise), emit, cache)


def build_plan(cfg: StreamConfig, num_latent_frames: int) -> Plan:
    """The whole plan for a clip of `num_latent_frames` latent frames (1 + B * n_blocks)."""
    if num_latent_frames < 1 + cfg.block_frames or (num_latent_frames - 1) % cfg.block_frames:
        raise ValueError(f"num_latent_frames={num_latent_frames} must be 1 + {cfg.block_frames} * n with n >= 1 "
                         f"(the reference frame plus whole blocks of {cfg.block_frames})")
    n_blocks = (num_latent_frames - 1) // cfg.block_frames
    levels_t = warped_timesteps(cfg)
    steps = tuple(step_plan(cfg, wi, n_blocks, levels_t) for wi in range(n_blocks + cfg.window_blocks - 1))
    return Plan(cfg, num_latent_frames, levels_t, steps)
