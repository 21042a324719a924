"""The static-shape engine: same output as the reference session, compiles whole with no recompiles,
dispatches fewer operators than the official-style loop; on a GPU: graphs == eager, no host syncs."""
import json

import numpy as np
import pytest
import torch

from runtime import AvatarPipeline

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def pipe():
    return AvatarPipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)


def stream_latents(pipe, image, stream, engine, feats, compile=False, seed=0):
    sess = pipe.session(image, stream=stream, seed=seed, engine=engine, compile=compile)
    latents = {}
    sess.on_block = lambda b, x: latents.__setitem__(b, x.detach().clone())
    with torch.inference_mode():
        frames = torch.cat([sess.push_features(feats[:50]), sess.push_features(feats[50:]), sess.flush()])
    return latents, frames, sess


@pytest.mark.parametrize("stream,tol", [("official", 0.0), ("relative", 0.0), ("low-delay", 1e-6), ("live", 1e-6)])
def test_engine_equals_session(pipe, image, stream, tol):
    """fp32 on CPU. Bitwise where the ring is read in the same order; low-delay reads its wrapped ring in
    physical slot order (the session in time order), which changes the softmax summation order only."""
    feats = torch.randn(160, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(1))
    ref, ref_frames, _ = stream_latents(pipe, image, stream, False, feats)
    got, frames, sess = stream_latents(pipe, image, stream, True, feats)
    assert sess.engine is not None and sess.engine.steps >= 3
    assert sorted(got) == sorted(ref)
    err = max((got[b] - ref[b]).abs().max().item() for b in ref)
    assert err <= tol, err
    if tol == 0.0:
        assert torch.equal(frames, ref_frames)


