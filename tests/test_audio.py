"""wav2vec2 features: clip mode against an independent step-by-step computation, the row/frame contract, and the
streaming extractor's properties (chunking invariance, bounded memory, clear errors, honest distance to clip mode).
Tiny random wav2vec2 (preset "tiny"), a few seconds of synthetic chirps and noise."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.audio import (CONV_KERNELS, CONV_STRIDES, SAMPLES_PER_FRAME, StreamingAudioFeatures, Wav2Vec2Features,
                           num_audio_frames)
from runtime.config import ModelConfig

CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def enc():
    return Wav2Vec2Features.random(CFG, seed=0)


def chirps(seconds: float, seed: int = 0) -> np.ndarray:
    """Two rising chirps plus noise, with a DC offset and a loud half so normalisation matters."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (150 * t + 60 * t ** 2)) + 0.2 * np.sin(2 * np.pi * (900 * t - 40 * t ** 2))
    x = x * (1 + (t > seconds / 2)) + 0.05 * rng.standard_normal(len(t)) + 0.02
    return (0.4 * x).astype(np.float32)


# ---------------------------------------------------------------------------------------------- independent path
def interpolate_align_corners(feats: np.ndarray, size: int) -> np.ndarray:
    """Linear resampling [T_in, C] -> [size, C] with the end samples aligned (PyTorch align_corners=True)."""
    t_in = feats.shape[0]
    out = np.empty((size, feats.shape[1]), feats.dtype)
    for i in range(size):
        src = 0.0 if size == 1 else i * (t_in - 1) / (size - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, t_in - 1)
        w = src - lo
        out[i] = (1 - w) * feats[lo] + w * feats[hi]
    return out


