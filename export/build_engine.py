"""python -m export.build_engine: ONNX graphs of the runtime, their ONNX Runtime parity, and TensorRT engines.

    python -m export.build_engine --out DIR [--preset tiny] [--stream official] [--fp16] [--trt]
                                  [--graphs dit_main,vae_step] [--weights WEIGHTS_DIR] [--no-parity]

Writes DIR/<graph>/model.onnx + config.json for every graph of export/onnx.py (progress bar), then runs each graph
on ONNX Runtime and its PyTorch module on the same random inputs and writes DIR/parity.json (a table is printed:
max abs / max rel error and cosine per output; fp32 must agree to 1e-4 abs, fp16 to 1e-2 of the output's range).
`--trt` builds DIR/<graph>/model.plan through the TensorRT Python API; without TensorRT it exits with code 2 before
exporting anything. The equivalent trtexec commands are printed either way. The last line is one JSON summary.

Weights are random (seeded) unless --weights points at released weights (AvatarPipeline.from_pretrained). The
--preset wan-1.3b export runs the same code on the real shapes (checked on the meta device in the tests, not run
here): the fp32 model is ~6 GB, --fp16 adds a 2.8 GB copy, and the DiT graphs go to external data. Its parity run is
the real 832x480 computation on the CPU, minutes per DiT graph, and ORT's CPU Attention materialises the
[N_h, 24,960, 29,640] scores; skip it with --no-parity or use --providers CUDAExecutionProvider.

Exit codes: 0 done (parity within tolerance or skipped), 1 parity out of tolerance, 2 a required package
(onnx, tensorrt) is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from runtime import AvatarPipeline, StreamConfig
from runtime.config import MODEL_PRESETS, STREAM_PRESETS

from . import trt as trt_backend
from .backend import FP32_MAX_ABS, LOW_PRECISION_MAX_REL, LOW_PRECISION_MIN_COSINE, check_parity
from .onnx import ALL_GRAPHS, HAS_ONNX, export_all

PARITY_FILE = "parity.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.build_engine", description=__doc__.split("\n\n")[0])
    # -- what to export --
    p.add_argument("--out", required=True, type=Path, help="output directory (one subdirectory per graph)")
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model preset")
    p.add_argument("--stream", default="official", choices=sorted(STREAM_PRESETS), help="stream preset")
    p.add_argument("--graphs", default=",".join(ALL_GRAPHS), help="comma-separated subset of the graphs")
    p.add_argument("--fp16", action="store_true", help="export fp16 graphs (fp32 otherwise)")
    p.add_argument("--weights", type=Path, default=None, help="released weights directory (default: random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and parity inputs")
    # -- checks --
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime parity run")
    p.add_argument("--providers", default="CPUExecutionProvider", help="ONNX Runtime providers for parity")
    # -- TensorRT --
    p.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs tensorrt)")
    p.add_argument("--workspace-gib", type=float, default=trt_backend.DEFAULT_WORKSPACE_GIB)
    p.add_argument("--opt-level", type=int, default=trt_backend.DEFAULT_OPT_LEVEL,
                   help="TensorRT builder optimization level 0-5")
    return p.parse_args(argv)


def build_pipeline(args) -> AvatarPipeline:
    """fp32 on the CPU: the parity reference; the export converts a copy when --fp16."""
    if args.weights is not None:
        return AvatarPipeline.from_pretrained(args.weights, preset=args.preset, device="cpu", dtype=torch.float32,
                                              seed=args.seed)
    return AvatarPipeline.from_preset(args.preset, device="cpu", dtype=torch.float32, seed=args.seed)


def parity_table(results: list[dict]) -> str:
    """One row per output; a decoder's state outputs share one row (their worst values). parity.json has all."""
    rows = [f"{'graph':<12} {'output':<16} {'dtype':<8} {'max abs':>10} {'max rel':>10} {'cosine':>12}  ok"]
    for r in results:
        if r.get("skipped"):
            rows.append(f"{r['graph']:<12} {'-':<16} {r['dtype']:<8} skipped: {r['skipped']}")
            continue
        groups: dict[str, list[dict]] = {}
        for name, stats in r["outputs"].items():
            key = "cache_out_*" if name.startswith("cache_out_") else name
            groups.setdefault(key, []).append(stats)
        for name, group in groups.items():
            label = f"{name} ({len(group)})" if len(group) > 1 else name
            worst_abs, worst_rel = max(g["max_abs"] for g in group), max(g["max_rel"] for g in group)
            rows.append(f"{r['graph']:<12} {label:<16} {r['dtype']:<8} {worst_abs:>10.3e} {worst_rel:>10.3e} "
                        f"{min(g['cosine'] for g in group):>12.9f}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.graphs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_GRAPHS))
    if unknown:
        print(f"error: unknown graphs {unknown}; choose from {', '.join(ALL_GRAPHS)}", file=sys.stderr)
        return 2
    if args.trt and not trt_backend.HAS_TRT:       # fail before minutes of export
        print(f"error: --trt: {trt_backend.TRT_MISSING}", file=sys.stderr)
        return 2
    if not HAS_ONNX:
        print("error: ONNX export needs onnx and onnxscript: pip install -e '.[export]'", file=sys.stderr)
        return 2
    started = time.perf_counter()
    pipe = build_pipeline(args)
    stream = StreamConfig.preset(args.stream)
    dtype = torch.float16 if args.fp16 else torch.float32
    graphs = export_all(pipe, stream, args.out, dtype=dtype, names=names, seed=args.seed, progress=True)
    export_s = time.perf_counter() - started

    results = []
    if not args.no_parity:
        from tqdm import tqdm
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        for graph in tqdm(graphs.values(), desc="parity", unit="graph"):
            results.append(check_parity(graph, pipe.dit, pipe.decoder, seed=args.seed, providers=providers))
        report = dict(preset=args.preset, stream=args.stream, dtype=str(dtype).removeprefix("torch."),
                      tolerance=dict(fp32_max_abs=FP32_MAX_ABS, low_precision_max_rel=LOW_PRECISION_MAX_REL,
                                     low_precision_min_cosine=LOW_PRECISION_MIN_COSINE), graphs=results)
        (args.out / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        print(parity_table(results))

    plans = {}
    if args.trt:
        plans = trt_backend.build_engines(args.out, names=list(graphs), progress=True,
                                          workspace_gib=args.workspace_gib, opt_level=args.opt_level)

    cache = args.out / trt_backend.TIMING_CACHE_FILE
    print("\nTensorRT engines from these files (on the target GPU, TensorRT >= 10.15):")
    print(f"  python -m export.build_engine --preset {args.preset} --stream {args.stream}"
          f"{' --fp16' if args.fp16 else ''} --out {args.out} --trt")
    for graph in graphs.values():
        print("  " + trt_backend.trtexec_command(graph.directory, workspace_gib=args.workspace_gib,
                                                 timing_cache=cache, opt_level=args.opt_level))
    failed = [r["graph"] for r in results if r.get("ok") is False]
    summary = dict(out=str(args.out), preset=args.preset, stream=args.stream, dtype=str(dtype).removeprefix("torch."),
                   graphs=list(graphs), parity_ok=not failed if results else None, parity_failed=failed,
                   engines=[str(p) for p in plans.values()], export_s=round(export_s, 1))
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
