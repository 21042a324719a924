"""Command line: stream an audio file through a session and write an mp4 (H.264 + AAC) with a progress bar.

    python -m runtime.generate --out out.mp4                       # shipped sample image + speech
    python -m runtime.generate --image me.png --audio talk.wav --out out.mp4 --weights DIR --device cuda

The audio is pushed in real-time-sized chunks (default 200 ms), exactly as a live caller would, and frames are
written as they come out. Arguments and paths are checked before the model loads or the audio is decoded.
Exit codes: 0 ok; 2 bad input or a failed run (one line "error: ..." says what to fix); 128 + N when stopped by
signal N (SIGINT 130, SIGHUP 129, SIGTERM 143). A failed or stopped run leaves no partial mp4 behind, and an
existing file at --out is only replaced by a complete one. A run killed by SIGKILL leaves its hidden part file;
the next run to the same --out deletes it (see media.Mp4Writer).
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from .config import TOY_ASSETS

ASSETS = Path(__file__).parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample" / "face.png"
SAMPLE_AUDIO = ASSETS / "sample" / "speech.wav"
# The shipped default: the trained toy-talker when its weights are in the repo, else the random tiny preset.
DEFAULT_PRESET = "toy-talker" if (TOY_ASSETS / "toy-talker.safetensors").is_file() else "tiny"
# Signals that stop a run cleanly (the with-blocks unwind, so Mp4Writer removes its part file); the exit status is
# 128 + the signal number, what a shell reports for a process the signal killed. SIGKILL cannot be caught.
STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived. BaseException, as KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def default_inputs(preset: str) -> tuple[Path, Path]:
    """The sample image and speech for a preset: the toy-talker's own reference face and clip, or the generic ones."""
    if preset == "toy-talker":
        return TOY_ASSETS / "ref_0.png", TOY_ASSETS / "hello.wav"
    return SAMPLE_IMAGE, SAMPLE_AUDIO


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__.split("\n\n")[0])
    # inputs and output
    p.add_argument("--image", help="reference image (png/jpg/...); default: the shipped sample face")
    p.add_argument("--audio", help="speech audio (wav/mp3/flac/...; any rate); default: the shipped sample")
    p.add_argument("--out", required=True, help="output .mp4 path")
    p.add_argument("--text", default="", help="text prompt (needs the umT5 encoder or an embedding file)")
    # model
    p.add_argument("--preset", default=None, help=f"model preset (default {DEFAULT_PRESET}, or wan-1.3b with --weights)")
    p.add_argument("--weights", help="directory in the official download layout (see README 'Real weights')")
    p.add_argument("--stream", default=None,
                   help="stream preset: official, relative, low-delay (default: the model's own; official for Wan)")
    p.add_argument("--audio-mode", default="stream", choices=["stream", "clip"],
                   help="stream: live incremental features; clip: whole-clip features (official, offline)")
    # execution
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", default=None, choices=["error", "crop"],
                   help="image aspect differs from the model's: error (default) or centre-crop")
    p.add_argument("--chunk-ms", type=float, default=200.0, help="audio pushed per call in stream mode")
    p.add_argument("--scale", type=int, default=None, help="integer upscale of the written video (nearest)")
    return p.parse_args(argv)


def check_args(args):
    """Every check that needs neither the model nor the decoded inputs, so that bad arguments fail at once.
    Returns the (torch.device, torch.dtype) to build the pipeline with."""
    from .config import ModelConfig, StreamConfig, check_seed
    from .media import Mp4Writer
    Mp4Writer.check_path(args.out)
    if Path(args.out).suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {Path(args.out).name!r}")
    for flag, path in (("--image", args.image), ("--audio", args.audio)):
        if path is not None and not Path(path).is_file():
            what = "is not a file" if Path(path).exists() else "not found"
            raise FileNotFoundError(f"{flag} {path}: {what}; pass an existing file")
    if args.weights is not None and not Path(args.weights).is_dir():
        raise FileNotFoundError(f"--weights {args.weights} is not a directory; pass the directory laid out as the "
                                "official download (README section 'Real weights')")
    if not (math.isfinite(args.chunk_ms) and args.chunk_ms > 0):
        raise ValueError(f"--chunk-ms must be a positive, finite number of milliseconds (default 200), got "
                         f"{args.chunk_ms:g}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be a positive integer (the upscale factor; 1 writes the model's own size), "
                         f"got {args.scale}")
    check_seed(args.seed)
    preset = args.preset or ("wan-1.3b" if args.weights else DEFAULT_PRESET)
    ModelConfig.preset(preset)                          # names the available presets when unknown
    if args.stream is not None:
        StreamConfig.preset(args.stream)
    try:
        return device_and_dtype(args.device, args.dtype)
    except ValueError as err:
        raise ValueError(f"--device {args.device}: {err}") from None


