"""The LiveKit integration (runtime/integrations/livekit.py) with livekit-agents' own classes and real rtc frames, on
the real clock, without a room (no LiveKit server can be installed here): segments and AudioSegmentEnd, 16/24/48 kHz,
video/audio pairing and counts, clear_buffer mid-generation, and AvatarRunner + QueueAudioOutput under repeated
interrupts (playback_finished reported, bounded time, no deadlock)."""
import asyncio
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the 'livekit' extra is not installed: pip install -e '.[livekit]'")

from livekit import api, rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput  # noqa: E402

from runtime import AvatarPipeline  # noqa: E402
from runtime.integrations import livekit as lk  # noqa: E402
from runtime.live import freeze_heap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# No compile, no warm-up. A frame computed after its play time is dropped with its audio (the live core's policy): a
# margin of 0.6 s keeps a step that a loaded 2-core machine slows to 250 ms from costing one. D = 0.6 s + 0.6 s.
FAST = dict(compile=False, warmup=False, margin_s=0.6)


@pytest.fixture(scope="module")
def pipe():
    pipe = AvatarPipeline.from_preset("toy-talker", device="cpu")
    freeze_heap()               # as a worker does after loading its model: no long garbage collection pauses
    yield pipe
    gc.unfreeze()


def tone(rate, seconds, hz=300.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)


def rtc_frames(pcm, rate, ms=10):
    n = rate * ms // 1000
    return [rtc.AudioFrame(pcm[i:i + n].tobytes(), rate, 1, len(pcm[i:i + n])) for i in range(0, len(pcm), n)]


async def collect(gen, until, timeout_s=20.0):
    """Items from the generator until `until(items)` holds (bounded in time)."""
    out = []

    async def run():
        async for x in gen:
            out.append(x)
            if until(out):
                return
    await asyncio.wait_for(run(), timeout_s)
    return out


def segment_ends(items):
    return sum(isinstance(x, AudioSegmentEnd) for x in items)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_segment_pairs_each_video_frame_with_its_speech(pipe, rate):
    """One second of speech at `rate` in 10 ms rtc frames, then AudioSegmentEnd: every item after a VideoFrame is
    either its AudioFrame (24 kHz mono: the avatar's track) or the next VideoFrame; the speech comes back whole (24 kHz
    input: bit for bit; other rates: the resampled second, within the resampler's look-back), in 40 ms frames, one
    per speech frame; AudioSegmentEnd follows the segment's last audio, once."""
    gen = lk.AvatarVideoGenerator.open(pipe, sample_rate=24000, **FAST)
    pcm = tone(rate, 1.0)

    async def main():
        for f in rtc_frames(pcm, rate):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        return await collect(gen, lambda items: segment_ends(items) == 1)

    try:
        items = asyncio.run(main())
    finally:
        gen.close()
    assert isinstance(items[0], rtc.VideoFrame) and isinstance(items[-1], AudioSegmentEnd)
    videos = [x for x in items if isinstance(x, rtc.VideoFrame)]
    audios = [x for x in items if isinstance(x, rtc.AudioFrame)]
    assert all((v.width, v.height, v.type) == (gen.live.width, gen.live.height, rtc.VideoBufferType.RGBA)
               for v in videos)
    for i, x in enumerate(items):
        if isinstance(x, rtc.AudioFrame):
            assert isinstance(items[i - 1], rtc.VideoFrame)          # paired: right after its own frame
            assert (x.sample_rate, x.num_channels) == (24000, 1)
    assert isinstance(items[-2], rtc.AudioFrame)                      # the end follows the last speech
    got = np.concatenate([np.frombuffer(a.data, np.int16) for a in audios])
    if rate == 24000:
        assert np.array_equal(got, pcm)
    else:
        assert abs(len(got) - 24000) <= 48
        spectrum = np.abs(np.fft.rfft(got[2400:21600].astype(np.float64)))
        assert abs(np.argmax(spectrum) * 24000 / 19200 - 300) < 3
    assert len(audios) == 25 and all(abs(a.samples_per_channel - 960) <= 24 for a in audios[:-1])
    assert gen.audio_frames_out == 25 and gen.segments_out == 1 and gen.frames_out == len(videos)
    stats = gen.live.stats()
    assert stats["fillers"] == 0 and stats["dropped_audio_frames"] == 0


@pytest.mark.timeout(120)
def test_clear_buffer_mid_segment_silences_at_once_and_the_next_segment_plays(pipe):
    """clear_buffer() after 8 speech frames: at most one more speech frame can be in flight (the item being yielded),
    the cleared segment never ends with AudioSegmentEnd (the runner reports it interrupted instead), idle video keeps
    coming at 25 fps, and a later segment plays whole and ends normally."""
    gen = lk.AvatarVideoGenerator.open(pipe, sample_rate=24000, **FAST)
    first, second = tone(24000, 2.0), tone(24000, 0.5, hz=500.0)

    async def main():
        for f in rtc_frames(first, 24000):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        before = await collect(gen, lambda items: sum(isinstance(x, rtc.AudioFrame) for x in items) == 8)
        gen.clear_buffer()
        after = await collect(gen, lambda items: len(items) >= 30)            # ~1.2 s more
        for f in rtc_frames(second, 24000):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        last = await collect(gen, lambda items: segment_ends(items) == 1)
        return before, after, last

    start = time.monotonic()
    try:
        before, after, last = asyncio.run(main())
    finally:
        gen.close()
    assert time.monotonic() - start < 30
    assert sum(isinstance(x, rtc.AudioFrame) for x in after) <= 1 and segment_ends(before + after) == 0
    assert all(isinstance(x, rtc.VideoFrame) for x in after[1:])
    got = np.concatenate([np.frombuffer(a.data, np.int16) for a in last if isinstance(a, rtc.AudioFrame)])
    assert np.array_equal(got, second)
    assert gen.live.stats()["interrupts"] == 1


