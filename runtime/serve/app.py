"""The live server: FastAPI app, sessions on the live core, WebRTC media with aiortc.

    hub = Hub(pipe, max_sessions=2)          # the loaded pipeline, the sessions, limits and metrics
    app = create_app(hub, token=None)        # an ASGI app: uvicorn serves it (runtime.serve), Ray Serve can too

Endpoints (all under the token when one is set: `Authorization: Bearer T`, or `?token=T` for the page itself,
which a browser opens without headers):
    GET  /                            the page (runtime/serve/static/index.html)
    GET  /healthz                     {"ok": true, "sessions": n, "max_sessions": k}; 503 with "ok": false while
                                      it cannot take sessions (under Ray Serve: no replica ready yet)
    GET  /metrics                     Prometheus text: sessions, frames, dropped frames, step ms, delay
    GET  /api/faces                   the shipped faces: [{"name", "url"}]; GET /api/faces/{name}: the PNG
    POST /api/sessions                JSON {} or {"face": name}, or multipart with an `image` file -> {"id", ...}
    POST /api/sessions/{id}/offer     {"sdp", "type": "offer"} -> {"sdp", "type": "answer"}; the client sends one
                                      audio track (its microphone) and receives one video and one audio track
    GET  /api/sessions/{id}/events    server-sent events: `ended` with {"id", "reason"} when the session ends (deleted,
                                      idle timeout, connection closed, server stopped, or under Ray Serve: its
                                      replica failed)
    DELETE /api/sessions/{id}
A data channel "control" carries {"type": "interrupt"} from the client and {"type": "stats", ...} once a second
from the server. Bad input is a 4xx with {"error": message}; past `max_sessions` a 503 with Retry-After.

A session holds a StreamSession (made at POST, which checks the image; on the pipeline's live stream) and, once the
offer arrives, a LiveStream (warm-up and steps in threads of its own with `Hub.threads` OpenMP threads: the cores
shared out over max_sessions), an RTCPeerConnection whose audio receiver passes each packet on once the next
arrives (`shorten_audio_jitter`), a task that feeds the client's audio into the live core and a pacer that hands
each LiveFrame to the two outgoing tracks at its play time. Video pts advance 3,600 ticks (90 kHz)
per frame and audio 40 ms per frame, from the same slots, so the browser keeps them in sync. A session ends on
DELETE, when its connection fails or closes, when it idles past `idle_timeout_s` without media, or when the
server stops; everything it held is released.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from fractions import Fraction
from pathlib import Path

import av
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..config import TOY_ASSETS
from ..live import LiveStream, host_thread, live_session, threads_per_stream
from ..media import load_image, pcm_to_int16

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 * 2 ** 20
VIDEO_CLOCK = 90000
IDLE_TIMEOUT_S = 30.0          # a session with no offer, or no audio from its client, for this long is ended
SWEEP_S = 2.0
AUDIO_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"      # aiortc 1.14-1.16's private RTCRtpReceiver.__jitter_buffer
log = logging.getLogger(__name__)


def _on_host_thread(fn, *args, **kwargs):
    """fn in an event-loop worker thread, which computes with one OpenMP thread (runtime.live.host_thread)."""
    host_thread()
    return fn(*args, **kwargs)


def shorten_audio_jitter(pc: RTCPeerConnection) -> int:
    """aiortc's audio receiver holds four Opus packets back (80 ms at 20 ms a packet) before it decodes the oldest,
    and offers no option for it. The live core queues a whole 40 ms frame before speech starts anyway, which absorbs
    arrival jitter, so each audio receiver of `pc` gets a jitter buffer that releases a packet as soon as the next
    one arrives (20 ms; it still puts reordered packets back in order): 60 ms less speech-to-lips delay. Call it
    after setRemoteDescription, before media flows. Returns how many receivers it changed; an aiortc that has
    renamed its private buffer is left as it is (0)."""
    from aiortc.jitterbuffer import JitterBuffer
    changed = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind == "audio" and hasattr(receiver, AUDIO_JITTER_ATTR):
            setattr(receiver, AUDIO_JITTER_ATTR, JitterBuffer(capacity=16, prefetch=0))
            changed += 1
    return changed


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def shipped_faces(directory: Path = TOY_ASSETS) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.glob("ref_*.png"))}


class Metrics:
    """Prometheus metrics in their own registry (one per app, so that tests and several apps do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.sessions = Gauge("avatar_sessions", "live sessions", registry=self.registry)
        self.frames = Counter("avatar_frames", "frames sent", registry=self.registry)
        self.dropped = Counter("avatar_dropped_frames", "frames not sent on time (fillers sent instead)",
                               registry=self.registry)
        self.step_ms = Histogram("avatar_step_ms", "compute time of a window step, ms", registry=self.registry,
                                 buckets=(5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 800))
        self.delay_ms = Histogram("avatar_delay_ms", "speech-to-lips delay of speech frames (audio arrival to "
                                  "frame sent), ms", registry=self.registry,
                                  buckets=(100, 200, 400, 600, 700, 800, 1000, 1500, 2000, 3000, 5000))


class AvatarTrack(MediaStreamTrack):
    """One outgoing track (video or audio): frames come from the session's pacer, already timed."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=100)

    def put(self, frame) -> None:
        if self.queue.full():                     # nobody reads this track: keep only the newest frames
            self.queue.get_nowait()
        self.queue.put_nowait(frame)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.queue.get()
        if frame is None:
            raise MediaStreamError
        return frame


def video_frame(f) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(f.video, format="rgb24")
    frame.pts, frame.time_base = f.slot * VIDEO_CLOCK // 25, Fraction(1, VIDEO_CLOCK)
    return frame


def audio_frames(f) -> list[av.AudioFrame]:
    """A frame's 40 ms as two 20 ms frames: aiortc sends every packet of one encoded frame with one RTP timestamp,
    so a 40 ms frame (two Opus packets) would lose its second half at the receiver."""
    pcm = pcm_to_int16(f.audio)                                                   # [640] s16 mono, 16 kHz
    out, half = [], len(pcm) // 2
    for i in range(2):
        frame = av.AudioFrame.from_ndarray(pcm[None, i * half:(i + 1) * half], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, f.slot * len(pcm) + i * half, Fraction(1, 16000)
        out.append(frame)
    return out


class Session:
    def __init__(self, hub: "Hub", sid: str, stream_session):
        self.hub, self.id, self.session = hub, sid, stream_session
        self.created = self.last_active = time.monotonic()
        self.live: LiveStream | None = None
        self.pc: RTCPeerConnection | None = None
        self.tasks: list[asyncio.Task] = []
        self.control = None
        self.closed = False
        self.ended = asyncio.Event()
        self.reason = "ended"

    def info(self) -> dict:
        cfg = self.session.cfg
        return {"id": self.id, "width": cfg.width, "height": cfg.height, "fps": cfg.fps,
                "stream": self.session.stream.name}

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        if self.pc is not None:
            raise HTTPError(409, f"session {self.id} already has a connection; create a new session")
        self.pc = pc = RTCPeerConnection()
        video, audio = AvatarTrack("video"), AvatarTrack("audio")

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                self.tasks.append(asyncio.ensure_future(self._consume(track)))

        @pc.on("datachannel")
        def on_datachannel(channel):
            if channel.label != "control":
                return
            self.control = channel

            @channel.on("message")
            def on_message(message):
                try:
                    kind = json.loads(message).get("type")
                except (ValueError, AttributeError):
                    kind = None
                if kind == "interrupt" and self.live is not None:
                    self.live.interrupt()

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self.hub.remove(self.id, f"the connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(offer)
        except (ValueError, TypeError) as err:
            raise HTTPError(400, f"the offer's SDP is not usable: {err}") from None
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            raise HTTPError(400, "the offer's SDP has no audio m-line: send the microphone as one audio track")
        if not shorten_audio_jitter(pc):
            log.warning("aiortc's audio jitter buffer was not found: its 80 ms prefetch adds to the delay")
        pc.addTrack(audio)
        pc.addTrack(video)
        self.live = await asyncio.to_thread(LiveStream, self.session, threads=self.hub.threads)   # warm-up, clock
        self.live.on_step = self.hub.metrics.step_ms.observe
        self.tasks.append(asyncio.ensure_future(self._pace(video, audio)))
        self.tasks.append(asyncio.ensure_future(self._report()))
        await pc.setLocalDescription(await pc.createAnswer())
        self.last_active = time.monotonic()
        return pc.localDescription

    async def _consume(self, track) -> None:
        """The client's microphone into the live core."""
        try:
            while True:
                frame = await track.recv()
                if self.live is not None:
                    self.live.feed_frame(frame)
                self.last_active = time.monotonic()
        except MediaStreamError:
            return

    async def _pace(self, video: AvatarTrack, audio: AvatarTrack) -> None:
        """Each LiveFrame, at its play time, to both outgoing tracks; a live stream that fails ends the session."""
        metrics = self.hub.metrics
        try:
            async for f in self.live.frames():
                video.put(video_frame(f))
                for part in audio_frames(f):
                    audio.put(part)
                metrics.frames.inc()
                if f.filler:
                    metrics.dropped.inc()
                if f.arrival is not None:
                    metrics.delay_ms.observe((self.live.clock() - f.arrival) * 1e3)
        except RuntimeError:                       # the producer stopped (its error is in self.live.error)
            asyncio.ensure_future(self.hub.remove(self.id, f"the live stream failed: {self.live.error}"))

    async def _report(self) -> None:
        """Stats on the control channel once a second: fps over the last second, delay, drops."""
        last_frames, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            stats = self.live.stats()
            now = time.monotonic()
            fps = (stats["frames"] - last_frames) / (now - last_time)
            last_frames, last_time = stats["frames"], now
            if self.control is not None and self.control.readyState == "open":
                self.control.send(json.dumps({"type": "stats", "fps": round(fps, 2), **stats}))

    async def close(self, reason: str = "ended") -> None:
        if self.closed:
            return
        self.closed, self.reason = True, reason
        self.ended.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        if self.live is not None:
            await asyncio.to_thread(self.live.close)
        if self.pc is not None:
            await self.pc.close()
        self.live = self.pc = self.control = None
        self.session = None


class Hub:
    """The server's state: one loaded pipeline shared by every session, the sessions, limits and metrics. create_app
    uses it through create / offer / remove / ended / health / metrics_text / faces (runtime/serve/ray_app.py
    provides the same for sessions spread over Ray Serve replicas). `sid_prefix` starts every session id."""

    def __init__(self, pipe, *, max_sessions: int = 2, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 faces: dict[str, Path] | None = None, compile: bool | None = None, sid_prefix: str = "",
                 threads: int | None = None):
        self.pipe, self.max_sessions, self.idle_timeout_s = pipe, max_sessions, idle_timeout_s
        self.compile = compile          # None: live_session's default (compiled on a CPU)
        # each session's compute threads (the cores shared out over max_sessions); one count for every session,
        # as the compiled step is specialised to it
        self.threads = threads or threads_per_stream(max_sessions)
        self.faces = shipped_faces() if faces is None else faces
        self.sid_prefix = sid_prefix
        self.sessions: dict[str, Session] = {}
        self.metrics = Metrics()
        self._creating = 0

    async def create(self, image) -> dict:
        """A new session for `image` (a path or a decoded image) -> its info {"id", "width", ...}."""
        if len(self.sessions) + self._creating >= self.max_sessions:
            raise HTTPError(503, f"all {self.max_sessions} session slots are in use; retry later",
                            {"Retry-After": "5"})
        self._creating += 1
        try:
            stream_session = await asyncio.to_thread(_on_host_thread, live_session, self.pipe, image,
                                                     compile=self.compile)
        except (ValueError, TypeError) as err:
            raise HTTPError(400, f"the image cannot be used: {err}") from None
        finally:
            self._creating -= 1
        sid = self.sid_prefix + secrets.token_urlsafe(12)
        self.sessions[sid] = Session(self, sid, stream_session)
        self.metrics.sessions.set(len(self.sessions))
        return self.sessions[sid].info()

    async def offer(self, sid: str, sdp: str) -> dict:
        """The client's SDP offer -> the answer {"sdp", "type"}; a failed first offer ends the session."""
        session = self.get(sid)
        try:
            answer = await session.answer(RTCSessionDescription(sdp=sdp, type="offer"))
        except HTTPError as err:
            if err.status != 409:                  # a failed first offer leaves a half-made connection: end it
                await self.remove(sid, "the offer failed")
            raise
        return {"sdp": answer.sdp, "type": answer.type}

    async def ended(self, sid: str) -> dict:
        """Waits until the session ends -> {"id", "reason"}."""
        session = self.get(sid)
        await session.ended.wait()
        return {"id": sid, "reason": session.reason}

    async def health(self) -> dict:
        return {"ok": True, "sessions": len(self.sessions), "max_sessions": self.max_sessions}

    def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def warm_up(self) -> float:
        """Compile and warm the engine once on a shipped face, so that the first client does not wait for it;
        returns the seconds it took."""
        start = time.monotonic()
        face = next(iter(self.faces.values()))
        LiveStream(live_session(self.pipe, face, compile=self.compile), start=False, threads=self.threads)
        return time.monotonic() - start

    def get(self, sid: str) -> Session:
        if sid not in self.sessions:
            raise HTTPError(404, f"no session {sid!r}: it ended or never existed")
        return self.sessions[sid]

    async def remove(self, sid: str, reason: str = "deleted") -> bool:
        session = self.sessions.pop(sid, None)
        self.metrics.sessions.set(len(self.sessions))
        if session is None:
            return False
        await session.close(reason)
        return True

    async def sweep(self) -> None:
        """End sessions idle past the timeout: no offer yet, or no audio from the client for that long."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for sid, s in list(self.sessions.items()):
                if now - s.last_active > self.idle_timeout_s:
                    await self.remove(sid, "idle timeout")

    async def close(self) -> None:
        for sid in list(self.sessions):
            await self.remove(sid, "the server stopped")


def create_app(hub: Hub, *, token: str | None = None, cors_origins: list[str] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        sweeper = asyncio.ensure_future(hub.sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            await hub.close()

    app = FastAPI(title="AvatarForcing live", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, err: HTTPError):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if token is not None and not _authorized(request, token):
            return JSONResponse({"error": "missing or wrong token: send 'Authorization: Bearer <token>' (the page: "
                                          "open /?token=<token>)"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/")
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/healthz")
    async def healthz():
        health = await hub.health()
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(hub.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/faces")
    async def faces():
        return [{"name": name, "url": f"/api/faces/{name}"} for name in hub.faces]

    @app.get("/api/faces/{name}")
    async def face(name: str):
        if name not in hub.faces:
            raise HTTPError(404, f"no shipped face {name!r}; GET /api/faces lists them")
        return FileResponse(hub.faces[name], media_type="image/png")

    @app.post("/api/sessions")
    async def create_session(request: Request):
        image = await _session_image(request, hub)
        return await hub.create(image)

    @app.post("/api/sessions/{sid}/offer")
    async def offer(sid: str, request: Request):
        body = await _json(request)
        if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise HTTPError(400, 'expected {"sdp": "...", "type": "offer"}')
        return await hub.offer(sid, body["sdp"])

    @app.get("/api/sessions/{sid}/events")
    async def events(sid: str):
        """Server-sent events: one `ended` event ({"id", "reason"}) when the session ends for any reason."""
        end = asyncio.ensure_future(hub.ended(sid))
        await asyncio.wait([end], timeout=0)              # an unknown id is a 404 now, not inside the stream
        if end.done() and end.exception() is not None:
            raise end.exception()

        async def stream():
            try:
                yield f"event: ended\ndata: {json.dumps(await end)}\n\n"
            except HTTPError as err:
                yield f"event: ended\ndata: {json.dumps({'id': sid, 'reason': err.message})}\n\n"
            finally:
                end.cancel()
        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.delete("/api/sessions/{sid}")
    async def delete_session(sid: str):
        if not await hub.remove(sid):
            raise HTTPError(404, f"no session {sid!r}: it ended or never existed")
        return {"deleted": sid}

    return app


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else None
    if given is None and request.url.path == "/":
        given = request.query_params.get("token")
    return given is not None and secrets.compare_digest(given, token)


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw or b"{}")
    except ValueError as err:
        raise HTTPError(400, f"the body is not JSON: {err}") from None


async def _session_image(request: Request, hub: Hub):
    """The reference image of a new session: an uploaded `image` file, a shipped face by name, or the first one."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES:
            raise HTTPError(413, f"the upload is over {MAX_UPLOAD_BYTES // 2 ** 20} MiB")
        form = await request.form()
        upload = form.get("image")
        if upload is None or not hasattr(upload, "read"):
            raise HTTPError(400, "multipart body without an 'image' file field")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPError(413, f"the upload is over {MAX_UPLOAD_BYTES // 2 ** 20} MiB")
        return _decode_upload(data)
    body = await _json(request)
    if not isinstance(body, dict):
        raise HTTPError(400, 'expected a JSON object: {} or {"face": "<name>"}')
    name = body.get("face", next(iter(hub.faces), None))
    if name not in hub.faces:
        raise HTTPError(400, f"no shipped face {name!r}; choose one of {sorted(hub.faces)} or upload an image")
    return hub.faces[name]


def _decode_upload(data: bytes):
    """Uploaded bytes -> an RGB image through the runtime's own loader (same checks and messages as the API)."""
    try:
        return load_image(data)
    except ValueError as err:
        raise HTTPError(415, str(err)) from None
