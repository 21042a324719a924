"""The live core: one session driven by a 25 fps clock, for any transport (WebRTC, LiveKit, Pipecat, ...).

    live = LiveStream(pipe.session(face))        # warms up, then starts its clock
    live.feed(pcm, sample_rate=48000)            # audio as it arrives: any rate, mono or [channels, n]
    async for f in live.frames():                # one LiveFrame every 40 ms, on time
        send(f.video, f.audio)                   # uint8 [H, W, 3] and the 40 ms of 16 kHz audio that drove it
    live.interrupt()                             # drop the queued speech, back to idle within about one block
    live.close()

Time is cut into slots of 40 ms. Slot s's audio is taken from the input at its tick, t_s = T0 + 40 ms * s: 640
samples of what has arrived, or silence when the input has run dry, so the avatar idles instead of stalling (a
speech onset waits until a whole frame is queued, so that arrival jitter does not cut it into pieces). A producer
thread pushes each tick's audio into the session; the frame that audio drives becomes slot s's frame and leaves
together with it at the play time P_s = t_s + D, so audio and lips are paired by construction. D is constant for
the stream: the structural wait of the frame that waits longest, (look-ahead + 4B - 1) frames, plus a margin for the
step's compute (measured during warm-up unless given), so the speech-to-lips delay never grows.

When compute falls behind (documented drop policy, every case counted in `stats()`):
- a frame that is not ready at its play time is replaced by a filler (the last frame again, with silence): `fillers`;
  the real frame, when it comes later, is dropped: `late`;
- if the producer falls more than max(1 s, D) behind the clock (it cannot keep up; a single slow step only costs a
  few fillers), it restarts the stream (`session.reset()`: same reference, new history) from the current tick on:
  the audio of the ticks it skipped is dropped (`dropped_audio_frames`, `restarts`), and the slots before the new
  stream's first frame get fillers showing its first output, the reference reconstruction (a neutral face). The
  clock, D and the pairing stay. A machine too slow for real time so restarts about once a second of lag.
- a speech segment whose last frame is lost (late, skipped or cut by such a restart) still ends: the next frame
  handed out carries its `segment_end`, so whoever waits for the segment's end is not left waiting.
`interrupt()` does the same restart, dropping all queued input audio and every frame made from it that has not been
played: the audio stops at once, the face turns neutral at once, and idle motion follows one play delay later.

With `source_rate=R`, every feed is first resampled to R Hz mono and kept next to its 16 kHz copy: each frame's
`source` holds the same speech at R Hz (the stretch of the caller's audio that its 640 model samples came from, split
in proportion per fed chunk), so a transport can play the speech at its own rate instead of the model's 16 kHz.

The session's frame 0 (the reference reconstruction, before any audio) is not sent. Only the producer thread
touches the session once the clock runs; warm-up and producer run in threads of their own with the stream's OpenMP
thread count (`threads`), and a serving process keeps its other threads at one (`host_thread`). Not here: network
transports (runtime/serve/, runtime/integrations/).
"""
from __future__ import annotations

import asyncio
import collections
import gc
import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .media import validate_pcm

SAMPLE_RATE = 16000
FRAME_SAMPLES = 640                 # 40 ms at 16 kHz: one video frame's audio
FPS = 25
FRAME_S = 1.0 / FPS
ONSET_SAMPLES = 640                 # speech starts once a whole frame is queued
WARMUP_STEPS = 14                   # steps of silence run before the clock starts (JIT, compile, step timing)
TIMED_STEPS = 8                     # the last warm-up steps, run at the clock's pace; the slowest sets the margin
MIN_MARGIN_S = 0.12                 # the slowest live steps on a 2-core VM: 93-111 ms in 30 s (median 37-40)
MAX_LAG_S = 1.0                     # a producer this far behind the clock (or D, if longer) restarts the stream


