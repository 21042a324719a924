"""Dual-anchor KV cache: the style anchor (one reference frame) and a ring of recent clean frames.

Per layer it holds, preallocated at session start and written in place:
    anchor_k, anchor_v   [N_layers, B, S_f, N_h, D]        K after RMSNorm and BEFORE RoPE, V
    ring_k,   ring_v     [N_layers, B, W * S_f, N_h, D]    the last W clean latent frames (K before RoPE)
Shapes never change after construction; which ring slot holds which absolute latent frame is host-side Python
bookkeeping (no device counters, no `.item()`). Keys are stored un-rotated and rotated to the positions of each
call, so positions are relative to the current context: a step at stream position 10^6 computes exactly what the
same step at position 10 computes, and there is no 1,024-frame table to run off.

The window's own K/V are not kept (the official main-pass write is dead: the cache pass overwrites it first).

Not here: which positions each call uses (scheduler.py) and the attention itself (dit.py / kernels).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dit import Prefix
from .rope import Rope, apply_rope


class DualAnchorCache:
    def __init__(self, *, num_layers: int, batch: int, grid_hw: tuple[int, int], history_frames: int,
                 num_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.grid_hw, self.head_dim = grid_hw, head_dim
        self.tokens_per_frame = grid_hw[0] * grid_hw[1]
        self.capacity = history_frames
        shape = (num_layers, batch, self.tokens_per_frame, num_heads, head_dim)
        ring = (num_layers, batch, history_frames * self.tokens_per_frame, num_heads, head_dim)
        self.anchor_k = torch.zeros(shape, dtype=dtype, device=device)
        self.anchor_v = torch.zeros(shape, dtype=dtype, device=device)
        self.ring_k = torch.zeros(ring, dtype=dtype, device=device)
        self.ring_v = torch.zeros(ring, dtype=dtype, device=device)
        self.slot_frame: list[int | None] = [None] * history_frames   # absolute latent frame per ring slot
        self._next_slot = 0
        self._pending: list[tuple[int, int]] = []   # (slot, offset of the frame in the incoming block)

    # -- bookkeeping --
    def reset(self) -> None:
        """Forget the history (the anchor stays: it depends only on the reference image and text)."""
        self.slot_frame = [None] * self.capacity
        self._next_slot = 0
        self._pending = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.anchor_k, self.anchor_v, self.ring_k, self.ring_v))

    def slots_of(self, frames) -> list[int]:
        """Ring slots holding `frames` (raises if one is not cached: a plan/cache mismatch is a bug)."""
        where = {f: s for s, f in enumerate(self.slot_frame) if f is not None}
        missing = [f for f in frames if f not in where]
        if missing:
            raise RuntimeError(f"latent frames {missing} are not in the temporal cache (holds {self.slot_frame})")
        return [where[f] for f in frames]

    # -- writes (used as DiT kv sinks) --
    def write_anchor(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.anchor_k[layer].copy_(k)
        self.anchor_v[layer].copy_(v)

    def begin_history_write(self, frames) -> list[tuple[int, int]]:
        """Reserve ring slots for the last W of `frames` (a block about to go through the cache pass); returns the
        (slot, offset of the frame in the block) pairs that `write_history` will copy."""
        keep = list(frames)[-self.capacity:] if self.capacity else []
        offset = len(frames) - len(keep)
        self._pending = []
        for i, f in enumerate(keep):
            self._pending.append((self._next_slot, offset + i))
            self._next_slot = (self._next_slot + 1) % self.capacity
        self._pending_frames = keep
        return list(self._pending)

    def write_history(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Sink for the cache pass: copy the reserved frames of k, v [B, F * S_f, N_h, D] into the ring."""
        s = self.tokens_per_frame
        for slot, i in self._pending:
            self.ring_k[layer, :, slot * s:(slot + 1) * s].copy_(k[:, i * s:(i + 1) * s])
            self.ring_v[layer, :, slot * s:(slot + 1) * s].copy_(v[:, i * s:(i + 1) * s])

    def end_history_write(self) -> None:
        for (slot, _), f in zip(self._pending, self._pending_frames):
            self.slot_frame[slot] = f
        self._pending = []

    # -- reads --
    def ring_window(self, frames) -> tuple[int, int]:
        """(first slot, count) of the ring slots holding `frames` in order; they are contiguous modulo capacity
        because the history is always the most recent writes."""
        slots = self.slots_of(frames)
        if any(s != (slots[0] + i) % self.capacity for i, s in enumerate(slots)):
            raise RuntimeError(f"history frames {list(frames)} are not contiguous in the ring {self.slot_frame}")
        return (slots[0] if slots else 0), len(slots)

    def ring_rope(self, relative, device) -> Rope:
        """Positions of every ring slot in physical order (`relative(frame)`; empty slots at 0)."""
        frames = [relative(f) if f is not None else 0 for f in self.slot_frame]
        return Rope(frames, self.grid_hw, self.head_dim, device)

    def prefix(self, layer: int, anchor_rope: Rope | None, ring_rope: Rope | None, ring: tuple[int, int],
               use_kernels: bool = False) -> Prefix | None:
        """Style anchor and history of one layer, rotated to this call's positions, as separate segments.
        `anchor_rope=None` leaves the anchor out; `ring` = (first slot, count) from `ring_window`."""
        s = self.tokens_per_frame
        rotate = _rotate_kernel if use_kernels else _rotate_ref
        anchor = None
        if anchor_rope is not None:
            anchor = (rotate(self.anchor_k[layer], anchor_rope), self.anchor_v[layer])
        ring_kv = None
        if ring[1]:
            ring_kv = (rotate(self.ring_k[layer], ring_rope), self.ring_v[layer])
        if anchor is None and ring_kv is None:
            return None
        return Prefix(anchor=anchor, ring=ring_kv, ring_start=ring[0] * s, ring_len=ring[1] * s)


def _rotate_ref(k: Tensor, rope: Rope) -> Tensor:
    return apply_rope(k, *rope.full)


def _rotate_kernel(k: Tensor, rope: Rope) -> Tensor:
    from .kernels.rope import rope_rotate
    return rope_rotate(k, rope.axes)
