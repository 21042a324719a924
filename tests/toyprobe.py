"""Test helpers for reading the toy-talker's mouth: synthetic clips on given audio and a mouth-reading probe trained
on their ground truth (bench.quality's probe). Used by the toy-talker and live-serving tests."""
import numpy as np

SECONDS = 2.0


def clips_on(audio: np.ndarray, clips: int, seed0: int):
    """Random identities (seeds seed0..) rendered on random pieces of the given audio (no espeak-ng needed)."""
    from train.data import ClipSet
    from train.synth import make_clip
    rng = np.random.default_rng(seed0)
    made = []
    for i in range(clips):
        start = int(rng.integers(0, max(1, len(audio) - 16000)))
        piece = audio[start:start + int(16000 * SECONDS)] * float(rng.uniform(0.5, 1.0))
        made.append(make_clip(seed0 + i, SECONDS, audio=piece))
    return ClipSet.of(made)


def probe_for(audio: np.ndarray, clips: int = 30, steps: int = 250):
    """A mouth-reading probe trained on synthetic ground truth."""
    from bench.quality import train_probe
    return train_probe(clips_on(audio, clips, 300_000), steps=steps)
