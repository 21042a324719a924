"""Triton kernels == their PyTorch references (CPU interpreter in fp32/fp16; bf16 on a GPU).

Tolerances: fp32 checks are absolute (1e-5: the kernels reorder a few fp32 sums). For fp16/bf16 the kernel is
compared with the fp32 reference and its error must be at most 2x the error of the same-precision PyTorch
reference plus a rounding term (the flash-attention convention), so a kernel may be more exact but not worse.
"""
import pytest
import torch

from runtime.kernels.audio_inject import audio_inject, audio_inject_ref
from runtime.kernels.ring_attention import ring_attention, ring_attention_ref
from runtime.kernels.rope import qk_norm_rope, qk_norm_rope_ref, rope_rotate, rope_rotate_ref
from runtime.rope import axis_pairs, axis_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(got, ref_lowp, ref32, dtype, name=""):
    """fp32: |got - ref| <= 1e-5. Lower precision: err(got) <= 2 err(PyTorch same precision) + rounding."""
    got, ref_lowp = got.float(), ref_lowp.float()
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    err = (got - ref32).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5, f"{name}: max abs err {err:.3g}"
        return
    bound = 2 * (ref_lowp - ref32).abs().max().item() + ROUNDING[dtype] * max(1.0, ref32.abs().max().item())
    assert err <= bound, f"{name}: max abs err {err:.3g} > bound {bound:.3g} (mean {(got - ref32).abs().mean():.3g})"