class FakeRoom:
    """What AvatarRunner touches of an rtc.Room, connected, with publications that are subscribed at once."""

    class Publication:
        async def wait_for_subscription(self):
            return None

    class Participant:
        identity = "agent"

        def __init__(self):
            self.published = []

        async def publish_track(self, track, options):
            self.published.append(track)
            return FakeRoom.Publication()

    def __init__(self):
        self.local_participant = self.Participant()
        self.name = "test-room"

    def isconnected(self):
        return True

    def on(self, *args):
        return lambda f: f

    def off(self, *args):
        pass


@pytest.mark.timeout(180)
def test_runner_with_queue_output_reports_playback_and_survives_repeated_interrupts(pipe):
    """The in-process wiring (QueueAudioOutput as the agent's audio output and the runner's receiver) with the real
    AvatarRunner and AVSynchronizer: ten segments each interrupted mid-speech, then one played to its end. Every
    interrupt is reported as playback_finished(interrupted=True), the last segment as interrupted=False with its
    whole duration, the runner publishes the avatar's audio and video tracks, and everything finishes in bounded
    time (a deadlock would hang the test until its timeout)."""
    gen = lk.AvatarVideoGenerator.open(pipe, sample_rate=24000, **FAST)

    async def main():
        room = FakeRoom()
        audio = QueueAudioOutput(sample_rate=24000)
        finished = []
        audio.on("playback_finished", finished.append)
        runner = AvatarRunner(room, audio_recv=audio, video_gen=gen, options=gen.options)
        await runner.start()
        try:
            for _ in range(10):
                spoken = gen.audio_frames_out
                for f in rtc_frames(tone(24000, 1.0), 24000, ms=20):
                    await audio.capture_frame(f)
                audio.flush()
                await asyncio.wait_for(_until(lambda: gen.audio_frames_out >= spoken + 4), 20)   # mid-speech
                audio.clear_buffer()
                await asyncio.sleep(0.1)
            for f in rtc_frames(tone(24000, 0.6), 24000, ms=20):
                await audio.capture_frame(f)
            audio.flush()
            await asyncio.wait_for(_until(lambda: len(finished) == 11), 20)
        finally:
            await runner.aclose()
        return room, finished

    start = time.monotonic()
    try:
        room, finished = asyncio.run(main())
    finally:
        gen.close()
    assert time.monotonic() - start < 60
    assert [e.interrupted for e in finished] == [True] * 10 + [False]
    assert finished[-1].playback_position == pytest.approx(0.6, abs=0.03), gen.live.stats()
    positions = [e.playback_position for e in finished]
    assert all(0.0 < p < 1.0 for p in positions[:10]), positions
    assert len(room.local_participant.published) == 2
    assert gen.live.stats()["interrupts"] == 10


async def _until(condition):
    while not condition():
        await asyncio.sleep(0.02)


def test_avatar_token_grants_the_room_and_names_the_agent(monkeypatch):
    token = lk.avatar_token("room-1", "avatar-1", "agent-7", api_key="key", api_secret="s" * 32)
    claims = api.TokenVerifier("key", "s" * 32).verify(token)
    assert claims.identity == "avatar-1" and claims.kind == "agent"
    assert claims.video.room == "room-1" and claims.video.room_join and claims.video.can_publish
    assert claims.attributes == {lk.ON_BEHALF: "agent-7"}
    monkeypatch.delenv("LIVEKIT_API_KEY", raising=False)
    monkeypatch.delenv("LIVEKIT_API_SECRET", raising=False)
    with pytest.raises(ValueError, match="LIVEKIT_API_KEY"):
        lk.avatar_token("room-1", "avatar-1", "agent-7")


def test_capacity_reports_load_for_livekit_dispatch():
    held = lk.Capacity(2)
    assert held.load() == 0.0
    with held:
        assert held.load() == 0.5
        with held:
            assert held.load() == 1.0
    assert held.load() == 0.0


def test_session_options_are_checked():
    with pytest.raises(ValueError, match="launch"):
        lk.AvatarForcingSession(launch="cloud")
    with pytest.raises(ValueError, match="pipe="):
        lk.AvatarForcingSession(launch="in-process")


@pytest.mark.timeout(120)
def test_cli_help_and_argument_errors():
    env = {k: v for k, v in os.environ.items() if k not in ("LIVEKIT_URL", "AVATAR_LIVEKIT_TOKEN")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "runtime.integrations.livekit", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=60)
    for args in (["--help"], ["worker", "--help"], ["serve", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    r = run("worker")
    assert r.returncode == 2 and "--url" in r.stderr and "Traceback" not in r.stderr
    r = run("serve", "--capacity", "0")
    assert r.returncode == 2 and "--capacity" in r.stderr
    r = subprocess.run([sys.executable, "examples/livekit_agent.py", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage:" in r.stdout.lower(), r.stderr
