"""Attention of the window's queries over [style anchor | temporal ring | window] without concatenating them.

    O = softmax(Q K^T / sqrt(D)) V,   K = [K_anchor ; K_ring[(start + i) % cap], i < len ; K_window]

FlashAttention-2 forward: one program per (BLOCK_M queries, batch x head); the Q tile stays in registers and the
three key/value segments stream through one online softmax (running max m, running sum l, fp32 accumulator, base-2
exponentials). The ring segment reads physical rows (start + i) % cap, so a ring whose valid part wraps around its
end needs no copy. Every tile is masked, so no length has to be a multiple of a block (1,560 tokens per frame is not).
Keys must already be rotated to the call's positions (kernels/rope.py).

Layout [B, S, N_h, D] with the head dim contiguous, as the DiT produces it. Autotuned over a small list of tiles
on GPUs, those that fit the device's shared memory (`tile_bytes`), once per head dim, dtype and size class; one
fixed small tile under the CPU interpreter. The launcher is the custom op `avatar::ring_attention` with a fake
implementation, so torch.compile(fullgraph=True) keeps it as one opaque call and CUDA graphs capture its launch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import HAS_TRITON, INTERPRET, check, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _configs():
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        tiles = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (128, 128, 8, 4),
                 (256, 64, 8, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]

    def _fits_shared_memory(configs, named_args, **kwargs):
        """Drop tiles whose Q tile plus `num_stages` K and V tiles exceed the device's shared memory per block
        (e.g. 128x128 with 4 stages at D = 128 in bf16 needs ~288 KB; Hopper allows ~227 KB, Ampere ~163 KB)."""
        q = named_args["Q"]
        limit = shared_memory_per_block(q.device)
        size = {id(c): tile_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], named_args["D"], c.num_stages,
                                  q.element_size()) for c in configs}
        kept = [c for c in configs if size[id(c)] <= limit]
        return kept or [min(configs, key=lambda c: size[id(c)])]     # none fits: the smallest, for a clear error

    @triton.jit
    def _attend_segment(acc, m_i, l_i, q, K, V, stride_n, n_rows, start, cap, offs_d, dmask, qk_scale,
                        IS_RING: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        for lo in range(0, n_rows, BLOCK_N):
            offs_n = lo + tl.arange(0, BLOCK_N)
            nmask = offs_n < n_rows
            rows = (start + offs_n) % cap if IS_RING else offs_n
            kv_off = rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            # -- scores in base 2: s = q k^T * scale * log2(e) --
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
            # -- online softmax --
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    # Tuned once per head dim, dtype and size class (SIZE: 0 under 4,096 queries, 1 from there): ramp-up windows and
    # the anchor pass see both classes before the stream is steady, so tail windows never stall on a tuning run.
    @triton.autotune(configs=_configs(), key=["D", "SIZE"],
                     prune_configs_by={"early_config_prune": _fits_shared_memory})
    @triton.jit
    def _ring_attention_kernel(Q, KA, VA, KR, VR, KW, VW, O,
                               S_q, S_a, R_len, R_start, R_cap, S_w, H, D, SIZE, qk_scale,
                               sq_b, sq_s, sa_b, sa_s, sr_b, sr_s, sw_b, sw_s,
                               IEEE: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0).to(tl.int64)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qmask = (offs_m[:, None] < S_q) & dmask[None, :]
        q_off = b * sq_b + offs_m[:, None] * sq_s + h * D + offs_d[None, :]
        q = tl.load(Q + q_off, mask=qmask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # -- the three segments share one softmax state: anchor, ring (wrap-around), window --
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, KA + b * sa_b + h * D, VA + b * sa_b + h * D, sa_s,
                                        S_a, 0, 1, offs_d, dmask, qk_scale, False, BLOCK_N, IEEE)
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, KR + b * sr_b + h * D, VR + b * sr_b + h * D, sr_s,
                                        R_len, R_start, R_cap, offs_d, dmask, qk_scale, True, BLOCK_N, IEEE)
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, KW + b * sw_b + h * D, VW + b * sw_b + h * D, sw_s,
                                        S_w, 0, 1, offs_d, dmask, qk_scale, False, BLOCK_N, IEEE)
        out = acc / l_i[:, None]
        tl.store(O + b * sq_b + offs_m[:, None] * sq_s + h * D + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=qmask)


LARGE_QUERIES = 4096        # the autotuner's size classes: fewer queries than this, or more


def shared_memory_per_block(device) -> int:
    """Opt-in shared memory per block of a CUDA device, in bytes (the interpreter has no limit)."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


def tile_bytes(block_m: int, block_n: int, head_dim: int, stages: int, element_size: int) -> int:
    """Shared memory of one program: the Q tile and `stages` buffered K and V tiles (head dim padded to 2^k)."""
    d = max(16, next_pow2(head_dim))
    return (block_m * d + stages * 2 * block_n * d) * element_size


def autotune_runs() -> int:
    """How many (head dim, dtype, size class) keys the autotuner has benchmarked so far in this process."""
    return len(_ring_attention_kernel.cache) if HAS_TRITON else 0