@dataclass
class LiveFrame:
    slot: int                       # 0, 1, 2, ... every 40 ms from the start of the stream
    video: np.ndarray               # uint8 [H, W, 3]
    audio: np.ndarray               # float32 [640] at 16 kHz: the 40 ms that drove this frame (silence if idle)
    speech: bool                    # the audio came from the input (not silence padding)
    play_time: float                # clock seconds when it is due
    filler: bool = False            # not ready in time: the previous frame again, with silence
    segment_end: bool = False       # the last frame of a speech segment closed by `end_segment()`
    arrival: float | None = None    # clock seconds when its first input sample arrived (speech frames only)
    source: np.ndarray | None = None    # with source_rate: this frame's input at that rate, float32, only the samples
                                        # taken from the input (empty for idle frames and fillers)


@dataclass
class LiveStats:
    frames: int = 0                 # frames handed to the transport (fillers included)
    fillers: int = 0                # slots whose frame was not ready at its play time
    late: int = 0                   # frames computed after their play time (dropped)
    dropped_audio_frames: int = 0   # 40 ms input frames dropped by restarts and interrupts
    restarts: int = 0               # stream restarts (falling behind) and interrupts
    interrupts: int = 0
    underruns: int = 0              # ticks during speech that found less than 40 ms queued (padded)
    step_ms: list = field(default_factory=list)     # compute time of recent ticks that ran a window step


class _Input:
    """Input audio at 16 kHz mono float32 with its arrival times, and the positions where speech segments end. Each
    chunk may carry the same audio at another rate (`source`), handed out in proportion to the 16 kHz samples taken."""

    def __init__(self):
        self.chunks: collections.deque[list] = collections.deque()     # [pcm16, source | None, used16, used_source]
        self.arrivals: collections.deque[float] = collections.deque()     # per chunk
        self.queued = 0
        self.ends: collections.deque[int] = collections.deque()    # sample counts (from the queue start) of ends
        self.speaking = False
        self._held = _EMPTY          # source audio whose 16 kHz copy the resampler has not given out yet

    def push(self, pcm: np.ndarray, arrival: float, source: np.ndarray | None = None) -> None:
        if source is not None and len(self._held):
            source, self._held = np.concatenate([self._held, source]), _EMPTY
        if not len(pcm) and source is not None:
            self._held = source
        elif len(pcm):
            self.chunks.append([pcm, source, 0, 0])
            self.arrivals.append(arrival)
            self.queued += len(pcm)

    def mark_end(self) -> None:
        self.ends.append(self.queued)

    def take(self) -> tuple[np.ndarray, np.ndarray, bool, bool, bool, float | None]:
        """One tick's 640 samples -> (audio, source, speech, underrun, segment_end, arrival of its first sample)."""
        if not self.speaking and self.queued < ONSET_SAMPLES and not self.ends:
            return np.zeros(FRAME_SAMPLES, np.float32), _EMPTY, False, False, False, None
        n = min(FRAME_SAMPLES, self.queued)
        if self.ends and self.ends[0] <= FRAME_SAMPLES:          # a segment ends inside this frame
            n = min(n, self.ends[0])
        out = np.zeros(FRAME_SAMPLES, np.float32)
        arrival = self.arrivals[0] if n else None
        source = self._consume(n, out)
        self.ends = collections.deque(e - n for e in self.ends)
        ended = bool(self.ends) and self.ends[0] <= 0
        if ended:
            self.ends.popleft()
        speech = n > 0
        underrun = self.speaking and n < FRAME_SAMPLES and not ended
        self.speaking = self.queued > 0 and not ended
        return out, source, speech, underrun, ended, arrival

    def _consume(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """Take the n oldest samples off the queue, copied into `out` when given; returns their source audio."""
        got, sources = 0, []
        while got < n:
            chunk = self.chunks[0]
            pcm, source, used = chunk[0], chunk[1], chunk[2]
            k = min(n - got, len(pcm) - used)
            if out is not None:
                out[got:got + k] = pcm[used:used + k]
            if source is not None:
                until = (used + k) * len(source) // len(pcm)
                sources.append(source[chunk[3]:until])
                chunk[3] = until
            got += k
            chunk[2] = used + k
            if chunk[2] == len(pcm):
                self.chunks.popleft()
                self.arrivals.popleft()
        self.queued -= n
        return np.concatenate(sources) if sources else _EMPTY

    def drop(self, samples: int | None = None) -> int:
        """Drop `samples` from the front (all when None); returns how many 40 ms frames that was."""
        n = self.queued if samples is None else min(samples, self.queued)
        self._consume(n)
        self.ends = collections.deque(e - n for e in self.ends if e - n > 0)
        if samples is None:
            self.ends.clear()
            self._held = _EMPTY
        self.speaking = self.speaking and self.queued > 0
        return math.ceil(n / FRAME_SAMPLES)


_EMPTY = np.zeros(0, np.float32)


class Resampler:
    """Any-rate, any-layout PCM chunks -> float32 mono at `rate` (default 16 kHz): PyAV's AudioResampler, stateful
    across chunks."""

    def __init__(self, sample_rate: int, channels: int = 1, rate: int = SAMPLE_RATE):
        import av
        self.rate, self.channels, self.out_rate = int(sample_rate), int(channels), int(rate)
        self._av = av
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.out_rate)

    def frame(self, frame) -> np.ndarray:
        """A decoded av.AudioFrame (any format, layout and rate) -> float32 mono at the output rate."""
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        """pcm: int16 or float32, [n] (mono) or [channels, n]."""
        pcm = np.asarray(pcm)
        if pcm.ndim == 1:
            pcm = pcm[None]
        if pcm.ndim != 2 or pcm.shape[0] != self.channels:
            raise ValueError(f"expected {self.channels} channel(s) as [channels, n], got shape {pcm.shape}")
        if pcm.dtype == np.int16:
            fmt, data = "s16p", np.ascontiguousarray(pcm)
        else:
            fmt, data = "fltp", np.ascontiguousarray(pcm, dtype=np.float32)
        layout = "mono" if self.channels == 1 else "stereo" if self.channels == 2 else f"{self.channels}c"
        frame = self._av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate = self.rate
        return self.frame(frame)