def device_and_dtype(device=None, dtype=None):
    """The CLI's (and the C host's) defaults: CUDA when available, else the CPU; bfloat16 on CUDA, else float32."""
    import torch

    from .pipeline import resolve_device, resolve_dtype
    device = resolve_device(device)
    return device, resolve_dtype(dtype, default=torch.bfloat16 if device.type == "cuda" else torch.float32)


def serving_pipeline(preset: str | None, weights: str | None = None, device=None, stream: str | None = None):
    """The pipeline a server or worker loads: the CLI's device and dtype defaults, the same messages as the CLI's.
    `stream`: the preset its live sessions run (default: the model's live stream, else its own)."""
    from .config import StreamConfig
    live_stream = StreamConfig.preset(stream) if stream else None      # a bad name fails before the model loads
    device, dtype = device_and_dtype(device, None)
    pipe = build_pipeline(argparse.Namespace(preset=preset, weights=weights, seed=0), device, dtype)
    pipe.live_stream = live_stream or pipe.live_stream
    return pipe


def build_pipeline(args, device, dtype):
    from .pipeline import AvatarPipeline
    if args.weights:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = AvatarPipeline.from_pretrained(args.weights, preset=args.preset or "wan-1.3b", device=device,
                                                  dtype=dtype, seed=args.seed)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    else:
        pipe = AvatarPipeline.from_preset(args.preset or DEFAULT_PRESET, device=device, dtype=dtype, seed=args.seed)
    if pipe.random_components:
        print(f"note: {', '.join(pipe.random_components)} carry RANDOM weights, so the video will be noise, not a "
              "face. To load real weights: --weights DIR --preset wan-1.3b (README section 'Real weights').",
              file=sys.stderr)
    return pipe


def run(args) -> Path:
    from tqdm import tqdm

    from .media import Mp4Writer, load_audio
    device, dtype = check_args(args)
    out = Path(args.out)
    preset = args.preset or ("wan-1.3b" if args.weights else DEFAULT_PRESET)
    sample_image, sample_audio = default_inputs(preset)
    image = args.image or sample_image
    fit = args.fit or ("crop" if args.image is None else "error")   # the shipped samples fit by cropping
    pcm = load_audio(args.audio or sample_audio)
    pipe = build_pipeline(args, device, dtype)
    try:
        pipe.encode_text(args.text)                     # a prompt the model cannot use fails before generating
    except ValueError as err:
        raise ValueError(f"--text: {err}") from None
    cfg = pipe.config
    if args.scale is None:
        scale = max(1, 256 // max(cfg.height, cfg.width))            # tiny presets are upscaled for viewing
    else:
        scale = args.scale
    total = 1 + -(-len(pcm) // cfg.samples_per_frame)
    with Mp4Writer(out, fps=cfg.fps, audio=pcm, scale=scale) as writer, \
            tqdm(total=total, unit="frame", desc="generating", file=sys.stderr) as bar:
        if args.audio_mode == "clip":
            video = pipe.generate(image, pcm, stream=args.stream, audio_mode="clip", seed=args.seed,
                                  text=args.text, fit=fit)
            writer.write(video.numpy())
            bar.update(len(video))
        else:
            sess = pipe.session(image, stream=args.stream, text=args.text, seed=args.seed, fit=fit)
            seconds = min(args.chunk_ms / 1000, len(pcm) / cfg.sample_rate)   # a huge --chunk-ms: one push
            step = max(1, int(seconds * cfg.sample_rate))
            for start in range(0, len(pcm), step):
                frames = sess.push_audio(pcm[start:start + step])
                writer.write(frames.numpy())
                bar.update(len(frames))
            frames = sess.flush()
            writer.write(frames.numpy())
            bar.update(len(frames))
    print(f"wrote {out} ({total} frames at {cfg.fps} fps, {cfg.width * scale}x{cfg.height * scale})",
          file=sys.stderr)
    return out


@contextmanager
def stop_signals_raise():
    """While inside, each of STOP_SIGNALS raises Interrupted in the main thread; the previous handlers come back
    on exit. A signal the parent set to be ignored stays ignored (`nohup` keeps the run alive after a hang-up),
    and a second signal during the unwinding is ignored so the clean-up it triggered can finish."""
    if threading.current_thread() is not threading.main_thread():   # handlers can only be set from there
        yield
        return
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)   # None: set outside Python


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with stop_signals_raise():
            run(args)
    except Interrupted as stop:
        print(f"interrupted by {signal.Signals(stop.signum).name}: the run stopped before the video was complete, "
              f"nothing was written to {args.out}", file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
