"""The DiT: official names and sizes, audio injection rule, prefix K/V, unpatchify layout, numerics."""
import math

import pytest
import torch

from runtime.config import ModelConfig
from runtime.dit import AvatarDiT, RMSNorm, sinusoidal_embedding
from runtime.dit import init_random_
from runtime.rope import apply_rope, grid_positions, rope_cos_sin


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    return cfg, init_random_(AvatarDiT(cfg), seed=0).eval()


def inputs(cfg, frames, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.latent_hw
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    y = torch.randn(batch, 17, frames, h, w, generator=g)
    audio = torch.randn(batch, 4 * frames, cfg.audio_input_dim, generator=g)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, y, audio, ctx


def rope_for(cfg, frames):
    return rope_cos_sin(grid_positions(frames, cfg.grid_hw), cfg.head_dim)


def test_wan_1_3b_state_dict_on_meta():
    with torch.device("meta"):
        model = AvatarDiT(ModelConfig.preset("wan-1.3b"))
    sd = model.state_dict()
    assert len(sd) == 857
    assert sum(p.numel() for p in model.parameters()) == 1_421_187_232
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embedding.weight"] == (1536, 33, 1, 2, 2)
    assert shapes["audio_proj.proj.weight"] == (32, 43008)
    assert shapes["audio_proj.norm_out.weight"] == (32,)
    assert shapes["audio_cond_projs.13.weight"] == (1536, 32) and "audio_cond_projs.14.weight" not in shapes
    assert shapes["time_projection.1.weight"] == (9216, 1536)
    assert shapes["head.head.weight"] == (64, 1536) and shapes["head.modulation"] == (1, 2, 1536)
    assert shapes["blocks.29.ffn.0.weight"] == (8960, 1536) and shapes["blocks.29.modulation"] == (1, 6, 1536)
    assert shapes["blocks.0.norm3.bias"] == (1536,) and "blocks.0.norm1.weight" not in shapes


def block_io(model, cfg, audio, frames=2):
    """Per block: the residual stream its norm1 sees (after any audio add) and the block's output."""
    x, y, _, ctx = inputs(cfg, frames)
    seen, hooks = {}, []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.norm1.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, [a[0]])))
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: seen[i].append(o[0])))
    with torch.no_grad():
        model(x, y, torch.full((1, frames), 500.0), audio, model.context_kv(ctx), rope_for(cfg, range(frames)))
    for h in hooks:
        h.remove()
    return seen


def test_audio_is_added_exactly_before_blocks_2_to_half(tiny):
    cfg, model = tiny
    _, _, audio, _ = inputs(cfg, 2)
    seen = block_io(model, cfg, audio)
    tokens = model.audio_tokens(audio)
    assert len(tokens) == cfg.num_layers // 2 - 1 == 2
    for i in range(1, cfg.num_layers):
        added = seen[i][0] - seen[i - 1][1]                # what block i normalizes minus block i-1's output
        a = model.audio_layer(i, cfg.num_layers)
        if a is None:
            assert torch.equal(added, torch.zeros_like(added)), i
        else:
            expected = tokens[a].unsqueeze(2).expand(-1, -1, cfg.tokens_per_frame, -1).flatten(1, 2)
            assert torch.allclose(added, expected, atol=1e-5), i
    assert [i for i in range(cfg.num_layers) if model.audio_layer(i, cfg.num_layers) is not None] == [2, 3]
    assert [i for i in range(30) if AvatarDiT.audio_layer(i, 30) is not None] == list(range(2, 16))


def test_zero_audio_still_injects_the_bias_path(tiny):
    cfg, model = tiny
    zero = torch.zeros(1, 8, cfg.audio_input_dim)
    seen = block_io(model, cfg, zero)
    ln = model.audio_proj.norm_out(model.audio_proj.proj.bias)
    expected = model.audio_cond_projs[0](ln)
    added = seen[2][0] - seen[1][1]
    assert expected.abs().max() > 1e-3
    assert torch.allclose(added, expected.expand_as(added), atol=1e-5)


