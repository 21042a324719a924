"""The window plan: the official loop step by step (reference doc section 3), other presets, N > 1."""
import math

import pytest

from runtime.config import StreamConfig
from runtime.scheduler import audio_rows, build_plan, sigma_for, warped_timesteps

OFFICIAL_T = (1000.0, 952.3810424804688, 769.2307739257812, 555.5556030273438)


def test_warped_timesteps_and_sigmas():
    ts = warped_timesteps(StreamConfig.preset("official"))
    assert ts == OFFICIAL_T
    assert sigma_for(1000.0, 5.0) == 1.0
    assert math.isclose(sigma_for(952.3810424804688, 5.0), 0.9523810148, rel_tol=1e-7)
    assert math.isclose(sigma_for(555.5556030273438, 5.0), 0.5555555821, rel_tol=1e-7)
    # nearest table entry (u = 0.001), not 0; the reference doc rounds this to 0.004975
    assert math.isclose(sigma_for(0.0, 5.0), 5 * 0.001 / (1 + 4 * 0.001), rel_tol=1e-6)
    unwarped = StreamConfig(warp=False)
    assert warped_timesteps(unwarped) == (1000.0, 800.0, 400.0, 200.0)


def official_trace(n_latent):
    """The official loop of avatarforcing-official.md section 3, written out independently."""
    n_blocks = (n_latent - 1) // 4
    steps = OFFICIAL_T
    out = []
    for wi in range(n_blocks + 3):
        sb, eb = max(0, wi - 3), min(n_blocks - 1, wi)
        fs, fe = 1 + 4 * sb, 1 + 4 * (eb + 1)
        w = 0 if fs == 1 else 2
        full = fe - fs == 16
        ts = tuple(steps[wi - b] for b in range(sb, eb + 1) for _ in range(4))
        emit = sb if wi >= 3 else None
        dead_cache = wi < 3 or wi == n_blocks + 2
        out.append(dict(
            frames=tuple(range(fs, fe)), timesteps=ts, history=tuple(range(fs - w, fs)),
            anchor=fs - w - 1, rows=(4 * fs - 3, 4 * fe - 3),
            fresh=eb if (full or fs == 1) else None, emit=emit,
            renoise=tuple(b for b in range(sb, eb + 1) if wi - b < 3),
            cache=None if dead_cache else dict(frames=tuple(range(fs, fs + 4)), anchor=0,
                                               rows=(4 * fs - 3, 4 * (fs + 4) - 3))))
    return out


def test_official_plan_for_25_latent_frames_matches_the_traced_loop():
    plan = build_plan(StreamConfig.preset("official"), 25)
    trace = official_trace(25)
    assert plan.num_blocks == 6 and len(plan.steps) == len(trace) == 9
    for sp, ref in zip(plan.steps, trace):
        (main,) = sp.passes
        assert main.frames == ref["frames"], sp.index
        assert main.timesteps == ref["timesteps"], sp.index
        assert main.history == ref["history"], sp.index
        assert main.anchor_position == ref["anchor"], sp.index
        assert main.audio_rows == ref["rows"], sp.index
        assert sp.fresh_block == ref["fresh"], sp.index
        assert sp.emit == ref["emit"], sp.index
        assert tuple(b for b, _ in sp.renoise[0]) == ref["renoise"], sp.index
        for b, level in sp.renoise[0]:
            assert plan.timesteps[level] == OFFICIAL_T[sp.index - b + 1]
        if ref["cache"] is None:
            assert sp.cache_pass is None, sp.index
        else:
            cp = sp.cache_pass
            assert cp.frames == ref["cache"]["frames"] and cp.anchor_position == 0
            assert cp.timesteps == (0.0,) * 4 and cp.history == ref["history"]
            assert cp.audio_rows == ref["cache"]["rows"]
    # a steady window, spelled out: [555.6 x4 | 769.2 x4 | 952.4 x4 | 1000 x4], anchor at frame_s - 3
    steady = plan.steps[5].passes[0]
    assert steady.timesteps == tuple(t for t in reversed(OFFICIAL_T) for _ in range(4))
    assert steady.frames[0] == 9 and steady.anchor_position == 6 and steady.history == (7, 8)


