"""Pipecat (pipecat-ai 1.x): the avatar as a video service between the TTS and the transport's output.

    from runtime.integrations.pipecat import AvatarVideoService

    transport = SmallWebRTCTransport(connection, TransportParams(
        audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True, video_out_framerate=25,
        video_out_width=pipe.config.width, video_out_height=pipe.config.height))
    avatar = AvatarVideoService(pipe)                  # pipe: an AvatarPipeline; image: the shipped face by default
    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts,
                         avatar,                       # TTS audio in; images + their audio out, 25 fps
                         transport.output(), assistant_aggregator])

It consumes `TTSAudioRawFrame`s (any rate, mono or interleaved stereo int16) and feeds them to a `LiveStream`
(runtime/live.py). From the `StartFrame` on it pushes one `OutputImageRawFrame` (RGB, the model's size) every 40 ms,
speech or not, and after each image the speech that drove it as a `TTSAudioRawFrame` at the pipeline's output rate
(`PipelineParams.audio_out_sample_rate`), so lips and audio leave paired and in order. The TTS's own audio is not
forwarded: the transport plays the service's copy of it (the TTS's samples, cut per frame; resampled only when the
TTS's rate is not the pipeline's), as the hosted avatar services (Simli, HeyGen, Tavus) do. Frames, in pipecat terms:
- `TTSAudioRawFrame` (downstream): fed to the avatar, not forwarded. `TTSStartedFrame` passes at once.
- `TTSStoppedFrame`: closes the segment (`live.end_segment()`) and is held until the segment's last frame has been
  pushed, so the transport sees started, audio, stopped in order (it marks the bot stopped on that frame). If that
  frame is lost (computed after its play time, or dropped by a restart: the live core's drop policy), it goes with
  the next idle frame instead.
- `InterruptionFrame`: `live.interrupt()`, the held `TTSStoppedFrame`s are dropped (as pipecat drops every queued
  control frame on an interruption), then forwarded. The speech stops at once; the images go on (idle).
- `EndFrame`: the queued speech plays out first (bounded by its length plus the play delay), then the stream
  closes and the frame goes on. `CancelFrame`: closes at once. Everything else passes through unchanged.
- A failing stream (an error in its producer thread) becomes an `ErrorFrame` upstream and marks the service
  unusable; from then on the TTS audio passes through unchanged (voice only) instead of hanging the bot.

Transport: `video_out_enabled=True`, `video_out_is_live=True` (play the images as a stream at
`video_out_framerate=25`, instead of cycling the last one), `video_out_width`/`video_out_height` = the model's
size (other sizes are resized by the transport, per frame). The images are not `sync_with_audio`: both streams
leave here in real time, one image and its 40 ms of speech together.

The session is made and warmed up in `setup()` (pipecat's place for slow start-up: processors are set up
concurrently, before the `StartFrame` is let through), on a worker thread; the 25 fps clock starts at the
`StartFrame`. The first session on a CPU compiles the model's step (up to a minute for toy-talker; later sessions
reuse it): raise `PipelineWorker(setup_timeout_secs=...)` (default 20 s) or warm up the pipe before the first bot.
A full garbage collection of a bot's process (torch, pipecat, the model: ~200k objects) stops every thread for
60-160 ms, and the live stream skips the frames it falls behind (speech included): call `gc.freeze()` once the model
is loaded (examples/pipecat_bot.py does), so that the long-lived objects are not scanned again.

Not here: TTS word timestamps are not moved (a `TTSTextFrame` passes at once; its speech plays one play delay D
later, ~0.9 s for toy-talker on a CPU); an interruption drops all queued speech, uninterruptible TTS contexts too.
"""
from __future__ import annotations

import asyncio
import collections

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from ..config import TOY_ASSETS
from ..live import FRAME_S, LiveFrame, LiveStream, live_session
from ..media import pcm_to_int16

FACE = TOY_ASSETS / "ref_0.png"
END_SLACK_S = 2.0       # EndFrame waits at most for the queued speech + the play delay + this, then closes anyway
                        # (a stalled producer must not hold the end of the pipeline)


