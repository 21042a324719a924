"""Fused q/k RMSNorm + 3-D RoPE, and the RoPE re-index of cached keys, in one pass per token.

For token n of a call with grid (F, G_h, G_w): frame f = n // (G_h G_w), row r = (n // G_w) % G_h, col c = n % G_w.
Pair j of every head turns by the angle of its axis (time pairs j < P_t, then row pairs, then column pairs):

    k_pre = (k_lin * rsqrt(mean(k_lin^2) + eps)).to(dtype) * w_k           (RMSNorm over all C = N_h D)
    out[2j], out[2j+1] = y[2j] cos - y[2j+1] sin,  y[2j] sin + y[2j+1] cos  (theta from the axis tables)

Positions come in as per-axis cos/sin tables built on the host from float64 angles (runtime/rope.py
`axis_tables`): the time table has one row per frame of the call, so frames need not be consecutive (ring slots)
and a position can be 10^6 without losing precision in a float32 angle. `qk_norm_rope` writes q and k after RoPE
and k before RoPE (what the cache stores); `rope_rotate` turns already-normed cached keys (the style anchor, the
history ring) to the positions of the current call.

Not here: the q/k/v projections (cuBLAS GEMMs) and the attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON, check, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _axis_cos_sin(COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W, f, r, c, p,
                      PT: tl.constexpr, PH: tl.constexpr, P: tl.constexpr):
        """cos/sin [BLOCK_P] of pair p for a token at (frame row f of the time table, row r, col c)."""
        in_t = p < PT
        in_h = (p >= PT) & (p < PT + PH)
        in_w = (p >= PT + PH) & (p < P)
        pw = P - PT - PH
        cos = (tl.load(COS_T + f * PT + p, mask=in_t, other=0.0)
               + tl.load(COS_H + r * PH + (p - PT), mask=in_h, other=0.0)
               + tl.load(COS_W + c * pw + (p - PT - PH), mask=in_w, other=0.0))
        sin = (tl.load(SIN_T + f * PT + p, mask=in_t, other=0.0)
               + tl.load(SIN_H + r * PH + (p - PT), mask=in_h, other=0.0)
               + tl.load(SIN_W + c * pw + (p - PT - PH), mask=in_w, other=0.0))
        return cos[None, :], sin[None, :]

    @triton.jit
    def _norm_rotate(X, W, OUT_ROT, OUT_PRE, x_off, out_off, offs, mask, cos, sin, eps,
                     C: tl.constexpr, NORM: tl.constexpr, WRITE_PRE: tl.constexpr):
        """Load one token's even/odd channels, RMSNorm them (optional), write pre-RoPE and rotated values."""
        xe = tl.load(X + x_off + offs, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(X + x_off + offs + 1, mask=mask, other=0.0).to(tl.float32)
        dtype = OUT_ROT.dtype.element_ty
        if NORM:
            # -- RMSNorm over the full width: fp32 statistics, normalized value rounded, then * weight --
            rstd = 1.0 / tl.sqrt((tl.sum(tl.sum(xe * xe, 1), 0) + tl.sum(tl.sum(xo * xo, 1), 0)) / C + eps)
            we = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            wo = tl.load(W + offs + 1, mask=mask, other=0.0).to(tl.float32)
            xe = ((xe * rstd).to(dtype).to(tl.float32) * we).to(dtype).to(tl.float32)
            xo = ((xo * rstd).to(dtype).to(tl.float32) * wo).to(dtype).to(tl.float32)
        if WRITE_PRE:
            tl.store(OUT_PRE + out_off + offs, xe.to(dtype), mask=mask)
            tl.store(OUT_PRE + out_off + offs + 1, xo.to(dtype), mask=mask)
        # -- rotate interleaved pairs --
        tl.store(OUT_ROT + out_off + offs, (xe * cos - xo * sin).to(dtype), mask=mask)
        tl.store(OUT_ROT + out_off + offs + 1, (xe * sin + xo * cos).to(dtype), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(XQ, XK, WQ, WK, Q_ROT, K_ROT, K_PRE,
                             COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W,
                             S, GH, GW, eps, stride_qb, stride_qs, stride_kb, stride_ks,
                             H: tl.constexpr, D: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr,
                             NORM: tl.constexpr, DO_Q: tl.constexpr, WRITE_PRE: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b, n = row // S, row % S
        f, r, c = n // (GH * GW), (n // GW) % GH, n % GW
        p = tl.arange(0, BLOCK_P)
        heads = tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < H) & (p[None, :] < D // 2)
        offs = heads[:, None] * D + 2 * p[None, :]                  # even channel of pair p in head h
        cos, sin = _axis_cos_sin(COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W, f, r, c, p, PT, PH, D // 2)
        out_off = row * (H * D)
        _norm_rotate(XK, WK, K_ROT, K_PRE, b * stride_kb + n * stride_ks, out_off, offs, mask, cos, sin, eps,
                     H * D, NORM, WRITE_PRE)
        if DO_Q:
            _norm_rotate(XQ, WQ, Q_ROT, Q_ROT, b * stride_qb + n * stride_qs, out_off, offs, mask, cos, sin, eps,
                         H * D, NORM, False)


def _launch(xq, xk, wq, wk, tables, num_heads, eps, norm, do_q, write_pre):
    check(HAS_TRITON, "the rope kernels need triton; use qk_norm_rope_ref / rope_rotate_ref")
    cos_t, sin_t, cos_h, sin_h, cos_w, sin_w = tables
    B, S, C = xk.shape
    D = C // num_heads
    check(C % num_heads == 0 and D % 2 == 0, f"{xk.shape=} does not split into {num_heads} heads of even size")
    PT, PH = cos_t.shape[1], cos_h.shape[1]
    check(PT + PH + cos_w.shape[1] == D // 2, f"axis tables {cos_t.shape=} {cos_h.shape=} {cos_w.shape=} "
                                              f"do not cover {D // 2} pairs")
    F, GH, GW = cos_t.shape[0], cos_h.shape[0], cos_w.shape[0]
    check(S == F * GH * GW, f"{S=} tokens but the tables describe {F} frames of {GH}x{GW}")
    check(all(t.dtype == torch.float32 and t.is_contiguous() for t in tables), "axis tables must be contiguous fp32")
    check(xk.stride(2) == 1 and (xq is None or xq.stride(2) == 1), f"channels must be contiguous: {xk.stride()=}")
    out = dict(dtype=xk.dtype, device=xk.device)
    k_rot = torch.empty(B, S, num_heads, D, **out)
    k_pre = torch.empty(B, S, num_heads, D, **out) if write_pre else k_rot
    q_rot = torch.empty(B, S, num_heads, D, **out) if do_q else k_rot
    xq_, wq_ = (xq, wq) if do_q else (xk, wk)
    wk_ = wk if norm else xk
    _qk_norm_rope_kernel[(B * S,)](
        xq_, xk, wq_ if norm else xk, wk_, q_rot, k_rot, k_pre, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w,
        S, GH, GW, eps, xq_.stride(0), xq_.stride(1), xk.stride(0), xk.stride(1),
        H=num_heads, D=D, PT=PT, PH=PH, NORM=norm, DO_Q=do_q, WRITE_PRE=write_pre,
        BLOCK_H=next_pow2(num_heads), BLOCK_P=next_pow2(D // 2), num_warps=4)
    return q_rot, k_rot, k_pre


def _check_tables(tables) -> None:
    check(len(tables) == 6, f"expected 6 axis tables (cos_t, sin_t, cos_h, sin_h, cos_w, sin_w), got {len(tables)}")


def qk_norm_rope(q_lin: Tensor, k_lin: Tensor, wq: Tensor, wk: Tensor, tables, num_heads: int,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """q_lin, k_lin [B, S, C] (projection outputs) -> q_rot, k_rot, k_pre, each [B, S, N_h, D]
    (the custom op `avatar::qk_norm_rope`)."""
    check(q_lin.shape == k_lin.shape and q_lin.dtype == k_lin.dtype, f"{q_lin.shape=} {k_lin.shape=} must match")
    check(k_lin.ndim == 3 and k_lin.shape[2] % num_heads == 0, f"{k_lin.shape=} must be [B, S, {num_heads} x D]")
    _check_tables(tables)
    return torch.ops.avatar.qk_norm_rope(q_lin, k_lin, wq, wk, *tables, num_heads, eps)


def rope_rotate(k_pre: Tensor, tables) -> Tensor:
    """Cached keys [B, S, N_h, D] (normed, before RoPE) -> rotated to the positions described by `tables`
    (the custom op `avatar::rope_rotate`)."""
    check(k_pre.ndim == 4, f"expected [B, S, N_h, D], got {k_pre.shape=}")
    _check_tables(tables)
    return torch.ops.avatar.rope_rotate(k_pre, *tables)


@torch.library.custom_op("avatar::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q_lin: Tensor, k_lin: Tensor, wq: Tensor, wk: Tensor, cos_t: Tensor, sin_t: Tensor,
                     cos_h: Tensor, sin_h: Tensor, cos_w: Tensor, sin_w: Tensor, num_heads: int,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    tables = (cos_t, sin_t, cos_h, sin_h, cos_w, sin_w)
    return _launch(q_lin, k_lin, wq, wk, tables, num_heads, eps, norm=True, do_q=True, write_pre=True)


@_qk_norm_rope_op.register_fake
def _(q_lin, k_lin, wq, wk, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, num_heads, eps):
    B, S, C = k_lin.shape
    return tuple(k_lin.new_empty(B, S, num_heads, C // num_heads) for _ in range(3))


@torch.library.custom_op("avatar::rope_rotate", mutates_args=())
def _rope_rotate_op(k_pre: Tensor, cos_t: Tensor, sin_t: Tensor, cos_h: Tensor, sin_h: Tensor, cos_w: Tensor,
                    sin_w: Tensor) -> Tensor:
    B, S, H, D = k_pre.shape
    tables = (cos_t, sin_t, cos_h, sin_h, cos_w, sin_w)
    return _launch(None, k_pre.reshape(B, S, H * D), None, None, tables, H, 0.0,
                   norm=False, do_q=False, write_pre=False)[1]


@_rope_rotate_op.register_fake
def _(k_pre, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w):
    return torch.empty_like(k_pre, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------- references
def _tables_to_full(tables, S):
    """Expand per-axis tables to per-token [S, D/2] cos/sin in token order (frame, row, col)."""
    cos_t, sin_t, cos_h, sin_h, cos_w, sin_w = tables
    F, GH, GW = cos_t.shape[0], cos_h.shape[0], cos_w.shape[0]

    def full(t, h, w):
        return torch.cat([t[:, None, None].expand(F, GH, GW, -1), h[None, :, None].expand(F, GH, GW, -1),
                          w[None, None, :].expand(F, GH, GW, -1)], -1).reshape(S, -1)
    return full(cos_t, cos_h, cos_w), full(sin_t, sin_h, sin_w)


def rope_rotate_ref(k_pre: Tensor, tables) -> Tensor:
    """Pairs (2j, 2j+1) turned by their angle, in float32, result in k_pre's dtype (runtime.rope.apply_rope)."""
    cos, sin = (t[:, None, :] for t in _tables_to_full(tables, k_pre.shape[1]))   # broadcast over heads
    pairs = k_pre.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(k_pre.dtype)


def qk_norm_rope_ref(q_lin, k_lin, wq, wk, tables, num_heads: int, eps: float = 1e-6):
    """The DiT's own computation: runtime.dit.RMSNorm then runtime.rope.apply_rope."""
    def rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
    shape = (*k_lin.shape[:2], num_heads, -1)
    q, k = rms(q_lin, wq).view(shape), rms(k_lin, wk).view(shape)
    return rope_rotate_ref(q, tables), rope_rotate_ref(k, tables), k