def compiled_stream(pipe, image, feats):
    """A low-delay stream through the engine with its step and (on a CPU) its decode under torch.compile; asserts
    it compiled to one graph each with no graph break and no recompile. Returns (latents, frames, session)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    with dynamo.config.patch(error_on_recompile=True):
        latents, frames, sess = stream_latents(pipe, image, "low-delay", True, feats, compile=True)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]      # the step and the decode
    return latents, frames, sess


def test_engine_step_compiles_whole_without_recompiles(pipe, image):
    feats = torch.randn(4 * 56, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(2))
    got, frames, sess = compiled_stream(pipe, image, feats)
    assert sess.engine.steps >= 50
    ref, ref_frames, _ = stream_latents(pipe, image, "low-delay", True, feats)
    assert max((got[b] - ref[b]).abs().max().item() for b in ref) <= 1e-5
    # uint8 frames from the compiled decode: within one level (fp32 reassociation on a rounding edge)
    assert frames.shape == ref_frames.shape and (frames.int() - ref_frames.int()).abs().max() <= 1


def test_engine_step_with_kernels_compiles_whole(image):
    """The Triton kernels are custom ops with fake implementations, so the steady step with them inside still
    compiles to one graph with no break (CPU interpreter here). Tolerance against the reference path without
    kernels: 1e-4 max abs on the latents (the kernels reorder fp32 sums; test_kernels.py bounds each op)."""
    pipe = AvatarPipeline.from_preset("tiny", device="cpu")
    feats = torch.randn(4 * 12, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(5))
    ref, _, _ = stream_latents(pipe, image, "low-delay", False, feats)
    pipe.dit.use_kernels = True
    got, _, sess = compiled_stream(pipe, image, feats)
    assert sess.engine.steps >= 6
    assert max((got[b] - ref[b]).abs().max().item() for b in ref) <= 1e-4


def test_engine_dispatches_fewer_operators_than_the_naive_loop(pipe, image):
    import argparse

    from bench.latency import count_step_ops, naive_run
    from runtime import StreamConfig
    ours = count_step_ops(pipe, image, StreamConfig.preset("official"), argparse.Namespace(engine=True))
    naive = naive_run(pipe, image, n_blocks=5)
    assert 0 < ours["ops_per_step"] < naive["ops_per_step"], (ours, naive)


def test_bench_latency_cpu_json(capsys):
    from bench.latency import main
    assert main(["--preset", "tiny", "--device", "cpu", "--frames", "64", "--realtime-seconds", "2.5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads(last)
    for key in ("ms_per_frame_p50", "ms_per_frame_p99", "throughput_ms_per_frame", "time_to_first_frame_ms",
                "audio_to_video_delay_ms_p50", "lookahead_frames", "stages_ms", "peak_memory_bytes",
                "warmup_first_steady_ms", "hardware", "torch", "flops_per_step", "bytes_per_step", "ops_per_step"):
        assert r.get(key) is not None, key
    assert set(r["stages_ms"]) == {"audio", "dit_main", "dit_cache", "decode", "copy"}
    assert r["steps"] * r["frames_per_step"] >= 64 and r["lookahead_frames"] == 48


# ---------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu_pipe():
    return AvatarPipeline.from_preset("tiny", device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_engine_graphs_equal_session(gpu_pipe, image):
    """bf16: the graph-replayed engine against the eager reference session. Tolerance: 5e-2 max abs on latents
    (bf16 rounding through 6 blocks, two passes per step, and a different ring summation order)."""
    feats = torch.randn(160, gpu_pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(1))
    ref, _, _ = stream_latents(gpu_pipe, image, "official", False, feats)
    got, _, sess = stream_latents(gpu_pipe, image, "official", True, feats)
    assert sess.engine.use_graphs and sess.engine.steps >= 3
    err = max((got[b].float() - ref[b].float()).abs().max().item() for b in ref)
    assert err <= 5e-2, err


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_engine(gpu_pipe, image):
    feats = torch.randn(160, gpu_pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(3))
    eager_sess = gpu_pipe.session(image, stream="low-delay", engine=True)
    eager_sess.engine.use_graphs = False
    eager = {}
    eager_sess.on_block = lambda b, x: eager.__setitem__(b, x.clone())
    graph = {}
    graph_sess = gpu_pipe.session(image, stream="low-delay", engine=True)
    graph_sess.on_block = lambda b, x: graph.__setitem__(b, x.clone())
    with torch.inference_mode():
        a = torch.cat([eager_sess.push_features(feats), eager_sess.flush()])
        b = torch.cat([graph_sess.push_features(feats), graph_sess.flush()])
    assert all(torch.equal(eager[k], graph[k]) for k in eager)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_steady_step_has_no_host_sync(gpu_pipe, image):
    feats = torch.randn(200, gpu_pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(4))
    sess = gpu_pipe.session(image, stream="low-delay", engine=True)
    with torch.inference_mode():
        sess.push_features(feats[:120])                  # ramp-up, capture and a few replays
        from runtime.scheduler import step_plan
        sp = step_plan(sess.stream, sess.next_window, None, sess.state.levels_t)
        assert sess.engine.handles(sp)
        audio = sess.rows(*sp.passes[0].audio_rows)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sess.engine.run(sp, audio)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_decode_has_no_host_sync(gpu_pipe, image):
    feats = torch.randn(120, gpu_pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(6))
    sess = gpu_pipe.session(image, stream="low-delay", engine=True)
    with torch.inference_mode():
        sess.push_features(feats)                        # the decode graph is captured by now
        block = torch.randn_like(sess.engine.out_block)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = sess.engine.decode(block)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert pending.wait().shape == (4, gpu_pipe.config.height, gpu_pipe.config.width, 3)


@pytest.mark.gpu
def test_gpu_graphs_replay_after_reset(gpu_pipe, image):
    """reset() keeps every buffer, so the captured step and decode graphs stay valid: a second stream through the
    same session gives the first stream's frames again, bit for bit."""
    feats = torch.randn(100, gpu_pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(7))
    sess = gpu_pipe.session(image, stream="low-delay", engine=True)
    with torch.inference_mode():
        first = torch.cat([sess.push_features(feats), sess.flush()])
        assert set(sess.engine._graphs) == {"dit", "vae"}
        sess.reset()
        second = torch.cat([sess.push_features(feats), sess.flush()])
    assert torch.equal(first, second)


