"""Tests for runtime/tiny_decoder.py: TAEHV layout (keys, parameter counts, FLOPs) at the real wan-1.3b size on the
meta device; decoding behaviour (frame counts, streaming == offline, an independent frame-by-frame reference, fixed
state, output range, weight files) on the tiny preset in fp32 with seeded random weights.
"""
import pytest
import torch

from runtime.config import ModelConfig
from runtime.tiny_decoder import MemBlock, TAEHV, TGrow, load_taehv_weights, taehv_decode_flops

TINY = ModelConfig.preset("tiny")        # 32x48 output, 4x6 latent
WAN = ModelConfig.preset("wan-1.3b")     # 832x480 output, 104x60 latent


def assert_close(actual, expected, atol=1e-5, rtol=0.0):
    assert actual.shape == expected.shape, f"{actual.shape=} {expected.shape=}"
    diff = (actual - expected).abs()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), \
        f"max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}"


def tiny_model(seed=0):
    """Seeded weights that keep activations alive. PyTorch's default conv init shrinks the signal through the
    22 layers until every pixel clamps to -1, which would make every comparison below vacuous."""
    torch.manual_seed(seed)
    model = TAEHV(TINY).eval()
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.normal_(0.0, fan_in ** -0.5)
            if conv.bias is not None:
                conv.bias.zero_()
        model.decoder[-1].weight.mul_(0.5)
        model.decoder[-1].bias.fill_(0.5)        # centre TAEHV's [0, 1] output
    return model


def latents(batch, frames, seed=1):
    gen = torch.Generator().manual_seed(seed)
    h, w = TINY.latent_hw
    return torch.randn(batch, TINY.vae_z_dim, frames, h, w, generator=gen)


# -- layout at the real size (meta device: no memory, no compute) --
def wan_meta_model():
    with torch.device("meta"):
        return TAEHV(WAN)


def test_parameter_counts_match_reference():
    model = wan_meta_model()
    assert sum(p.numel() for p in model.decoder.parameters()) == 9_844_611
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_470_928


@pytest.mark.parametrize("key, shape", [
    ("decoder.1.weight", (256, 16, 3, 3)),          # conv 16 -> 256 after the soft clamp (decoder.0)
    ("decoder.3.conv.0.weight", (256, 512, 3, 3)),  # MemBlock conv over cat[x, past]
    ("decoder.5.conv.4.bias", (256,)),
    ("decoder.7.conv.weight", (256, 256, 1, 1)),    # TGrow stride 1: no time upsampling in stage 0
    ("decoder.8.weight", (128, 256, 3, 3)),
    ("decoder.13.conv.weight", (256, 128, 1, 1)),   # TGrow stride 2
    ("decoder.14.weight", (64, 128, 3, 3)),
    ("decoder.17.conv.2.weight", (64, 64, 3, 3)),
    ("decoder.19.conv.weight", (128, 64, 1, 1)),    # TGrow stride 2
    ("decoder.22.weight", (3, 64, 3, 3)),
    ("encoder.0.weight", (64, 3, 3, 3)),
    ("encoder.2.conv.weight", (64, 128, 1, 1)),     # TPool stride 2
    ("encoder.3.weight", (64, 64, 3, 3)),           # strided conv, no bias
    ("encoder.12.conv.weight", (64, 64, 1, 1)),     # TPool stride 1
    ("encoder.16.conv.0.weight", (64, 128, 3, 3)),
    ("encoder.17.weight", (16, 64, 3, 3)),
])
def test_published_key_names_and_shapes(key, shape):
    assert tuple(wan_meta_model().state_dict()[key].shape) == shape


def test_key_set_is_exactly_the_published_layout():
    keys = set(wan_meta_model().state_dict())
    assert len(keys) == 128
    # Bias-free convs and parameter-free layers (clamp, ReLU, Upsample) have no keys.
    for absent in ("decoder.0.weight", "decoder.2.weight", "decoder.6.weight", "decoder.8.bias",
                   "decoder.14.bias", "decoder.20.bias", "decoder.21.weight", "encoder.3.bias", "decoder.3.skip.weight"):
        assert absent not in keys
    with_params = {int(k.split(".")[1]) for k in keys if k.startswith("decoder.")}
    assert with_params == {1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 19, 20, 22}


def test_flops_per_latent_match_reference():
    assert taehv_decode_flops(WAN) == pytest.approx(2 * 272e9, rel=0.02)


def test_wan_cache_size_matches_reference():
    cache = wan_meta_model().init_decode_cache(1, torch.float16, "meta", WAN.height, WAN.width)
    # 3 x 256 @ 60x104 + 3 x 128 @ 120x208 + 3 x 64 @ 240x416 = 33,546,240 elements.
    assert cache.nbytes() == 2 * 33_546_240


