"""A minimal LiveKit voice agent whose speech is played by the AvatarForcing avatar.

    pip install -e '.[livekit]' livekit-plugins-openai livekit-plugins-silero   # STT/LLM/TTS: any you like
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... OPENAI_API_KEY=...
    python examples/livekit_agent.py dev          # LiveKit's agent CLI: dev, start, connect --room NAME, ...

AVATAR_LAUNCH picks where the avatar runs (runtime/integrations/livekit.py):
    in-process  (default) the shipped toy-talker in this agent's process, on its CPU
    process     one `python -m runtime.integrations.livekit worker` per room, started here
    dispatch    avatar servers elsewhere (`python -m runtime.integrations.livekit serve`), one GPU each
"""
import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    from livekit.plugins import openai, silero      # the voice pipeline is yours to choose

    from runtime import AvatarPipeline
    from runtime.integrations.livekit import AvatarForcingSession

    launch = os.environ.get("AVATAR_LAUNCH", "in-process")
    pipe = AvatarPipeline.from_preset("toy-talker") if launch == "in-process" else None
    session = AgentSession(stt=openai.STT(), llm=openai.LLM(), tts=openai.TTS(), vad=silero.VAD.load(),
                           resume_false_interruption=False)       # an avatar cannot pause its audio
    await ctx.connect()
    avatar = AvatarForcingSession(launch=launch, pipe=pipe)
    await avatar.start(session, room=ctx.room)                   # routes the agent's speech to the avatar
    await session.start(agent=Agent(instructions="You are a friendly assistant. Keep answers short."),
                        room=ctx.room)


if __name__ == "__main__":
    cli.run_app(server)
