"""LiveKit Agents (livekit-agents 1.8): this runtime as a self-hosted avatar, on the live core (runtime/live.py).

Three ways to put it in a room, all on the same `AvatarVideoGenerator`:

    # 1. in the agent's own process: the agent publishes the avatar's video and the paired speech itself
    avatar = AvatarForcingSession(launch="in-process", pipe=AvatarPipeline.from_preset("toy-talker"))
    await avatar.start(session, room=ctx.room)            # before session.start(...)

    # 2. one avatar process per room, started by the agent (needs LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET)
    avatar = AvatarForcingSession(launch="process")       # runs `python -m runtime.integrations.livekit worker`

    # 3. LiveKit's own dispatch: avatar servers register as agent "avatarforcing" and report their load
    #    (sessions / capacity), so LiveKit spreads rooms over many of them (one GPU each)
    #      python -m runtime.integrations.livekit serve --capacity 2 --preset wan-1.3b --weights DIR
    avatar = AvatarForcingSession(launch="dispatch")

In 2 and 3 the agent's speech travels to the avatar as a LiveKit byte stream (DataStreamAudioOutput ->
DataStreamAudioReceiver); the avatar joins with the attribute `lk.publish_on_behalf` = the agent's identity and
publishes video and the same speech, paired frame by frame, through AvatarRunner's AVSynchronizer. Agents should set
`AgentSession(resume_false_interruption=False)`: an avatar cannot pause its audio.

Interruption: the runner calls `clear_buffer()`, which drops the queued speech; the output goes quiet at once (no
frame made from the dropped speech is played) and the face returns to idle within about one block; the runner then
reports playback_finished(interrupted=True). A segment's end (the agent closed its audio stream) is yielded as
`AudioSegmentEnd` right after the segment's last frame, and the runner reports playback_finished(interrupted=False).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading

import numpy as np
from livekit import api, rtc
from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner, AvatarSession,
                                         DataStreamAudioOutput, DataStreamAudioReceiver, QueueAudioOutput,
                                         VideoGenerator)

from ..config import TOY_ASSETS
from ..live import FPS, LiveStream, freeze_heap, live_session
from ..media import pcm_to_int16

AGENT_NAME = "avatarforcing"            # the agent name avatar servers register under (launch="dispatch")
ON_BEHALF = "lk.publish_on_behalf"      # participant attribute: the agent whose speech the avatar plays
DEFAULT_FACE = TOY_ASSETS / "ref_0.png"
DEFAULT_RATE = 24000                    # the avatar's audio track; agents' TTS mostly speaks at 24 kHz
JOIN_TIMEOUT_S = 60.0


class AvatarVideoGenerator(VideoGenerator):
    """A LiveKit VideoGenerator on a LiveStream: audio in at any rate, 25 fps RGBA video and the paired speech out.

    Yields, every 40 ms: an `rtc.VideoFrame`; after it, for a frame that speech drove, an `rtc.AudioFrame` holding that
    speech (int16 mono at the stream's `source_rate`); after a segment's last frame, `AudioSegmentEnd`. Between
    segments it yields idle video only, so the runner's playback position counts the speech alone."""

    def __init__(self, live: LiveStream):
        if live.source_rate is None:
            raise ValueError("the LiveStream needs a source_rate (the rate of the audio track the avatar publishes)")
        self.live = live
        self.sample_rate = live.source_rate
        self.frames_out = self.audio_frames_out = self.segments_out = 0
        self._cut = 0               # clear_buffer calls so far: a frame taken before one loses its audio

    @classmethod
    def open(cls, pipe, image=DEFAULT_FACE, *, sample_rate: int = DEFAULT_RATE, compile: bool | None = None,
             **live_options) -> "AvatarVideoGenerator":
        """Make the session, warm it up and start its clock (blocking: run it in a thread from async code)."""
        return cls(LiveStream(live_session(pipe, image, compile=compile), source_rate=sample_rate, **live_options))

    @property
    def options(self) -> AvatarOptions:
        return AvatarOptions(video_width=self.live.width, video_height=self.live.height, video_fps=FPS,
                             audio_sample_rate=self.sample_rate, audio_channels=1)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.live.end_segment()
            return
        self.live.feed_s16(frame.data, frame.sample_rate, frame.num_channels)

    def clear_buffer(self) -> None:
        self.live.interrupt()
        self._cut += 1

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        async for f in self.live.frames():
            rgba = np.concatenate([f.video, np.full((*f.video.shape[:2], 1), 255, np.uint8)], axis=2)
            self.frames_out += 1
            cut = self._cut
            yield rtc.VideoFrame(self.live.width, self.live.height, rtc.VideoBufferType.RGBA, rgba.tobytes())
            if cut != self._cut:    # cleared while the runner pushed the image: its speech goes with the rest
                continue
            if len(f.source):
                pcm = pcm_to_int16(f.source)                # int16 in: the same samples out
                self.audio_frames_out += 1
                yield rtc.AudioFrame(pcm.tobytes(), self.sample_rate, 1, len(pcm))
            if f.segment_end:
                self.segments_out += 1
                yield AudioSegmentEnd()

    def close(self) -> None:
        self.live.close()


async def run_avatar(room: rtc.Room, generator: AvatarVideoGenerator, *, sender_identity: str | None = None) -> None:
    """Play one agent's speech in `room` (connected) until the room disconnects: receive it from the agent's byte
    stream, publish the video and the paired audio. Closes the generator at the end."""
    disconnected = asyncio.Event()
    room.on("disconnected", lambda *_: disconnected.set())
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room, sender_identity=sender_identity),
                          video_gen=generator, options=generator.options)
    try:
        await runner.start()
        done = asyncio.ensure_future(runner.wait_for_complete())
        await asyncio.wait([done, asyncio.ensure_future(disconnected.wait())], return_when=asyncio.FIRST_COMPLETED)
        if done.done() and done.exception() is not None:
            raise done.exception()
    finally:
        await runner.aclose()
        generator.close()