def rand(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


# --------------------------------------------------------------------------------------------- ring attention
RING_CASES = [  # (S_q, S_window, S_anchor, ring capacity, ring start, ring length)
    (1, 1, 0, 0, 0, 0),          # one query, one key
    (7, 23, 6, 12, 9, 7),        # ring window wraps around its end
    (37, 11, 6, 12, 0, 12),      # full ring
    (17, 31, 0, 5, 4, 5),        # no anchor, wrapping full ring
    (29, 13, 13, 18, 17, 2),     # two rows at the very end / start
]


def run_ring(case, dtype, H=2, D=32, seed=0):
    S_q, S_w, S_a, cap, start, length = case
    q = rand(1, S_q, H, D, dtype=dtype, seed=seed)
    wk, wv = rand(1, S_w, H, D, dtype=dtype, seed=seed + 1), rand(1, S_w, H, D, dtype=dtype, seed=seed + 2)
    seg = {}
    if S_a:
        seg.update(anchor_k=rand(1, S_a, H, D, dtype=dtype, seed=seed + 3),
                   anchor_v=rand(1, S_a, H, D, dtype=dtype, seed=seed + 4))
    if cap:
        seg.update(ring_k=rand(1, cap, H, D, dtype=dtype, seed=seed + 5), ring_v=rand(1, cap, H, D, dtype=dtype,
                   seed=seed + 6), ring_start=start, ring_len=length)
    got = ring_attention(q, wk, wv, **seg)
    ref_lowp = ring_attention_ref(q, wk, wv, **seg)
    up = {k: (v.float() if torch.is_tensor(v) else v) for k, v in seg.items()}
    ref32 = ring_attention_ref(q.float(), wk.float(), wv.float(), **up)
    return got, ref_lowp, ref32


@pytest.mark.parametrize("case", RING_CASES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_ring_attention(case, dtype):
    got, ref_lowp, ref32 = run_ring(case, dtype)
    assert got.shape == ref32.shape and got.dtype == dtype
    assert_close(got, ref_lowp, ref32, dtype, f"ring {case}")


@pytest.mark.parametrize("H,D", [(1, 16), (3, 12)])
def test_ring_attention_odd_heads_and_dims(H, D):
    got, ref_lowp, ref32 = run_ring((9, 19, 5, 7, 6, 4), torch.float32, H=H, D=D)
    assert_close(got, ref_lowp, ref32, torch.float32)


def test_ring_attention_checks_shapes():
    q = rand(1, 4, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="window_k"):
        ring_attention(q, rand(1, 4, 3, 16, dtype=torch.float32), rand(1, 4, 3, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="capacity"):
        ring_attention(q, q, q, ring_k=q, ring_v=q, ring_start=5, ring_len=2)


# --------------------------------------------------------------------------------------------- rope
ROPE_CASES = [  # (heads, head dim, frames (positions), grid)
    (2, 32, [3], (1, 1)),                    # a single token
    (2, 32, [0, 1, 2], (2, 3)),
    (3, 12, [5, 1_000_000], (3, 5)),         # odd head count, prime grid, huge position
    (1, 128, [-4, 7], (2, 3)),               # full head dim, negative position (official cache-pass anchor)
]


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_qk_norm_rope(case, dtype):
    H, D, frames, grid = case
    S, C = len(frames) * grid[0] * grid[1], H * D
    tables = axis_tables(frames, grid, D, DEVICE)
    ql, kl = rand(2, S, C, dtype=dtype, seed=1) * 3, rand(2, S, C, dtype=dtype, seed=2)
    wq, wk = rand(C, dtype=dtype, seed=3).abs() + 0.5, rand(C, dtype=dtype, seed=4).abs() + 0.5
    got = qk_norm_rope(ql, kl, wq, wk, tables, H)
    ref_lowp = qk_norm_rope_ref(ql, kl, wq, wk, tables, H)
    ref32 = qk_norm_rope_ref(ql.float(), kl.float(), wq.float(), wk.float(), tables, H)
    for name, g, r, r32 in zip(("q_rot", "k_rot", "k_pre"), got, ref_lowp, ref32):
        assert g.shape == (2, S, H, D)
        assert_close(g, r, r32, dtype, name)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rope_rotate_reindexes_cached_keys(dtype):
    H, D, grid = 2, 32, (2, 3)
    k_pre = rand(1, 2 * 6, H, D, dtype=dtype)
    for frames in ([0, 1], [17, 3], [1_000_000, -1]):      # ring slots need not be consecutive
        tables = axis_tables(frames, grid, D, DEVICE)
        got = rope_rotate(k_pre, tables)
        assert_close(got, rope_rotate_ref(k_pre, tables), rope_rotate_ref(k_pre.float(), tables), dtype)
        t = 2 * axis_pairs(D)[0]
        if frames == [0, 1]:   # frame 0: the time pairs do not turn
            assert torch.equal(got[:, :6, :, :t], k_pre[:, :6, :, :t])


# --------------------------------------------------------------------------------------------- audio inject
@pytest.mark.parametrize("C,S_f,F", [(64, 6, 2), (48, 1, 3), (37, 5, 1)])
@pytest.mark.parametrize("with_audio", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_audio_inject(C, S_f, F, with_audio, dtype):
    r = rand(2, F * S_f, C, dtype=dtype, seed=1) * 4
    mod = rand(2, F, 6, C, dtype=dtype, seed=2) * 0.5            # a [B, F, 6, C] table, sliced like the DiT does
    shift, scale = mod[:, :, 0], mod[:, :, 1]
    audio = rand(2, F, C, dtype=dtype, seed=3) if with_audio else None
    got_r, got_h = audio_inject(r, shift, scale, audio)
    ref_r, ref_h = audio_inject_ref(r, shift, scale, audio)
    up = (lambda t: None if t is None else t.float())
    _, ref32_h = audio_inject_ref(ref_r.float(), up(shift), up(scale), None)
    assert torch.equal(got_r, ref_r)                               # the residual is rounded exactly as reference
    assert_close(got_h, ref_h, ref32_h, dtype, "h")


# --------------------------------------------------------------------------------------------- bf16 on GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", RING_CASES)
def test_ring_attention_bf16(case):
    got, ref_lowp, ref32 = run_ring(case, torch.bfloat16)
    assert_close(got, ref_lowp, ref32, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROPE_CASES)
def test_qk_norm_rope_bf16(case):
    H, D, frames, grid = case
    S, C = len(frames) * grid[0] * grid[1], H * D
    tables = axis_tables(frames, grid, D, DEVICE)
    args = [rand(1, S, C, dtype=torch.bfloat16, seed=i) for i in (1, 2)]
    w = [rand(C, dtype=torch.bfloat16, seed=i).abs() + 0.5 for i in (3, 4)]
    got = qk_norm_rope(*args, *w, tables, H)
    ref = qk_norm_rope_ref(*args, *w, tables, H)
    ref32 = qk_norm_rope_ref(*(a.float() for a in args), *(x.float() for x in w), tables, H)
    for g, r, r32 in zip(got, ref, ref32):
        assert_close(g, r, r32, torch.bfloat16)


@pytest.mark.gpu
def test_audio_inject_bf16():
    r = rand(1, 3 * 1560, 1536, dtype=torch.bfloat16)
    mod = rand(1, 3, 6, 1536, dtype=torch.bfloat16) * 0.5
    audio = rand(1, 3, 1536, dtype=torch.bfloat16)
    got = audio_inject(r, mod[:, :, 0], mod[:, :, 1], audio)
    ref = audio_inject_ref(r, mod[:, :, 0], mod[:, :, 1], audio)
    ref32 = audio_inject_ref(ref[0].float(), mod[:, :, 0].float(), mod[:, :, 1].float(), None)
    assert torch.equal(got[0], ref[0])
    assert_close(got[1], ref[1], ref32[1], torch.bfloat16)


# --------------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_dit_kernel_path_equals_reference_path(dtype):
    """A whole tiny DiT call with anchor + wrapped ring prefix: kernels on vs off.
    Tolerance: fp32 1e-4 max abs on the flow output (errors of ~1e-6 per op through 6 blocks);
    fp16 within 2x the fp16 reference's own error against fp32 plus 2e-3."""
    from runtime.config import ModelConfig
    from runtime.dit import AvatarDiT, Prefix, init_random_
    from runtime.rope import Rope
    cfg = ModelConfig.preset("tiny")
    model = init_random_(AvatarDiT(cfg), seed=0).to(DEVICE)
    frames, s = 3, cfg.tokens_per_frame
    h, w = cfg.latent_hw
    x, y = rand(1, 16, frames, h, w, dtype=torch.float32, seed=1), rand(1, 17, frames, h, w, dtype=torch.float32, seed=2)
    audio = rand(1, 4 * frames, cfg.audio_input_dim, dtype=torch.float32, seed=3)
    ctx = rand(1, cfg.text_len, cfg.text_dim, dtype=torch.float32, seed=4)
    t = torch.tensor([[555.5, 769.2, 1000.0]], device=DEVICE)
    kv = [(rand(1, s, 2, 32, dtype=torch.float32, seed=10 + i), rand(1, 3 * s, 2, 32, dtype=torch.float32, seed=50 + i))
          for i in range(cfg.num_layers)]

    def run(model, kernels, dt):
        model.use_kernels = kernels
        rope, anchor_rope = Rope([3, 4, 5], cfg.grid_hw, cfg.head_dim, DEVICE), Rope([0], cfg.grid_hw, cfg.head_dim, DEVICE)
        ring_rope = Rope([2, 0, 1], cfg.grid_hw, cfg.head_dim, DEVICE)    # 3 slots; valid: slots 2, 0 (wraps)

        def prefix(i):
            a, r = kv[i][0].to(dt), kv[i][1].to(dt)
            return Prefix(anchor=(rope_rotate_ref(a, anchor_rope.axes), a),
                          ring=(rope_rotate_ref(r, ring_rope.axes), r), ring_start=2 * s, ring_len=2 * s)
        with torch.no_grad():
            return model(x.to(dt), y.to(dt), t, audio.to(dt), model.context_kv(ctx.to(dt)), rope, prefix=prefix)

    ref32 = run(model, False, torch.float32)
    model_dt = AvatarDiT(cfg).to(device=DEVICE, dtype=dtype)
    model_dt.load_state_dict(model.state_dict())
    got, ref_lowp = run(model_dt, True, dtype), run(model_dt, False, dtype)
    if dtype == torch.float32:
        assert (got - ref32).abs().max() <= 1e-4
    else:
        err, own = (got.float() - ref32).abs().max(), (ref_lowp.float() - ref32).abs().max()
        assert err <= 2 * own + 2e-3, (err, own)


# --------------------------------------------------------------------------------------------- custom ops
def test_kernels_are_custom_ops_with_fake_implementations():
    """torch.library.opcheck: schema (no input mutated), fake implementation (same shapes, strides and dtypes as
    the real output, also under dynamic shapes), autograd registration; on the CPU under the interpreter."""
    ops = torch.ops.avatar
    H, D, frames, grid = 2, 16, [3, 5], (2, 3)
    S = len(frames) * grid[0] * grid[1]
    tables = axis_tables(frames, grid, D, DEVICE)
    q, k, v = (rand(1, S, H, D, dtype=torch.float32, seed=i) for i in range(3))
    anchor, ring = rand(1, 6, H, D, dtype=torch.float32, seed=4), rand(1, 12, H, D, dtype=torch.float32, seed=5)
    lin = [rand(1, S, H * D, dtype=torch.float32, seed=i) for i in (6, 7)]
    weights = [rand(H * D, dtype=torch.float32, seed=i).abs() + 0.5 for i in (8, 9)]
    r, mod = rand(1, 2 * 6, 32, dtype=torch.float32, seed=10), rand(1, 2, 2, 32, dtype=torch.float32, seed=11)
    audio = rand(1, 2, 32, dtype=torch.float32, seed=12)
    cases = [
        (ops.ring_attention.default, (q, k, v, anchor, anchor, ring, ring, 9, 7)),
        (ops.ring_attention.default, (q, k, v, None, None, None, None, 0, 0)),
        (ops.qk_norm_rope.default, (*lin, *weights, *tables, H, 1e-6)),
        (ops.rope_rotate.default, (k, *tables)),
        (ops.audio_inject.default, (r, audio, mod[:, :, 0], mod[:, :, 1], 1e-6)),
        (ops.layernorm_modulate.default, (r, mod[:, :, 0], mod[:, :, 1], 1e-6)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_autotune_keeps_only_tiles_that_fit_shared_memory(monkeypatch):
    """The pruning of the attention tiles: Q tile + num_stages K/V tiles must fit the device's shared memory."""
    triton = pytest.importorskip("triton")
    from runtime.kernels import ring_attention as ra
    assert ra.tile_bytes(128, 128, 128, 4, 2) == 288 * 1024 > 227 * 1024       # the Hopper limit: pruned
    assert ra.tile_bytes(128, 64, 128, 3, 2) == 128 * 1024
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=8, num_stages=st)
               for m, n, st in ((128, 128, 4), (64, 64, 3), (128, 64, 3))]
    monkeypatch.setattr(ra, "shared_memory_per_block", lambda device: 227 * 1024)
    q = torch.empty(1, 1, 12, 128, dtype=torch.bfloat16)
    kept = ra._fits_shared_memory(configs, {"Q": q, "D": 128})
    assert kept == configs[1:]
    monkeypatch.setattr(ra, "shared_memory_per_block", lambda device: 1024)       # nothing fits: keep the smallest
    assert ra._fits_shared_memory(configs, {"Q": q, "D": 128}) == [configs[1]]
