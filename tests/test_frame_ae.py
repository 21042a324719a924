"""The toy-talker's autoencoder in the Wan latent layout (per-frame encoder, decoder with a temporal context), and
the causal log-mel features."""
import numpy as np
import pytest
import torch

from runtime.audio import LogMelFeatures, StreamingAudioFeatures
from runtime.config import ModelConfig
from runtime.frame_ae import FrameAE, context_index


@pytest.fixture(scope="module")
def ae():
    torch.manual_seed(0)
    return FrameAE(ModelConfig.preset("toy-talker")).eval()


def video(frames, seed=0):
    return torch.rand(1, 3, frames, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_packing_matches_the_wan_layout(ae):
    z = ae.encode(video(9))
    assert z.shape == (1, 16, 3, 16, 16)
    codes = ae.encode_frames(video(9)[0].transpose(0, 1))                    # [9, 4, 16, 16]
    raw = ae.unpack(z)                                                       # [1, 3, 4, 4, 16, 16]
    for sub in range(4):                                                     # latent 0 = frame 0's code x 4
        assert torch.allclose(raw[0, 0, sub], codes[0], atol=1e-5)
    assert torch.allclose(raw[0, 1, 2], codes[3], atol=1e-5) and torch.allclose(raw[0, 2, 3], codes[8], atol=1e-5)


def test_streaming_decode_equals_offline(ae):
    z = ae.encode(video(13, seed=1))
    offline = ae.decode(z)
    assert offline.shape == (1, 3, 13, 64, 64)
    for chunks in ([1, 1, 1, 1], [2, 2], [1, 3]):
        cache, out, i = ae.init_decode_cache(1, z.dtype, z.device, 64, 64), [], 0
        for n in chunks:
            out.append(ae.decode_step(z[:, :, i:i + n], cache))
            i += n
        assert (torch.cat(out, 2) - offline).abs().max() <= 1e-5


def context_ae(context=(2, 3), seed=0):
    """A FrameAE whose context layer is not zero (a trained one's is not), so the context matters."""
    torch.manual_seed(seed)
    ae = FrameAE(ModelConfig.preset("toy-talker", frame_ae_context=context)).eval()
    with torch.no_grad():
        ae.context.weight.normal_(0, 0.05)
        ae.context.bias.normal_(0, 0.05)
    return ae


def test_context_index_follows_the_latent_layout():
    """Frame t sees t-2, t-1 (frame 0 before the start) and up to 3 later frames of its own latent (latent 0 =
    frame 0, latent k = frames 4k-3 .. 4k), the latent's last frame repeated past its end, masked 0."""
    index, mask = context_index(torch.tensor([0, 1, 4, 5, 7]), 2, 3)
    assert index.tolist() == [[0, 0, 0, 0, 0], [0, 0, 2, 3, 4], [2, 3, 4, 4, 4], [3, 4, 6, 7, 8], [5, 6, 8, 8, 8]]
    assert mask.tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("context", [(2, 3), (4, 0), (0, 2), (6, 1)])
def test_streaming_decode_with_context_equals_offline(context):
    ae = context_ae(context)
    z = ae.encode(video(21, seed=2))                                          # 6 latents
    with torch.no_grad():
        offline = ae.decode(z)
        for chunks in ([1] * 6, [2, 3, 1], [1, 5], [4, 2]):
            cache, out, i = ae.init_decode_cache(1, z.dtype, z.device, 64, 64), [], 0
            for n in chunks:
                out.append(ae.decode_step(z[:, :, i:i + n], cache))
                i += n
            assert (torch.cat(out, 2) - offline).abs().max() <= 1e-5
        assert cache.nbytes() == context[0] * 4 * 16 * 16 * 4
        cache.reset()                                                         # a new stream from the same buffers
        again = torch.cat([ae.decode_step(z[:, :, :1], cache), ae.decode_step(z[:, :, 1:], cache)], 2)
        assert (again - offline).abs().max() <= 1e-5


def test_context_reaches_exactly_the_frames_it_should():
    """Changing latent 3 (frames 9..12) with context (2, 3) changes frames 9..14 and nothing before frame 9: the
    later codes of a latent reach its earlier frames (no added latency), earlier codes reach 2 frames on."""
    ae = context_ae((2, 3))
    z = ae.encode(video(21, seed=3))
    z2 = z.clone()
    z2[:, :, 3] += torch.randn(z2[:, :, 3].shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        changed = (ae.decode(z2) - ae.decode(z)).abs().amax(dim=(0, 1, 3, 4)) > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(9, 15))


def test_zero_context_is_the_per_frame_decoder():
    """A new context layer is zero: adding it changes no output, and building it draws nothing from the RNG (so a
    training run's later random initialisations are unchanged)."""
    torch.manual_seed(0)
    plain = FrameAE(ModelConfig.preset("toy-talker", frame_ae_context=(0, 0))).eval()
    state = torch.get_rng_state()
    torch.manual_seed(0)
    with_context = FrameAE(ModelConfig.preset("toy-talker", frame_ae_context=(2, 3))).eval()
    assert torch.equal(torch.get_rng_state(), state) and plain.context is None
    missing, unexpected = with_context.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["context.bias", "context.weight"] and not unexpected
    z = plain.encode(video(9))
    with torch.no_grad():
        assert torch.equal(with_context.decode(z), plain.decode(z))


def test_bad_context_setting():
    for bad in ((-1, 0), (1, 4), (1,)):
        with pytest.raises(ValueError, match="frame_ae_context"):
            ModelConfig.preset("toy-talker", frame_ae_context=bad)


def test_normalisation_uses_the_config_statistics():
    cfg = ModelConfig.preset("toy-talker", latent_mean=tuple(range(16)), latent_std=(2.0,) * 16)
    torch.manual_seed(0)
    ae = FrameAE(cfg)
    torch.manual_seed(0)
    plain = FrameAE(ModelConfig.preset("toy-talker"))
    v = video(5)
    assert torch.allclose(ae.encode(v) * 2 + torch.arange(16.0).view(1, -1, 1, 1, 1), plain.encode(v), atol=1e-5)


def test_bad_frame_count(ae):
    with pytest.raises(ValueError, match="1 \\+ 4 k"):
        ae.encode(video(6))


# ---------------------------------------------------------------------------------------------- log-mel
def test_logmel_streaming_equals_clip_bit_for_bit():
    lm = LogMelFeatures(32)
    pcm = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.2).astype(np.float32)
    clip = lm.clip(pcm, 50)
    assert clip.shape == (51, 128) and torch.equal(clip[0], torch.zeros(128))
    rng = np.random.default_rng(1)
    for sizes in ([1] * 2000 + [len(pcm) - 2000], [640] * 50, None):
        stream = StreamingAudioFeatures(lm, left_context_frames=1)
        i = 0
        while i < len(pcm):
            n = int(rng.integers(1, 3000)) if sizes is None else sizes.pop(0)
            stream.push(pcm[i:i + n])
            i += n
        assert torch.equal(stream.features(0, 50), clip[1:])
        assert torch.equal(stream.features(17, 33), clip[18:34])


def test_logmel_is_causal_and_tracks_loudness():
    lm = LogMelFeatures(32)
    t = np.arange(16000) / 16000
    loud = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    quiet = loud * 0.01
    pcm = np.concatenate([quiet[:6400], loud[:6400]])                          # 10 quiet frames, then 10 loud
    feats = lm.clip(pcm, 20)[1:]
    changed = pcm.copy()
    changed[640 * 12:] = 0                                                      # change the future only
    assert torch.equal(lm.clip(changed, 20)[1:13], feats[:12])                  # frames 0..11 unaffected
    peak = feats.max(dim=1).values                                              # the 300 Hz band dominates
    assert peak[12:].min() > peak[:9].max() + 6                                 # +40 dB is +9.2 in natural log
