"""Live-serving benchmark: WebRTC clients talk to `python -m runtime.serve` on this machine and measure what a user
gets.

    python -m bench.serve [--preset toy-talker] [--seconds 60] [--sessions 1,2] [--device cpu] [--json-out FILE]
    python -m bench.serve --ray [--replicas 2] [--sessions-per-replica 1] --sessions 1,2    # on Ray Serve

For each session count K, `python -m runtime.serve` is started on 127.0.0.1 in its own process (as deployed), K
aiortc clients connect at once from this process and each sends speech (the shipped clip, repeated) as its
microphone in real time for --seconds, then:
- speech-to-lips delay, measured by the client: the server sends each frame with the 40 ms of audio that drove
  it, so the received audio is the client's own speech, delayed; windowed cross-correlation of received against
  sent audio maps each received frame back to the sent sample that drove it, and the delay is the frame's arrival
  time minus that sample's send time (p50 / p99 over frames);
- sustained fps (received video frames over the run) and the server's drop counters (fillers, late frames);
- CPU use of the server process over the run (user + system seconds / wall seconds, so 2.0 = two cores busy);
  with --ray, of the whole machine (the replicas are processes of their own; the clients are counted too).
One table, then one JSON line last. `run_client` is the client the serving tests use too.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench import emit

RATE = 16000
CLIENT_FRAME = 320                      # 20 ms at 16 kHz: what a browser's Opus packetisation sends


@dataclass
class ClientResult:
    session: dict
    sent: np.ndarray                                    # float32 16 kHz, what the client sent
    send_times: list = field(default_factory=list)      # (sample index, wall time) per 20 ms frame sent
    video: list = field(default_factory=list)           # (wall time, uint8 [H, W, 3])
    audio: list = field(default_factory=list)           # (wall time, float32 mono 16 kHz chunk)
    stats: list = field(default_factory=list)           # the server's control-channel messages

    def received_audio(self) -> np.ndarray:
        return np.concatenate([a for _, a in self.audio]) if self.audio else np.zeros(0, np.float32)

    def fps(self, skip_s: float = 1.0) -> float:
        """Received video frames per second after the first `skip_s` seconds of video."""
        times = np.array([t for t, _ in self.video])
        if len(times) < 2:
            return 0.0
        late = times[times >= times[0] + skip_s]
        return (len(late) - 1) / (late[-1] - late[0]) if len(late) > 1 else 0.0


def make_tracks():
    """The client's microphone track class (aiortc imported here: the `serve` extra)."""
    import av
    from aiortc import MediaStreamTrack

    class PcmTrack(MediaStreamTrack):
        """Plays float32 16 kHz samples as a microphone, 20 ms per frame in real time, noting each send time."""
        kind = "audio"

        def __init__(self, pcm: np.ndarray, result: ClientResult):
            super().__init__()
            self.pcm, self.result, self.pos, self.start = pcm, result, 0, None

        async def recv(self):
            if self.start is None:
                self.start = time.monotonic()
            due = self.start + self.pos / RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            chunk = self.pcm[self.pos:self.pos + CLIENT_FRAME]
            chunk = np.pad(chunk, (0, CLIENT_FRAME - len(chunk)))
            frame = av.AudioFrame.from_ndarray((chunk * 32767).astype(np.int16)[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, self.pos, fractions.Fraction(1, RATE)
            self.result.send_times.append((self.pos, time.monotonic()))
            self.pos += CLIENT_FRAME
            return frame

    return PcmTrack


async def run_client(base_url: str, pcm: np.ndarray, seconds: float, *, token: str | None = None,
                     session_body: dict | None = None, interrupt_at: float | None = None,
                     disconnect: bool = False, on_start=None) -> ClientResult:
    """One WebRTC client: creates a session, sends `pcm` (16 kHz float32, looped) as its microphone for `seconds`,
    records the video and audio it receives with their arrival times. `interrupt_at`: seconds into the call at which
    it sends {"type": "interrupt"}. `disconnect`: close the connection without DELETE (a client that goes away).
    `on_start(result)`: called once the connection is set up (result.session holds the session's info)."""
    import httpx
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    loops = int(np.ceil(seconds * RATE / len(pcm))) + 1
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        response = await http.post("/api/sessions", json=session_body or {})
        response.raise_for_status()
        info = response.json()
        result = ClientResult(session=info, sent=np.tile(pcm, loops).astype(np.float32))
        pc = RTCPeerConnection()
        pc.addTrack(make_tracks()(result.sent, result))
        pc.addTransceiver("video", direction="recvonly")
        control = pc.createDataChannel("control")
        control.on("message", lambda m: result.stats.append(json.loads(m)))
        readers = []

        async def read(track):
            resample = None
            try:
                while True:
                    frame = await track.recv()
                    now = time.monotonic()
                    if track.kind == "video":
                        result.video.append((now, frame.to_ndarray(format="rgb24")))
                    else:
                        if resample is None:
                            from runtime.live import Resampler
                            resample = Resampler(frame.sample_rate, frame.layout.nb_channels)
                        result.audio.append((now, resample.frame(frame)))
            except MediaStreamError:
                return

        pc.on("track", lambda track: readers.append(asyncio.ensure_future(read(track))))
        await pc.setLocalDescription(await pc.createOffer())
        response = await http.post(f"/api/sessions/{info['id']}/offer",
                                   json={"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})
        response.raise_for_status()
        await pc.setRemoteDescription(RTCSessionDescription(**response.json()))
        if on_start is not None:
            on_start(result)
        start = time.monotonic()
        if interrupt_at is not None:
            await asyncio.sleep(interrupt_at)
            control.send(json.dumps({"type": "interrupt"}))
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - start)))
        await pc.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        if not disconnect:
            await http.delete(f"/api/sessions/{info['id']}")
    return result


def speech_delays(result: ClientResult, window_s: float = 1.0, max_delay_s: float = 4.0) -> np.ndarray:
    """Per received frame that carries speech, its arrival time minus the send time of the sample that drove it
    (seconds). The server sends frame k with received audio samples [640 k, 640 (k + 1)); each 1 s window of the
    received audio is located in the sent audio by normalised cross-correlation (windows scoring under 0.5, e.g.
    silence or fillers, are left out), which maps its frames' samples to sent samples and so to send times."""
    received = result.received_audio()
    if not len(received) or not result.send_times or not result.video:
        return np.zeros(0)
    send_idx = np.array([i for i, _ in result.send_times], dtype=np.float64)
    send_t = np.array([t for _, t in result.send_times])
    video_t = np.array([t for t, _ in result.video])
    recv_t = np.concatenate([[t] * len(a) for t, a in result.audio])     # arrival of each received sample
    sent, w, delays = result.sent, int(window_s * RATE), []
    for r0 in range(0, len(received) - w + 1, w):
        seg = received[r0:r0 + w]
        if np.abs(seg).max() < 1e-3:
            continue
        # where it can be in the sent audio: sent at most max_delay_s before it arrived
        lo = int(np.interp(recv_t[r0] - max_delay_s, send_t, send_idx))
        hi = min(int(np.interp(recv_t[r0], send_t, send_idx)) + w, len(sent))
        ref = sent[lo:hi]
        if len(ref) < w:
            continue
        corr = np.correlate(ref, seg, mode="valid")
        norm = np.sqrt(np.convolve(ref ** 2, np.ones(w), mode="valid") * float(seg @ seg)) + 1e-9
        k = int(np.argmax(corr / norm))
        if corr[k] / norm[k] < 0.5:
            continue
        offset = lo + k - r0                                                # sent index = received index + offset
        for frame in range(r0 // 640, min((r0 + w) // 640, len(video_t))):
            delays.append(video_t[frame] - np.interp(frame * 640 + offset, send_idx, send_t))
    return np.array(delays)


# ---------------------------------------------------------------------------------------------- the server
@contextlib.contextmanager
def serving(pipe, *, max_sessions: int = 2, token: str | None = None, idle_timeout_s: float = 30.0):
    """A live server on 127.0.0.1 (a free port) in a background thread; yields (base_url, hub)."""
    import uvicorn

    from runtime.serve.app import Hub, create_app
    hub = Hub(pipe, max_sessions=max_sessions, idle_timeout_s=idle_timeout_s)
    hub.warm_up()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(hub, token=token), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the live server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", hub
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def server_process(args: list[str], timeout: float = 600.0):
    """`python -m runtime.serve ARGS` on 127.0.0.1 and a free port, in its own process (its own interpreter and
    GIL, as deployed); yields (base_url, pid) once /healthz answers."""
    import subprocess

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--host", "127.0.0.1", "--port", str(port),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far, summed over cores (Linux /proc/stat)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")      # minus idle and iowait


def measure(preset: str, device, pcm, sessions: int, seconds: float, ray: tuple[int, int] | None = None) -> dict:
    """`sessions` clients at once for `seconds` against `python -m runtime.serve` (or, with ray=(replicas, K),
    its Ray Serve deployment: replicas run in their own processes, so CPU is the machine's, clients included)."""
    if ray is None:
        args = ["--preset", preset, "--device", str(device), "--max-sessions", str(sessions)]
        cpu = cpu_seconds
    else:
        args = ["--preset", preset, "--device", str(device), "--ray", "--replicas", str(ray[0]),
                "--sessions-per-replica", str(ray[1])]
        cpu = lambda pid: machine_busy_seconds()          # noqa: E731
    with server_process(args) as (url, pid):
        if ray is not None:
            from runtime.serve.ray_app import wait_ready
            wait_ready(url, ray[0])             # every replica up (each warms up its model first)
        cpu0, wall0 = cpu(pid), time.monotonic()

        async def clients():
            return await asyncio.gather(*(run_client(url, pcm, seconds) for _ in range(sessions)))
        results = asyncio.run(clients())
        cpu1, wall1 = cpu(pid), time.monotonic()
    delays = np.concatenate([speech_delays(r) for r in results])
    last = [r.stats[-1] if r.stats else {} for r in results]
    return dict(sessions=sessions, seconds=seconds,
                fps=[round(r.fps(), 2) for r in results],
                frames=[len(r.video) for r in results],
                delay_ms_p50=pct(delays * 1e3, 50), delay_ms_p99=pct(delays * 1e3, 99), delay_frames=len(delays),
                fillers=[s.get("fillers") for s in last], late=[s.get("late") for s in last],
                server_delay_ms=[s.get("delay_ms") for s in last],
                server_cpu_cores_busy=round((cpu1 - cpu0) / (wall1 - wall0), 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy-talker")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sessions", default="1,2", help="comma-separated session counts to measure")
    p.add_argument("--device", default=None)
    p.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve (python -m runtime.serve --ray); CPU is then the whole machine's")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: replicas (default 2)")
    p.add_argument("--sessions-per-replica", type=int, default=1, help="with --ray: slots per replica (default 1)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    ray = (args.replicas, args.sessions_per_replica) if args.ray else None
    import platform

    import torch

    from runtime.config import TOY_ASSETS
    from runtime.media import load_audio
    from runtime.pipeline import resolve_device
    device = resolve_device(args.device)
    pcm = load_audio(TOY_ASSETS / "hello.wav")
    rows = [measure(args.preset, device, pcm, int(k), args.seconds, ray) for k in args.sessions.split(",")]
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    where = f"Ray Serve, {ray[0]} replicas x {ray[1]} slots" if ray else "one server process"
    print(f"live serving | {where} | preset {args.preset} | {device} | {hardware} | {args.seconds:.0f} s per run")
    print(f"{'sessions':>8}{'fps each':>16}{'delay p50 ms':>14}{'p99 ms':>9}{'fillers':>12}{'late':>10}"
          f"{'machine CPU' if ray else 'server CPU':>12}")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.0f}"   # noqa: E731
        print(f"{r['sessions']:>8}{'/'.join(f'{x:.1f}' for x in r['fps']):>16}{fmt(r['delay_ms_p50']):>14}"
              f"{fmt(r['delay_ms_p99']):>9}{'/'.join(map(str, r['fillers'])):>12}{'/'.join(map(str, r['late'])):>10}"
              f"{r['server_cpu_cores_busy']:>12.2f}")
    return emit(dict(bench="serve", preset=args.preset, device=str(device), hardware=hardware, rows=rows,
                     ray=dict(replicas=ray[0], sessions_per_replica=ray[1]) if ray else None),
                args.json_out)


if __name__ == "__main__":
    sys.exit(main())