@pytest.mark.gpu
def test_gpu_toy_talker_through_the_captured_decode_graph(image):
    """The toy-talker's FrameAE decoder (temporal context built on the device) captured as a CUDA graph: frames
    equal the reference session's within one uint8 level (fp32 on both; the engine reads the ring in slot order)."""
    from runtime.config import TOY_ASSETS
    pipe = AvatarPipeline.from_preset("toy-talker", device="cuda")
    face = TOY_ASSETS / "ref_0.png"
    feats = torch.randn(80, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        ref_sess, sess = pipe.session(face, engine=False), pipe.session(face, engine=True)
        ref = torch.cat([ref_sess.push_features(feats), ref_sess.flush()])
        got = torch.cat([sess.push_features(feats), sess.flush()])
    assert sess.engine.use_graphs and "vae" in sess.engine._graphs
    assert got.shape == ref.shape and (got.int() - ref.int()).abs().max() <= 1


@pytest.mark.gpu
def test_gpu_kernels_tune_only_while_warming_up(image):
    """Ramp-up, steady and tail windows with the Triton kernels on: every autotuning run happens before the stream
    is steady (the anchor pass and the ramp-up cover both size classes), none in the steady steps or the tail."""
    from runtime.kernels.ring_attention import autotune_runs
    pipe = AvatarPipeline.from_preset("wan-1.3b", device="cuda", dtype=torch.bfloat16, num_layers=2)
    assert pipe.dit.use_kernels
    cfg = pipe.config
    face = (np.random.default_rng(1).random((cfg.height, cfg.width, 3)) * 255).astype(np.uint8)
    feats = torch.randn(4 * 10, cfg.audio_input_dim, generator=torch.Generator().manual_seed(9))
    sess = pipe.session(face, stream="low-delay", engine=True)
    with torch.inference_mode():
        sess.push_features(feats[:4 * 7])                 # ramp-up (4 windows), warm-up and capture
        tuned = autotune_runs()
        sess.push_features(feats[4 * 7:])
        sess.flush()                                      # the tail: 3 shorter windows
    assert tuned >= 1 and autotune_runs() == tuned


def test_step_flops_equal_torch_flop_counter_at_full_size():
    """The cost model behind bench.latency / bench.roofline: wan-1.3b, one 4-frame window over an anchor + 2-frame
    ring prefix, on the meta device (no memory). torch's FlopCounterMode counts the matmuls and attention of the real
    forward; step_flops must agree to 0.1% (it leaves out only elementwise work and the tiny AudioPack matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    from runtime.kernels.rope import rope_rotate_ref
    from runtime.config import ModelConfig
    from runtime.dit import AvatarDiT, Prefix
    from runtime.rope import Rope
    cfg, dev, frames = ModelConfig.preset("wan-1.3b"), "meta", 4
    model = AvatarDiT(cfg).to(dev)
    s, (h, w) = cfg.tokens_per_frame, cfg.latent_hw
    x, y = torch.empty(1, 16, frames, h, w, device=dev), torch.empty(1, cfg.in_dim - 16, frames, h, w, device=dev)
    audio = torch.empty(1, 4 * frames, cfg.audio_input_dim, device=dev)
    ctx = model.context_kv(torch.empty(1, cfg.text_len, cfg.text_dim, device=dev))
    k = torch.empty(1, s, cfg.num_heads, cfg.head_dim, device=dev)
    ring = torch.empty(1, 2 * s, cfg.num_heads, cfg.head_dim, device=dev)
    anchor_rope, ring_rope = Rope([0], cfg.grid_hw, cfg.head_dim, dev), Rope([1, 2], cfg.grid_hw, cfg.head_dim, dev)
    prefix = Prefix(anchor=(rope_rotate_ref(k, anchor_rope.axes), k),
                    ring=(rope_rotate_ref(ring, ring_rope.axes), ring), ring_start=0, ring_len=2 * s)
    t = torch.full((1, frames), 500.0, device=dev)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, y, t, audio, ctx, Rope(list(range(3, 3 + frames)), cfg.grid_hw, cfg.head_dim, dev),
              prefix=lambda i: prefix)
    want = model.step_flops(frames * s, (3 + frames) * s, frames)
    assert abs(counter.get_total_flops() / want - 1) < 1e-3, (counter.get_total_flops(), want)


def test_roofline_floor_is_the_slower_of_compute_and_bandwidth(capsys):
    from bench.roofline import PEAKS, main
    assert main(["--preset", "tiny", "--streams", "official,low-delay"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 2 * len(PEAKS)
    for r in rows:
        assert r["ms_per_frame"] == pytest.approx(sum(r["stages_ms"].values()) / r["frames_per_step"])
    h100 = {r["stream"]: r for r in rows if r["gpu"] == "H100 SXM"}
    assert h100["official"]["frames_per_step"] == 16 and h100["low-delay"]["frames_per_step"] == 4
    main(["--preset", "wan-1.3b", "--streams", "low-delay", "--decoder", "taehv"])
    taehv = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    main(["--preset", "wan-1.3b", "--streams", "low-delay", "--decoder", "vae"])
    vae = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert 0 < taehv[0]["stages_ms"]["decode"] < vae[0]["stages_ms"]["decode"]      # the decoder choice is counted
    assert taehv[0]["stages_ms"]["dit_main"] == vae[0]["stages_ms"]["dit_main"]
    assert PEAKS["H100 SXM"].floor_ms(989e12, 1.0) == pytest.approx(1e3)            # compute-bound: 1 s of FLOPs
    assert PEAKS["H100 SXM"].floor_ms(1.0, 3.35e12) == pytest.approx(1e3)           # bandwidth-bound: 1 s of bytes
