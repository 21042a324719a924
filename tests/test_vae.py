"""Tests for runtime/vae.py: layout of the released Wan 2.1 VAE (keys, shapes, parameter counts, cache size, FLOPs)
at the real wan-1.3b size on the meta device; behaviour (frame counts, streaming == offline in any chunking, fixed
cache shapes, causality, encode chunking and normalisation, weight-file round trip, bf16) on the tiny preset
(32x48 frames, 4x6 latents, base width 8) in fp32 with seeded random weights.

The official wan/modules/vae.py (which needs einops, not a test dependency) was run by hand with the same state dict:
encode and decode were bit-identical in fp32 and bf16. `test_matches_official_golden_values` pins numbers it produced.
"""
import pytest
import torch

from runtime.config import ModelConfig
from runtime.vae import CacheCursor, WanVAE, vae_decode_flops

TINY = ModelConfig.preset("tiny")        # 32x48 output, 4x6 latent
WAN = ModelConfig.preset("wan-1.3b")     # 832x480 output, 104x60 latent


def assert_close(actual, expected, atol=1e-5):
    assert actual.shape == expected.shape, f"{actual.shape=} {expected.shape=}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max diff {diff:.3g} > {atol}"


def tiny_vae(seed=0):
    """Seeded weights that keep the signal alive: conv weights ~ N(0, 1/fan_in) (the attention projection too,
    which the official zero-initialises), small random biases, gammas near 1 so that they matter."""
    torch.manual_seed(seed)
    vae = WanVAE(TINY).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.normal_(1.0, 0.1)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.uniform_(-0.1, 0.1)
    return vae


def latents(batch, frames, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TINY.vae_z_dim, frames, *TINY.latent_hw, generator=gen)


def video(batch, frames, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, TINY.height, TINY.width, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def offline(vae):
    """Offline decodes of latents(batch, 5), computed once (decoding dominates this file's run time)."""
    return {b: vae.decode(latents(b, 5)) for b in (1, 2)}


# -- layout at the real size (meta device: no memory, no compute) --
@pytest.fixture(scope="module")
def wan_meta():
    with torch.device("meta"):
        return WanVAE(WAN)


def test_parameter_counts_and_no_memory(wan_meta):
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(wan_meta.decoder) == 73_295_331 and count(wan_meta.conv2) == 272
    assert count(wan_meta.encoder) == 53_595_872 and count(wan_meta.conv1) == 1_056
    assert all(t.is_meta for t in [*wan_meta.parameters(), *wan_meta.buffers()])


@pytest.mark.parametrize("key, shape", [
    ("decoder.conv1.weight", (384, 16, 3, 3, 3)),
    ("decoder.middle.0.residual.0.gamma", (384, 1, 1, 1)),       # video RMS norm
    ("decoder.middle.1.norm.gamma", (384, 1, 1)),                # image RMS norm in the attention block
    ("decoder.middle.1.to_qkv.weight", (1152, 384, 1, 1)),
    ("decoder.upsamples.3.time_conv.weight", (768, 384, 3, 1, 1)),
    ("decoder.upsamples.3.resample.1.weight", (192, 384, 3, 3)),
    ("decoder.upsamples.4.shortcut.weight", (384, 192, 1, 1, 1)),
    ("decoder.upsamples.11.resample.1.weight", (96, 192, 3, 3)),
    ("decoder.head.0.gamma", (96, 1, 1, 1)),
    ("decoder.head.2.weight", (3, 96, 3, 3, 3)),
    ("encoder.conv1.weight", (96, 3, 3, 3, 3)),
    ("encoder.downsamples.2.resample.1.weight", (96, 96, 3, 3)),  # downsample2d: no time conv
    ("encoder.downsamples.5.time_conv.weight", (192, 192, 3, 1, 1)),
    ("encoder.head.2.weight", (32, 384, 3, 3, 3)),
    ("conv1.weight", (32, 32, 1, 1, 1)),
    ("conv2.weight", (16, 16, 1, 1, 1)),
])
def test_checkpoint_key_shapes(wan_meta, key, shape):
    assert tuple(wan_meta.state_dict()[key].shape) == shape


def test_key_set(wan_meta):
    keys = wan_meta.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "conv1", "conv2"}
    assert len(keys) == 194
    assert "encoder.downsamples.2.time_conv.weight" not in keys      # stage 0 is 2-D only
    assert not any("latent_" in k for k in keys)                     # the statistics are not in the file