def _segment(t: Tensor | None, like: Tensor) -> Tensor:
    """An absent segment is an empty [B, 0, N_h, D] tensor (its loop runs zero times)."""
    return t if t is not None else like.new_empty(like.shape[0], 0, *like.shape[2:])


def ring_attention(q: Tensor, window_k: Tensor, window_v: Tensor, *, anchor_k: Tensor | None = None,
                   anchor_v: Tensor | None = None, ring_k: Tensor | None = None, ring_v: Tensor | None = None,
                   ring_start: int = 0, ring_len: int | None = None) -> Tensor:
    """q [B, S_q, N_h, D]; window/anchor [B, S, N_h, D]; ring [B, cap, N_h, D] whose valid rows are
    (ring_start + i) % cap for i < ring_len (default: all). Returns [B, S_q, N_h, D] in q's dtype.
    Checks its arguments, then calls the custom op `avatar::ring_attention` (opaque to torch.compile)."""
    check(HAS_TRITON, "ring_attention needs triton; use ring_attention_ref")
    B, S_q, H, D = q.shape
    cap = ring_k.shape[1] if ring_k is not None else 0
    ring_len = cap if ring_len is None else ring_len
    present = {"window_k": window_k, "window_v": window_v, "anchor_k": anchor_k, "anchor_v": anchor_v,
               "ring_k": ring_k, "ring_v": ring_v}
    for name, t in present.items():
        if t is None:
            continue
        check(t.ndim == 4 and t.shape[0] == B and t.shape[2:] == (H, D),
              f"{name}: expected [B={B}, S, N_h={H}, D={D}], got {tuple(t.shape)}")
        check(t.dtype == q.dtype, f"{name} is {t.dtype}, q is {q.dtype}")
        check(t.shape[1] == 0 or (t.stride(3) == 1 and t.stride(2) == D),
              f"{name}: heads and head dim must be contiguous, strides {t.stride()}")
    for name in ("anchor", "ring", "window"):
        a, b_ = present[f"{name}_k"], present[f"{name}_v"]
        check((a is None) == (b_ is None) and (a is None or (a.shape == b_.shape and a.stride() == b_.stride())),
              f"{name} K and V must both be given with the same shape/strides")
    check(q.stride(3) == 1 and q.stride(2) == D, f"q: heads and head dim must be contiguous, strides {q.stride()}")
    check(0 <= ring_len <= cap and (cap == 0 or 0 <= ring_start < cap),
          f"ring window start={ring_start} len={ring_len} does not fit capacity {cap}")
    keys = window_k.shape[1] + (anchor_k.shape[1] if anchor_k is not None else 0) + ring_len
    check(keys > 0, "no keys to attend to")
    return torch.ops.avatar.ring_attention(q, window_k, window_v, anchor_k, anchor_v, ring_k, ring_v,
                                           ring_start, ring_len)


@torch.library.custom_op("avatar::ring_attention", mutates_args=())
def _ring_attention_op(q: Tensor, window_k: Tensor, window_v: Tensor, anchor_k: Tensor | None,
                       anchor_v: Tensor | None, ring_k: Tensor | None, ring_v: Tensor | None,
                       ring_start: int, ring_len: int) -> Tensor:
    anchor_k, anchor_v = _segment(anchor_k, window_k), _segment(anchor_v, window_v)
    ring_k, ring_v = _segment(ring_k, window_k), _segment(ring_v, window_v)
    B, S_q, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    qk_scale = (1.0 / math.sqrt(D)) * 1.4426950408889634      # 1 / sqrt(D) * log2(e)
    grid = lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _ring_attention_kernel[grid](
        q, anchor_k, anchor_v, ring_k, ring_v, window_k, window_v, out,
        S_q, anchor_k.shape[1], ring_len, ring_start, max(ring_k.shape[1], 1), window_k.shape[1], H, D,
        int(S_q >= LARGE_QUERIES), qk_scale,
        q.stride(0), q.stride(1), anchor_k.stride(0), anchor_k.stride(1), ring_k.stride(0), ring_k.stride(1),
        window_k.stride(0), window_k.stride(1),
        IEEE=q.dtype == torch.float32, BLOCK_D=max(16, next_pow2(D)))
    return out


@_ring_attention_op.register_fake
def _(q, window_k, window_v, anchor_k, anchor_v, ring_k, ring_v, ring_start, ring_len):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def ring_attention_ref(q: Tensor, window_k: Tensor, window_v: Tensor, *, anchor_k=None, anchor_v=None,
                       ring_k=None, ring_v=None, ring_start: int = 0, ring_len: int | None = None) -> Tensor:
    """Concatenate the valid keys in order and call SDPA (what the reference DiT does)."""
    ks, vs = [], []
    if anchor_k is not None:
        ks.append(anchor_k)
        vs.append(anchor_v)
    if ring_k is not None:
        cap = ring_k.shape[1]
        idx = (ring_start + torch.arange(cap if ring_len is None else ring_len, device=q.device)) % max(cap, 1)
        ks.append(ring_k[:, idx])
        vs.append(ring_v[:, idx])
    k, v = torch.cat(ks + [window_k], 1), torch.cat(vs + [window_v], 1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
