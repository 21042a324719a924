"""Voice-agent framework integrations on the live core (runtime/live.py), each an optional extra:

    runtime.integrations.livekit   LiveKit Agents: a VideoGenerator, the avatar worker and an AvatarSession  [livekit]
    runtime.integrations.pipecat   Pipecat: a video service between TTS and the transport output             [pipecat]

Pacing, idle frames, interruption and audio/video pairing all live in runtime.live.LiveStream; these modules only
translate frames between it and the framework.
"""
