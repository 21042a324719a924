"""A Pipecat bot with the avatar's face: SmallWebRTC transport, AvatarVideoService between the TTS and the output.

    pip install -e '.[pipecat]' "pipecat-ai[runner,webrtc]"      # the dev runner, its browser client, aiortc
    python examples/pipecat_bot.py                   # keyless: says the shipped clip to each client that connects
    OPENAI_API_KEY=... python examples/pipecat_bot.py --mode agent     # a voice agent: STT -> LLM -> TTS

Open http://localhost:7860/client (Pipecat's development runner; its own flags: --host, --port, -t webrtc, ...).
`--mode clip` needs no key and no network: it sends the shipped clip (runtime/assets/toy/hello.wav) into the
pipeline as a TTS would (started, 20 ms audio frames, stopped). `--mode agent` is the usual voice agent with OpenAI's
STT, LLM and TTS as placeholders: swap in any Pipecat services, the avatar only needs TTSAudioRawFrames. Their
imports sit inside `agent_stages()`, so this file imports without them.

The model loads and warms up once, at the first connection (compiling its step takes up to a minute on a small
CPU; later connections reuse it); each connection gets its own avatar session.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import os
import threading

from runtime.config import TOY_ASSETS

FACE = TOY_ASSETS / "ref_0.png"
CLIP = TOY_ASSETS / "hello.wav"
SETUP_TIMEOUT_S = 60        # each session warms up in setup() (10 steps; the compile is done at load): room for a
                            # slow machine (pipecat's default is 20 s)
_load_lock = threading.Lock()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # model
    p.add_argument("--preset", default="toy-talker", help="model preset (default: the shipped toy-talker)")
    p.add_argument("--weights", help="directory in the official download layout (with --preset wan-1.3b)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the engine step (default: on a CPU; CUDA graphs do the same on a GPU)")
    p.add_argument("--face", default=str(FACE), help="reference image (default: the shipped toy face)")
    # bot
    p.add_argument("--mode", choices=["clip", "agent"], default="clip",
                   help="clip: say the shipped clip, no keys (default); agent: OpenAI STT -> LLM -> TTS")
    return p


@functools.cache
def _pipeline(preset: str, weights: str | None, device: str | None, compile: bool | None, face: str):
    """The model, loaded and warmed up once per process (the compiled step is shared by later sessions)."""
    from runtime.generate import serving_pipeline
    from runtime.live import LiveStream, freeze_heap, live_session
    pipe = serving_pipeline(preset, weights, device)
    LiveStream(live_session(pipe, face, compile=compile), start=False)
    freeze_heap()               # no full garbage collection pauses while streaming
    return pipe


def load_pipeline(args: argparse.Namespace):
    with _load_lock:                # two first connections at once: one load
        return _pipeline(args.preset, args.weights, args.device, args.compile, args.face)


def clip_frames() -> list:
    """The shipped clip as a TTS sends it: started, 20 ms int16 audio frames at 16 kHz, stopped."""
    import numpy as np
    from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame

    from runtime.media import load_audio
    pcm = (np.clip(load_audio(CLIP), -1, 1) * 32767).astype(np.int16)
    audio = [TTSAudioRawFrame(audio=pcm[i:i + 320].tobytes(), sample_rate=16000, num_channels=1)
             for i in range(0, len(pcm), 320)]
    return [TTSStartedFrame(), *audio, TTSStoppedFrame()]


def agent_stages():
    """STT -> user turn -> LLM -> TTS, and the assistant aggregator, with OpenAI's services as placeholders (they
    read OPENAI_API_KEY). Any Pipecat STT/LLM/TTS fits here."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.services.openai.stt import OpenAISTTService
    from pipecat.services.openai.tts import OpenAITTSService

    key = os.environ["OPENAI_API_KEY"]          # placeholder: your provider's key
    context = LLMContext([{"role": "system", "content": "You are a friendly avatar. Answer in one or two short "
                                                        "sentences: your words are spoken aloud."}])
    turns = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))
    front = [OpenAISTTService(api_key=key), turns.user(), OpenAILLMService(api_key=key), OpenAITTSService(api_key=key)]
    return front, [turns.assistant()]


async def bot(runner_args):
    """One connection: Pipecat's development runner calls this with a SmallWebRTC connection."""
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
    from pipecat.workers.runner import WorkerRunner

    from runtime.integrations.pipecat import AvatarVideoService

    args = runner_args.cli_args
    pipe = await asyncio.to_thread(load_pipeline, args)
    transport = SmallWebRTCTransport(runner_args.webrtc_connection, TransportParams(
        audio_in_enabled=args.mode == "agent", audio_out_enabled=True,
        video_out_enabled=True, video_out_is_live=True, video_out_framerate=25,
        video_out_width=pipe.config.width, video_out_height=pipe.config.height))
    front, back = agent_stages() if args.mode == "agent" else ([], [])
    avatar = AvatarVideoService(pipe, args.face, compile=args.compile)
    pipeline = Pipeline([transport.input(), *front, avatar, transport.output(), *back])
    worker = PipelineWorker(pipeline, setup_timeout_secs=SETUP_TIMEOUT_S)

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        if args.mode == "clip":
            await worker.queue_frames(clip_frames())

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


def main():
    from pipecat.runner.run import main as run     # Pipecat's development runner: adds its flags, serves, calls bot()
    run(build_parser())


if __name__ == "__main__":
    main()
