"""The live core (runtime/live.py) on a fake clock: frame/audio pairing equals the offline stream bit for bit,
idle when the input is dry, constant delay, interrupt, falling behind, segment ends, resampling."""
import asyncio

import numpy as np
import pytest

from runtime import AvatarPipeline
from runtime.config import TOY_ASSETS
from runtime.live import FRAME_S, FRAME_SAMPLES, LiveStream, Resampler
from runtime.media import load_audio

FACE = TOY_ASSETS / "ref_0.png"


@pytest.fixture(scope="module")
def pipe():
    return AvatarPipeline.from_preset("toy-talker", device="cpu")


@pytest.fixture(scope="module")
def speech():
    return load_audio(TOY_ASSETS / "hello.wav")[:16000 * 2]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def live_on(pipe, clock, delay_s=1.0):
    live = LiveStream(pipe.session(FACE), delay_s=delay_s, clock=clock, warmup=False, start=False)
    live.start(background=False)
    return live


def run_ticks(live, clock, ticks):
    """Ticks on time: the clock stands at each tick's due time while it runs (compute takes no fake time)."""
    for _ in range(ticks):
        clock.now = live.t0 + live._next_tick * FRAME_S
        live.tick()


def play(live, clock, slots):
    out = []
    for s in slots:
        clock.now = max(clock.now, live.play_time(s))
        out.append(live.frame(s))
    return out


def test_frames_pair_with_their_audio_and_equal_the_offline_stream(pipe, speech):
    """Fed before the clock starts, the speech is taken 640 samples per tick; slot s carries the frame driven by
    samples [640 s, 640 (s + 1)) and those samples; the frames equal pipe.generate's frames 1.. bit for bit (given
    the silence that follows, so that its tail windows come after the frames compared)."""
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(speech)
    slots = len(speech) // FRAME_SAMPLES
    run_ticks(live, clock, slots + live.structural_frames + 1)
    got = play(live, clock, range(slots))
    offline = pipe.generate(FACE, np.concatenate([speech, np.zeros(16000, np.float32)]), audio_mode="stream")
    offline = offline.numpy()
    assert not any(f.filler for f in got)
    for s, f in enumerate(got):
        assert np.array_equal(f.audio, speech[s * FRAME_SAMPLES:(s + 1) * FRAME_SAMPLES]) and f.speech
        assert np.array_equal(f.video, offline[s + 1]), s
        assert f.play_time == pytest.approx(live.t0 + s * FRAME_S + live.delay_s)
    assert live.stats()["fillers"] == live.stats()["late"] == 0


def test_dry_input_idles_at_25_fps(pipe):
    clock = FakeClock()
    live = live_on(pipe, clock)
    run_ticks(live, clock, 60)
    frames = play(live, clock, range(40))
    assert not any(f.filler or f.speech for f in frames)
    assert all(np.array_equal(f.audio, np.zeros(FRAME_SAMPLES, np.float32)) for f in frames)
    assert len({f.video.tobytes() for f in frames}) > 1          # idle motion, not one frozen image


def test_delay_is_the_structural_wait_plus_the_margin(pipe):
    live = LiveStream(pipe.session(FACE), margin_s=0.1, warmup=False, start=False)
    # low-delay: 12 frames of look-ahead + 4 frames of a block - 1 = 15 frames before the first frame is computable
    assert live.structural_frames == 15
    assert live.delay_s == pytest.approx(15 * FRAME_S + 0.1)


def test_frames_not_ready_on_time_become_fillers_and_are_dropped_when_late(pipe):
    """A 10 ms margin and 45 ms of compute per tick: the first frames of each block miss their play time; their
    slots get fillers (the last frame, silence) and the frames themselves are dropped as late."""
    clock = FakeClock()
    live = live_on(pipe, clock, delay_s=15 * FRAME_S + 0.01)
    for _ in range(60):
        clock.now = live.t0 + live._next_tick * FRAME_S + 0.045
        live.tick()
    frames = play(live, clock, range(40))
    stats = live.stats()
    assert stats["late"] > 0 and stats["fillers"] == sum(f.filler for f in frames) > 0 and stats["restarts"] == 0
    assert all(np.array_equal(f.audio, np.zeros(FRAME_SAMPLES, np.float32)) for f in frames if f.filler)
    with pytest.raises(ValueError, match="structural wait"):
        LiveStream(pipe.session(FACE), delay_s=0.2, warmup=False, start=False)


