"""Fused audio injection + LayerNorm + per-frame adaLN modulation (the start of every DiT block).

For token n of frame f = n // S_f (one program per token row of C values):

    r'[n] = r[n] + a[f]                                  (only with an audio token: blocks 2 .. L/2)
    h[n]  = LN(r'[n]) * (1 + scale[f]) + shift[f]        LN without affine, eps, statistics in fp32

It writes both r' (the new residual stream) and h (the input of the attention's q/k/v projections), so the
residual is read once instead of three times (add, norm, modulate). r' is rounded to the storage dtype before
the norm, as the reference computes it; h is computed in fp32 and rounded once, which is at most one rounding
step away from the reference's bf16 chain (tolerances in tests/test_kernels.py).

Not here: computing shift/scale (modulation + e0 is a [B, F, 6, C] add done by the caller).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import HAS_TRITON, check, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _audio_inject_kernel(R, A, SHIFT, SCALE, R_OUT, H_OUT,
                             S, S_f, C, eps,
                             stride_rb, stride_rs, stride_ab, stride_af, stride_mb, stride_mf,
                             HAS_AUDIO: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b, n = row // S, row % S
        f = n // S_f
        offs = tl.arange(0, BLOCK_C)
        mask = offs < C
        # -- residual add, rounded to the storage dtype like the reference --
        x = tl.load(R + b * stride_rb + n * stride_rs + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_AUDIO:
            a = tl.load(A + b * stride_ab + f * stride_af + offs, mask=mask, other=0.0).to(tl.float32)
            x = (a + x).to(R_OUT.dtype.element_ty).to(tl.float32)
            tl.store(R_OUT + row * C + offs, x.to(R_OUT.dtype.element_ty), mask=mask)
        # -- LayerNorm (no affine), fp32 statistics --
        mean = tl.sum(x, axis=0) / C
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        # -- per-frame modulation --
        shift = tl.load(SHIFT + b * stride_mb + f * stride_mf + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * stride_mb + f * stride_mf + offs, mask=mask, other=0.0).to(tl.float32)
        h = d * rstd * (1.0 + scale) + shift
        tl.store(H_OUT + row * C + offs, h.to(H_OUT.dtype.element_ty), mask=mask)


def audio_inject(r: Tensor, shift: Tensor, scale: Tensor, audio: Tensor | None = None,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """r [B, S, C]; shift, scale [B, F, C] (any strides along B, F; contiguous along C); audio [B, F, C] or None.
    Returns (r', h), both [B, S, C] contiguous in r's dtype (r' is r itself when audio is None). The custom ops
    `avatar::audio_inject` and, without audio, `avatar::layernorm_modulate`."""
    check(HAS_TRITON, "audio_inject needs triton; use audio_inject_ref")
    check(r.ndim == 3 and shift.ndim == 3 and shift.shape == scale.shape,
          f"expected r [B, S, C] and shift/scale [B, F, C], got {r.shape=} {shift.shape=} {scale.shape=}")
    B, S, C = r.shape
    frames = shift.shape[1]
    check(shift.shape[0] == B and shift.shape[2] == C and S % frames == 0,
          f"{r.shape=} does not split into {frames} frames of shift {shift.shape=}")
    check(r.stride(2) == 1 and shift.stride(2) == 1 and scale.stride(2) == 1 and shift.stride() == scale.stride(),
          f"the channel dim must be contiguous and shift/scale strides equal: {r.stride()=} {shift.stride()=}")
    check(r.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {r.dtype}")
    if audio is None:
        return r, torch.ops.avatar.layernorm_modulate(r, shift, scale, eps)
    check(audio.shape == shift.shape and audio.stride(2) == 1, f"{audio.shape=} must equal {shift.shape=}")
    return torch.ops.avatar.audio_inject(r, audio, shift, scale, eps)


def _launch(r: Tensor, audio: Tensor | None, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    B, S, C = r.shape
    frames = shift.shape[1]
    r_out = torch.empty(B, S, C, dtype=r.dtype, device=r.device) if audio is not None else r
    h = torch.empty(B, S, C, dtype=r.dtype, device=r.device)
    a = audio if audio is not None else shift
    _audio_inject_kernel[(B * S,)](
        r, a, shift, scale, r_out, h, S, S // frames, C, eps,
        r.stride(0), r.stride(1), a.stride(0), a.stride(1), shift.stride(0), shift.stride(1),
        HAS_AUDIO=audio is not None, BLOCK_C=next_pow2(C), num_warps=4 if C <= 2048 else 8)
    return r_out, h


@torch.library.custom_op("avatar::audio_inject", mutates_args=())
def _audio_inject_op(r: Tensor, audio: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _launch(r, audio, shift, scale, eps)


@_audio_inject_op.register_fake
def _(r, audio, shift, scale, eps):
    return r.new_empty(r.shape), r.new_empty(r.shape)


@torch.library.custom_op("avatar::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(r: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return _launch(r, None, shift, scale, eps)[1]


@_layernorm_modulate_op.register_fake
def _(r, shift, scale, eps):
    return r.new_empty(r.shape)


def audio_inject_ref(r: Tensor, shift: Tensor, scale: Tensor, audio: Tensor | None = None,
                     eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The DiT's own computation (dit.py): add, LayerNorm in the input dtype, modulate in the input dtype."""
    frames = shift.shape[1]
    if audio is not None:
        r = (audio.unsqueeze(2) + r.unflatten(1, (frames, -1))).flatten(1, 2)
    normed = F.layer_norm(r, (r.shape[-1],), eps=eps).type_as(r)
    h = (normed.unflatten(1, (frames, -1)) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)
    return r, h