class AvatarVideoService(AIService):
    """TTS audio in, avatar video and its paired audio out (see the module docstring). `pipe`: an AvatarPipeline;
    `image`: the reference face (path, PIL image or array; default: the shipped toy face); `live_kwargs`: passed to
    LiveStream (e.g. `margin_s`, `delay_s`, `warmup`); `compile`: live_session's (default: compiled on a CPU).
    `live`: the LiveStream from setup() to the end (its `stats()`, `delay_s`), None before and after."""

    def __init__(self, pipe, image=FACE, *, live_kwargs: dict | None = None, compile: bool | None = None,
                 **kwargs):
        # An AIService like pipecat's own avatar services (Simli, HeyGen, Tavus): start/stop/cancel hooks, and
        # settings (none here: model=None, as theirs).
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._pipe, self._image, self._compile = pipe, image, compile
        self._live_kwargs = dict(live_kwargs or {})
        self.live: LiveStream | None = None
        self._task: asyncio.Task | None = None
        self._rate = 0                  # the pipeline's output rate: the audio pushed downstream
        # one per segment not played yet: (live clock when it was closed, its TTSStoppedFrame or None)
        self._ends: collections.deque[tuple[float, TTSStoppedFrame | None]] = collections.deque()
        self._open = False              # audio fed since the last segment end
        self._cut = 0                   # interruptions so far: a frame taken before one loses its audio

    # ------------------------------------------------------------------ lifecycle
    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._rate = setup.audio_out_sample_rate       # StartFrame.audio_out_sample_rate is deprecated since 1.8
        self.live = await asyncio.to_thread(self._make_live)

    def _make_live(self) -> LiveStream:
        session = live_session(self._pipe, self._image, compile=self._compile)
        return LiveStream(session, source_rate=self._rate, start=False, **self._live_kwargs)   # warms up here

    async def start(self, frame: StartFrame):
        await super().start(frame)
        if self.live is not None:
            self.live.start()                           # the clock: slot 0 is now
            self._task = self.create_task(self._play(self.live))

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        live = self.live
        if live is not None:
            if self._open:                              # speech with no TTSStoppedFrame: it ends here
                self._end_segment(None)
            try:
                await asyncio.wait_for(self._played(), timeout=live.queued_s + live.delay_s + END_SLACK_S)
            except TimeoutError:                        # (asyncio's, since Python 3.11: pipecat 1.x needs it)
                logger.warning(f"{self}: the queued speech did not play out before the end; closing anyway")
        await self._close()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close()

    async def cleanup(self):
        await super().cleanup()
        await self._close()

    async def _close(self):
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None
        live, self.live = self.live, None
        if live is not None:
            await asyncio.to_thread(live.close)        # joins the producer thread (at most one step)

    async def _played(self):
        while self._ends and self.live is not None:
            await asyncio.sleep(FRAME_S)

    # ------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, InterruptionFrame):
            self._interrupt()       # before the base class's handling, which awaits: quiet at once
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM and self.live is not None and \
                isinstance(frame, (TTSAudioRawFrame, TTSStoppedFrame)):
            if isinstance(frame, TTSAudioRawFrame):
                self._feed(frame)
            else:
                self._end_segment(frame)
            return
        await self.push_frame(frame, direction)

    def _feed(self, frame: TTSAudioRawFrame):
        self.live.feed_s16(frame.audio, frame.sample_rate, frame.num_channels)
        self._open = True

    def _end_segment(self, stop: TTSStoppedFrame | None):
        self._ends.append((self.live.clock(), stop))
        self.live.end_segment()
        self._open = False

    def _interrupt(self):
        if self.live is not None:
            self.live.interrupt()
        self._ends.clear()          # their segment ends were dropped with the speech
        self._open = False
        self._cut += 1

    # ------------------------------------------------------------------ frames out
    async def _play(self, live: LiveStream):
        """Push every frame of the live stream at its play time; a failing stream becomes an ErrorFrame."""
        error = None
        try:
            async for f in live.frames():
                await self._push(f, live)
        except Exception as err:                        # frames() raises when the producer thread failed
            error = err
        error = live.error or error                     # (or it just stops, when the failure closed it first)
        if error is None:                               # closed
            return
        await self.push_error(f"the avatar's live stream stopped: {error}", exception=error,
                              force_treat_as_permanent=True)
        self.live, self._task = None, None             # from now on the TTS audio passes through (voice only)
        self._ends.clear()
        await asyncio.to_thread(live.close)

    async def _push(self, f: LiveFrame, live: LiveStream):
        cut = self._cut
        h, w = f.video.shape[:2]
        await self.push_frame(OutputImageRawFrame(image=f.video.tobytes(), size=(w, h), format="RGB"))
        if cut != self._cut:        # interrupted while the image went out: its speech goes with the rest
            return
        if len(f.source):
            pcm = pcm_to_int16(f.source)
            await self.push_frame(TTSAudioRawFrame(audio=pcm.tobytes(), sample_rate=self._rate, num_channels=1))
        if f.segment_end:
            await self._release(1, cut)
        elif not f.speech and not f.filler:
            # An idle frame's tick found no speech and no segment end queued: every segment closed before that tick
            # has ended, also one whose last frame was lost (computed too late, or dropped by a restart).
            tick = f.play_time - live.delay_s
            await self._release(sum(closed < tick for closed, _ in self._ends), cut)

    async def _release(self, n: int, cut: int):
        """Push the TTSStoppedFrames of the n oldest segments (unless an interruption dropped them meanwhile)."""
        for _ in range(n):
            if cut != self._cut or not self._ends:
                return
            stop = self._ends.popleft()[1]
            if stop is not None:
                await self.push_frame(stop)
