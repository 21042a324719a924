"""The bidirectional flow-matching teacher of the toy-talker, and its Euler sampler (with exact-level recording).

The teacher is the runtime's own AvatarDiT (toy-talker preset) called on one sequence
    [anchor = clean reference latent, t = 0, zero audio, mask 0 | F latent frames at one noise level sigma]
with RoPE frames 0..F and full (bidirectional) attention. Target: the flow v = eps - x0 (Wan's convention), so
x0 = x_t - sigma v. The text context is a learned one-token embedding (`TextEmbedding`), kept with the weights
so that the very same DiT with cross-attention runs in the runtime.

Training (the plan's recipe): F = 4 (70%) or 6, sigma half from shift-5(U) and half U(0, 1), 10% audio dropout
(for audio CFG), AdamW with warm-up, gradient clipping, an EMA copy. Sampling: Euler on the shift-5 grid.

Not here: data (train/data.py), distillation (train/distill.py).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from runtime.dit import AvatarDiT
from runtime.rope import Rope

SHIFT = 5.0


class TextEmbedding(nn.Module):
    """A learned text context [1, text_len, text_dim] (the toy-talker has no text encoder)."""

    def __init__(self, text_len: int, text_dim: int):
        super().__init__()
        self.context = nn.Parameter(torch.randn(1, text_len, text_dim) * 0.02)


def randn(shape, generator: torch.Generator, device) -> Tensor:
    """Standard normal noise drawn from a CPU generator, then moved to `device`: the training stages draw their
    noise this way, so a run on a GPU sees the numbers a CPU run with the same seed sees."""
    return torch.randn(shape, generator=generator).to(device)


def shift(sigma: Tensor, s: float = SHIFT) -> Tensor:
    return s * sigma / (1 + (s - 1) * sigma)


def sample_sigma(batch: int, generator: torch.Generator) -> Tensor:
    """Half shift-5(U(0, 1)) (Wan's training shift), half U(0, 1); [batch] float32."""
    u = torch.rand(batch, generator=generator)
    shifted = torch.rand(batch, generator=generator) < 0.5
    return torch.where(shifted, shift(u), u).clamp(1e-3, 1.0)


def conditioning(ref: Tensor, frames: int) -> Tensor:
    """y [B, 17, 1 + frames, h, w]: the reference latent everywhere, mask 0 on the anchor and 1 elsewhere."""
    B, C, _, h, w = ref.shape
    mask = torch.ones(B, 1, 1 + frames, h, w, dtype=ref.dtype, device=ref.device)
    mask[:, :, 0] = 0
    return torch.cat([ref.expand(-1, -1, 1 + frames, -1, -1), mask], 1)


def flow(dit: AvatarDiT, text: TextEmbedding, x: Tensor, y: Tensor, t: Tensor, audio: Tensor,
         positions, mask: Tensor | None = None) -> Tensor:
    """One DiT call over a whole sequence (anchor included) at RoPE frames `positions`."""
    cfg = dit.cfg
    rope = Rope(positions, cfg.grid_hw, cfg.head_dim, x.device)
    ctx = dit.context_kv(text.context.expand(x.shape[0], -1, -1))
    return dit(x, y, t, audio, ctx, rope, mask=mask)


def teacher_flow(dit, text, ref: Tensor, xt: Tensor, sigma: Tensor, audio: Tensor) -> Tensor:
    """v for F noisy frames xt [B, 16, F, h, w] at per-sample sigma [B] given the reference and audio rows
    [B, 4F, A] (the anchor's zero rows are added here). Returns v for the F frames."""
    B, _, frames = xt.shape[:3]
    x = torch.cat([ref, xt], 2)
    t = torch.cat([torch.zeros(B, 1, device=xt.device), (sigma.to(xt.device) * 1000).view(B, 1).expand(B, frames)], 1)
    rows = torch.cat([torch.zeros(B, 4, audio.shape[-1], dtype=audio.dtype, device=audio.device), audio], 1)
    return flow(dit, text, x, conditioning(ref, frames), t, rows, range(frames + 1))[:, :, 1:]


def teacher_loss(dit, text, batch: dict, generator: torch.Generator, audio_dropout: float = 0.1) -> Tensor:
    """Flow-matching loss on a batch {ref [B,16,1,h,w], x0 [B,16,F,h,w], audio [B,4F,A]}."""
    x0, audio = batch["x0"], batch["audio"]
    B = x0.shape[0]
    sigma = sample_sigma(B, generator).to(x0.device)
    eps = randn(x0.shape, generator, x0.device)
    xt = (1 - sigma.view(B, 1, 1, 1, 1)) * x0 + sigma.view(B, 1, 1, 1, 1) * eps
    keep = (torch.rand(B, generator=generator) >= audio_dropout).float().view(B, 1, 1).to(x0.device)
    v = teacher_flow(dit, text, batch["ref"], xt, sigma, audio * keep)
    return (v - (eps - x0)).pow(2).mean()


def euler_grid(steps: int) -> Tensor:
    """Shift-5 sigmas from 1 to 0 (steps + 1 values), as Wan's samplers space them."""
    return torch.cat([shift(torch.linspace(1.0, 0.0, steps + 1)[:-1]), torch.zeros(1)])


@torch.no_grad()
def sample(dit, text, ref: Tensor, audio: Tensor, frames: int, generator: torch.Generator, steps: int = 8,
           cfg_scale: float = 1.0, record_levels: tuple[float, ...] = ()) -> tuple[Tensor, dict]:
    """Euler-sample F frames jointly. Returns x0 [B,16,F,h,w] and {level: x_t exactly at sigma = level}: a level
    inside a segment [s_k, s_k+1) gets the partial Euler step x_k + (level - s_k) v_k (not the nearest grid point).
    `cfg_scale` > 1 applies classifier-free guidance on the audio (zero rows as the unconditional input)."""
    B, C, _, h, w = ref.shape
    x = randn((B, C, frames, h, w), generator, ref.device)
    grid = euler_grid(steps)
    recorded = {}
    for k in range(steps):
        s, s_next = float(grid[k]), float(grid[k + 1])
        sig = torch.full((B,), s, device=ref.device)
        v = teacher_flow(dit, text, ref, x, sig, audio)
        if cfg_scale != 1.0:
            v_uncond = teacher_flow(dit, text, ref, x, sig, torch.zeros_like(audio))
            v = v_uncond + cfg_scale * (v - v_uncond)
        for level in record_levels:
            if s >= level > s_next and level not in recorded:
                recorded[level] = x + (level - s) * v
        x = x + (s_next - s) * v
    return x, recorded


class EMA:
    """Exponential moving average of a model's parameters (the teacher that is used is the EMA)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - self.decay)


def warmup_lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