def test_every_block_is_emitted_once_after_L_levels():
    """Every block passes through the window's L positions, one per step, and gets all L * N noise levels, noisiest
    first (N passes per step; `live`: L = 2, N = 2)."""
    for name in ("official", "relative", "low-delay", "live"):
        cfg = StreamConfig.preset(name)
        plan = build_plan(cfg, 1 + cfg.block_frames * 7)
        assert [sp.emit for sp in plan.steps if sp.emit is not None] == list(range(7))
        seen, noise = {}, {}
        for sp in plan.steps:
            for i, (b, j) in enumerate(zip(sp.blocks, sp.levels)):
                seen.setdefault(b, []).append(j)
                noise.setdefault(b, []).extend(p.timesteps[i * cfg.block_frames] for p in sp.passes)
        assert all(levels == list(range(cfg.window_blocks)) for levels in seen.values()), name
        assert all(len(set(t)) == 4 and t == sorted(t, reverse=True) for t in noise.values()), name


def test_relative_preset_reindexes_the_cache_pass_anchor():
    plan = build_plan(StreamConfig.preset("relative"), 41)
    for sp in plan.steps:
        if sp.cache_pass is not None:
            assert sp.cache_pass.anchor_position == sp.passes[0].anchor_position
            first = sp.cache_pass.history[0] if sp.cache_pass.history else sp.cache_pass.frames[0]
            assert sp.cache_pass.relative(first) == 1       # anchor at u - 1, relative origin at the anchor


def test_low_delay_history_grows_to_two_frames():
    plan = build_plan(StreamConfig.preset("low-delay"), 9)
    assert [len(sp.passes[0].history) for sp in plan.steps[:6]] == [0, 0, 0, 0, 1, 2]
    assert plan.steps[5].passes[0].frames == (3, 4, 5, 6)
    assert StreamConfig.preset("low-delay").lookahead_video_frames() == 12
    assert StreamConfig.preset("official").lookahead_video_frames() == 48


@pytest.mark.parametrize("L,N", [(1, 4), (2, 2), (4, 1)])
def test_passes_walk_each_block_through_all_levels(L, N):
    cfg = StreamConfig(block_frames=4, window_blocks=L, passes=N)
    plan = build_plan(cfg, 1 + 4 * 5)
    visits = {}
    for sp in plan.steps:
        for n, pp in enumerate(sp.passes):
            for i, b in enumerate(sp.blocks):
                visits.setdefault(b, []).append(pp.timesteps[4 * i])
    assert all(v == list(OFFICIAL_T) for v in visits.values())


def test_short_clips_plan_correctly():
    # fewer blocks than the window: every block still sees each level once (the official loop does not)
    plan = build_plan(StreamConfig.preset("official"), 5)
    assert [sp.levels for sp in plan.steps] == [(0,), (1,), (2,), (3,)]
    assert [sp.fresh_block for sp in plan.steps] == [0, None, None, None]


@pytest.mark.parametrize("n", [0, 1, 4, 6, 24])
def test_bad_lengths(n):
    with pytest.raises(ValueError, match="num_latent_frames"):
        build_plan(StreamConfig.preset("official"), n)


def test_audio_rows():
    assert audio_rows((0,)) == (0, 1)
    assert audio_rows((1, 2, 3, 4)) == (1, 17)
    assert audio_rows((5,)) == (17, 21)


def test_bad_stream_configs():
    with pytest.raises(ValueError, match="L\\*N"):
        StreamConfig(window_blocks=2, passes=1)
    with pytest.raises(ValueError, match="noisiest first"):
        StreamConfig(denoise_steps=(200, 400, 800, 1000))
    with pytest.raises(ValueError, match="unknown stream preset"):
        StreamConfig.preset("fastest")
