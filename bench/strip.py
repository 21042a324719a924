"""The README's frame strip: the toy-talker beside the renderer's ground truth for the same face and speech.

    python -m bench.strip [--weights runtime/assets/toy] [--out docs/toy_strip.png] [--every 8] [--count 10]

Top row: the renderer (train/synth.py) drawing unseen identity 0 of bench.quality (the face of the shipped
ref_0.png) saying the shipped hello.wav, i.e. the frames the model should produce. Bottom row: the model's stream
(`generate(..., audio_mode="stream")`, the shipped low-delay stream) from that face's first frame and the same
audio. Every `every`-th frame from 0, each 64x64 frame shown at 2x. Then one JSON line.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import emit


def strip(truth: np.ndarray, generated: np.ndarray, every: int, count: int, scale: int = 2,
          gap: int = 4) -> np.ndarray:
    """Two rows (truth above, generated below) of frames 0, every, 2 every, ... as one uint8 image on white."""
    picks = list(range(0, min(len(truth), len(generated)), every))[:count]
    h, w = truth.shape[1] * scale, truth.shape[2] * scale
    out = np.full((2 * h + gap, len(picks) * (w + gap) - gap, 3), 255, np.uint8)
    for row, frames in enumerate((truth, generated)):
        for i, f in enumerate(picks):
            big = frames[f].repeat(scale, 0).repeat(scale, 1)
            out[row * (h + gap):row * (h + gap) + h, i * (w + gap):i * (w + gap) + w] = big
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.strip", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="toy-talker directory (default: the shipped one)")
    p.add_argument("--out", default="docs/toy_strip.png")
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--count", type=int, default=10)
    args = p.parse_args(argv)
    from PIL import Image

    from bench.quality import VAL_SEED0
    from runtime import AvatarPipeline
    from runtime.media import load_audio
    from runtime.pipeline import TOY_ASSETS
    from train.synth import make_clip
    pipe = AvatarPipeline.from_preset("toy-talker") if args.weights is None else AvatarPipeline.from_toy(args.weights)
    speech = load_audio(TOY_ASSETS / "hello.wav")
    seconds = (args.every * (args.count - 1) + 1) / 25
    clip = make_clip(VAL_SEED0, seconds, audio=speech)
    generated = pipe.generate(clip.frames[0], clip.audio, audio_mode="stream").numpy()
    Image.fromarray(strip(clip.frames, generated, args.every, args.count)).save(args.out)
    print(f"wrote {args.out}: ground truth above, the model below, frames 0..{args.every * (args.count - 1)} "
          f"every {args.every}")
    return emit(dict(bench="strip", out=args.out, frames=list(range(0, args.every * args.count, args.every))))


if __name__ == "__main__":
    sys.exit(main())
