"""Streaming latency benchmark, following the paper's Table 2 protocol.

    python -m bench.latency [--preset wan-1.3b] [--stream official] [--frames 400] [--device cuda]
                            [--baseline naive] [--sessions K] [--compile] [--json-out FILE]

Random weights of the chosen preset (bf16 on a GPU, fp32 on a CPU); a synthetic voiced signal as audio.
Reported:
- steady state: ms per video frame, p50 / p99 over the steady steps of a run of >= --frames frames after warm-up,
  each step pushed as one block of audio (the latency a live caller sees), and the throughput when all the audio
  is pushed at once (steps overlap: VAE of block i with the DiT of block i + 1 on a GPU);
- real time: audio fed at 25 fps wall-clock pace; time to first frame (frame 1) and audio-to-video delay (when a
  frame comes back minus when the 40 ms of audio that drives it had arrived), p50 / max; algorithmic look-ahead;
- per-stage times of one steady step (audio features, DiT main pass, cache pass, decode, device-to-host copy),
  each timed alone with synchronisation, next to its roofline floor from counted FLOPs and bytes;
- warm-up (first steady step: compile / graph capture), peak memory, hardware and versions;
- per step: FLOPs, bytes of weights + KV touched, dispatched aten operators (and graph launches with CUDA graphs);
- `--baseline naive`: bench.naive's official-style loop (per-layer concatenation, .item() per layer, whole-video
  decode at the end) timed in the same run on the same weights, with the time and operator-count ratios;
- `--sessions K`: K sessions stepped round robin; per-session frames per second.
A table, then one JSON line last. Timings are measurements of this run only.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import emit
from bench.roofline import detect
from runtime import AvatarPipeline, StreamConfig
from runtime.scheduler import step_plan
from runtime.tiny_decoder import taehv_decode_flops
from runtime.vae import vae_decode_flops


# ---------------------------------------------------------------------------------------------- measuring
class OpCounter(TorchDispatchMode):
    """Counts aten operators dispatched (a proxy for kernel launches; a CUDA graph replay counts as one)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timer(device, out: list):
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out.append((time.perf_counter() - start) * 1e3)


def pct(values, q):
    return float(np.percentile(values, q)) if values else None


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    env = np.clip(np.sin(2 * np.pi * 3.1 * t) + 0.3, 0, None)
    voice = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t + 1) + 0.05 * rng.standard_normal(len(t))
    return (0.25 * env * voice).astype(np.float32)


# ---------------------------------------------------------------------------------------------- cost model
def decode_flops_per_latent(cfg) -> int:
    """Convolution FLOPs of decoding one steady latent frame with the configured decoder (0: not counted)."""
    if cfg.decoder == "taehv":
        return taehv_decode_flops(cfg)
    return vae_decode_flops(cfg, first=False) if cfg.vae == "wan" else 0


def step_cost(pipe, stream: StreamConfig) -> dict:
    """FLOPs and bytes of one steady step, per stage (matmul FLOPs; weights read once per pass, KV read once)."""
    cfg, dit = pipe.config, pipe.dit
    s_f, B, L, N = cfg.tokens_per_frame, stream.block_frames, stream.window_blocks, stream.passes
    W = stream.history_frames if stream.use_temporal_anchor else 0
    prefix = s_f * ((1 if stream.use_style_anchor else 0) + W)
    q_main, q_cache = L * B * s_f, B * s_f
    elt = torch.finfo(pipe.dtype).bits // 8
    weights = sum(p.numel() for p in dit.parameters()) * elt
    kv = lambda q: 2 * (prefix + q) * cfg.dim * cfg.num_layers * elt            # noqa: E731
    return {
        "dit_main": dict(flops=N * dit.step_flops(q_main, prefix + q_main, L * B), bytes=N * (weights + kv(q_main))),
        "dit_cache": dict(flops=dit.step_flops(q_cache, prefix + q_cache, B), bytes=weights + kv(q_cache)),
        "decode": dict(flops=B * decode_flops_per_latent(cfg),
                       bytes=sum(p.numel() for p in pipe.decoder.parameters()) * elt * B),
    }


# ---------------------------------------------------------------------------------------------- runs
def make_session(pipe, image, stream, args, seed=0):
    return pipe.session(image, stream=stream, seed=seed, engine=args.engine, compile=args.compile)