def _resampler(cache: dict, sample_rate: int, channels: int, rate: int, fmt: str | None = None) -> Resampler:
    """The stateful resampler for one input format (kept while the format stays the same)."""
    key = (sample_rate, channels, rate, fmt)
    if key not in cache:
        cache.clear()
        cache[key] = Resampler(sample_rate, channels, rate)
    return cache[key]


def freeze_heap() -> None:
    """For a serving process, once its model is loaded: a full garbage collection of a process holding torch and a
    model (~200k objects) stops every thread for 60-160 ms, and a live stream skips the frames it falls behind;
    frozen, the long-lived objects are not scanned again."""
    gc.collect()
    gc.freeze()


def host_thread() -> None:
    """For a serving process, in every long-lived thread that is not a live stream's (the main thread before it loads
    the model, the event loop's worker threads): compute with one OpenMP thread, so that only the live streams'
    compute threads own OpenMP teams. libgomp cuts its workers' spin-wait to almost nothing once it manages more
    threads than the machine has cores, and every thread that has run a parallel torch op keeps a team; with the
    main thread's team alive, toy-talker's step in a stream's thread took 47-52 ms on 2 cores instead of 25."""
    own_threads(1)


def own_threads(n: int) -> None:
    """The calling thread computes with n OpenMP threads; threads started later keep the process's default.
    (torch.set_num_threads also makes n the count every new thread starts with, so that default is read in a fresh
    thread first and put back from another, under a lock so that streams starting at once do not keep each other's.)"""
    with _THREADS_LOCK:
        torch.get_num_threads()                # this thread's own lazy start-up, which reads the default, goes first
        default = _in_fresh_thread(torch.get_num_threads)
        torch.set_num_threads(n)
        _in_fresh_thread(torch.set_num_threads, default)