def reference_features(model, pcm: np.ndarray, num_frames: int) -> np.ndarray:
    """The official extraction spelled out with the model's submodules: [num_frames + 1, width]."""
    x = (pcm - pcm.mean()) / np.sqrt(pcm.var() + 1e-7)                        # whole-pcm normalisation
    x = x[:num_frames * SAMPLES_PER_FRAME]
    if -(-len(x) // SAMPLES_PER_FRAME) < num_frames:        # short by whole frames (not official): pad after normalising
        x = np.pad(x, (0, num_frames * SAMPLES_PER_FRAME - len(x)))
    with torch.no_grad():
        cnn = model.feature_extractor(torch.from_numpy(x.astype(np.float32))[None])[0].T.numpy()   # [~2F-1, C]
        cnn = interpolate_align_corners(cnn, num_frames)
        h, _ = model.feature_projection(torch.from_numpy(cnn)[None])
        encoder = model.encoder
        h = encoder.layer_norm(h + encoder.pos_conv_embed(h))
        states = [h]
        for layer in encoder.layers:
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
            states.append(h)
    rows = torch.cat([states[-1], *states], -1)[0].numpy()
    return np.concatenate([np.zeros((1, rows.shape[1]), rows.dtype), rows])


# ---------------------------------------------------------------------------------------------- clip mode
def test_frame_arithmetic():
    assert SAMPLES_PER_FRAME == CFG.samples_per_frame == 640
    assert [num_audio_frames(n) for n in (0, 1, 639, 640, 641, 16000)] == [0, 1, 1, 1, 2, 25]


@pytest.mark.parametrize("seconds, num_frames", [(3.0, 75), (3.0, 40), (2.1, 60), (0.05, 1)])
def test_clip_matches_independent_computation(enc, seconds, num_frames):
    pcm = chirps(seconds)
    got = enc.clip(pcm, num_frames)
    assert got.dtype == torch.float32 and got.shape == (num_frames + 1, enc.width)
    assert torch.equal(got[0], torch.zeros(enc.width))                         # the zero prefix row
    ref = reference_features(enc.model, pcm, num_frames)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_width_and_layout(enc):
    assert enc.width == (CFG.wav2vec_layers + 2) * CFG.wav2vec_hidden == CFG.audio_input_dim
    rows = enc.clip(chirps(1.0), 25)[1:]
    hidden = CFG.wav2vec_hidden
    # last_hidden_state is repeated as the final hidden state: the first and last H-wide slices are equal
    torch.testing.assert_close(rows[:, :hidden], rows[:, -hidden:], rtol=0, atol=0)


def test_row_r_is_audio_frame_r_minus_1():
    """Audio frame v uses CNN frame 2v, whose receptive field [640 v, 640 v + 400) starts at the frame's first
    sample: the align_corners interpolation from 2F - 1 CNN frames to F frames is an exact decimation."""
    receptive, jump = 1, 1
    for k, s in zip(CONV_KERNELS, CONV_STRIDES):
        receptive, jump = receptive + (k - 1) * jump, jump * s
    assert (receptive, jump) == (400, 320)
    for frames in (1, 2, 7, 75, 1001):
        samples = frames * SAMPLES_PER_FRAME
        length = samples
        for k, s in zip(CONV_KERNELS, CONV_STRIDES):
            length = (length - k) // s + 1
        assert length == 2 * frames - 1
        cnn = torch.arange(length, dtype=torch.float32).view(1, 1, -1)
        picked = torch.nn.functional.interpolate(cnn, size=frames, mode="linear", align_corners=True)[0, 0]
        assert torch.equal(picked, 2 * torch.arange(frames, dtype=torch.float32))
        starts = picked * jump
        assert torch.equal(starts, torch.arange(frames) * SAMPLES_PER_FRAME * 1.0)


def test_clip_truncates_after_normalising_the_whole_pcm(enc):
    """Samples past num_frames * 640 reach the rows only through the normalisation statistics, and the CNN's
    first GroupNorm (per channel over time, no conv bias) cancels any affine change of its input up to its eps:
    so the whole-pcm normalisation is nearly a no-op for full-length clips, and the tail is effectively cut."""
    pcm = chirps(3.0)
    short = enc.clip(pcm, 40)
    loud_tail = pcm.copy()
    loud_tail[40 * SAMPLES_PER_FRAME:] = np.clip(np.random.default_rng(1).normal(0, 0.3, len(pcm) - 40 * 640), -1, 1)
    torch.testing.assert_close(enc.clip(loud_tail, 40), short, rtol=0, atol=1e-3)
    torch.testing.assert_close(enc.clip(0.5 * pcm + 0.01, 40), short, rtol=0, atol=1e-3)


def test_clip_pads_short_audio_after_normalisation(enc):
    pcm = chirps(1.0)                      # 25 frames of audio, 40 asked for
    got = enc.clip(pcm, 40)
    np.testing.assert_allclose(got.numpy(), reference_features(enc.model, pcm, 40), rtol=1e-4, atol=1e-5)
    # padding before normalising would pad with -mean/std instead of 0: visibly different rows
    raw_padded = np.pad(pcm, (0, 40 * SAMPLES_PER_FRAME - len(pcm)))
    assert (enc.clip(raw_padded, 40) - got).abs().max() > 0.1


@pytest.mark.parametrize("short", [40, 300])
def test_clip_takes_audio_ending_inside_the_last_frame_unpadded(enc, short):
    """The official loader keeps a clip when ceil(samples / 640) reaches the frame count and runs wav2vec2 on the
    samples as they are (no padding): 300 samples short leaves the CNN one frame fewer (2F - 2), 40 short the same
    count over fewer samples; the first GroupNorm's statistics see the difference either way."""
    frames = 40
    pcm = chirps(3.0)[:frames * SAMPLES_PER_FRAME - short]
    got = enc.clip(pcm, frames)
    np.testing.assert_allclose(got.numpy(), reference_features(enc.model, pcm, frames), rtol=1e-4, atol=1e-5)
    padded = np.pad(pcm, (0, short))      # zero-padding the raw samples would be a different input
    assert (enc.clip(padded, frames) - got).abs().max() > 1e-4


def test_encoder_shared_by_threads_matches_sequential_runs(enc):
    """One encoder, calls of different lengths from 4 threads at once: each gets exactly its sequential result (the
    frame count of a call is per thread, nothing on the shared model changes per call)."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(chirps(1.0 + 0.3 * i, seed=i), frames) for i, frames in enumerate((25, 31, 20, 36, 12, 40, 17, 28))]
    expected = [enc.clip(pcm, frames) for pcm, frames in jobs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda job: enc.clip(*job), jobs))
            for want, have in zip(expected, got):
                assert torch.equal(want, have)


def test_clip_errors(enc):
    with pytest.raises(ValueError, match="num_frames"):
        enc.clip(chirps(1.0), 0)
    with pytest.raises(ValueError, match="empty"):
        enc.clip(np.zeros(0, np.float32), 5)
    with pytest.raises(ValueError):
        enc.clip(np.full(800, np.nan, np.float32), 1)


def test_random_is_deterministic_per_seed():
    a, b, c = (Wav2Vec2Features.random(CFG, seed) for seed in (3, 3, 4))
    pcm = chirps(0.5)
    assert torch.equal(a.clip(pcm, 12), b.clip(pcm, 12))
    assert not torch.allclose(a.clip(pcm, 12), c.clip(pcm, 12))
    with pytest.raises(ValueError, match="audio_input_dim"):
        Wav2Vec2Features.random(ModelConfig.preset("tiny").__class__(**{**CFG.to_dict(), "audio_input_dim": 99}), 0)


def test_from_pretrained_round_trip_and_missing_files(enc, tmp_path):
    enc.model.save_pretrained(tmp_path / "w2v")
    enc.extractor.save_pretrained(tmp_path / "w2v")
    loaded = Wav2Vec2Features.from_pretrained(tmp_path / "w2v")
    assert not getattr(loaded.model, "use_kernels", False)        # transformers 5: no hub kernels swapped in
    pcm = chirps(1.0)
    assert torch.equal(loaded.clip(pcm, 25), enc.clip(pcm, 25))
    weights = load_file(tmp_path / "w2v" / "model.safetensors")
    del weights["encoder.layers.3.attention.k_proj.weight"]
    save_file(weights, tmp_path / "w2v" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights.*encoder\.layers\.3\.attention\.k_proj\.weight"):
        Wav2Vec2Features.from_pretrained(tmp_path / "w2v")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Wav2Vec2Features.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "w2v" / "preprocessor_config.json").unlink()
    for weights in (tmp_path / "w2v").glob("model*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json.*model.safetensors or pytorch_model.bin"):
        Wav2Vec2Features.from_pretrained(tmp_path / "w2v")


# ---------------------------------------------------------------------------------------------- stream mode
def pushed(enc, pcm, chunks, left=20) -> StreamingAudioFeatures:
    stream = StreamingAudioFeatures(enc, left_context_frames=left)
    for piece in np.split(pcm, np.cumsum(chunks)[:-1]):
        stream.push(piece)
    return stream


def test_stream_segment_is_the_clip_of_the_segment(enc):
    pcm = chirps(3.0)
    stream = pushed(enc, pcm, [len(pcm)], left=20)
    assert stream.available_frames == 75
    got = stream.features(50, 70)                       # segment = frames [30, 70)
    segment = pcm[30 * SAMPLES_PER_FRAME:70 * SAMPLES_PER_FRAME]
    assert torch.equal(got, enc.clip(segment, 40)[1 + 20:])
    assert torch.equal(stream.features(5, 30), enc.clip(pcm[:30 * SAMPLES_PER_FRAME], 30)[1 + 5:])  # clamped at 0
    assert stream.features(7, 7).shape == (0, enc.width)


def test_stream_is_independent_of_chunking(enc):
    pcm = chirps(2.0, seed=1)
    rng = np.random.default_rng(0)
    random_chunks = []
    while sum(random_chunks) < len(pcm):
        random_chunks.append(int(rng.integers(0, 3000)))
    random_chunks[-1] -= sum(random_chunks) - len(pcm)
    chunkings = {"one sample": [1] * len(pcm), "frame": [SAMPLES_PER_FRAME] * (len(pcm) // SAMPLES_PER_FRAME),
                 "random": random_chunks, "all at once": [len(pcm)]}
    ranges = [(0, 10), (12, 31), (40, 50)]
    results = {}
    for name, chunks in chunkings.items():
        stream = pushed(enc, pcm, chunks)
        assert stream.available_frames == 50, name
        results[name] = [stream.features(a, b) for a, b in ranges]
    for name, feats in results.items():
        for got, want in zip(feats, results["all at once"]):
            assert torch.equal(got, want), name


def test_stream_requests_while_pushing_equal_requests_at_the_end(enc):
    pcm = chirps(2.0, seed=2)
    live = StreamingAudioFeatures(enc, left_context_frames=8)
    early = {}
    for piece in np.array_split(pcm, 37):
        live.push(piece)
        n = live.available_frames
        if n >= 4 and (n - 4, n) not in early:
            early[(n - 4, n)] = live.features(n - 4, n)
    whole = pushed(enc, pcm, [len(pcm)], left=8)
    assert len(early) > 10
    for (a, b), feats in early.items():
        assert torch.equal(feats, whole.features(a, b))


def test_pad_to_completes_the_last_frame_with_zeros(enc):
    pcm = chirps(1.0)[:10 * SAMPLES_PER_FRAME + 100]
    stream = pushed(enc, pcm, [len(pcm)], left=4)
    assert stream.available_frames == 10 and num_audio_frames(len(pcm)) == 11
    stream.pad_to(12)
    assert stream.available_frames == 12
    padded = np.concatenate([pcm, np.zeros(12 * SAMPLES_PER_FRAME - len(pcm), np.float32)])
    assert torch.equal(stream.features(8, 12), enc.clip(padded[4 * SAMPLES_PER_FRAME:], 8)[1 + 4:])
    with pytest.raises(RuntimeError, match="pad_to"):
        stream.push(pcm[:10])


def test_release_keeps_memory_bounded(enc):
    left, window = 10, 8
    stream = StreamingAudioFeatures(enc, left_context_frames=left)
    seconds = [chirps(1.0, seed=i % 7) for i in range(120)]     # two minutes of audio in 1 s chunks
    held, capacity = [], []
    for second in seconds:
        stream.push(second)
        n = stream.available_frames
        last = stream.features(n - window, n)
        stream.release(n - window + 1)
        held.append(stream.buffered_samples)
        capacity.append(stream.capacity_samples)
    assert stream.available_frames == 120 * 25          # indices stay absolute
    kept_everything = pushed(enc, np.concatenate(seconds), [120 * 16000], left=left)
    assert torch.equal(last, kept_everything.features(n - window, n))
    bound = (left + window + 25) * SAMPLES_PER_FRAME
    assert max(held) <= bound and max(capacity) <= 4 * bound
    assert held[-1] == held[-50] and capacity[-1] == capacity[-50]     # steady state: no growth


def test_stream_errors_name_the_frames(enc):
    stream = pushed(enc, chirps(1.0), [16000], left=5)
    with pytest.raises(ValueError, match=r"\[20, 30\).*only 25 complete frames"):
        stream.features(20, 30)
    stream.release(12)
    with pytest.raises(ValueError, match=r"\[11, 15\).*before 12 were released"):
        stream.features(11, 15)
    stream.features(12, 15)                             # the left context of frame 12 is still there
    with pytest.raises(ValueError, match="start <= stop"):
        stream.features(15, 14)
    with pytest.raises(ValueError, match="left_context_frames"):
        StreamingAudioFeatures(enc, left_context_frames=-1)
    with pytest.raises(ValueError):
        stream.push(np.array([0.1, np.inf], np.float32))


def test_stream_approaches_clip_away_from_the_right_edge(enc):
    """The encoder is bidirectional: a segment that ends at `stop` lacks the future the clip saw, so the error
    is largest at the right edge, and more left context brings the early rows closer to the clip."""
    pcm = chirps(8.0, seed=3)
    clip = enc.clip(pcm, 200)[1:]
    start, stop = 150, 180

    def rel_err(left):
        stream = pushed(enc, pcm, [len(pcm)], left=left)
        got, want = stream.features(start, stop), clip[start:stop]
        return ((got - want).norm(dim=1) / want.norm(dim=1)).numpy()

    long_ctx, no_ctx = rel_err(100), rel_err(0)
    interior, edge = long_ctx[:10].mean(), long_ctx[-5:].mean()
    assert interior < 0.7 * edge, (interior, edge)
    assert long_ctx[:10].mean() < 0.5 * no_ctx[:10].mean(), (long_ctx[:10].mean(), no_ctx[:10].mean())
    assert edge > 1e-3                                # and it is not exact: streaming is an approximation