def steady_run(pipe, image, stream, args, pcm) -> dict:
    """One block of audio per push; per-step wall time; then a throughput run with one big push."""
    cfg = pipe.config
    sess = make_session(pipe, image, stream, args)
    per_block = stream.block_frames * cfg.audio_frames_per_latent * cfg.samples_per_frame
    warm_steps = stream.window_blocks + 2
    times, frames_per_step, warmup_ms = [], [], []
    with torch.inference_mode():
        for i in range(0, len(pcm) - per_block + 1, per_block):
            rec = warmup_ms if i // per_block < warm_steps else times
            with timer(pipe.device, rec):
                frames = sess.push_audio(pcm[i:i + per_block])
            if rec is times:
                frames_per_step.append(len(frames))
        sess.flush()
    fps = statistics.median(frames_per_step) if frames_per_step else 0
    ms_frame = [t / fps for t in times] if fps else []
    thr = make_session(pipe, image, stream, args, seed=1)
    with torch.inference_mode():
        thr.push_audio(pcm[:warm_steps * per_block])
        rest = pcm[warm_steps * per_block:]
        out = []
        with timer(pipe.device, out):
            n = len(thr.push_audio(rest))
    return dict(ms_per_frame_p50=pct(ms_frame, 50), ms_per_frame_p99=pct(ms_frame, 99), steps=len(times),
                frames_per_step=fps, warmup_first_steady_ms=max(warmup_ms) if warmup_ms else None,
                throughput_ms_per_frame=out[0] / n if n else None, stats=sess.stats())


def realtime_run(pipe, image, stream, args, seconds: float) -> dict:
    """Feed audio at wall-clock pace in 40 ms chunks; when does each video frame come back?"""
    cfg = pipe.config
    pcm = speech(seconds, seed=2)
    sess = make_session(pipe, image, stream, args, seed=2)
    chunk = cfg.samples_per_frame
    arrival, returned = [], []                 # audio frame end times; (video frame index, time returned)
    start = time.perf_counter()
    frames_seen = 0
    with torch.inference_mode():
        for i in range(0, len(pcm) - chunk + 1, chunk):
            due = start + (i + chunk) / cfg.sample_rate
            while time.perf_counter() < due:
                time.sleep(max(0.0, min(0.002, due - time.perf_counter())))
            arrival.append(time.perf_counter())
            got = sess.push_audio(pcm[i:i + chunk])
            now = time.perf_counter()
            returned += [(frames_seen + k, now) for k in range(len(got))]
            frames_seen += len(got)
    delays = [(t - arrival[v - 1]) * 1e3 for v, t in returned if 1 <= v <= len(arrival)]
    first = next((t for v, t in returned if v == 1), None)
    return dict(time_to_first_frame_ms=(first - start) * 1e3 if first else None,
                audio_to_video_delay_ms_p50=pct(delays, 50), audio_to_video_delay_ms_max=max(delays) if delays else None,
                realtime_seconds=seconds)


