"""StreamSession against a naive implementation of the official loop, plus the streaming properties:
translation invariance, chunking invariance, determinism, bounded look-ahead and constant memory."""
import gc
import warnings

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from bench.naive import naive_official
from runtime import AvatarPipeline, StreamConfig
from runtime.scheduler import step_plan, warped_timesteps

SAMPLES_PER_FRAME = 640


@pytest.fixture(scope="module")
def pipe():
    return AvatarPipeline.from_preset("tiny", device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return (rng.random((64, 96, 3)) * 255).astype(np.uint8)


def speechlike(seconds, seed=0):
    """A deterministic voiced signal with syllable-rate loudness changes and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t) + 0.3, 0, None) * (rng.random() * 0.3 + 0.5)
    voice = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t + 1) + 0.1 * rng.standard_normal(len(t))
    return (0.3 * envelope * voice).astype(np.float32)


# ---------------------------------------------------------------------------------------------- naive loop
def naive(pipe, sess, feats, n_blocks, seed, noise_upfront=False):
    """bench.naive's deliberately naive official loop (absolute positions, concatenated caches)."""
    return naive_official(pipe, sess.state.z_ref, sess.state.context_kv, feats, n_blocks, seed, noise_upfront=noise_upfront)


def test_session_equals_naive_official_loop(pipe, image):
    n_blocks = 6
    feats = torch.randn(n_blocks * 16, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(3))
    sess = pipe.session(image, stream="official", seed=7)
    got = {}
    sess.on_block = lambda b, x0: got.__setitem__(b, x0.clone())
    with torch.inference_mode():
        frames = torch.cat([sess.push_features(feats[:37]), sess.push_features(feats[37:]), sess.flush()])
        ref = naive(pipe, sess, feats, n_blocks, seed=7)
    assert sorted(got) == sorted(ref) == list(range(n_blocks))
    for b in ref:
        err = (got[b] - ref[b]).abs().max().item()
        assert err <= 1e-6, (b, err)
    assert frames.shape == (1 + n_blocks * 16, 32, 48, 3) and frames.dtype == torch.uint8


def test_generate_clip_is_the_official_computation(pipe, image):
    """Whole-clip features, noise drawn up front, 17 latent frames: generate() == the naive loop + offline decode."""
    from runtime.media import frames_to_uint8
    pcm = speechlike(6.0)
    video = pipe.generate(image, pcm, stream="official", audio_mode="clip", num_latent_frames=17, seed=11)
    assert video.shape[0] == 1 + 4 * 16
    feats = pipe.audio_encoder.clip(pcm, 4 * 17 + 80)[1:]
    sess = pipe.session(image, stream="official", seed=11)
    with torch.inference_mode():
        ref = naive(pipe, sess, feats, 4, seed=11, noise_upfront=True)
        latents = torch.cat([sess.state.z_ref] + [ref[b] for b in range(4)], dim=2)
        ref_video = frames_to_uint8(pipe.vae.decode(latents))
    diff = (video.int() - ref_video.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3   # uint8 truncation of equal-within-1e-6 floats


def test_generate_clip_accepts_what_the_official_loader_accepts(pipe, image):
    """The official loader keeps a clip whose last 40 ms frame is partial (ceil(samples / 640) frames): so does
    generate(num_latent_frames=N), which needs 4 N + 80 audio frames; a whole frame less is refused."""
    needed = (4 * 5 + 80) * SAMPLES_PER_FRAME
    pcm = speechlike(needed / 16000 + 0.1)
    assert pipe.generate(image, pcm[:needed - 300], stream="low-delay", num_latent_frames=5).shape[0] == 17
    with pytest.raises(ValueError, match=r"needs 100 audio frames .*got 99"):
        pipe.generate(image, pcm[:needed - SAMPLES_PER_FRAME], stream="low-delay", num_latent_frames=5)
    with pytest.raises(ValueError, match=r"num_latent_frames=0 must be 1 \+ 1 \* n"):
        pipe.generate(image, pcm, stream="low-delay", num_latent_frames=0)
    with pytest.raises(TypeError, match="num_latent_frames must be an int"):
        pipe.generate(image, pcm, stream="low-delay", num_latent_frames=5.0)


# ---------------------------------------------------------------------------------------------- invariance
def test_relative_step_is_translation_invariant_bitwise(pipe, image):
    cfg = pipe.config
    stream = StreamConfig.preset("relative")
    sess = pipe.session(image, stream=stream, seed=0)
    levels = warped_timesteps(stream)
    g = torch.Generator().manual_seed(1)
    cache = sess.state.cache
    ring_k, ring_v = torch.randn(cache.ring_k.shape, generator=g), torch.randn(cache.ring_v.shape, generator=g)
    x = torch.randn(1, 16, 16, *cfg.latent_hw, generator=g)
    audio = torch.randn(1, 64, cfg.audio_input_dim, generator=g)
    outs = []
    for wi in (2, 250_000):                                  # window starts at latent frames 9 and 1,000,001
        sp = step_plan(stream, wi + 3, None, levels)
        cache.slot_frame = list(sp.passes[0].history)
        with torch.inference_mode():                     # session buffers are inference tensors
            cache.ring_k.copy_(ring_k)
            cache.ring_v.copy_(ring_v)
            main = sess.reference.dit_pass(x, sp.passes[0], audio)
            block = sess.reference.dit_pass(x[:, :, :4], sp.cache_pass, audio[:, :16])
        outs.append((main, block))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def run_chunks(pipe, image, pcm, sizes, stream="official", seed=0):
    sess = pipe.session(image, stream=stream, seed=seed)
    out, i = [], 0
    for n in sizes:
        out.append(sess.push_audio(pcm[i:i + n]))
        i += n
    assert i == len(pcm)
    out.append(sess.flush())
    return torch.cat(out)


def test_chunking_does_not_change_frames(pipe, image):
    pcm = speechlike(2.3)
    whole = run_chunks(pipe, image, pcm, [len(pcm)])
    assert whole.shape[0] == 1 + -(-len(pcm) // SAMPLES_PER_FRAME)
    rng = np.random.default_rng(0)
    random_sizes = []
    while sum(random_sizes) < len(pcm):
        random_sizes.append(int(min(rng.integers(0, 5000), len(pcm) - sum(random_sizes))))
    for sizes in ([1] * len(pcm), [640] * (len(pcm) // 640) + [len(pcm) % 640], random_sizes):
        assert torch.equal(run_chunks(pipe, image, pcm, sizes), whole)


def test_seeded_runs_are_identical_and_seeds_matter(pipe, image):
    pcm = speechlike(1.0)
    a = run_chunks(pipe, image, pcm, [len(pcm)], seed=5)
    assert torch.equal(a, run_chunks(pipe, image, pcm, [len(pcm)], seed=5))
    assert not torch.equal(a[1:], run_chunks(pipe, image, pcm, [len(pcm)], seed=6)[1:])


@pytest.mark.parametrize("threads", [2, 4])
def test_pipeline_shared_by_threads_gives_the_sequential_frames(pipe, image, threads):
    """Streams of different lengths through one pipeline (one wav2vec2) from several threads at once: every frame
    equals the same stream run alone."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(speechlike(0.9 + 0.25 * i, seed=i), i) for i in range(threads)]
    run = lambda job: pipe.generate(image, job[0], stream="low-delay", audio_mode="stream", seed=job[1])  # noqa: E731
    expected = [run(job) for job in jobs]
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(run, jobs))
    for want, have in zip(expected, got):
        assert torch.equal(want, have)


def test_generate_stream_equals_session(pipe, image):
    pcm = speechlike(1.5)
    video = pipe.generate(image, pcm, stream="low-delay", audio_mode="stream", seed=3)
    assert torch.equal(video, run_chunks(pipe, image, pcm, [4000] * 6, stream="low-delay", seed=3))


def test_frames_never_depend_on_audio_beyond_the_lookahead(pipe, image):
    stream = StreamConfig.preset("low-delay")
    look = stream.lookahead_video_frames()
    pcm = speechlike(3.0)
    changed = pcm.copy()
    cut = 40 * SAMPLES_PER_FRAME
    changed[cut:] = speechlike(3.0, seed=9)[cut:]
    sess = pipe.session(image, stream=stream, seed=0)
    early = sess.push_audio(pcm[:cut])
    assert len(early) == 1 + 40 - look                      # frames 0 .. 40 - look: their look-ahead is in
    later = run_chunks(pipe, image, changed, [len(changed)], stream=stream)
    assert torch.equal(later[:len(early)], early)
    assert not torch.equal(later[len(early):], run_chunks(pipe, image, pcm, [len(pcm)], stream=stream)[len(early):])


def tensor_bytes():
    """Bytes of every live tensor storage in the process (a CPU stand-in for torch.cuda.memory_allocated)."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():      # isinstance on some lazy module objects warns about deprecations
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.is_meta or isinstance(obj, FakeTensor):      # no real memory (left behind by torch.compile)
            continue
        storage = obj.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def test_memory_and_cache_shapes_constant_over_2000_steps(image):
    # the TAEHV decoder keeps 2,000 steps fast on a CPU; the Wan VAE's fixed-shape cache is tested in test_vae.py
    pipe = AvatarPipeline.from_preset("tiny", decoder="taehv")
    stream = StreamConfig.preset("low-delay")
    sess = pipe.session(image, stream=stream, seed=0)
    width = pipe.config.audio_input_dim
    feats = torch.randn(4 * 50, width, generator=torch.Generator().manual_seed(0))
    cache = sess.state.cache
    shapes = [t.shape for t in (cache.anchor_k, cache.ring_k, cache.ring_v)]
    marks = {}
    with torch.inference_mode():
        for step in range(2000 // 50):
            frames = sess.push_features(feats)
            del frames
            if step in (4, 39):
                marks[step] = (tensor_bytes(), sess.next_window)
    assert sess.state.counts["steps"] >= 1990
    assert [t.shape for t in (cache.anchor_k, cache.ring_k, cache.ring_v)] == shapes
    assert marks[39][0] == marks[4][0], marks