def test_prefix_and_kv_sink_equal_one_block_causal_pass(tiny):
    """Frame A alone, then frame B with A's stored K/V as prefix == one pass over [A, B] where A sees only A."""
    cfg, model = tiny
    x, y, audio, ctx = inputs(cfg, 2)
    kv = model.context_kv(ctx)
    t = torch.tensor([[0.0, 700.0]])
    s = cfg.tokens_per_frame
    stored = {}
    with torch.no_grad():
        out_a = model(x[:, :, :1], y[:, :, :1], t[:, :1], audio[:, :4], kv, rope_for(cfg, [5]),
                      kv_sink=lambda i, k, v: stored.__setitem__(i, (k, v)))
        prefix_rope = rope_for(cfg, [5])
        out_b = model(x[:, :, 1:], y[:, :, 1:], t[:, 1:], audio[:, 4:], kv, rope_for(cfg, [6]),
                      prefix=lambda i: (apply_rope(stored[i][0], *prefix_rope), stored[i][1]))
        mask = torch.ones(2 * s, 2 * s, dtype=torch.bool)
        mask[:s, s:] = False
        joint = model(x, y, t, audio, kv, rope_for(cfg, [5, 6]), mask=mask)
    assert torch.allclose(joint[:, :, :1], out_a, atol=1e-5)
    assert torch.allclose(joint[:, :, 1:], out_b, atol=1e-5)


def test_unpatchify_layout(tiny):
    cfg, model = tiny
    f, (gh, gw) = 2, cfg.grid_hw
    head = torch.randn(1, f, gh * gw, 64)
    video = model.unpatchify(head, (f, gh, gw))
    assert video.shape == (1, 16, f, 2 * gh, 2 * gw)
    for (ff, h, w, q, r, c) in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 1, 0, 5), (1, 0, 1, 1, 1, 15)]:
        assert video[0, c, ff, 2 * h + q, 2 * w + r] == head[0, ff, h * gw + w, q * 32 + r * 16 + c]


def test_per_frame_timesteps_are_used(tiny):
    cfg, model = tiny
    x, y, audio, ctx = inputs(cfg, 2)
    kv, rope = model.context_kv(ctx), rope_for(cfg, [1, 2])
    with torch.no_grad():
        a = model(x, y, torch.tensor([[100.0, 900.0]]), audio, kv, rope)
        b = model(x, y, torch.tensor([[100.0, 900.5]]), audio, kv, rope)
        same = model(x, y, torch.tensor([[100.0, 900.0]]), audio, kv, rope)
    assert torch.equal(a, same) and not torch.equal(a, b)


def test_sinusoid_cos_first():
    t = torch.tensor([0.0, 952.381])                       # float32, as the loop feeds it
    emb = sinusoidal_embedding(t, 256)
    assert emb.dtype == torch.float64 and emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert math.isclose(emb[1, 1].item(), math.cos(float(t[1]) * 10000 ** (-1 / 128)), rel_tol=1e-12)


def test_rmsnorm_statistics_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 64) * 50).to(torch.bfloat16)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), expected)


def test_bf16_forward_matches_fp32(tiny):
    cfg, model = tiny
    x, y, audio, ctx = inputs(cfg, 2)
    rope, t = rope_for(cfg, [1, 2]), torch.tensor([[555.5, 1000.0]])
    with torch.no_grad():
        ref = model(x, y, t, audio, model.context_kv(ctx), rope)
        m16 = AvatarDiT(cfg).to(torch.bfloat16)
        m16.load_state_dict(model.state_dict())
        out = m16(x, y, t, audio, m16.context_kv(ctx), rope)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_text_context_longer_than_text_len_is_rejected(tiny):
    cfg, model = tiny
    with pytest.raises(ValueError, match="text_len"):
        model.context_kv(torch.zeros(1, cfg.text_len + 1, cfg.text_dim))