def test_interrupt_drops_queued_speech_and_returns_to_idle(pipe, speech):
    """After interrupt() every slot not played yet carries silence: up to the interrupt's tick they are fillers
    showing the neutral face (the new stream's frame 0, the reference reconstruction), and from that tick on the
    frames of a new stream of silence (same reference, no history)."""
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(np.concatenate([speech, speech]))
    run_ticks(live, clock, 40)
    clock.now = live.t0 + live._next_tick * FRAME_S
    tick = live._next_tick
    next_play = int(np.ceil((clock.now - live.t0 - live.delay_s) / FRAME_S))
    live.interrupt()
    run_ticks(live, clock, 40)
    after = play(live, clock, range(next_play, tick + 12))
    idle = pipe.generate(FACE, np.zeros(FRAME_SAMPLES * 40, np.float32), audio_mode="stream").numpy()
    assert all(not f.speech and not np.any(f.audio) for f in after)
    for f in after[:tick - next_play]:
        assert f.filler and np.array_equal(f.video, idle[0])
    for k, f in enumerate(after[tick - next_play:]):
        assert not f.filler and np.array_equal(f.video, idle[k + 1]), k
    stats = live.stats()
    assert stats["interrupts"] == 1 and stats["restarts"] == 1 and stats["queued_ms"] == 0
    assert stats["dropped_audio_frames"] == 2 * len(speech) // FRAME_SAMPLES - 40


def test_falling_behind_restarts_from_the_current_tick_instead_of_queueing(pipe, speech):
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(np.concatenate([speech] * 3))
    run_ticks(live, clock, 20)
    clock.now += 2.0                                           # the producer stalls for 2 s
    live.tick()
    stats = live.stats()
    assert stats["restarts"] == 1 and stats["interrupts"] == 0
    assert 45 <= stats["dropped_audio_frames"] <= 52           # the 2 s of ticks it could not process
    assert live._next_tick == int((clock.now - live.t0) / FRAME_S) + 1      # back on the clock
    run_ticks(live, clock, 30)
    next_play = int(np.ceil((clock.now - live.t0 - live.delay_s) / FRAME_S))
    live.frame(next_play)                                      # playing forgets older slots: bounded memory
    assert len(live._ready) <= live.delay_s / FRAME_S + 1


def test_segment_end_marks_the_last_frame_of_the_speech(pipe, speech):
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(speech[:FRAME_SAMPLES * 10 + 100])
    live.end_segment()
    run_ticks(live, clock, 40)
    frames = play(live, clock, range(20))
    assert [f.segment_end for f in frames].index(True) == 10 and sum(f.segment_end for f in frames) == 1
    assert [f.speech for f in frames[:11]] == [True] * 11 and not any(f.speech for f in frames[11:])


def test_feed_resamples_any_rate_and_layout(pipe):
    t = np.arange(48000) / 48000
    stereo = (0.5 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)]) * 32767).astype(np.int16)
    resample = Resampler(48000, channels=2)
    out = np.concatenate([resample(stereo[:, i:i + 960]) for i in range(0, 48000, 960)])
    assert abs(len(out) - 16000) <= 64 and out.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(out[1000:15000]))
    assert abs(np.argmax(spectrum) * 16000 / 14000 - 440) < 3
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(stereo[:, :4800], sample_rate=48000, channels=2)
    assert abs(live._input.queued - 1600) <= 64
    with pytest.raises(ValueError, match="NaN"):
        live.feed(np.full(640, np.nan, np.float32))


def test_frames_iterator_paces_slots_on_the_real_clock(pipe):
    """The async iterator on the real clock with the producer thread: slots in order at 40 ms apart."""
    live = LiveStream(pipe.session(FACE), margin_s=0.3, warmup=False)

    async def first(n):
        out = []
        async for f in live.frames():
            out.append((f.slot, live.clock()))
            if len(out) == n:
                return out
    try:
        got = asyncio.run(asyncio.wait_for(first(30), timeout=30))
    finally:
        live.close()
    assert [s for s, _ in got] == list(range(30))
    gaps = np.diff([t for _, t in got])
    assert abs(np.median(gaps) - FRAME_S) < 0.01
    assert got[0][1] >= live.t0 + live.delay_s - 0.005
    assert live.stats()["frames"] == 30 and live.error is None


def test_source_audio_at_the_callers_rate_is_handed_out_whole_and_in_order(pipe):
    """With source_rate=24000, 24 kHz speech fed in odd-sized chunks comes back in the frames' `source`: every sample
    once, in order (so playing the sources plays exactly what was fed), 960 samples per speech frame, empty on
    idle frames; the 16 kHz model audio of each frame is the resampled copy of the same stretch."""
    rng = np.random.default_rng(0)
    t = np.arange(24000 * 2) / 24000
    fed = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    clock = FakeClock()
    live = LiveStream(pipe.session(FACE), delay_s=1.0, clock=clock, warmup=False, start=False, source_rate=24000)
    live.start(background=False)
    i = 0
    while i < len(fed):
        n = int(rng.integers(1, 2000))
        live.feed(fed[i:i + n], sample_rate=24000)
        i += n
    live.end_segment()
    slots = 60
    run_ticks(live, clock, slots + live.structural_frames + 1)
    frames = play(live, clock, range(slots))
    speech = [f for f in frames if f.speech]
    assert not any(f.filler for f in frames)
    got = np.concatenate([f.source for f in frames])
    # all but the resampler's own look-back (held until more audio arrives) comes out, unchanged and in order
    assert len(fed) - 64 <= len(got) <= len(fed) and np.array_equal(got, fed[:len(got)])
    # 960 each, give or take the resampler's lag (under 1 ms) on the first frames
    assert all(abs(len(f.source) - 960) <= 24 for f in speech[:-1]) and 0 < len(speech[-1].source) <= 960
    assert all(len(f.source) == 0 for f in frames if not f.speech)
    # each speech frame's model audio is the 16 kHz copy of its source stretch: compare the 300 Hz phase by energy
    for f in speech[2:-2]:
        assert abs(np.sqrt(np.mean(f.audio ** 2)) - np.sqrt(np.mean(f.source ** 2))) < 0.02
    with pytest.raises(ValueError, match="source_rate"):
        LiveStream(pipe.session(FACE), warmup=False, start=False, source_rate=24000.5)


