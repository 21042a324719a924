"""Kernel benchmark: each Triton kernel against its PyTorch baseline at the real shapes, on a GPU.

    python -m bench.kernels [--dtype bfloat16] [--reps 50] [--json-out FILE]

Shapes (wan-1.3b, 832x480, B=4 blocks): main pass q 24,960 over kv 29,640 = anchor 1,560 + ring 3,120 + window
24,960; cache pass q 6,240 over kv 10,920; 12 heads x 128. Attention is compared with
`scaled_dot_product_attention` on the concatenated keys with the cuDNN and the flash backends (the concatenation
itself is not timed for them). RoPE and audio injection are memory bound: GB/s and % of peak bandwidth; attention:
TFLOP/s (4 S_q S_kv D N_h) and % of peak bf16. Timing: CUDA events around each call, warm-up first (compile and
autotune excluded and reported), median with p20/p80 over --reps calls. Prints a table, then one JSON line.
Without CUDA it says so and exits 0 after printing the JSON line with "skipped".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench import emit
from bench.roofline import detect

MAIN = dict(name="main", s_q=24960, anchor=1560, ring=3120)
CACHE = dict(name="cache", s_q=6240, anchor=1560, ring=3120)
HEADS, HEAD_DIM, DIM, TOKENS_PER_FRAME = 12, 128, 1536, 1560


def time_cuda(fn, reps: int) -> dict:
    """Median / p20 / p80 milliseconds of fn() over reps calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=5)
    return dict(ms=statistics.median(times), p20=q[0], p80=q[3])


def bench_attention(shape, dtype, reps, peak):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from runtime.kernels.ring_attention import ring_attention
    g = torch.Generator("cuda").manual_seed(0)
    mk = lambda s: torch.randn(1, s, HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    q, wk, wv = mk(shape["s_q"]), mk(shape["s_q"]), mk(shape["s_q"])
    ak, av, rk, rv = mk(shape["anchor"]), mk(shape["anchor"]), mk(shape["ring"]), mk(shape["ring"])
    s_kv = shape["s_q"] + shape["anchor"] + shape["ring"]
    flops = 4 * shape["s_q"] * s_kv * HEAD_DIM * HEADS
    t0 = time.perf_counter()
    ring_attention(q, wk, wv, anchor_k=ak, anchor_v=av, ring_k=rk, ring_v=rv, ring_start=1560)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    rows = [("ring_attention (triton)", time_cuda(lambda: ring_attention(
        q, wk, wv, anchor_k=ak, anchor_v=av, ring_k=rk, ring_v=rv, ring_start=1560), reps))]
    k = torch.cat([ak, rk, wk], 1).transpose(1, 2)
    v = torch.cat([av, rv, wv], 1).transpose(1, 2)
    qt = q.transpose(1, 2)
    for label, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                rows.append((label, time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(qt, k, v),
                                              reps)))
        except RuntimeError as err:            # backend not available for this build / GPU
            rows.append((label, dict(error=str(err).splitlines()[0])))
    out = []
    for label, r in rows:
        if "ms" in r:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
            r["pct_peak"] = 100 * r["tflops"] / peak.bf16_tflops if peak else None
        out.append(dict(kernel=f"attention/{shape['name']}", impl=label, q=shape["s_q"], kv=s_kv, **r))
    out[0]["warmup_s"] = warmup_s
    return out


def bench_rope(shape, dtype, reps, peak):
    from runtime.kernels.rope import qk_norm_rope, qk_norm_rope_ref
    from runtime.rope import axis_tables
    s = shape["s_q"]
    g = torch.Generator("cuda").manual_seed(0)
    ql, kl = (torch.randn(1, s, DIM, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    wq, wk = torch.ones(DIM, device="cuda", dtype=dtype), torch.ones(DIM, device="cuda", dtype=dtype)
    tables = axis_tables(range(s // TOKENS_PER_FRAME), (30, 52), HEAD_DIM, "cuda")
    nbytes = 5 * s * DIM * ql.element_size()                       # read q, k; write q_rot, k_rot, k_pre
    rows = [("qk_norm_rope (triton)", time_cuda(lambda: qk_norm_rope(ql, kl, wq, wk, tables, HEADS), reps)),
            ("pytorch reference", time_cuda(lambda: qk_norm_rope_ref(ql, kl, wq, wk, tables, HEADS), reps))]
    return [_bw_row(f"qk_norm_rope/{shape['name']}", label, r, nbytes, peak) for label, r in rows]


def bench_audio_inject(shape, dtype, reps, peak):
    from runtime.kernels.audio_inject import audio_inject, audio_inject_ref
    s, frames = shape["s_q"], shape["s_q"] // TOKENS_PER_FRAME
    g = torch.Generator("cuda").manual_seed(0)
    r = torch.randn(1, s, DIM, device="cuda", dtype=dtype, generator=g)
    mod = torch.randn(1, frames, 6, DIM, device="cuda", dtype=dtype, generator=g)
    audio = torch.randn(1, frames, DIM, device="cuda", dtype=dtype, generator=g)
    nbytes = 3 * s * DIM * r.element_size()                        # read r; write r', h
    rows = [("audio_inject (triton)", time_cuda(lambda: audio_inject(r, mod[:, :, 0], mod[:, :, 1], audio), reps)),
            ("pytorch reference", time_cuda(lambda: audio_inject_ref(r, mod[:, :, 0], mod[:, :, 1], audio), reps))]
    return [_bw_row(f"audio_inject/{shape['name']}", label, row, nbytes, peak) for label, row in rows]


def _bw_row(kernel, label, r, nbytes, peak):
    r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
    r["pct_peak"] = 100 * r["gbps"] / (peak.hbm_tbps * 1e3) if peak else None
    return dict(kernel=kernel, impl=label, bytes=nbytes, **r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json-out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        result = dict(bench="kernels", skipped="no CUDA device: these kernels are benchmarked on a GPU only")
        print("bench.kernels: no CUDA device; nothing to time (the CPU interpreter is for correctness only)")
        print(json.dumps(result))
        return 0
    dtype = getattr(torch, args.dtype)
    peak = detect()
    rows = []
    for shape in (MAIN, CACHE):
        rows += bench_attention(shape, dtype, args.reps, peak)
        rows += bench_rope(shape, dtype, args.reps, peak)
        rows += bench_audio_inject(shape, dtype, args.reps, peak)
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}  dtype: {args.dtype}  torch {torch.__version__}  peak: {peak}")
    print(f"{'kernel':<24}{'impl':<26}{'ms':>9}{'p20':>9}{'p80':>9}{'TFLOP/s':>10}{'GB/s':>9}{'% peak':>9}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['kernel']:<24}{r['impl']:<26}  unavailable: {r['error']}")
            continue
        pct = f"{r['pct_peak']:.1f}" if r.get("pct_peak") is not None else "-"
        print(f"{r['kernel']:<24}{r['impl']:<26}{r['ms']:>9.3f}{r['p20']:>9.3f}{r['p80']:>9.3f}"
              f"{r.get('tflops', 0):>10.1f}{r.get('gbps', 0):>9.0f}{pct:>9}")
    result = dict(bench="kernels", gpu=gpu, dtype=args.dtype, torch=torch.__version__, rows=rows)
    return emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