_THREADS_LOCK = threading.Lock()


def _in_fresh_thread(fn, *args, name: str | None = None):
    """fn(*args) in a new thread, waited for; its exception is raised in the caller's thread."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as err:
            out["error"] = err
    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def threads_per_stream(streams: int) -> int:
    """OpenMP threads for each of `streams` concurrent live streams: this machine's cores (OMP_NUM_THREADS, if
    set) shared out, at least 1."""
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, streams))


def live_session(pipe, image, *, compile: bool | None = None, stream=None):
    """A session for live use: the pipeline's live stream (`pipe.live_stream`, else its default; `stream` overrides
    both) on the static-shape engine, its step compiled (torch.compile) on a CPU by default (the small models' steps
    are bound by Python dispatch, which compiling removes; the compiled step is shared by later sessions). On CUDA
    the engine's graphs do that already."""
    compile = pipe.device.type == "cpu" if compile is None else compile
    stream = stream or pipe.live_stream or pipe.default_stream
    return pipe.session(image, stream=stream, fit="crop", engine=True, compile=compile)


class LiveStream:
    """One session on a 25 fps clock (see the module docstring). `delay_s`: the constant play delay D (default:
    structural wait + a compute margin measured during warm-up); `clock`: a monotonic time source in seconds;
    `source_rate`: keep the input at this rate too, in each frame's `source` (see the module docstring); `threads`:
    the OpenMP threads of the stream's compute (default: the constructing thread's torch.get_num_threads()), which
    runs in threads of its own (warm-up, then the producer) so that they own the OpenMP teams (see `host_thread`)."""

    def __init__(self, session, *, delay_s: float | None = None, margin_s: float | None = None,
                 clock=time.monotonic, warmup: bool = True, start: bool = True, source_rate: int | None = None,
                 threads: int | None = None):
        self.session = session
        self.threads = threads or torch.get_num_threads()
        cfg, stream = session.cfg, session.stream
        if cfg.sample_rate != SAMPLE_RATE or cfg.samples_per_frame != FRAME_SAMPLES or cfg.fps != FPS:
            raise ValueError(f"the live core runs 25 fps from 16 kHz audio; model {cfg.name!r} has {cfg.fps} fps, "
                             f"{cfg.sample_rate} Hz")
        self.height, self.width = cfg.height, cfg.width
        # the frame that waits longest: the first of a block, for its block and the look-ahead
        self.structural_frames = stream.lookahead_video_frames(cfg.audio_frames_per_latent) + \
            stream.block_frames * cfg.audio_frames_per_latent - 1
        self.clock = clock
        self.stats_ = LiveStats()
        self._lock = threading.Lock()
        self._input = _Input()
        if source_rate is not None and (not isinstance(source_rate, int) or not 8000 <= source_rate <= 192000):
            raise ValueError(f"source_rate must be an int sample rate in 8000..192000 Hz, got {source_rate!r}")
        self.source_rate = source_rate
        self._resamplers: dict = {}           # input format -> Resampler to source_rate (or 16 kHz)
        self._model_resampler: dict = {}      # source_rate -> 16 kHz
        self._ready: dict[int, LiveFrame] = {}          # slot -> frame, waiting for its play time
        self._lost_ends = 0                             # segment ends whose frames were lost, not yet handed out
        self._audio: dict[int, tuple] = {}              # tick slot -> (audio, source, speech, segment_end, arrival)
                                                        # pushed, its frame pending
        self._last_video = np.zeros((self.height, self.width, 3), np.uint8)
        self._interrupt = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.on_step = None          # optional callback(ms) from the producer thread after each window step
        margin = margin_s               # given: used as is; measured (or no warm-up): at least MIN_MARGIN_S
        if margin is None:
            margin = max(MIN_MARGIN_S, self._in_compute_thread(self._warm_up) if warmup else 0.0)
        self.delay_s = delay_s if delay_s is not None else self.structural_frames * FRAME_S + margin
        if self.delay_s < self.structural_frames * FRAME_S:
            raise ValueError(f"delay_s={self.delay_s:.3f} s is below the structural wait of this stream "
                             f"({self.structural_frames} frames = {self.structural_frames * FRAME_S:.2f} s): every "
                             "frame would be late; leave delay_s unset to have it measured")
        if start:
            self.start()

    # ------------------------------------------------------------------ input (any thread)
    def feed(self, pcm, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        """Audio as it arrives: int16 or float32, [n] mono or [channels, n], at any rate (resampled with PyAV)."""
        pcm = np.asarray(pcm)
        rate = self.source_rate or SAMPLE_RATE
        if sample_rate != rate or channels != 1 or pcm.ndim != 1:
            pcm = _resampler(self._resamplers, sample_rate, channels, rate)(pcm)
        self._push(pcm)

    def feed_s16(self, data, sample_rate: int, channels: int = 1) -> None:
        """Interleaved int16 PCM bytes, as voice frameworks carry audio (LiveKit's rtc.AudioFrame.data, Pipecat's
        audio frames)."""
        pcm = np.frombuffer(data, dtype=np.int16)
        if channels > 1:
            pcm = pcm.reshape(-1, channels).T
        self.feed(pcm, sample_rate=sample_rate, channels=channels)

    def feed_frame(self, frame) -> None:
        """A decoded av.AudioFrame as it arrives (e.g. from a WebRTC track): resampled to mono."""
        rate = self.source_rate or SAMPLE_RATE
        resample = _resampler(self._resamplers, frame.sample_rate, frame.layout.nb_channels, rate, frame.format.name)
        self._push(resample.frame(frame))

    def _push(self, pcm: np.ndarray) -> None:
        """pcm: mono float32 at source_rate (or 16 kHz without one)."""
        pcm = validate_pcm(pcm, allow_empty=True)          # the runtime's one level rule; NaN is refused
        source = None
        if self.source_rate is not None:
            source = pcm
            if self.source_rate != SAMPLE_RATE:
                pcm = _resampler(self._model_resampler, self.source_rate, 1, SAMPLE_RATE)(pcm)
        now = self.clock()
        with self._lock:
            self._input.push(pcm, now, source)

    def end_segment(self) -> None:
        """The speech fed so far is a complete segment: its last frame carries `segment_end`."""
        with self._lock:
            self._input.mark_end()

    def interrupt(self) -> None:
        """Drop the queued input and the frames made from it that were not played; idle within about one block.
        The output goes quiet at once: the frames waiting for their play time go now (fillers take their slots), and
        so do the frames of a step running meanwhile; the producer's next tick restarts the stream."""
        with self._lock:
            self._interrupt = True
            self.stats_.dropped_audio_frames += self._input.drop()   # now: audio fed after this call is kept
            self._ready.clear()
            self._lost_ends = 0

    @property
    def queued_s(self) -> float:
        return self._input.queued / SAMPLE_RATE

    # ------------------------------------------------------------------ output (the transport's event loop)
    def frame(self, slot: int) -> LiveFrame:
        """Slot's frame if it is ready, else a filler (the last frame, silence); forgets older slots. A segment end
        whose frame was lost (late, skipped, or dropped by a restart for lag) goes with the next frame handed out, so
        a consumer waiting for a segment to end is never left waiting."""
        with self._lock:
            for old in [s for s in self._ready if s < slot]:
                self._lost_ends += self._ready.pop(old).segment_end
            f = self._ready.pop(slot, None)
            self.stats_.frames += 1
            if f is None:
                self.stats_.fillers += 1
                f = LiveFrame(slot, self._last_video, np.zeros(FRAME_SAMPLES, np.float32), False,
                              self.play_time(slot), filler=True, source=None if self.source_rate is None else _EMPTY)
            else:
                self._last_video = f.video
            if self._lost_ends and not f.segment_end:      # a segment whose last frame was lost still ends
                f.segment_end = True
                self._lost_ends -= 1
            return f

    def play_time(self, slot: int) -> float:
        return self.t0 + slot * FRAME_S + self.delay_s

    async def frames(self, start_slot: int = 0):
        """One LiveFrame per slot at its play time. A consumer that falls more than two slots behind skips ahead
        (the skipped frames count as late)."""
        slot = start_slot
        while not self._closed.is_set():
            wait = self.play_time(slot) - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            elif -wait > 2 * FRAME_S:
                skip = int(-wait / FRAME_S) - 1
                with self._lock:
                    self.stats_.late += skip
                slot += skip
            if self.error is not None:
                raise RuntimeError(f"the live stream stopped: {self.error}") from self.error
            yield self.frame(slot)
            slot += 1

    def stats(self) -> dict:
        with self._lock:
            s = self.stats_
            steps = sorted(s.step_ms)
            return dict(frames=s.frames, fillers=s.fillers, late=s.late, dropped_audio_frames=s.dropped_audio_frames,
                        restarts=s.restarts, interrupts=s.interrupts, underruns=s.underruns,
                        delay_ms=round(self.delay_s * 1e3, 1), queued_ms=round(self.queued_s * 1e3, 1),
                        step_ms_p50=steps[len(steps) // 2] if steps else None,
                        step_ms_max=steps[-1] if steps else None)

    # ------------------------------------------------------------------ the producer
    def start(self, background: bool = True) -> None:
        """Start the clock (slot 0's tick is now) and the producer thread; `background=False` starts the clock only,
        and the caller calls `tick()` itself (tests drive a fake clock so)."""
        if hasattr(self, "t0"):
            return
        self.t0 = self.clock()
        self._next_tick = 0
        self._s0 = 0                 # slot of the current session's audio frame 0
        if background:
            self._thread = threading.Thread(target=self._run, name="live-producer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _in_compute_thread(self, fn):
        """fn() in a new thread with the stream's OpenMP threads (the thread, and its team, end with it)."""
        def run():
            own_threads(self.threads)
            return fn()
        return _in_fresh_thread(run, name="live-warm-up")

    def _warm_up(self) -> float:
        """Run WARMUP_STEPS windows of silence (JIT, allocations, the engine's compile and capture), the last
        TIMED_STEPS of them tick by tick at the clock's pace, then reset; returns the compute margin: 2x the
        slowest timed step (the stream takes at least MIN_MARGIN_S). Timed at pace, not back to back: a step that
        follows idle ticks runs slower (toy-talker's low-delay step on 2 cores: 25 ms back to back, 38 ms p50 at
        pace). Twice the slowest, because a live step also shares the machine with the transport's encoders and
        the event loop (a server's steps: 37 ms p50, 93 ms the slowest in 30 s, where 1.5x the slowest warm-up
        step, 64 ms, left 2 frames in 750 late)."""
        sess, per_step = self.session, self.session.stream.block_frames * self.session.cfg.audio_frames_per_latent
        silence = np.zeros(FRAME_SAMPLES, np.float32)
        times = []
        with torch.inference_mode():
            for _ in range(WARMUP_STEPS - TIMED_STEPS):
                sess.push_audio(np.zeros(per_step * FRAME_SAMPLES, np.float32))
            for _ in range(TIMED_STEPS):
                for _ in range(per_step):
                    time.sleep(FRAME_S)
                    start = time.perf_counter()
                    sess.push_audio(silence)
                times.append(time.perf_counter() - start)        # the step's tick: the block's last
            sess.reset()
        return 2.0 * max(times)

    def _run(self) -> None:
        own_threads(self.threads)
        try:
            with torch.inference_mode():
                while not self._closed.is_set():
                    due = self.t0 + self._next_tick * FRAME_S
                    wait = due - self.clock()
                    if wait > 0:
                        self._closed.wait(wait)
                        continue
                    self.tick()
        except BaseException as err:                 # surfaced by frames() to the transport
            self.error = err
            self._closed.set()

    def tick(self) -> None:
        """Process the next tick: take its 40 ms of input (or silence) and push it into the session (the producer
        thread calls this at each tick's time)."""
        n = self._next_tick
        now = self.clock()
        with self._lock:
            interrupt, self._interrupt = self._interrupt, False
            self.stats_.interrupts += interrupt
        # A slow step or a restart's own burst of compute only costs a few fillers, and the producer catches up;
        # a lag past max(1 s, D) means it cannot keep up: the backlog goes, instead of queueing without bound.
        behind = now - (self.t0 + n * FRAME_S) > max(MAX_LAG_S, self.delay_s)
        if interrupt or behind:
            self._restart(now, n, interrupt)
            n = self._next_tick
        with self._lock:
            audio, source, speech, underrun, ended, arrival = self._input.take()
            self.stats_.underruns += underrun
            self._audio[n] = (audio, source if self.source_rate is not None else None, speech, ended, arrival)
        start = time.perf_counter()
        frames = self.session.push_audio(audio).numpy()
        if len(frames):
            ms = (time.perf_counter() - start) * 1e3
            with self._lock:
                self.stats_.step_ms = (self.stats_.step_ms + [ms])[-200:]
            if self.on_step is not None:
                self.on_step(ms)
        self._emit(frames)
        self._next_tick = n + 1

    def _emit(self, frames: np.ndarray) -> None:
        """Pair the session's new frames with their audio and queue them for their slots (frame v -> slot s0+v-1)."""
        first = self.session.frames_out - len(frames)         # session frame number of frames[0]
        now = self.clock()
        with self._lock:
            if self._interrupt:      # made from input that an interrupt since dropped: the next tick restarts
                return
            for i, video in enumerate(frames):
                v = first + i
                if v == 0:           # the reference reconstruction: not sent, but fillers show it from now on
                    self._last_video = video
                    continue
                slot = self._s0 + v - 1
                audio, source, speech, ended, arrival = self._audio.pop(slot)
                if now > self.play_time(slot):
                    self.stats_.late += 1
                    self._lost_ends += ended
                    continue
                self._ready[slot] = LiveFrame(slot, video, audio, speech, self.play_time(slot), segment_end=ended,
                                              arrival=arrival, source=source)

    def _restart(self, now: float, tick: int, interrupt: bool = False) -> None:
        """A new stream whose first audio is the current tick's: the input of the ticks the producer could not
        process is dropped (not after an interrupt: that input came after it), and the frames not played yet are
        forgotten, so the slots up to the new stream's first
        frame get fillers, which show its first output, the reference reconstruction (a neutral face), at once."""
        self.session.reset()
        current = max(tick, int((now - self.t0) / FRAME_S))
        play_slot = max(0, math.ceil((now - self.t0 - self.delay_s) / FRAME_S))
        with self._lock:
            self.stats_.restarts += 1
            ends = len(self._input.ends)
            if not interrupt:        # an interrupt dropped its input when called; what came since is new speech
                self.stats_.dropped_audio_frames += self._input.drop((current - tick) * FRAME_SAMPLES)
            lost = ends - len(self._input.ends) + sum(ended for _, _, _, ended, _ in self._audio.values())
            for slot in [s for s in self._ready if s >= play_slot]:
                lost += self._ready.pop(slot).segment_end
            self._audio.clear()
            # segments cut by falling behind still end (with the next frame); an interrupt's segments do not
            self._lost_ends = 0 if interrupt else self._lost_ends + lost
        self._s0 = self._next_tick = current