# -- decoding (tiny preset, fp32) --
def reference_decode(model, z):
    """Independent reference: one frame at a time, depth first through the decoder (the published streaming
    order); TGrow sub-frames from channel blocks; first 3 frames dropped; [0, 1] -> [-1, 1]."""
    memory, out = {}, []

    def run(i, x):
        if i == len(model.decoder):
            out.append(x)
            return
        layer = model.decoder[i]
        if isinstance(layer, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            run(i + 1, layer(x, past))
        elif isinstance(layer, TGrow):
            for sub in layer.conv(x).chunk(layer.stride, dim=1):
                run(i + 1, sub)
        else:
            run(i + 1, layer(x))

    for t in range(z.shape[2]):
        run(0, z[:, :, t])
    return torch.stack(out[3:], dim=2).clamp(0, 1) * 2 - 1


@pytest.mark.parametrize("frames, expected", [(1, 1), (2, 5), (5, 17)])
def test_frame_counts(frames, expected):
    with torch.no_grad():
        video = tiny_model().decode(latents(2, frames))
    assert video.shape == (2, 3, expected, TINY.height, TINY.width)


def test_decode_matches_frame_by_frame_reference():
    model, z = tiny_model(), latents(2, 3)
    with torch.no_grad():
        video = model.decode(z)
        assert_close(video, reference_decode(model, z))
    assert video.std() > 0.2 and (video.abs() == 1).float().mean() < 0.2, "degenerate test weights"


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [2, 3], [1, 4], [3, 1, 1], [5]])
def test_streaming_equals_offline(chunks):
    model, z = tiny_model(), latents(2, sum(chunks))
    with torch.no_grad():
        offline = model.decode(z)
    cache = model.init_decode_cache(2, torch.float32, "cpu", TINY.height, TINY.width)
    pieces, start = [], 0
    for i, n in enumerate(chunks):
        piece = model.decode_step(z[:, :, start:start + n], cache)
        assert piece.shape[2] == 4 * n - (3 if i == 0 else 0)
        pieces.append(piece)
        start += n
    assert cache.first_done
    assert_close(torch.cat(pieces, dim=2), offline)


def test_state_is_fixed_size_and_updated_in_place():
    model, z = tiny_model(), latents(1, 6)
    cache = model.init_decode_cache(1, torch.float32, "cpu", TINY.height, TINY.width)
    shapes = [m.shape for m in cache.tensors]
    pointers = [m.data_ptr() for m in cache.tensors]
    nbytes = cache.nbytes()
    assert len(shapes) == 9 and all(m.abs().sum() == 0 for m in cache.tensors)
    for t in range(6):
        model.decode_step(z[:, :, t:t + 1], cache)
        assert [m.shape for m in cache.tensors] == shapes
        assert [m.data_ptr() for m in cache.tensors] == pointers
        assert cache.nbytes() == nbytes
    assert all(m.abs().sum() > 0 for m in cache.tensors)


def test_reset_starts_a_new_stream():
    model, z = tiny_model(), latents(1, 3)
    cache = model.init_decode_cache(1, torch.float32, "cpu", TINY.height, TINY.width)
    first = model.decode_step(z, cache)
    model.decode_step(latents(1, 2, seed=5), cache)
    cache.reset()
    assert_close(model.decode_step(z, cache), first, atol=0.0)


def test_output_range_is_minus_one_to_one():
    model = tiny_model()
    with torch.no_grad():
        # Saturate red high and green low through the final conv's bias: TAEHV's [0, 1] must map to exactly
        # +1 and -1 (not 1 and 0); blue stays unsaturated and inside the range.
        model.decoder[-1].bias.copy_(torch.tensor([50.0, -50.0, 0.0]))
        video = model.decode(10 * latents(1, 2))
    assert (video[:, 0] == 1).all() and (video[:, 1] == -1).all()
    assert video.min() >= -1 and video.max() <= 1 and video[:, 2].std() > 0


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weight_file_round_trip_is_strict(tmp_path, suffix):
    source, target = tiny_model(seed=0), tiny_model(seed=7)
    path = tmp_path / f"taew2_1{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    load_taehv_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    z = latents(1, 2)
    with torch.no_grad():
        assert_close(target.decode(z), source.decode(z), atol=0.0)


def test_weight_file_errors_name_the_problem(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="taew2_1"):
        load_taehv_weights(model, tmp_path / "missing.pth")
    state = model.state_dict()
    state.pop("decoder.22.bias")
    state["decoder.1.weight"] = torch.zeros(4, 16, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['decoder.22.bias'\].*decoder.1.weight"):
        load_taehv_weights(model, tmp_path / "bad.pth")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        load_taehv_weights(model, tmp_path / "w.bin")


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    cache = model.init_decode_cache(1, torch.float32, "cpu", TINY.height, TINY.width)
    with pytest.raises(ValueError, match="expects latents"):
        model.decode_step(torch.zeros(1, 8, 1, 4, 6), cache)
    with pytest.raises(ValueError, match="cache was made for"):
        model.decode_step(torch.zeros(1, 16, 1, 5, 6), cache)
    with pytest.raises(TypeError, match="dtype"):
        model.decode_step(torch.zeros(1, 16, 1, 4, 6, dtype=torch.float64), cache)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.init_decode_cache(1, torch.float32, "cpu", 30, 48)
    with pytest.raises(ValueError, match="T = 0"):
        model.decode(torch.zeros(1, 16, 0, 4, 6))
    with pytest.raises(ValueError, match="taehv_channels"):
        TAEHV(ModelConfig(**{**TINY.to_dict(), "taehv_channels": (8, 8, 8)}))
