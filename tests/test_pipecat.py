"""The Pipecat video service (runtime/integrations/pipecat.py) in a real Pipeline, run by pipecat's own test utility
(`run_test`) on the real clock with toy-talker on the CPU: images at 25 fps of the model's size, each speech image
followed by its own audio, that audio being the TTS's samples (at the pipeline's rate), the TTSStoppedFrame after
the last of it (or at the next idle frame, when that last frame is lost); an interruption stops the speech at once
and its held TTSStoppedFrame never comes; speech with no TTSStoppedFrame plays out before the EndFrame; a failing
stream is an ErrorFrame, not a hang. Plus the example bot: importable, `--help` without a network."""
import asyncio
import gc
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="needs the pipecat extra: pip install -e '.[pipecat]'")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from runtime import AvatarPipeline  # noqa: E402
from runtime.config import TOY_ASSETS  # noqa: E402
from runtime.integrations.pipecat import AvatarVideoService  # noqa: E402
from runtime.live import FPS, FRAME_S, LiveFrame, LiveStream, Resampler, freeze_heap, live_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACE = TOY_ASSETS / "ref_0.png"
OUT_RATE = 24000            # PipelineParams' default audio_out_sample_rate: the rate the service sends audio at
CHUNK_S = 0.02              # TTS audio arrives in 20 ms frames
LOOK_BACK = 64              # samples the live core's 16 kHz resampler may still hold at a segment's end (test_live)
# A frame computed after its play time is dropped with its audio (the live core's policy): a margin of 0.6 s keeps
# a step that a loaded 2-core machine slows to 250 ms from costing a frame. The play delay: toy-talker's structural
# wait (15 frames, test_live) + the margin.
LIVE = dict(margin_s=0.6, warmup=False)
DELAY_S = 15 * FRAME_S + LIVE["margin_s"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pipe():
    pipe = AvatarPipeline.from_preset("toy-talker", device="cpu")
    LiveStream(live_session(pipe, FACE, compile=False), start=False)    # warm-up: the first steps run slow
    freeze_heap()               # as a bot does after loading its model: no long garbage collection pauses
    yield pipe
    gc.unfreeze()


def tone(rate: int, seconds: float, hz: float = 300.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def tts(pcm: np.ndarray, rate: int, stop: bool = True) -> list:
    """What a TTS service sends for one utterance: started, 20 ms audio frames, stopped."""
    n = int(rate * CHUNK_S)
    audio = [TTSAudioRawFrame(audio=pcm[i:i + n].tobytes(), sample_rate=rate, num_channels=1)
             for i in range(0, len(pcm), n)]
    return [TTSStartedFrame(), *audio] + ([TTSStoppedFrame()] if stop else [])


class ImageTimes(BaseObserver):
    """The pipeline clock (ns) at each image the service pushes."""

    def __init__(self, service):
        super().__init__()
        self.service, self.times = service, []

    async def on_push_frame(self, data: FramePushed):
        if data.source is self.service and isinstance(data.frame, OutputImageRawFrame):
            self.times.append(data.timestamp)


def run(pipe, frames) -> tuple[list, list, list]:
    """frames through [source, AvatarVideoService, sink], then an EndFrame -> (downstream, upstream, image times)."""
    service = AvatarVideoService(pipe, FACE, live_kwargs=LIVE, compile=False)
    times = ImageTimes(service)
    down, up = asyncio.run(run_test(service, frames_to_send=frames, observers=[times], start_timeout=30))
    return list(down), list(up), times.times


def speech_audio(down: list) -> list[tuple[int, TTSAudioRawFrame]]:
    return [(i, f) for i, f in enumerate(down) if isinstance(f, TTSAudioRawFrame)]


def samples(frames) -> np.ndarray:
    return np.concatenate([np.frombuffer(f.audio, np.int16) for f in frames])


def expected_at_out_rate(pcm: np.ndarray, rate: int) -> np.ndarray:
    """The input as the service hands it out: resampled per 20 ms frame to OUT_RATE as the live core does it (the
    same stateful PyAV resampler), back to int16."""
    if rate == OUT_RATE:
        return pcm
    n, resample = int(rate * CHUNK_S), Resampler(rate, 1, OUT_RATE)
    out = np.concatenate([resample(pcm[i:i + n]) for i in range(0, len(pcm), n)])
    return np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("rate", [24000, 16000, 48000])
def test_images_at_25_fps_each_followed_by_its_own_audio(pipe, rate):
    """0.4 s of silence, then 1 s of speech: images of the model's size at 25 fps, idle ones first; after 25 of them
    (one per 40 ms of speech) a TTSAudioRawFrame of ~960 samples at the pipeline's rate, all together the TTS's
    samples in order (resampled to that rate as the live core does it); started before the first of them, stopped
    right after the last. None of the TTS's own audio frames reaches the transport."""
    fed = tone(rate, 1.0)
    sent = tts(fed, rate)
    down, _, times = run(pipe, [SleepFrame(sleep=0.4), *sent])
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    audio = speech_audio(down)
    h, w = pipe.config.height, pipe.config.width
    assert all(f.size == (w, h) and f.format == "RGB" and len(f.image) == w * h * 3 for f in images)
    # 25 fps: 40 ms apart, the count matching the span; idle images while no speech had arrived
    gaps = np.diff(times) / 1e9
    assert abs(np.median(gaps) - FRAME_S) < 0.005
    assert abs((times[-1] - times[0]) / 1e9 * FPS + 1 - len(images)) <= 2
    assert sum(isinstance(f, OutputImageRawFrame) for f in down[:audio[0][0]]) >= 0.4 * FPS * 0.8
    # pairing: every audio frame right after an image; one per 40 ms of speech; ~960 samples at the output rate
    assert all(isinstance(down[i - 1], OutputImageRawFrame) for i, _ in audio)
    assert abs(len(audio) - 25) <= 1
    assert all(f.sample_rate == OUT_RATE and f.num_channels == 1 for _, f in audio)
    assert all(abs(f.num_frames - OUT_RATE * FRAME_S) <= 24 for _, f in audio[:-1])
    # the TTS's samples, whole (but the resampler's look-back) and in order: the service's copy, not the originals
    want = expected_at_out_rate(fed, rate)
    got = samples(f for _, f in audio)
    assert len(want) - LOOK_BACK <= len(got) <= len(want) and np.array_equal(got, want[:len(got)])
    assert not {f.id for _, f in audio} & {f.id for f in sent}
    # started before the speech, stopped right after its last audio frame, once each
    kinds = [type(f) for f in down]
    start, stop = kinds.index(TTSStartedFrame), kinds.index(TTSStoppedFrame)
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 1
    assert start < audio[0][0] and stop == audio[-1][0] + 1 and down[stop] is sent[-1]


def test_interruption_stops_the_speech_at_once_and_drops_its_stop(pipe):
    """An InterruptionFrame 0.5 s into 2 s of speech: no speech audio after it, and the interrupted utterance's
    TTSStoppedFrame (held until its last frame) never comes, so it cannot close the next utterance early; the images
    go on (idle); the next utterance plays whole, with its own TTSStoppedFrame after it."""
    first, second = tts(tone(OUT_RATE, 2.0), OUT_RATE), tts(tone(OUT_RATE, 0.4, hz=500), OUT_RATE)
    cut = InterruptionFrame()
    down, _, _ = run(pipe, [*first, SleepFrame(sleep=DELAY_S + 0.5), cut, SleepFrame(sleep=0.6), *second])
    at, again = next(i for i, f in enumerate(down) if f is cut), down.index(second[0])
    before, after = [f for i, f in speech_audio(down) if i < at], [(i, f) for i, f in speech_audio(down) if i > at]
    assert 5 <= len(before) < 50
    assert [f.id for f in down if isinstance(f, TTSStoppedFrame)] == [second[-1].id]
    # after the cut: no speech, only idle images (0.6 s of them), until the second utterance, which plays whole
    assert after[0][0] > again
    assert sum(isinstance(f, OutputImageRawFrame) for f in down[at:again]) >= 0.6 * FPS * 0.8
    got, want = samples(f for _, f in after), np.frombuffer(b"".join(f.audio for f in second[1:-1]), np.int16)
    assert len(want) - LOOK_BACK <= len(got) <= len(want) and np.array_equal(got, want[:len(got)])
    assert down.index(second[-1]) == after[-1][0] + 1


def test_a_lost_last_frame_still_releases_its_stop_in_order(pipe, monkeypatch):
    """A segment's last frame lost (computed after its play time: a filler takes its slot, as under load): its
    TTSStoppedFrame goes with the next idle frame instead, and the next utterance gets its own, not the late one."""
    frame = LiveStream.frame

    def lose_segment_ends(self, slot):
        f = frame(self, slot)
        if not f.segment_end:
            return f
        return LiveFrame(slot, f.video, np.zeros_like(f.audio), False, f.play_time, filler=True, source=f.source[:0])
    monkeypatch.setattr(LiveStream, "frame", lose_segment_ends)
    first, second = tts(tone(OUT_RATE, 0.4), OUT_RATE), tts(tone(OUT_RATE, 0.4, hz=500), OUT_RATE)
    down, _, _ = run(pipe, [*first, SleepFrame(sleep=1.0), *second])
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert [down[i].id for i in stops] == [first[-1].id, second[-1].id]
    audio = [i for i, _ in speech_audio(down)]
    for stop, spoken in zip(stops, ([i for i in audio if i < stops[0]], [i for i in audio if i > stops[0]])):
        assert len(spoken) >= 8 and max(spoken) < stop
        assert sum(isinstance(f, OutputImageRawFrame) for f in down[max(spoken):stop]) <= 3     # filler, idle


def test_end_frame_lets_the_queued_speech_play_out(pipe):
    """Speech with no TTSStoppedFrame, then the EndFrame at once: all of it still comes out before the end."""
    fed = tone(OUT_RATE, 0.6)
    down, _, _ = run(pipe, tts(fed, OUT_RATE, stop=False))
    got = samples(f for _, f in speech_audio(down))
    assert len(fed) - LOOK_BACK <= len(got) <= len(fed) and np.array_equal(got, fed[:len(got)])
    assert not any(isinstance(f, TTSStoppedFrame) for f in down)


def test_a_failing_stream_is_an_error_frame_and_the_voice_goes_on(pipe, monkeypatch):
    """The producer thread fails: an ErrorFrame goes upstream, the pipeline still ends, and the TTS audio sent after
    the failure passes through unchanged (voice only)."""
    def fail(self):
        raise RuntimeError("boom")
    monkeypatch.setattr(LiveStream, "tick", fail)
    later = tts(tone(OUT_RATE, 0.2), OUT_RATE)
    down, up, _ = run(pipe, [SleepFrame(sleep=DELAY_S + 1.0), *later])      # found at the first play time
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "boom" in errors[0].error
    assert [f.id for f in down if isinstance(f, TTSAudioRawFrame)] == [f.id for f in later[1:-1]]


def test_example_bot_imports_and_shows_its_help():
    spec = importlib.util.spec_from_file_location("pipecat_bot", ROOT / "examples" / "pipecat_bot.py")
    bot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bot)
    assert callable(bot.bot) and callable(bot.main)
    out = subprocess.run([sys.executable, "examples/pipecat_bot.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--face" in out.stdout and "--port" in out.stdout
