"""Peak rates of common GPUs and the roofline floor of a stage: max(FLOPs / peak FLOP/s, bytes / peak B/s).

Peaks are the vendors' dense (no sparsity) datasheet numbers; measured attainable rates are lower (the design
doc measured 758 TFLOP/s for a bf16 GEMM and 588 for cuDNN attention on an H100 SXM). `detect()` matches the
running GPU by name; unknown GPUs get no floor rather than a guessed one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float     # dense tensor-core bf16 with fp32 accumulate
    fp8_tflops: float
    hbm_tbps: float        # memory bandwidth, TB/s

    def floor_ms(self, flops: float, nbytes: float, fp8: bool = False) -> float:
        rate = (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12
        return 1e3 * max(flops / rate, nbytes / (self.hbm_tbps * 1e12))


PEAKS = {
    "H100 SXM": Peak("H100 SXM", 989.0, 1979.0, 3.35),
    "H100 PCIe": Peak("H100 PCIe", 756.0, 1513.0, 2.0),
    "H200": Peak("H200", 989.0, 1979.0, 4.8),
    "A100": Peak("A100 80GB SXM", 312.0, 0.0, 2.04),
    "RTX 4090": Peak("RTX 4090", 165.2, 330.3, 1.01),
}


def detect(device_name: str | None = None) -> Peak | None:
    """The peak table row for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    if device_name is None:
        import torch
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    if "H200" in name:
        return PEAKS["H200"]
    if "H100" in name:
        return PEAKS["H100 PCIe"] if "PCIE" in name else PEAKS["H100 SXM"]
    if "A100" in name:
        return PEAKS["A100"]
    if "4090" in name:
        return PEAKS["RTX 4090"]
    return None


def floors(preset: str = "wan-1.3b", streams=("official", "relative", "low-delay"),
           decoder: str | None = None) -> list[dict]:
    """Per stream preset and GPU: the ms/frame floor of one steady step (DiT main + cache pass + decode), from the
    FLOPs and bytes counted on the meta device in bf16 (nothing is allocated)."""
    import torch

    from bench.latency import step_cost
    from runtime import AvatarPipeline, StreamConfig

    overrides = {"decoder": decoder} if decoder else {}
    pipe = AvatarPipeline.from_preset(preset, device="meta", dtype=torch.bfloat16, **overrides)
    rows = []
    for name in streams:
        stream = StreamConfig.preset(name)
        frames = stream.block_frames * pipe.config.audio_frames_per_latent
        cost = step_cost(pipe, stream)
        for gpu, peak in PEAKS.items():
            stages = {k: peak.floor_ms(v["flops"], v["bytes"]) for k, v in cost.items()}
            rows.append(dict(stream=name, gpu=gpu, frames_per_step=frames, stages_ms=stages,
                             ms_per_frame=sum(stages.values()) / frames,
                             tflop_per_step=sum(v["flops"] for v in cost.values()) / 1e12))
    return rows


def main(argv=None) -> int:
    import argparse

    from bench import emit
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=floors.__doc__)
    p.add_argument("--preset", default="wan-1.3b")
    p.add_argument("--streams", default="official,relative,low-delay", help="comma-separated stream presets")
    p.add_argument("--decoder", default=None, choices=["vae", "taehv"], help="override the preset's decoder")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    rows = floors(args.preset, tuple(s for s in args.streams.split(",") if s), args.decoder)
    stage_names = list(rows[0]["stages_ms"]) if rows else []
    print(f"roofline floors, {args.preset} bf16, decoder {args.decoder or 'of the preset'} "
          "(datasheet peaks; attainable rates are lower)")
    print(f"{'stream':10} {'gpu':10} {'TFLOP/step':>10} " + " ".join(f"{s + ' ms':>13}" for s in stage_names)
          + f" {'ms/frame':>9}")
    for r in rows:
        print(f"{r['stream']:10} {r['gpu']:10} {r['tflop_per_step']:10.2f} "
              + " ".join(f"{r['stages_ms'][s]:13.2f}" for s in stage_names) + f" {r['ms_per_frame']:9.2f}")
    return emit(dict(bench="roofline", preset=args.preset, decoder=args.decoder, rows=rows), args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