def test_cache_size_and_flops_match_reference(wan_meta):
    cache = wan_meta.init_decode_cache(1, torch.float32, "meta", WAN.height, WAN.width)
    assert len(cache.tensors) == 32 and all(t.shape[2] == 2 for t in cache.tensors)
    assert round(sum(t.numel() for t in cache.tensors) / 1e6) == 944          # 3.52 GiB fp32
    assert abs(cache.nbytes() / 2 ** 30 - 3.52) < 0.005
    assert abs(vae_decode_flops(WAN, first=False) / 2e9 - 6775) < 1           # GMAC per later latent
    assert abs(vae_decode_flops(WAN, first=True) / 2e9 - 2176) < 1


# -- decoding --
def test_frame_counts_and_causality(vae, offline):
    """T latents -> 1 + 4(T - 1) frames, and they are the first frames of a longer decode (causal)."""
    full = offline[1]
    assert full.shape == (1, 3, 17, TINY.height, TINY.width)
    assert full.abs().max() <= 1 and (full.abs() < 1).float().mean() > 0.5    # clamped, but not saturated
    for frames, expected in [(1, 1), (2, 5)]:
        out = vae.decode(latents(1, 5)[:, :, :frames])
        assert out.shape[2] == expected
        assert_close(out, full[:, :, :expected])


@pytest.mark.parametrize("batch, chunks", [(1, [1, 1, 1, 1, 1]), (1, [3, 2]), (2, [2, 1, 2])])
def test_streaming_equals_offline(vae, offline, batch, chunks):
    z = latents(batch, 5)
    cache = vae.init_decode_cache(batch, torch.float32, "cpu", TINY.height, TINY.width)
    shapes = [t.shape for t in cache.tensors]
    outs, start = [], 0
    for n in chunks:
        outs.append(vae.decode_step(z[:, :, start:start + n], cache))
        assert outs[-1].shape[2] == 4 * n - 3 * (start == 0)
        assert cache.first_done and [t.shape for t in cache.tensors] == shapes
        start += n
    assert_close(torch.cat(outs, dim=2), offline[batch])


# Produced by the official WanVAE_.decode / .encode (wan/modules/vae.py) with tiny_vae(0)'s state dict, on
# latents(1, 3) and video(1, 5): per-frame mean of the decoded video, and one green pixel (row 7, col 11) per frame.
OFFICIAL_FRAME_MEANS = [0.039295, 0.119827, 0.021856, 0.063781, 0.15099, 0.079296, -0.023433, 0.077501, 0.123414]
OFFICIAL_PIXELS = [0.2727, 0.243961, -0.739389, -0.787977, -0.201486, 0.875011, 0.312081, -0.265112, -0.528713]
OFFICIAL_LATENT_MEANS = [0.057662, 0.061595]     # encode: mean per latent frame
OFFICIAL_LATENT_VALUE = -0.956096                # encode: z[0, 5, 1, 2, 3]


def test_matches_official_golden_values(vae):
    """1e-4 leaves room for other CPUs' conv kernels; the mistakes this guards against move these by > 1e-2.
    Pins the first-frame ('Rep') rule, the time_conv frame interleave and the encoder chunking to the official."""
    out = vae.decode(latents(1, 3))[0]
    assert out.mean(dim=(0, 2, 3)).tolist() == pytest.approx(OFFICIAL_FRAME_MEANS, abs=1e-4)
    assert out[1, :, 7, 11].tolist() == pytest.approx(OFFICIAL_PIXELS, abs=1e-4)
    z = vae.encode(video(1, 5))
    assert z.mean(dim=(0, 1, 3, 4)).tolist() == pytest.approx(OFFICIAL_LATENT_MEANS, abs=1e-4)
    assert z[0, 5, 1, 2, 3].item() == pytest.approx(OFFICIAL_LATENT_VALUE, abs=1e-4)


def test_one_call_over_many_latents_equals_the_per_latent_loop(vae, offline):
    """The decoder as one causal pass over latents 1..4 (multi-frame convs, 2-frame caches) equals feeding them one
    at a time: checks the cache keeps the *last* frames and the time upsampling interleaves frames in order."""
    z = latents(1, 5)
    slots = vae.init_decode_cache(1, torch.float32, "cpu", TINY.height, TINY.width).tensors
    with torch.no_grad():
        x = vae.conv2(z / (1.0 / vae.latent_std.view(1, -1, 1, 1, 1)) + vae.latent_mean.view(1, -1, 1, 1, 1))
        head = vae.decoder(x[:, :, :1], CacheCursor(slots, first=True))
        rest = vae.decoder(x[:, :, 1:], CacheCursor(slots, first=False))
    assert_close(torch.cat([head, rest], dim=2).clamp(-1, 1), offline[1])


def test_cache_reset_restarts_the_stream(vae):
    z = latents(1, 2)
    cache = vae.init_decode_cache(1, torch.float32, "cpu", TINY.height, TINY.width)
    first = vae.decode_step(z, cache)
    assert any(t.abs().sum() > 0 for t in cache.tensors)
    cache.reset()
    assert not cache.first_done and all(t.abs().sum() == 0 for t in cache.tensors)
    assert torch.equal(vae.decode_step(z, cache), first)