def stage_times(pipe, image, stream, reps: int = 5) -> dict:
    """Each stage of one steady step alone (synchronised), median of reps calls."""
    cfg, dev = pipe.config, pipe.device
    sess = make_session(pipe, image, stream, argparse.Namespace(engine=False, compile=False))
    with torch.inference_mode():
        sess.push_audio(speech(6 * stream.block_frames * 4 / 25 + 1.0, seed=3))
        wi = stream.window_blocks - 1 + -(-stream.history_frames // stream.block_frames)
        sp = step_plan(stream, wi, None, sess.state.levels_t)
        main, cp = sp.passes[0], sp.cache_pass
        F, h, w = len(main.frames), *cfg.latent_hw
        x = torch.randn(1, cfg.vae_z_dim, F, h, w, device=dev, dtype=pipe.dtype)
        audio = torch.zeros(1, 4 * F, cfg.audio_input_dim, device=dev, dtype=pipe.dtype)
        cache = sess.state.cache
        cache.slot_frame = list(main.history) + [None] * (cache.capacity - len(main.history))
        out = {k: [] for k in ("audio", "dit_main", "dit_cache", "decode", "copy")}
        feat = pipe.streaming_audio(stream)
        feat.push(speech(F * 4 / 25 + stream.audio_left_context_s, seed=4))
        for _ in range(reps):
            with timer(dev, out["audio"]):
                feat.features(max(0, feat.available_frames - 4 * F), feat.available_frames)
            with timer(dev, out["dit_main"]):
                sess.reference.dit_pass(x, main, audio)
            with timer(dev, out["dit_cache"]):
                sess.reference.dit_pass(x[:, :, :stream.block_frames], cp, audio[:, :4 * stream.block_frames])
            with timer(dev, out["decode"]):
                video = pipe.decoder.decode_step(x[:, :, :stream.block_frames].to(pipe.vae_dtype),
                                                 sess.state.decode_cache)
            from runtime.media import frames_to_uint8
            u8 = frames_to_uint8(video)
            with timer(dev, out["copy"]):
                u8.cpu()
    return {k: statistics.median(v) for k, v in out.items()}


def count_step_ops(pipe, image, stream, args) -> dict:
    """Dispatched operators of one steady DiT step (main passes, re-noising, cache pass; not audio or decode).
    Counted without torch.compile (a dispatch mode cannot look inside a compiled region); with CUDA graphs the
    replay itself dispatches nothing, so the count is what the host still launches per step."""
    sess = make_session(pipe, image, stream, argparse.Namespace(engine=args.engine, compile=False))
    feats = torch.randn(4 * stream.block_frames * (stream.window_blocks + 6), pipe.config.audio_input_dim)
    counts, run_step = [], sess.executor.run

    def counted(sp, rows):
        if sp.index < stream.window_blocks + 3:           # past ramp-up and the first engine (warm-up) steps
            return run_step(sp, rows)
        with OpCounter() as counter:
            block = run_step(sp, rows)
        counts.append(counter.count)
        return block

    sess.executor.run = counted
    with torch.inference_mode():
        sess.push_features(feats)
    return dict(ops_per_step=counts[-1], graphs=bool(sess.engine and sess.engine.use_graphs))


def naive_run(pipe, image, n_blocks: int) -> dict:
    """bench.naive's official-style loop on the same weights: time per frame (DiT + whole-video decode) and
    dispatched operators of one steady step (the difference between runs of n and n - 1 blocks: one more window)."""
    from bench.naive import naive_official
    sess = pipe.session(image, stream="official", seed=0, engine=False)
    feats = torch.randn(4 * 4 * n_blocks, pipe.config.audio_input_dim)
    out, ops = [], []
    with torch.inference_mode():
        with timer(pipe.device, out):
            naive_official(pipe, sess.state.z_ref, sess.state.context_kv, feats, n_blocks, 0, sync_counters=True, decode=True)
        for n in (n_blocks - 1, n_blocks):
            with OpCounter() as counter:
                naive_official(pipe, sess.state.z_ref, sess.state.context_kv, feats[:16 * n], n, 0, sync_counters=True)
            ops.append(counter.count)
    return dict(ms_per_frame=out[0] / (16 * n_blocks), ops_per_step=ops[1] - ops[0], blocks=n_blocks)


def sessions_run(pipe, image, stream, args, k: int, pcm) -> dict:
    cfg = pipe.config
    sessions = [make_session(pipe, image, stream, args, seed=i) for i in range(k)]
    per_block = stream.block_frames * cfg.audio_frames_per_latent * cfg.samples_per_frame
    frames, out = 0, []
    with torch.inference_mode():
        for s in sessions:
            s.push_audio(pcm[:(stream.window_blocks + 2) * per_block])
        with timer(pipe.device, out):
            for i in range((stream.window_blocks + 2) * per_block, len(pcm) - per_block + 1, per_block):
                for s in sessions:
                    frames += len(s.push_audio(pcm[i:i + per_block]))
    seconds = out[0] / 1e3
    return dict(sessions=k, per_session_fps=frames / k / seconds if seconds else None)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    # what to run
    p.add_argument("--preset", default="wan-1.3b")
    p.add_argument("--stream", default="official")
    p.add_argument("--frames", type=int, default=400, help="steady-state video frames to time (after warm-up)")
    p.add_argument("--realtime-seconds", type=float, default=None,
                   help="real-time feeding run length (default 8; at least the look-ahead plus three blocks)")
    p.add_argument("--baseline", choices=["naive"], default=None)
    p.add_argument("--sessions", type=int, default=1)
    # how
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--engine", default=True, action=argparse.BooleanOptionalAction,
                   help="static-shape engine for steady steps (default on; --no-engine: reference session)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine step (compile time reported)")
    p.add_argument("--decoder", default=None, choices=["vae", "taehv"], help="override the preset's decoder")
    p.add_argument("--json-out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    overrides = {"decoder": args.decoder} if args.decoder else {}
    t0 = time.perf_counter()
    pipe = AvatarPipeline.from_preset(args.preset, device=device, dtype=dtype, seed=0, **overrides)
    build_s = time.perf_counter() - t0
    stream = StreamConfig.preset(args.stream)
    cfg = pipe.config
    image = (np.random.default_rng(0).random((cfg.height, cfg.width, 3)) * 255).astype(np.uint8)
    step_frames = stream.block_frames * cfg.audio_frames_per_latent
    warm = stream.window_blocks + 2
    n_steps = warm + -(-args.frames // step_frames)
    pcm = speech(n_steps * step_frames / cfg.fps + 0.5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steady = steady_run(pipe, image, stream, args, pcm)
    # long enough for the first block to clear the look-ahead, plus two more blocks
    block_s = step_frames / cfg.fps
    shortest = stream.lookahead_video_frames(cfg.audio_frames_per_latent) / cfg.fps + 3 * block_s
    realtime = realtime_run(pipe, image, stream, args, max(args.realtime_seconds or 8.0, shortest))
    stages = stage_times(pipe, image, stream)
    ops = count_step_ops(pipe, image, stream, args)
    cost = step_cost(pipe, stream)
    peak = detect() if device.type == "cuda" else None
    floors = {k: (peak.floor_ms(v["flops"], v["bytes"]) if peak else None) for k, v in cost.items()}
    result = dict(
        bench="latency", preset=args.preset, stream=args.stream, device=str(device), dtype=str(dtype).split(".")[-1],
        engine=args.engine, compile=args.compile,
        hardware=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        build_s=build_s, lookahead_frames=stream.lookahead_video_frames(cfg.audio_frames_per_latent),
        lookahead_s=stream.lookahead_video_frames(cfg.audio_frames_per_latent) / cfg.fps,
        **{k: v for k, v in steady.items() if k != "stats"}, **realtime,
        stages_ms=stages, floor_ms=floors,
        floor_ms_per_frame=(sum(floors.values()) / step_frames) if peak else None,
        flops_per_step=sum(c["flops"] for c in cost.values()), bytes_per_step=sum(c["bytes"] for c in cost.values()),
        kv_bytes=steady["stats"]["kv_bytes"], **ops,
        peak_memory_bytes=(torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    )
    if args.baseline == "naive":
        naive = naive_run(pipe, image, n_blocks=6)
        result["naive"] = naive
        result["ratio_time"] = naive["ms_per_frame"] / result["throughput_ms_per_frame"] \
            if result["throughput_ms_per_frame"] else None
        result["ratio_ops"] = naive["ops_per_step"] / result["ops_per_step"] if result["ops_per_step"] else None
    if args.sessions > 1:
        result.update(sessions_run(pipe, image, stream, args, args.sessions, pcm))
    print_table(result)
    return emit(result, args.json_out)


def print_table(r: dict) -> None:
    f = lambda v, d=2: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    print(f"AvatarForcing latency | preset {r['preset']} | stream {r['stream']} | {r['hardware']} | {r['device']} "
          f"{r['dtype']} | torch {r['torch']} | engine {r['engine']} compile {r['compile']}")
    rows = [("steady ms/frame p50 / p99", f"{f(r['ms_per_frame_p50'])} / {f(r['ms_per_frame_p99'])}"),
            ("throughput ms/frame (one big push)", f(r["throughput_ms_per_frame"])),
            ("time to first frame ms (real time)", f(r["time_to_first_frame_ms"], 1)),
            ("audio-to-video delay ms p50 / max", f"{f(r['audio_to_video_delay_ms_p50'], 1)} / "
                                                  f"{f(r['audio_to_video_delay_ms_max'], 1)}"),
            ("algorithmic look-ahead", f"{r['lookahead_frames']} frames = {r['lookahead_s']:.2f} s"),
            ("warm-up: first steady step ms", f(r["warmup_first_steady_ms"], 1)),
            ("peak memory MiB", f(r["peak_memory_bytes"] / 2 ** 20, 0)),
            ("FLOPs / step (TFLOP)", f(r["flops_per_step"] / 1e12, 3)),
            ("bytes / step (GB)", f(r["bytes_per_step"] / 1e9, 3)),
            ("aten ops / step", r["ops_per_step"])]
    for name, ms in r["stages_ms"].items():
        floor = r["floor_ms"].get(name)
        rows.append((f"stage {name} ms (floor)", f"{f(ms)} ({f(floor)})"))
    if r.get("floor_ms_per_frame") is not None:
        rows.append(("roofline floor ms/frame (DiT + decode)", f(r["floor_ms_per_frame"])))
    if "naive" in r:
        rows += [("naive baseline ms/frame", f(r["naive"]["ms_per_frame"])),
                 ("naive aten ops / step", f(r["naive"]["ops_per_step"], 0)),
                 ("ratio naive / runtime: time, ops", f"{f(r['ratio_time'])}x, {f(r['ratio_ops'])}x")]
    if "per_session_fps" in r:
        rows.append((f"{r['sessions']} sessions: fps each", f(r["per_session_fps"], 1)))
    width = max(len(n) for n, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