def avatar_token(room: str, identity: str, agent_identity: str, *, api_key: str | None = None,
                 api_secret: str | None = None) -> str:
    """An access token for the avatar participant: joins `room`, publishes on behalf of the agent."""
    api_key = api_key or os.environ.get("LIVEKIT_API_KEY")
    api_secret = api_secret or os.environ.get("LIVEKIT_API_SECRET")
    if not api_key or not api_secret:
        raise ValueError("minting the avatar's token needs LIVEKIT_API_KEY and LIVEKIT_API_SECRET (set them in the "
                         "environment or pass api_key/api_secret)")
    return (api.AccessToken(api_key, api_secret).with_identity(identity).with_name("avatar")
            .with_kind("agent").with_attributes({ON_BEHALF: agent_identity})
            .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                         can_publish_data=True))
            .to_jwt())


class AvatarForcingSession(AvatarSession):
    """The agent side. `start(agent_session, room)` puts the avatar in the room (see the module docstring for the
    three `launch` modes) and routes the agent's speech to it. Call it before `agent_session.start(...)`.

    launch="in-process": needs `pipe`; the generator runs in this process, behind a QueueAudioOutput.
    launch="process": starts `python -m runtime.integrations.livekit worker` (its token in the environment, never on
        the command line) with `worker_args` (e.g. ["--preset", "wan-1.3b", "--weights", DIR]).
    launch="dispatch": asks LiveKit to dispatch agent `agent_name` (avatar servers started with `... serve`) to the
        room, then waits for the avatar that publishes on this agent's behalf."""

    def __init__(self, *, launch: str = "dispatch", pipe=None, image=DEFAULT_FACE, sample_rate: int = DEFAULT_RATE,
                 identity: str = "avatarforcing-avatar", agent_name: str = AGENT_NAME, worker_args=(),
                 url: str | None = None, api_key: str | None = None, api_secret: str | None = None,
                 join_timeout_s: float = JOIN_TIMEOUT_S):
        super().__init__()
        if launch not in ("in-process", "process", "dispatch"):
            raise ValueError(f"launch must be 'in-process', 'process' or 'dispatch', got {launch!r}")
        if launch == "in-process" and pipe is None:
            raise ValueError("launch='in-process' needs pipe= (an AvatarPipeline)")
        self.launch, self.pipe, self.image, self.sample_rate = launch, pipe, image, sample_rate
        self._identity, self.agent_name, self.worker_args = identity, agent_name, list(worker_args)
        self.url, self.api_key, self.api_secret = url, api_key, api_secret
        self.join_timeout_s = join_timeout_s
        self.runner: AvatarRunner | None = None
        self.generator: AvatarVideoGenerator | None = None
        self.process: asyncio.subprocess.Process | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatarforcing"

    async def start(self, agent_session, room: rtc.Room) -> None:
        agent = room.local_participant.identity
        if self.launch == "in-process":
            self._identity = agent
            self.generator = await asyncio.to_thread(AvatarVideoGenerator.open, self.pipe, self.image,
                                                     sample_rate=self.sample_rate)
            audio = QueueAudioOutput(sample_rate=self.sample_rate)
            self.runner = AvatarRunner(room, audio_recv=audio, video_gen=self.generator,
                                       options=self.generator.options)
            await self.runner.start()
            agent_session.output.audio = audio
            await super().start(agent_session, room)
            return
        url = self.url or os.environ.get("LIVEKIT_URL")
        if not url:
            raise ValueError("the avatar needs the LiveKit server's URL: pass url= or set LIVEKIT_URL")
        if self.launch == "process":
            token = avatar_token(room.name, self._identity, agent, api_key=self.api_key, api_secret=self.api_secret)
            env = dict(os.environ, LIVEKIT_URL=url, AVATAR_LIVEKIT_TOKEN=token)
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "runtime.integrations.livekit", "worker", "--sender", agent,
                "--sample-rate", str(self.sample_rate), *self.worker_args, env=env)
        else:
            async with api.LiveKitAPI(url, self.api_key, self.api_secret) as lk:
                await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
                    agent_name=self.agent_name, room=room.name,
                    metadata=json.dumps({"agent_identity": agent, "sample_rate": self.sample_rate})))
            self._identity = await self._avatar_joined(room, agent)
        agent_session.output.audio = DataStreamAudioOutput(room, destination_identity=self._identity,
                                                           sample_rate=self.sample_rate,
                                                           wait_remote_track=rtc.TrackKind.KIND_VIDEO)
        await super().start(agent_session, room)

    async def _avatar_joined(self, room: rtc.Room, agent: str) -> str:
        """The identity of the participant that publishes on `agent`'s behalf, once it has joined."""
        joined = asyncio.get_running_loop().create_future()

        def check(p, *_):
            if p.attributes.get(ON_BEHALF) == agent and not joined.done():
                joined.set_result(p.identity)

        for p in room.remote_participants.values():
            check(p)
        room.on("participant_connected", check)
        room.on("participant_attributes_changed", lambda changed, p: check(p))
        try:
            return await asyncio.wait_for(joined, self.join_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no avatar joined room {room.name!r} within {self.join_timeout_s:.0f} s: is an avatar "
                               f"server (python -m runtime.integrations.livekit serve) registered as "
                               f"{self.agent_name!r} and below its capacity?") from None

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.aclose()
            self.runner = None
        if self.generator is not None:
            self.generator.close()
            self.generator = None
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        await super().aclose()