def test_decode_uses_latent_statistics(vae):
    """decode(z) == decode with identity statistics of z * std + mean."""
    z = latents(1, 2)
    plain = tiny_vae()
    plain.latent_mean.zero_()
    plain.latent_std.fill_(1.0)
    raw = z * vae.latent_std.view(1, -1, 1, 1, 1) + vae.latent_mean.view(1, -1, 1, 1, 1)
    assert_close(plain.decode(raw), vae.decode(z))


# -- encoding --
def test_encode_shapes_and_chunking(vae):
    image = video(2, 1)
    z_image = vae.encode(image)
    assert z_image.shape == (2, 16, 1, *TINY.latent_hw)
    clip = torch.cat([image, video(2, 4, seed=3)], dim=2)       # 5 frames, first frame = the image
    z_clip = vae.encode(clip)
    assert z_clip.shape == (2, 16, 2, *TINY.latent_hw)
    assert torch.equal(z_clip[:, :, :1], z_image)               # causal: the first latent sees frame 0 only
    assert vae.encode(torch.cat([clip, video(2, 4, seed=4)], dim=2)).shape[2] == 3


def test_encode_normalises_with_mean_and_std(vae):
    clip = video(1, 5)
    plain = tiny_vae()
    plain.latent_mean.zero_()
    plain.latent_std.fill_(1.0)
    mu = plain.encode(clip)                                       # the raw posterior mean
    mean, std = (t.view(1, -1, 1, 1, 1) for t in (vae.latent_mean, vae.latent_std))
    assert_close(vae.encode(clip) * std + mean, mu)
    assert mean.abs().max() > 0.5 and (std - 1).abs().max() > 0.5  # the comparison is not vacuous


def test_statistics_are_refilled_after_to_empty():
    with torch.device("meta"):
        vae = WanVAE(TINY)
    vae = vae.to_empty(device="cpu")
    vae.reset_buffers()
    assert torch.equal(vae.latent_mean, torch.tensor(TINY.latent_mean))
    assert torch.equal(vae.latent_std, torch.tensor(TINY.latent_std))


# -- weights and precision --
def test_state_dict_round_trip(vae, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(vae.state_dict(), path)
    fresh = WanVAE(TINY).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    z, clip = latents(1, 2), video(1, 5)
    assert torch.equal(fresh.decode(z), vae.decode(z))
    assert torch.equal(fresh.encode(clip), vae.encode(clip))


def test_bf16_close_to_fp32(vae):
    """bf16 weights and activations through ~35 conv layers: max error 0.06, mean 0.007 at seed 0. Bounds:
    max 0.15, mean 0.02 (of a [-1, 1] range). bf16 streaming must still equal bf16 offline exactly."""
    z = latents(1, 2)
    ref = vae.decode(z)
    half = tiny_vae().to(torch.bfloat16)
    out = half.decode(z.bfloat16())
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs()
    assert err.max() <= 0.15 and err.mean() <= 0.02, f"max {err.max():.3g} mean {err.mean():.3g}"
    cache = half.init_decode_cache(1, torch.bfloat16, "cpu", TINY.height, TINY.width)
    streamed = torch.cat([half.decode_step(z[:, :, i:i + 1].bfloat16(), cache) for i in range(2)], dim=2)
    assert torch.equal(streamed, out)
    z_img = half.encode(video(1, 1).bfloat16())
    assert z_img.dtype == torch.bfloat16 and (z_img.float() - vae.encode(video(1, 1))).abs().mean() < 0.05


# -- errors --
def test_clear_errors(vae):
    cache = vae.init_decode_cache(1, torch.float32, "cpu", TINY.height, TINY.width)
    with pytest.raises(ValueError, match="latents \\[B, 16"):
        vae.decode_step(torch.zeros(1, 8, 1, *TINY.latent_hw), cache)
    with pytest.raises(ValueError, match="init_decode_cache"):
        vae.decode_step(latents(2, 1), cache)
    with pytest.raises(TypeError, match="bfloat16"):
        vae.decode_step(latents(1, 1).bfloat16(), cache)
    with pytest.raises(ValueError, match="at least one latent"):
        vae.decode(latents(1, 0))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(video(1, 3))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 1, 30, 48))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.init_decode_cache(1, torch.float32, "cpu", 30, 48)
    with pytest.raises(ValueError, match="vae_stride"):
        WanVAE(ModelConfig(**{**TINY.to_dict(), "vae_stride": (4, 16, 16), "height": 32, "width": 64}))