def test_a_segment_whose_last_frame_is_lost_still_ends(pipe, speech):
    """A producer running 0.5 s late (not enough to restart) makes every frame late, the segment's last included:
    they are dropped, and the next frame handed out (a filler) carries the segment's end, once, so a consumer
    waiting for the segment to end (LiveKit's playback_finished, Pipecat's TTSStoppedFrame) is not left waiting."""
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(speech[:FRAME_SAMPLES * 10])
    live.end_segment()
    for _ in range(40):
        clock.now = live.t0 + live._next_tick * FRAME_S + 0.5
        live.tick()
    frames = play(live, clock, range(30, 34))
    assert live.stats()["late"] > 10 and all(f.filler for f in frames)
    assert [f.segment_end for f in frames] == [True, False, False, False]


def test_speech_fed_right_after_an_interrupt_is_kept(pipe, speech):
    """interrupt() drops what is queued when it is called, not when the producer gets to it: speech fed between
    the call and the producer's next tick (a step may be running) is the new stream's first audio."""
    clock = FakeClock()
    live = live_on(pipe, clock)
    live.feed(speech[:16000])
    run_ticks(live, clock, 10)
    live.interrupt()
    fresh = speech[16000:16000 + FRAME_SAMPLES * 5]
    live.feed(fresh)
    run_ticks(live, clock, 40)
    frames = play(live, clock, range(0, 50))
    spoken = np.concatenate([f.audio for f in frames if f.speech])
    assert np.array_equal(spoken, fresh) and live.stats()["dropped_audio_frames"] == 15


def test_compute_runs_in_threads_of_its_own_with_the_streams_thread_count(pipe):
    """Warm-up and steps run outside the constructing thread, with the stream's OpenMP thread count (the caller's
    own count is left alone); the measured margin is at least MIN_MARGIN_S."""
    import threading
    import time

    import torch

    from runtime.live import MIN_MARGIN_S
    sess, seen, caller = pipe.session(FACE), [], threading.current_thread()
    push = sess.push_audio

    def recording(pcm):
        seen.append((threading.current_thread() is caller, torch.get_num_threads()))
        return push(pcm)
    sess.push_audio = recording
    before = torch.get_num_threads()
    live = LiveStream(sess, threads=1)                     # warms up, then the producer starts
    try:
        warm, deadline = len(seen), time.monotonic() + 10
        while len(seen) < warm + 8 and time.monotonic() < deadline:      # the producer's first ticks
            time.sleep(0.05)
    finally:
        live.close()
    assert warm >= 14 and len(seen) >= warm + 8
    assert all(not in_caller and n == 1 for in_caller, n in seen)
    assert torch.get_num_threads() == before
    # threads started later (by anyone) keep the process's default, not the stream's count
    started = []
    later = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert started == [before]
    assert live.delay_s >= live.structural_frames * FRAME_S + MIN_MARGIN_S - 1e-9


def test_threads_per_stream_shares_the_cores(monkeypatch):
    from runtime.live import threads_per_stream
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert [threads_per_stream(k) for k in (1, 2, 3, 8)] == [4, 2, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    import os
    assert threads_per_stream(1) == len(os.sched_getaffinity(0))


def test_the_toy_talker_serves_live_on_its_live_stream(pipe):
    """toy-talker.json names `live` (a third of low-delay's look-ahead): live_session uses it; `stream` overrides."""
    from runtime.live import live_session
    assert pipe.default_stream.name == "low-delay" and pipe.live_stream.name == "live"
    live = LiveStream(live_session(pipe, FACE, compile=False), margin_s=0.1, warmup=False, start=False)
    # live: 4 frames of look-ahead + 4 frames of a block - 1 = 7 frames before the first frame is computable
    assert live.session.stream.name == "live" and live.structural_frames == 7
    assert live_session(pipe, FACE, compile=False, stream="low-delay").stream.name == "low-delay"


def test_a_server_can_pick_the_live_stream_and_a_bad_name_fails_before_loading():
    from runtime.generate import serving_pipeline
    assert serving_pipeline("toy-talker", device="cpu", stream="low-delay").live_stream.name == "low-delay"
    with pytest.raises(ValueError, match="unknown stream preset 'fast'.*live"):
        serving_pipeline("toy-talker", device="cpu", stream="fast")