# ---------------------------------------------------------------------------------------------- avatar servers
class Capacity:
    """Sessions held by this avatar server against its capacity; LiveKit reads the load (sessions / capacity) and
    sends no new rooms to a server at or past its load threshold."""

    def __init__(self, capacity: int):
        self.capacity, self.sessions = capacity, 0
        self._lock = threading.Lock()

    def load(self, *_) -> float:
        with self._lock:
            return min(1.0, self.sessions / self.capacity)

    def __enter__(self):
        with self._lock:
            self.sessions += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self.sessions -= 1


def make_server(pipe, *, capacity: int, image=DEFAULT_FACE, agent_name: str = AGENT_NAME, compile=None):
    """An AgentServer that plays avatars for dispatched rooms: jobs run as threads of this process (one loaded model
    for all of them), at most `capacity` at once (load = sessions / capacity, threshold just under 1)."""
    from livekit.agents import AgentServer, JobContext
    from livekit.agents.job import AutoSubscribe, JobExecutorType

    held = Capacity(capacity)
    server = AgentServer(job_executor_type=JobExecutorType.THREAD, load_fnc=held.load,
                         load_threshold=(capacity - 0.5) / capacity)

    async def on_request(request) -> None:       # a request that races past the load report is still refused
        await (request.reject() if held.load() >= 1.0 else request.accept())

    @server.rtc_session(agent_name=agent_name, on_request=on_request)
    async def avatar_job(ctx: JobContext) -> None:
        meta = json.loads(ctx.job.metadata or "{}")
        agent, rate = meta.get("agent_identity"), int(meta.get("sample_rate", DEFAULT_RATE))
        with held:
            generator = await asyncio.to_thread(AvatarVideoGenerator.open, pipe, image, sample_rate=rate,
                                                compile=compile)
            await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
            if agent:
                await ctx.room.local_participant.set_attributes({ON_BEHALF: agent})
            await run_avatar(ctx.room, generator, sender_identity=agent)

    server.capacity = held
    return server


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.integrations.livekit",
                                description="The AvatarForcing avatar for LiveKit Agents rooms.")
    sub = p.add_subparsers(dest="mode", required=True)
    worker = sub.add_parser("worker", help="join one room with a token and play one agent's speech")
    worker.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server (default $LIVEKIT_URL)")
    worker.add_argument("--token", default=os.environ.get("AVATAR_LIVEKIT_TOKEN"),
                        help="the avatar's access token (default $AVATAR_LIVEKIT_TOKEN; the environment keeps it "
                             "out of process listings)")
    worker.add_argument("--sender", help="identity of the agent whose speech to play (default: the first sender)")
    serve = sub.add_parser("serve", help="register with LiveKit as agent 'avatarforcing' and take dispatched rooms "
                                         "(LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET from the environment)")
    serve.add_argument("--capacity", type=int, default=1, help="concurrent rooms on this server (default 1)")
    serve.add_argument("--agent-name", default=AGENT_NAME)
    for q in (worker, serve):
        q.add_argument("--preset", default="toy-talker", help="model preset (default: the shipped toy-talker)")
        q.add_argument("--weights", help="directory in the official download layout (wan-1.3b)")
        q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        q.add_argument("--image", default=str(DEFAULT_FACE), help="the face (default: a shipped one)")
        q.add_argument("--sample-rate", type=int, default=DEFAULT_RATE,
                       help=f"the avatar's audio track in Hz (default {DEFAULT_RATE}); any input rate is resampled")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "worker" and (not args.url or not args.token):
        print("error: the worker needs --url (or LIVEKIT_URL) and --token (or AVATAR_LIVEKIT_TOKEN)", file=sys.stderr)
        return 2
    if args.mode == "serve" and args.capacity < 1:
        print("error: --capacity must be >= 1", file=sys.stderr)
        return 2
    if not 8000 <= args.sample_rate <= 192000:
        print("error: --sample-rate must be in 8000..192000", file=sys.stderr)
        return 2
    from ..generate import serving_pipeline
    from ..media import load_image
    try:
        pipe = serving_pipeline(args.preset, args.weights, args.device)
        image = load_image(args.image)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    freeze_heap()
    if args.mode == "serve":
        server = make_server(pipe, capacity=args.capacity, image=image, agent_name=args.agent_name)
        asyncio.run(server.run())
        return 0

    async def worker() -> None:
        room = rtc.Room()
        generator = await asyncio.to_thread(AvatarVideoGenerator.open, pipe, image, sample_rate=args.sample_rate)
        await room.connect(args.url, args.token)
        try:
            await run_avatar(room, generator, sender_identity=args.sender)
        finally:
            await room.disconnect()

    asyncio.run(worker())
    return 0


if __name__ == "__main__":
    sys.exit(main())
