"""Parity of every execution backend against the reference path, on the same stream.

    python -m bench.parity [--preset tiny] [--stream official] [--backends reference,triton,engine,ort,trt]
                           [--seconds 2.5] [--seed 0] [--json-out FILE]

The same image, audio and seed go through each backend; per emitted block it reports the max abs error and PSNR
of the latents and of the decoded uint8 frames against the reference (the readable PyTorch session):
- reference: StreamSession on PyTorch, no kernels, no engine;
- triton:    the DiT's Triton kernels (on a CPU under TRITON_INTERPRET=1, set here before anything imports them);
- engine:    the static-shape engine (CUDA graphs on a GPU, eager static buffers on a CPU);
- ort:       the DiT and decoder exported to ONNX (fp32) and run by ONNX Runtime;
- trt:       TensorRT engines built from those graphs (fp32), run on a GPU, where TensorRT and a GPU exist.
A backend that cannot run here is listed as skipped with the reason. A table, then one JSON line last. This is how
a user checks an optimized deployment against the reference.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():                  # the kernels read this when they are first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench import emit  # noqa: E402
from bench.latency import speech  # noqa: E402
from runtime import AvatarPipeline  # noqa: E402

BACKENDS = ("reference", "triton", "engine", "ort", "trt")


def run_stream(pipe, image, pcm, stream, seed, **session_kwargs) -> tuple[dict, torch.Tensor]:
    """{block: x0 latents} and all uint8 frames of one stream (pushed in 0.2 s chunks, then flushed)."""
    sess = pipe.session(image, stream=stream, seed=seed, **session_kwargs)
    latents = {}
    sess.on_block = lambda b, x0: latents.__setitem__(b, x0.detach().float().cpu().clone())
    out = [sess.push_audio(pcm[i:i + 3200]) for i in range(0, len(pcm), 3200)]
    out.append(sess.flush())
    return latents, torch.cat(out)


def psnr(err_mse: float, peak: float) -> float:
    return float("inf") if err_mse == 0 else 10 * math.log10(peak ** 2 / err_mse)


def compare(ref: tuple, got: tuple, frames_per_block: int) -> list[dict]:
    ref_lat, ref_frames = ref
    lat, frames = got
    rows = []
    for b in sorted(ref_lat):
        r, g = ref_lat[b], lat[b]
        peak = float(r.max() - r.min())
        lo, hi = 1 + frames_per_block * b, 1 + frames_per_block * (b + 1)
        fr, fg = ref_frames[lo:hi].float(), frames[lo:hi].float()
        rows.append(dict(block=b, latent_max_abs=float((r - g).abs().max()),
                         latent_psnr=psnr(float((r - g).pow(2).mean()), peak),
                         pixel_max_abs=float((fr - fg).abs().max()) if len(fr) else None,
                         pixel_psnr=psnr(float((fr - fg).pow(2).mean()), 255.0) if len(fr) else None))
    return rows


def backend_kwargs(name: str, pipe, stream, workdir: str) -> dict:
    """Session arguments for a backend, or raise RuntimeError(reason) when it cannot run here."""
    if name == "reference":
        return dict(engine=False)
    if name == "triton":
        from runtime.kernels import HAS_TRITON
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")
        return dict(engine=False)
    if name == "engine":
        return dict(engine=True)
    if name == "ort":
        from export.backend import HAS_ORT, ort_backends
        if not HAS_ORT:
            raise RuntimeError("onnxruntime is not installed (pip install -e '.[export]')")
        from export.onnx import export_all
        export_all(pipe, stream, workdir, dtype=torch.float32)
        return ort_backends(workdir)
    if name == "trt":
        from export.trt import HAS_TRT
        if not HAS_TRT:
            raise RuntimeError("TensorRT is not installed (it cannot be installed from PyPI without NVIDIA's index)")
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT needs a CUDA device")
        from export.backend import trt_backends
        from export.onnx import export_all
        from export.trt import build_engines
        trt_dir = os.path.join(workdir, "trt")
        export_all(pipe, stream, trt_dir, dtype=torch.float32)
        build_engines(trt_dir)
        return trt_backends(trt_dir)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stream", default="official")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    pipe = AvatarPipeline.from_preset(args.preset, device=device, dtype=torch.float32, seed=args.seed)
    stream = pipe._stream(args.stream)
    cfg = pipe.config
    image = (np.random.default_rng(args.seed).random((cfg.height, cfg.width, 3)) * 255).astype(np.uint8)
    pcm = speech(args.seconds, seed=args.seed)
    per_block = stream.block_frames * cfg.audio_frames_per_latent
    results, reference = {}, None
    with tempfile.TemporaryDirectory() as workdir:
        for name in ["reference"] + [n for n in names if n != "reference"]:
            try:
                kwargs = backend_kwargs(name, pipe, stream, workdir)
            except RuntimeError as reason:
                results[name] = dict(skipped=str(reason))
                continue
            pipe.dit.use_kernels = name == "triton"
            start = time.perf_counter()
            out = run_stream(pipe, image, pcm, stream, args.seed, **kwargs)
            pipe.dit.use_kernels = False
            seconds = time.perf_counter() - start
            if name == "reference":
                reference = out
            rows = compare(reference, out, per_block)
            results[name] = dict(seconds=round(seconds, 2), blocks=rows,
                                 latent_max_abs=max(r["latent_max_abs"] for r in rows),
                                 latent_psnr_min=min(r["latent_psnr"] for r in rows),
                                 pixel_max_abs=max((r["pixel_max_abs"] or 0) for r in rows),
                                 frames_equal=bool(torch.equal(out[1], reference[1])))
    result = dict(bench="parity", preset=args.preset, stream=stream.name, device=device, seconds=args.seconds,
                  backends=results)
    print(f"parity against the reference session | preset {args.preset} | stream {stream.name} | {device}")
    print(f"{'backend':<11}{'latent max abs':>16}{'latent PSNR min':>17}{'pixel max abs':>15}{'frames equal':>14}"
          f"{'seconds':>9}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<11}  skipped: {r['skipped']}")
            continue
        print(f"{name:<11}{r['latent_max_abs']:>16.3g}{r['latent_psnr_min']:>17.1f}{r['pixel_max_abs']:>15.0f}"
              f"{str(r['frames_equal']):>14}{r['seconds']:>9.1f}")
    return emit(result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
