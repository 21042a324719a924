"""3-D rotary position embedding of the Wan DiT, in real arithmetic, from explicit positions.

Wan splits each head's D channels into D/2 interleaved pairs (2j, 2j+1): the first D - 4(D//6) channels rotate with
the latent-frame index, the next 2(D//6) with the token row, the last 2(D//6) with the token column (22/21/21 pairs
at D = 128). Pair j of a token at position p turns by p * omega[j], omega = 10000^(-2j / axis_dim), i.e.

    out[2j]   = x[2j] cos(theta_j) - x[2j+1] sin(theta_j)
    out[2j+1] = x[2j] sin(theta_j) + x[2j+1] cos(theta_j)

which is the official complex product x_c * polar(1, theta). Angles are computed in float64 from the positions
(no 1,024-row table, so no ceiling), cos/sin are cast to float32, and the rotation runs in float32 and is cast back.
The rotation is written with `torch.stack(...).flatten(-2)`: that exports to plain ONNX ops (no ScatterND).

Not here: which positions a token gets (scheduler.py decides; kv_cache.py re-indexes the anchor).
"""
from __future__ import annotations

import torch
from torch import Tensor

THETA = 10000.0


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, row, col): (22, 21, 21) at head_dim 128."""
    side = head_dim // 6
    return (head_dim - 4 * side) // 2, side, side


def inv_freqs(head_dim: int) -> Tensor:
    """omega [D/2] float64: per-axis `1 / theta^(2j / axis_dim)` concatenated (time, row, col)."""
    parts = []
    for pairs in axis_pairs(head_dim):
        axis_dim = 2 * pairs
        parts.append(1.0 / torch.pow(THETA, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
    return torch.cat(parts)


def grid_positions(frames, grid_hw: tuple[int, int]) -> Tensor:
    """Positions [S, 3] (frame, row, col) int64 of every token of the given latent frames, frame-major order.

    `frames` is an iterable of (possibly negative or huge) frame positions; rows/cols run 0..grid-1.
    """
    gh, gw = grid_hw
    f = torch.as_tensor(list(frames), dtype=torch.int64)
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([f.view(-1, 1, 1).expand(-1, gh, gw),
                       r.expand(len(f), gh, gw), c.expand(len(f), gh, gw)], dim=-1)
    return pos.reshape(-1, 3)


def rope_angles(positions: Tensor, head_dim: int) -> Tensor:
    """theta [S, D/2] float64 for positions [S, 3]."""
    t_pairs, h_pairs, _ = axis_pairs(head_dim)
    omega = inv_freqs(head_dim)
    pos = positions.to(torch.float64)
    axis = torch.cat([torch.zeros(t_pairs, dtype=torch.long), torch.ones(h_pairs, dtype=torch.long),
                      torch.full((head_dim // 2 - t_pairs - h_pairs,), 2, dtype=torch.long)])
    return pos[:, axis] * omega          # [S, D/2]


def rope_cos_sin(positions: Tensor, head_dim: int, device=None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each [S, D/2] float32 on `device`, from float64 angles."""
    theta = rope_angles(positions, head_dim)
    return theta.cos().to(device=device, dtype=torch.float32), theta.sin().to(device=device, dtype=torch.float32)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, S, N_h, D] by per-token tables [S, D/2]; float32 inside, result in x.dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))          # [B, S, N_h, D/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]           # broadcast over heads
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


def rotate_time(x: Tensor, delta: float, head_dim: int) -> Tensor:
    """Move already-rotated keys x [B, S, N_h, D] by `delta` latent frames: only the time pairs turn.

    Rotations compose additively, so this equals re-applying RoPE at frame + delta (the row/col pairs stay).
    """
    t_pairs = axis_pairs(head_dim)[0]
    theta = torch.zeros(head_dim // 2, dtype=torch.float64)
    theta[:t_pairs] = delta * inv_freqs(head_dim)[:t_pairs]
    cos = theta.cos().to(device=x.device, dtype=torch.float32).expand(x.shape[1], -1)
    sin = theta.sin().to(device=x.device, dtype=torch.float32).expand(x.shape[1], -1)
    return apply_rope(x, cos, sin)


def axis_tables(frames, grid_hw: tuple[int, int], head_dim: int, device=None) -> tuple[Tensor, ...]:
    """Per-axis float32 tables for the kernels: (cos_t [F, P_t], sin_t, cos_h [G_h, P_h], sin_h, cos_w [G_w, P_w],
    sin_w), angles in float64. Row i of the time table belongs to the i-th frame of the call, whatever its position."""
    t_pairs, h_pairs, _ = axis_pairs(head_dim)
    omega = inv_freqs(head_dim)
    parts = ((torch.as_tensor(list(frames), dtype=torch.float64), omega[:t_pairs]),
             (torch.arange(grid_hw[0], dtype=torch.float64), omega[t_pairs:t_pairs + h_pairs]),
             (torch.arange(grid_hw[1], dtype=torch.float64), omega[t_pairs + h_pairs:]))
    out = []
    for pos, om in parts:
        theta = torch.outer(pos, om)
        out += [theta.cos().to(device=device, dtype=torch.float32).contiguous(),
                theta.sin().to(device=device, dtype=torch.float32).contiguous()]
    return tuple(out)


class Rope:
    """The positions of one call's tokens (latent frames on the token grid) with both table forms, built once:
    `full` = (cos, sin) [S, D/2] for `apply_rope`, `axes` = per-axis tables for the Triton kernels.
    Tables that already exist (e.g. computed on the device inside a CUDA graph) can be passed in directly."""

    def __init__(self, frames=None, grid_hw=None, head_dim=None, device=None, *, full=None, axes=None):
        self.frames = tuple(frames) if frames is not None else None
        self.grid_hw, self.head_dim, self.device = grid_hw, head_dim, device
        self._full, self._axes = full, axes

    @property
    def full(self) -> tuple[Tensor, Tensor]:
        if self._full is None:
            self._full = rope_cos_sin(grid_positions(self.frames, self.grid_hw), self.head_dim, self.device)
        return self._full

    @property
    def axes(self) -> tuple[Tensor, ...]:
        if self._axes is None:
            self._axes = axis_tables(self.frames, self.grid_hw, self.head_dim, self.device)
        return self._axes

    def __iter__(self):          # `cos, sin = rope` keeps working where a plain table pair is expected
        return iter(self.full)
