"""The AvatarForcing DiT: Wan 2.1 blocks with a 33-channel input, per-frame timesteps and additive audio.

One call denoises a window of F latent frames. Inputs (shape vocabulary in the README):
    x      [B, 16, F, h, w]   noisy latents (~N(0,1) at t = 1000)
    y      [B, 17, F, h, w]   conditioning: reference latent repeated over F, then a mask (0 on the anchor frame)
    t      [B, F]             per-frame timesteps in [0, 1000], non-integer allowed
    audio  [B, 4F, A]         audio feature rows, 4 per latent frame (AudioPack input)
    rope   (cos, sin)         [S, D/2] tables for the window's S = F * tokens_per_frame tokens (rope.py)
and returns the flow v [B, 16, F, h, w] (x0 = x_t - sigma * v is the caller's business).

Self-attention attends to caller-provided prefix K/V (the style anchor and temporal history, already rotated)
followed by the window's own K/V, and can hand the window's K (after RMSNorm, before RoPE) and V to a sink so a
cache can store them. Numerics follow the module dtype: in bf16 this is the official computation (everything bf16,
RMSNorm statistics in fp32, RoPE angles in fp64, sinusoid in fp64 then bf16); in fp32 everything is fp32.

Not here: window plans, caches, x0 conversion, VAE, audio/text encoders. Parameter names equal the official
`CausalWanModel` state dict (857 keys for wan-1.3b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import HAS_TRITON

from .config import ModelConfig
from .rope import apply_rope

# The Triton kernels replace the hot paths when triton and a GPU are both present; `model.use_kernels`
# overrides this per model (the tests turn it on under the CPU interpreter).
KERNELS_AVAILABLE = HAS_TRITON and torch.cuda.is_available()


@dataclass
class Prefix:
    """Keys/values a call attends to before its own window, already rotated to the call's positions.

    anchor: (k, v) [B, S_a, N_h, D] or None; ring: (k, v) [B, cap, N_h, D] or None, of which rows
    (ring_start + i) % cap for i < ring_len are valid (a ring whose valid part wraps needs no copy).
    """
    anchor: Optional[tuple[Tensor, Tensor]] = None
    ring: Optional[tuple[Tensor, Tensor]] = None
    ring_start: int = 0
    ring_len: int = 0

    def concat(self) -> Optional[tuple[Tensor, Tensor]]:
        """[anchor | valid ring rows in order] as one (k, v) pair (the reference path)."""
        ks, vs = [], []
        if self.anchor is not None:
            ks.append(self.anchor[0])
            vs.append(self.anchor[1])
        if self.ring is not None and self.ring_len:
            cap = self.ring[0].shape[1]
            idx = (self.ring_start + torch.arange(self.ring_len, device=self.ring[0].device)) % cap
            ks.append(self.ring[0][:, idx])
            vs.append(self.ring[1][:, idx])
        if not ks:
            return None
        return (torch.cat(ks, 1), torch.cat(vs, 1)) if len(ks) > 1 else (ks[0], vs[0])


# (layer, k_pre [B, S, N_h, D], v [B, S, N_h, D]) -> None
KVSink = Callable[[int, Tensor, Tensor], None]
# layer -> Prefix, a plain (k_rotated, v) pair, or None
KVPrefix = Callable[[int], Optional[Prefix]]


class RMSNorm(nn.Module):
    """Wan RMSNorm over the last dim: statistics in fp32, result cast back, then scaled by `weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm in the input dtype (the official bf16 path has no fp32 island here)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, S, N_h, D] layouts; `mask` [S_q, S_k] bool (True = attend)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class _Projections(nn.Module):
    """q, k, v, o linears and the q/k RMSNorms shared by self- and cross-attention (Wan's key names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(_Projections):
    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k after RMSNorm (before RoPE) and v, each [B, S, N_h, D]."""
        shape = (*x.shape[:2], self.num_heads, self.head_dim)
        return self.norm_q(self.q(x)).view(shape), self.norm_k(self.k(x)).view(shape), self.v(x).view(shape)

    def forward(self, x, rope, prefix=None, mask=None, use_kernels: bool = False):
        if use_kernels and mask is None:
            return self._forward_kernels(x, rope, prefix)
        q, k, v = self.qkv(x)
        cos, sin = rope
        keys, values = apply_rope(k, cos, sin), v
        if isinstance(prefix, Prefix):
            prefix = prefix.concat()
        if prefix is not None:                         # [anchor | history] before the window
            keys, values = torch.cat([prefix[0], keys], 1), torch.cat([prefix[1], values], 1)
        out = attention(apply_rope(q, cos, sin), keys, values, mask)
        return self.o(out.flatten(2)), k, v

    def _forward_kernels(self, x, rope, prefix):
        """Fused q/k RMSNorm + RoPE, then attention over the prefix segments and the window without a concat."""
        from .kernels.ring_attention import ring_attention
        from .kernels.rope import qk_norm_rope
        v = self.v(x).view(*x.shape[:2], self.num_heads, self.head_dim)
        q_rot, k_rot, k_pre = qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight,
                                           rope.axes, self.num_heads, self.norm_q.eps)
        if prefix is not None and not isinstance(prefix, Prefix):
            prefix = Prefix(anchor=prefix)
        prefix = prefix or Prefix()
        anchor = prefix.anchor or (None, None)
        ring = prefix.ring or (None, None)
        out = ring_attention(q_rot, k_rot, v, anchor_k=anchor[0], anchor_v=anchor[1], ring_k=ring[0],
                             ring_v=ring[1], ring_start=prefix.ring_start, ring_len=prefix.ring_len)
        return self.o(out.flatten(2)), k_pre, v


class CrossAttention(_Projections):
    """Text cross-attention; K/V depend only on the text, so `context_kv` is computed once per session."""

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        shape = (*context.shape[:2], self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        q = self.norm_q(self.q(x)).view(*x.shape[:2], self.num_heads, self.head_dim)
        return self.o(attention(q, *kv).flatten(2))


def per_frame(x: Tensor, frames: int) -> Tensor:
    """[B, S, C] -> [B, F, S/F, C] so per-frame modulation [B, F, 1, C] broadcasts over a frame's tokens."""
    return x.unflatten(1, (frames, x.shape[1] // frames))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, rope, context_kv, prefix=None, mask=None, audio=None, use_kernels=False):
        """x [B, S, C], e0 [B, F, 6, C], audio [B, F, C] or None (added to x first) -> (x, k_pre, v)."""
        frames = e0.shape[1]
        # shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn; each [B, F, 1, C]
        m = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)
        if use_kernels:
            from .kernels.audio_inject import audio_inject
            x, h = audio_inject(x, m[0].squeeze(2), m[1].squeeze(2), audio, self.norm1.eps)
        else:
            if audio is not None:          # residual-stream add, broadcast over the frame's tokens
                x = (audio.unsqueeze(2) + per_frame(x, frames)).flatten(1, 2)
            h = (per_frame(self.norm1(x), frames) * (1 + m[1]) + m[0]).flatten(1, 2)
        y, k, v = self.self_attn(h, rope, prefix, mask, use_kernels)
        x = x + (per_frame(y, frames) * m[2]).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), context_kv)
        if use_kernels:
            h = audio_inject(x, m[3].squeeze(2), m[4].squeeze(2), None, self.norm2.eps)[1]
        else:
            h = (per_frame(self.norm2(x), frames) * (1 + m[4]) + m[3]).flatten(1, 2)
        x = x + (per_frame(self.ffn(h), frames) * m[5]).flatten(1, 2)
        return x, k, v


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, S, C], e [B, F, C] (time embedding, not its projection) -> [B, F, S/F, prod(patch) * out]."""
        m = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)   # shift, scale: [B, F, 1, C]
        return self.head(per_frame(self.norm(x), e.shape[1]) * (1 + m[1]) + m[0])


class AudioPack(nn.Module):
    """4 audio rows per latent frame -> Linear(4A -> hidden) -> LayerNorm (keys `audio_proj.proj/norm_out`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rows = cfg.audio_frames_per_latent
        self.proj = nn.Linear(self.rows * cfg.audio_input_dim, cfg.audio_hidden)
        self.norm_out = nn.LayerNorm(cfg.audio_hidden, eps=cfg.audio_norm_eps)

    def forward(self, audio: Tensor) -> Tensor:
        # [B, 4F, A] -> [B, F, 4A] with index t * A + c (the official "(T t) -> T (t c)" rearrange)
        packed = audio.unflatten(1, (-1, self.rows)).flatten(2)
        return self.norm_out(self.proj(packed))


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[N] timesteps -> [N, dim] float64, cos first (Wan `sinusoidal_embedding_1d`)."""
    half = dim // 2
    pos = t.to(torch.float64)
    ang = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half)))
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


class AvatarDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.audio_proj = AudioPack(cfg)
        self.audio_cond_projs = nn.ModuleList(nn.Linear(cfg.audio_hidden, dim) for _ in range(cfg.num_audio_projs))
        self.use_kernels = KERNELS_AVAILABLE

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @staticmethod
    def audio_layer(block_index: int, num_layers: int) -> Optional[int]:
        """Which audio projection is added before `block_index` (blocks 2 .. num_layers // 2), or None."""
        return block_index - 2 if 1 < block_index <= num_layers // 2 else None

    # -- per-session and per-call embeddings --
    def context_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Text context [B, L_txt, text_dim] (zero-padded to text_len here) -> per-layer cross-attention K/V."""
        pad = self.cfg.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"text context has {context.shape[1]} tokens, more than text_len={self.cfg.text_len}")
        context = F.pad(context.to(self.dtype), (0, 0, 0, pad))
        ctx = self.text_embedding(context)
        return [blk.cross_attn.context_kv(ctx) for blk in self.blocks]

    def time_embed(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t [B, F] -> e [B, F, C] (for the head) and e0 [B, F, 6, C] (block modulation)."""
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.cfg.freq_dim).to(self.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape)

    def audio_tokens(self, audio: Tensor) -> list[Tensor]:
        """audio rows [B, 4F, A] -> one [B, F, C] token per injected block."""
        packed = self.audio_proj(audio.to(self.dtype))
        return [proj(packed) for proj in self.audio_cond_projs]

    def patchify(self, x: Tensor, y: Tensor) -> Tensor:
        """[B, 16, F, h, w] + [B, 17, F, h, w] -> tokens [B, S, C], frame-major then row then column."""
        return self.patch_embedding(torch.cat([x, y], dim=1).to(self.dtype)).flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Head output [B, F, S_f, p_t*p_h*p_w*c] -> [B, c, F*p_t, h, w] (channel last inside a patch)."""
        pt, ph, pw = self.cfg.patch_size
        f, gh, gw = grid
        c = self.cfg.out_dim
        u = out.reshape(out.shape[0], f, gh, gw, pt, ph, pw, c)                  # b f h w p q r c
        # -> b c f p h q w r (a plain transpose; the official einsum, without an 8-D Einsum node in exports)
        return u.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], c, f * pt, gh * ph, gw * pw)

    def forward(self, x: Tensor, y: Tensor, t: Tensor, audio: Tensor, context_kv, rope,
                prefix: Optional[KVPrefix] = None, kv_sink: Optional[KVSink] = None,
                mask: Optional[Tensor] = None, time_embeddings: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Flow prediction v [B, 16, F, h, w] for one window (see the module docstring for shapes).
        `time_embeddings` = (e, e0) computed elsewhere (an exported graph takes the float64 sinusoid from the host)
        replaces `t`."""
        grid = (x.shape[2] // self.cfg.patch_size[0], x.shape[3] // self.cfg.patch_size[1],
                x.shape[4] // self.cfg.patch_size[2])
        tokens = self.patchify(x, y)
        e, e0 = time_embeddings if time_embeddings is not None else self.time_embed(t)
        audio_tok = self.audio_tokens(audio)
        kernels = self.use_kernels and mask is None
        for i, block in enumerate(self.blocks):
            a = self.audio_layer(i, len(self.blocks))
            tokens, k, v = block(tokens, e0, rope, context_kv[i], prefix(i) if prefix else None, mask,
                                 audio_tok[a] if a is not None else None, kernels)
            if kv_sink is not None:
                kv_sink(i, k, v)
        return self.unpatchify(self.head(tokens, e), grid)

    # -- cost model (used by benchmarks) --
    def step_flops(self, q_tokens: int, kv_tokens: int, frames: int) -> int:
        """Forward FLOPs of one call with q_tokens queries over kv_tokens keys (matmuls only)."""
        cfg, d = self.cfg, self.cfg.dim
        per_block = (2 * q_tokens * d * d * 4            # q, k, v, o
                     + 2 * 2 * q_tokens * kv_tokens * d  # q k^T and p v
                     + 2 * q_tokens * d * d * 2          # cross-attn q, o
                     + 2 * 2 * q_tokens * cfg.text_len * d
                     + 2 * 2 * q_tokens * d * cfg.ffn_dim)
        outside = 2 * q_tokens * (cfg.in_dim * math.prod(cfg.patch_size) * d + d * math.prod(cfg.patch_size) * 16)
        return cfg.num_layers * per_block + outside + 2 * frames * d * 6 * d


def init_random_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic random init on the module's own device: U(+-1/sqrt(fan_in)) weights, unit norms,
    modulation tables ~ N(0, 1/dim) as the official init. Fast for a 1.4 B model on a GPU."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            params = dict(mod.named_parameters(recurse=False))
            norm_like = isinstance(mod, (nn.LayerNorm, RMSNorm, nn.GroupNorm))
            weight = params.get("weight")
            fan_in = weight[0].numel() if weight is not None and weight.ndim >= 2 else None
            for name, p in params.items():
                if norm_like or name == "gamma":
                    p.fill_(1.0 if name in ("weight", "gamma") else 0.0)
                elif name == "modulation":
                    p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
                else:
                    bound = (fan_in or p.shape[-1]) ** -0.5
                    p.uniform_(-bound, bound, generator=g)
    return module
