"""Synthetic talking heads for the toy-talker: a procedural 64x64 cartoon-face renderer whose mouth follows the
audio, speech from espeak-ng, and the ground-truth tracks (mouth opening, roundness, blink, pose) kept for metrics.

Frame contract (the runtime's): a clip of A audio frames (40 ms = 640 samples at 16 kHz each) has 1 + A video
frames. Frame 0 is the neutral reference (head centred, eyes open, mouth closed); frame v >= 1 shows the mouth
state of audio samples [640 (v - 1), 640 v). Frames are uint8 RGB [H=64, W=64, 3]; audio is float32 mono 16 kHz
in [-1, 1]; tracks are float32 [1 + A].

    clip = make_clip(seed=7, seconds=4.0)              # espeak-ng speech, or make_clip(7, 4.0, audio=pcm16k)
    clip.frames[0]                                     # the reference image
    manifest = build_dataset("data/train", n_clips=600, seconds=4.0, seed0=0, workers=2)
    python -m train.synth --out data/train --clips 600 --seconds 4 --seed 0 --grid grid.png

One seed fixes identity, speech and motion through three independent numpy streams, so the same seed gives the
same bytes on the same machine (other espeak-ng or soxr builds may change the audio, hence the mouth).

Deliberately not here: lighting, texture or 3-D (flat layered ellipses only), phoneme-accurate visemes (the mouth
shape comes from two acoustic measures), torch. The renderer is numpy only; espeak-ng is an external program
needed only for speech (`apt-get install espeak-ng`).
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import shutil
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soxr
from PIL import Image
from tqdm import tqdm

SAMPLE_RATE = 16_000
FPS = 25
HOP = SAMPLE_RATE // FPS            # 640 samples of audio per video frame
SIZE = 64                           # frames are SIZE x SIZE RGB
ESPEAK = "espeak-ng"                # the program; also the Debian/Ubuntu package name

# -- speech: 6 English accents x 31 ordinary voice variants (the robotic, whisper and croak variants are left out,
#    since their level does not track articulation the way a speaking face does)
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Alex", "Andy", "Annie",
            "adam", "anika", "aunty", "belinda", "benjamin", "david", "edward", "john", "linda", "max", "michel",
            "paul", "robert", "steph", "travis", "zac")

# -- mouth track
OPEN_RANGE_DB = 30.0                # opening goes 0 -> 1 over the 30 dB below the clip's loud level
LOUD_PERCENTILE = 95                # the clip's "loud" level: 95th percentile of its frame levels
MIN_LOUD_DB = -40.0                 # a clip never quieter than this counts as loud, so silence stays closed
ATTACK, RELEASE = 0.7, 0.45         # one-pole smoothing: the mouth opens fast and closes a bit slower
ROUND_SMOOTH = 0.5                  # one-pole rate for roundness; silent frames count as neutral (0)
ROUND_GATE = 0.25                   # roundness fades in over openings 0 .. 0.25, so a closed mouth has none

# -- motion (per frame)
MOTION_AMPLITUDE = dict(dx=1.5, dy=1.0, roll=0.06, yaw=0.3)   # px, px, rad, fraction of the feature shift
NOD_PX = 0.8                        # the head dips this much at full, sustained speech energy
NOD_RATE = 0.15                     # one-pole rate of the nod's energy follower (~0.25 s time constant)
BLINK_PROFILE = (0.4, 0.85, 1.0, 0.85, 0.4)                   # 5 frames of eyelid closure
HEAD_Y = 29.0                       # head centre row at rest; the shoulders fill rows ~53..63


# ============================================================================================== speech
def _espeak_program() -> str:
    path = shutil.which(ESPEAK)
    if path is None:
        raise FileNotFoundError(
            f"{ESPEAK} was not found on PATH: train.synth needs it to synthesise speech. Install it with "
            f"`sudo apt-get install {ESPEAK}` (Debian/Ubuntu package '{ESPEAK}'; `brew install {ESPEAK}` on macOS), "
            "or pass audio= to make_clip to render faces from your own 16 kHz audio.")
    return path


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    """The espeak-ng version line, e.g. 'eSpeak NG text-to-speech: 1.51' (recorded in dataset manifests)."""
    out = subprocess.run([_espeak_program(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at")[0].strip()


def _parse_wav(data: bytes) -> tuple[int, np.ndarray]:
    """(rate, int16 samples) of espeak-ng's piped WAV: a fixed 44-byte PCM header whose size fields are
    placeholders when it writes to a pipe, so the samples run to the end of the stream."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[36:40] != b"data":
        raise ValueError(f"{ESPEAK} --stdout did not produce the expected WAV stream (starts {data[:16]!r})")
    channels, rate, _, _, bits = struct.unpack_from("<HIIHH", data, 22)
    if channels != 1 or bits != 16:
        raise ValueError(f"expected 16-bit mono from {ESPEAK}, got {channels} channels x {bits} bits")
    return rate, np.frombuffer(data[44:44 + (len(data) - 44) // 2 * 2], dtype="<i2")


def speak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50, amplitude: int = 100) -> np.ndarray:
    """Synthesise `text` with espeak-ng (piped, no temporary files): float32 mono 16 kHz in [-1, 1].
    voice: an accent with an optional variant ('en-gb+f2'); speed in words per minute; pitch 0-99; amplitude 0-200."""
    if not text.strip():
        raise ValueError("speak() needs non-empty text")
    cmd = [_espeak_program(), "--stdout", "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)),
           "-a", str(int(amplitude))]
    run = subprocess.run(cmd, input=text.encode(), capture_output=True)   # text on stdin: no option parsing
    if run.returncode != 0:
        raise RuntimeError(f"{ESPEAK} failed ({run.returncode}): {run.stderr.decode(errors='replace').strip()}")
    rate, pcm = _parse_wav(run.stdout)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)   # 22,050 -> 16,000 Hz
    # resampling overshoots full-scale peaks slightly; the runtime accepts only [-1, 1]
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    return tuple((Path(__file__).with_name("words.txt")).read_text().split())


def audio_frames(seconds: float) -> int:
    """Whole 40 ms audio frames in `seconds` (the clip length unit)."""
    frames = int(round(seconds * FPS))
    if frames < 1:
        raise ValueError(f"seconds={seconds} is shorter than one 40 ms frame")
    return frames


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad to n samples."""
    return np.pad(audio[:n], (0, max(0, n - len(audio)))).astype(np.float32)


def random_utterance(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One random speaker saying random 3-11-word sentences separated (and preceded) by 0.1-0.9 s silences:
    float32 [640 * audio_frames(seconds)] at 16 kHz, trimmed or zero-padded to length."""
    n = audio_frames(seconds) * HOP
    voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"
    speed, pitch, amplitude = int(rng.integers(120, 201)), int(rng.integers(20, 81)), int(rng.integers(80, 181))
    parts, total = [], 0
    while total < n:
        parts.append(np.zeros(int(rng.uniform(0.1, 0.9) * SAMPLE_RATE), np.float32))
        words = rng.choice(_words(), size=int(rng.integers(3, 12)))
        parts.append(speak(" ".join(words).capitalize() + ".", voice, speed, pitch, amplitude))
        total += len(parts[-2]) + len(parts[-1])
    return _fit(np.concatenate(parts), n)


# ============================================================================================== tracks
def _follow(x: np.ndarray, up: float, down: float | None = None) -> np.ndarray:
    """One-pole follower over x [A], returning [1 + A] from y[0] = 0: y[v] = y[v-1] + rate (x[v-1] - y[v-1]),
    rate = `up` when rising and `down` (default `up`) when falling."""
    y = np.zeros(len(x) + 1)
    for v in range(1, len(y)):
        rate = up if down is None or x[v - 1] > y[v - 1] else down
        y[v] = y[v - 1] + rate * (x[v - 1] - y[v - 1])
    return y


def mouth_track(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(opening [1 + A] in [0, 1], roundness [1 + A] in [-1, 1]) from 16 kHz audio of A = len // 640 frames.
    Entry v >= 1 comes from samples [640 (v - 1), 640 v); entry 0 is the neutral reference (0, 0)."""
    A = len(audio) // HOP
    x = np.asarray(audio[:A * HOP], np.float64).reshape(A, HOP)                     # [A, 640]
    level = 10 * np.log10(np.mean(x * x, axis=1) + 1e-10)                           # RMS level, dB FS
    loud = max(np.percentile(level, LOUD_PERCENTILE), MIN_LOUD_DB) if A else 0.0
    target = np.clip(1 + (level - loud) / OPEN_RANGE_DB, 0, 1)
    opening = _follow(target, ATTACK, RELEASE)
    # roundness: vowel-like low band (200-900 Hz) against fricative-like high band (1.8-5 kHz); 25 Hz bins
    power = np.abs(np.fft.rfft(x * np.hanning(HOP), axis=1)) ** 2                    # [A, 321]
    freq = np.fft.rfftfreq(HOP, 1 / SAMPLE_RATE)
    low = power[:, (freq >= 200) & (freq < 900)].sum(1)
    high = power[:, (freq >= 1800) & (freq < 5000)].sum(1)
    shape = np.where(target > 0, np.tanh(0.6 * np.log((low + 1e-8) / (high + 1e-8)) - 1.5), 0.0)
    roundness = _follow(shape, ROUND_SMOOTH)    # smoothed a little: the raw ratio flips sign between frames
    roundness *= np.clip(opening / ROUND_GATE, 0, 1)                                 # none when closed
    return opening.astype(np.float32), roundness.astype(np.float32)


def motion_tracks(rng: np.random.Generator, opening: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame head motion and blinks, float32 [1 + A] each, all 0 at frame 0 (the neutral reference):
    dx, dy (px) and roll (rad) and yaw (-1..1) as 2 sinusoids each; nod (px) from smoothed speech energy;
    blink (0 open .. 1 closed), a 5-frame blink every 2-5 s."""
    n = len(opening)
    t = np.arange(n) / FPS
    tracks = {}
    for name, amp in MOTION_AMPLITUDE.items():
        a, f, phase = rng.uniform(0.25, 0.5, 2) * amp, rng.uniform(0.08, 0.5, 2), rng.uniform(0, 2 * np.pi, 2)
        tracks[name] = (a[:, None] * np.sin(2 * np.pi * f[:, None] * t + phase[:, None])).sum(0)   # [n]
    tracks["nod"] = NOD_PX * _follow(opening[1:], NOD_RATE)    # a slow follower: a nod, not a twitch per syllable
    blink, v = np.zeros(n), 1 + int(rng.uniform(0.3, 3.0) * FPS)
    while v < n:
        seg = blink[v:v + len(BLINK_PROFILE)]
        seg[:] = BLINK_PROFILE[:len(seg)]
        v += int(rng.uniform(2.0, 5.0) * FPS)
    tracks["blink"] = blink
    for track in tracks.values():
        track[0] = 0.0
    return {k: v.astype(np.float32) for k, v in tracks.items()}


# ============================================================================================== identity
def _hsv(h: float, s: float, v: float) -> tuple[float, ...]:
    return tuple(round(255 * c, 2) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _mix(a, b, t: float) -> tuple[float, ...]:
    return tuple(round((1 - t) * x + t * y, 2) for x, y in zip(a, b))


HAIR_COLOURS = ((25, 20, 20), (70, 45, 25), (120, 80, 45), (215, 175, 95), (160, 65, 30), (205, 205, 200),
                (225, 160, 205))         # black, brown, light brown, blonde, red, white, pink
IRIS_COLOURS = ((95, 60, 30), (60, 110, 190), (55, 140, 90), (115, 125, 140), (130, 70, 150))
SKIN_DARK, SKIN_LIGHT = (95, 64, 46), (252, 220, 192)


@dataclass(frozen=True)
class Identity:
    """One cartoon person. Colours are RGB 0..255; sizes in px or as fractions of the head radii."""
    bg_top: tuple               # background gradient, top row colour
    bg_bottom: tuple            # ... bottom row colour
    skin: tuple
    hair: tuple
    shirt: tuple
    iris: tuple
    lips: tuple                 # derived from skin: a redder, darker skin tone
    hair_style: int             # 0 short cap (ears show), 1 long (to the shoulders), 2 bob (to the jaw)
    hair_tilt: float            # fringe line angle, rad (a side parting)
    head_rx: float              # head half-width, px
    head_ry: float              # head half-height, px
    eye_dx: float               # half the eye spacing, fraction of head_rx
    eye_y: float                # eye height above the head centre, fraction of head_ry
    eye_size: float             # sclera half-height, px (half-width is 1.4x)
    brow_y: float               # gap between the sclera top and the brow, px
    mouth_y: float              # mouth depth below the head centre, fraction of head_ry
    mouth_w: float              # mouth half-width at rest, px

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        """Inverse of dataclasses.asdict, also after a JSON round trip (the manifest's per-clip identity)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Identity":
        hue = rng.uniform()
        skin = np.array(_mix(SKIN_DARK, SKIN_LIGHT, rng.uniform() ** 0.7)) + rng.uniform(-12, 12, 3)   # more mid/light
        if rng.uniform() < 0.1:          # an occasional cartoon tint (green, blue, ...) for variety
            skin = np.array(_mix(skin, _hsv(rng.uniform(), 0.6, skin.mean() / 255), 0.4))
        skin = tuple(np.clip(skin, 0, 255).round(2).tolist())
        hair = np.clip(np.array(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]) + rng.uniform(-15, 15, 3), 0, 255)
        head_rx = rng.uniform(12.5, 15.0)
        return cls(bg_top=_hsv(hue, rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.95)),
                   bg_bottom=_hsv(hue + rng.uniform(-0.4, 0.4), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.95)),
                   skin=skin, hair=tuple(np.round(hair, 2).tolist()),
                   shirt=_hsv(rng.uniform(), rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.95)),
                   iris=IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))],
                   lips=_mix(skin, (170, 55, 65), 0.45),
                   hair_style=int(rng.integers(3)), hair_tilt=rng.uniform(-0.3, 0.3),
                   head_rx=head_rx, head_ry=head_rx * rng.uniform(1.12, 1.32),
                   eye_dx=rng.uniform(0.34, 0.46), eye_y=rng.uniform(0.02, 0.16), eye_size=rng.uniform(1.4, 2.1),
                   brow_y=rng.uniform(1.0, 2.4), mouth_y=rng.uniform(0.42, 0.56), mouth_w=rng.uniform(3.5, 5.2))


@dataclass(frozen=True)
class FaceState:
    """What changes per frame. FaceState() is the neutral reference pose."""
    mouth_open: float = 0.0     # 0 closed .. 1 wide open
    roundness: float = 0.0      # -1 spread ("ee", "s") .. +1 rounded ("oo")
    blink: float = 0.0          # 0 open .. 1 closed
    dx: float = 0.0             # head shift, px
    dy: float = 0.0
    roll: float = 0.0           # head tilt about the neck, rad
    yaw: float = 0.0            # -1..1: facial features slide sideways (a cheap head turn)
    nod: float = 0.0            # extra downward shift, px


# ============================================================================================== renderer
_PIX = np.arange(SIZE, dtype=np.float32) + 0.5          # pixel centres


def _box(cx: float, cy: float, hx: float, hy: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) pixel range holding [c - h, c + h] with a 1 px anti-aliasing margin, inside the frame."""
    def span(c, h):
        return min(max(int(math.floor(c - h - 1)), 0), SIZE), min(max(int(math.ceil(c + h + 1)), 0), SIZE)
    return (*span(cy, hy), *span(cx, hx))


def _ellipse(cx, cy, rx, ry, angle=0.0, box=None) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """(box, coverage [h, w] in [0, 1]) of an ellipse (centre, half-axes, rotation in rad) over `box`
    (default: its own bounding box). Coverage = 0.5 - signed distance, clamped, where the distance is the
    gradient-normalised implicit function f / |grad f|, exact at the outline; it is also clipped to the
    bounding box because, along a thin ellipse's major axis, f / |grad f| stays small far past the tips and
    would leak a half-covered line across the frame."""
    c, s = math.cos(angle), math.sin(angle)
    hx, hy = math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)          # bounding-box half-extents
    y0, y1, x0, x1 = box = box or _box(cx, cy, hx, hy)
    X, Y = _PIX[None, x0:x1] - cx, _PIX[y0:y1, None] - cy                   # [1, w], [h, 1]
    u, v = (c * X + s * Y) / rx, (c * Y - s * X) / ry                        # [h, w], unit-circle coordinates
    f = u * u + v * v - 1
    grad = 2 * np.sqrt((u / rx) ** 2 + (v / ry) ** 2)                        # |grad f| in 1/px
    cov = np.clip(0.5 - f / np.maximum(grad, 1e-6), 0, 1)                    # centre: grad 0 -> fully covered
    cov = np.minimum(cov, np.clip(hx + 0.5 - np.abs(X), 0, 1))
    return box, np.minimum(cov, np.clip(hy + 0.5 - np.abs(Y), 0, 1))


def ellipse_coverage(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage of one ellipse over the whole frame, float32 [64, 64] in [0, 1] (pixel centres
    at integer + 0.5). The renderer's primitive, exposed for tests and masks."""
    full = np.zeros((SIZE, SIZE), np.float32)
    (y0, y1, x0, x1), cov = _ellipse(cx, cy, rx, ry, angle)
    full[y0:y1, x0:x1] = cov
    return full


def _paint(canvas: np.ndarray, box, cov: np.ndarray, colour) -> None:
    y0, y1, x0, x1 = box
    region = canvas[y0:y1, x0:x1]                                            # [h, w, 3] view
    region += cov[..., None] * (np.asarray(colour, np.float32) - region)


def _scale(colour, k: float) -> np.ndarray:
    return np.asarray(colour, np.float32) * k


@functools.lru_cache(maxsize=16)
def _backdrop(idn: Identity) -> np.ndarray:
    """The static layers: background gradient, neck and shoulders (the body does not move). float32 [64, 64, 3]."""
    rows = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]         # [64, 1, 1]
    canvas = (1 - rows) * _scale(idn.bg_top, 1.0) + rows * _scale(idn.bg_bottom, 1.0)
    canvas = np.repeat(canvas, SIZE, axis=1)                                 # [64, 64, 3]
    _paint(canvas, *_ellipse(SIZE / 2, HEAD_Y + 0.95 * idn.head_ry, 0.38 * idn.head_rx, 0.6 * idn.head_ry),
           _scale(idn.skin, 0.82))
    _paint(canvas, *_ellipse(SIZE / 2, SIZE + 6, 27, 17), idn.shirt)
    canvas.flags.writeable = False
    return canvas


class _Head:
    """Head-local coordinates (px from the head centre, y down) -> image: roll about the top of the neck,
    then the head shift. Draws ellipses given in local coordinates."""

    def __init__(self, idn: Identity, st: FaceState, canvas: np.ndarray):
        self.canvas, self.roll = canvas, st.roll
        self.pivot = 0.9 * idn.head_ry
        self.cx, self.cy = SIZE / 2 + st.dx, HEAD_Y + st.dy + st.nod
        self.c, self.s = math.cos(st.roll), math.sin(st.roll)

    def at(self, lx: float, ly: float) -> tuple[float, float]:
        ly -= self.pivot
        return self.cx + self.c * lx - self.s * ly, self.cy + self.pivot + self.s * lx + self.c * ly

    def ellipse(self, lx, ly, rx, ry, angle=0.0, box=None):
        return _ellipse(*self.at(lx, ly), rx, ry, angle + self.roll, box)

    def paint(self, colour, lx, ly, rx, ry, angle=0.0) -> None:
        _paint(self.canvas, *self.ellipse(lx, ly, rx, ry, angle), colour)

    def above(self, box, ly: float, tilt: float) -> np.ndarray:
        """Coverage [h, w] of the local half-plane above a line through (0, ly) tilted by `tilt`."""
        px, py = self.at(0.0, ly)
        a = tilt + self.roll
        y0, y1, x0, x1 = box
        below = math.cos(a) * (_PIX[y0:y1, None] - py) - math.sin(a) * (_PIX[None, x0:x1] - px)
        return np.clip(0.5 - below, 0, 1)


# hair layers per style: back part (behind the head) as (centre y, rx, ry) in head radii, or None, and the
# fringe line of the cap over the top of the head, in head_ry below the centre (negative = above)
HAIR_BACK = {0: None, 1: (0.25, 1.28, 1.3), 2: (0.05, 1.32, 1.12)}
HAIR_FRINGE = {0: -0.42, 1: -0.38, 2: -0.3}


def _draw_head(h: _Head, idn: Identity, st: FaceState) -> None:
    rx, ry = idn.head_rx, idn.head_ry
    back = HAIR_BACK[idn.hair_style]
    if back is not None:
        h.paint(_scale(idn.hair, 0.85), 0, back[0] * ry, back[1] * rx, back[2] * ry)
    else:                                   # ears show only with short hair; they slide against the turn
        for side in (-1, 1):
            h.paint(_scale(idn.skin, 0.9), side * rx - st.yaw * 0.12 * rx, 0.05 * ry, 0.17 * rx, 0.2 * ry)
    h.paint(idn.skin, 0, 0, rx, ry)
    box, cap = h.ellipse(-st.yaw * 0.08 * rx, -0.3 * ry, 1.06 * rx, 0.78 * ry)
    _paint(h.canvas, box, np.minimum(cap, h.above(box, HAIR_FRINGE[idn.hair_style] * ry, idn.hair_tilt)),
           idn.hair)
    h.paint(_scale(idn.skin, 0.86), st.yaw * 0.32 * rx, 0.18 * ry, 0.08 * rx, 0.1 * ry)   # nose shadow


def _draw_eyes(h: _Head, idn: Identity, st: FaceState) -> None:
    es, ey, shift = idn.eye_size, -idn.eye_y * idn.head_ry, st.yaw * 0.28 * idn.head_rx
    lash, is_open = _scale(idn.skin, 0.4), 1.0 - st.blink
    brow = _scale(idn.hair, 0.45) + _scale(idn.skin, 0.2)
    for side in (-1, 1):
        ex = side * idn.eye_dx * idn.head_rx + shift
        h.paint(brow, ex, ey - es - idn.brow_y - 0.6, 1.5 * es, 0.6, angle=side * 0.12)
        if is_open < 0.2:                   # shut: just the lash line
            h.paint(lash, ex, ey, 1.45 * es, 0.5)
            continue
        h.paint(lash, ex, ey, 1.4 * es + 0.5, es * is_open + 0.5)
        box, sclera = h.ellipse(ex, ey, 1.4 * es, es * is_open)
        _paint(h.canvas, box, sclera, (246, 246, 240))
        gaze = ex + st.yaw * 0.5 * es       # iris and pupil are clipped to the (possibly half-shut) sclera
        _paint(h.canvas, box, np.minimum(sclera, h.ellipse(gaze, ey, 0.8 * es, 0.8 * es, box=box)[1]), idn.iris)
        _paint(h.canvas, box, np.minimum(sclera, h.ellipse(gaze, ey, 0.4 * es, 0.4 * es, box=box)[1]), (15, 15, 20))


def _draw_mouth(h: _Head, idn: Identity, st: FaceState) -> None:
    """Rounded mouths are narrower and taller, spread ones wider and flatter. The dark inside grows smoothly
    from a closed lip line (so there is no pop when the mouth starts to open), and teeth show once it is open."""
    r, w0 = st.roundness, idn.mouth_w
    w = w0 * (1 - 0.3 * max(r, 0.0) + 0.12 * max(-r, 0.0))
    gap = st.mouth_open * 0.8 * w0 * (1 + 0.35 * r)                 # inner half-height, px
    mx, my = st.yaw * 0.25 * idn.head_rx, idn.mouth_y * idn.head_ry
    h.paint(idn.lips, mx, my, w + 0.7, gap + 1.0)
    dark = _scale(idn.lips, 0.55) + min(gap, 1.0) * (np.array((70, 20, 30), np.float32) - _scale(idn.lips, 0.55))
    box, inner = h.ellipse(mx, my, 0.85 * w, gap + 0.4)
    _paint(h.canvas, box, inner, dark)
    if gap > 0.6:                           # a band of upper teeth under the top lip, clipped to the inside
        t = min(0.3 * gap, 1.1)
        teeth = h.ellipse(mx, my - gap - 0.4 + 0.9 * t, 0.8 * w, t, box=box)[1]
        _paint(h.canvas, box, np.minimum(inner, teeth), (240, 240, 232))


def render_frame(identity: Identity, state: FaceState = FaceState()) -> np.ndarray:
    """One frame, uint8 [64, 64, 3] RGB. Layers back to front: backdrop, hair back, ears, head, hair cap,
    nose, brows, eyes, mouth. Deterministic: a pure function of (identity, state)."""
    canvas = _backdrop(identity).copy()
    head = _Head(identity, state, canvas)
    _draw_head(head, identity, state)
    _draw_eyes(head, identity, state)
    _draw_mouth(head, identity, state)
    return (np.clip(canvas, 0, 255) + 0.5).astype(np.uint8)


def mouth_region(identities: int = 32, seed: int = 0) -> np.ndarray:
    """Where the mouth moves: float32 [SIZE, SIZE] in [0, 1], the mean absolute difference (all channels) between
    a wide-open and a closed mouth, rounded and spread, over random identities in random head poses (the clips'
    motion range), divided by its maximum. A pure function of its arguments."""
    rng = np.random.default_rng(seed)
    total = np.zeros((SIZE, SIZE), np.float64)
    for _ in range(identities):
        idn = Identity.random(rng)
        pose = {k: float(rng.uniform(-a, a)) for k, a in MOTION_AMPLITUDE.items()}
        closed = render_frame(idn, FaceState(**pose)).astype(np.float64)
        for r in (-1.0, 0.0, 1.0):
            total += np.abs(render_frame(idn, FaceState(mouth_open=1.0, roundness=r, **pose)) - closed).mean(-1)
    return (total / total.max()).astype(np.float32)


# ============================================================================================== clips
@dataclass
class Clip:
    """One synthetic talking-head clip of A audio frames (see the frame contract at the top)."""
    frames: np.ndarray          # uint8 [1 + A, 64, 64, 3]; frames[0] is the neutral reference image
    audio: np.ndarray           # float32 [640 A], 16 kHz mono
    mouth_open: np.ndarray      # float32 [1 + A] in [0, 1]
    roundness: np.ndarray       # float32 [1 + A] in [-1, 1]
    blink: np.ndarray           # float32 [1 + A] in [0, 1]
    pose: np.ndarray            # float32 [1 + A, 5]: POSE_FIELDS
    identity: Identity
    seed: int


POSE_FIELDS = ("dx", "dy", "roll", "yaw", "nod")


def _rngs(seed: int) -> tuple[np.random.Generator, ...]:
    """Independent identity, speech and motion streams, so e.g. replacing the audio keeps the same face."""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))


def make_clip(seed: int, seconds: float, audio: np.ndarray | None = None) -> Clip:
    """A clip of audio_frames(seconds) audio frames for `seed`: espeak-ng speech, or the given 16 kHz float
    audio (trimmed or zero-padded to length; no espeak-ng needed) with the seed's face and motion."""
    identity_rng, speech_rng, motion_rng = _rngs(seed)
    identity = Identity.random(identity_rng)
    n = audio_frames(seconds) * HOP
    audio = random_utterance(speech_rng, seconds) if audio is None else _fit(np.asarray(audio, np.float32), n)
    opening, roundness = mouth_track(audio)
    motion = motion_tracks(motion_rng, opening)
    states = [FaceState(float(o), float(r), float(b), *(float(motion[k][v]) for k in POSE_FIELDS))
              for v, (o, r, b) in enumerate(zip(opening, roundness, motion["blink"]))]
    frames = np.stack([render_frame(identity, st) for st in states])        # [1 + A, 64, 64, 3]
    return Clip(frames=frames, audio=audio, mouth_open=opening, roundness=roundness, blink=motion["blink"],
                pose=np.stack([motion[k] for k in POSE_FIELDS], axis=1), identity=identity, seed=seed)


# ============================================================================================== datasets
SHARD_CLIPS = 100                   # clips per shard: 100 x 4 s is 124 MB of frames, so memory stays bounded
TRACKS = ("mouth_open", "roundness", "blink", "pose")
FORMAT = "toy-talker-synth/1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(out: Path, index: int, clips: list[Clip]) -> dict[str, str]:
    """Plain .npy files (np.save writes no timestamps, unlike .npz, so equal data gives equal bytes)."""
    arrays = dict(frames=np.stack([c.frames for c in clips]),                           # uint8 [n, 1+A, 64, 64, 3]
                  audio=np.stack([np.round(np.clip(c.audio, -1, 1) * 32767) for c in clips]).astype(np.int16),
                  seeds=np.array([c.seed for c in clips], np.int64),
                  **{k: np.stack([getattr(c, k) for c in clips]) for k in TRACKS})       # float32 [n, 1+A(, 5)]
    files = {}
    for key, arr in arrays.items():
        name = f"shard{index:04d}.{key}.npy"
        np.save(out / name, arr)
        files[name] = sha256_file(out / name)
    return files


def build_dataset(out_dir: str | Path, n_clips: int, seconds: float, seed0: int = 0, workers: int = 1,
                  shard_clips: int = SHARD_CLIPS) -> dict:
    """Render clips for seeds seed0 .. seed0 + n_clips - 1 into `out_dir` and return the manifest (also written as
    manifest.json): per shard, frames uint8, audio int16 (x / 32767), seeds and the float32 tracks, each a .npy
    file with its sha256; per clip its seed, shard, row and identity; the espeak-ng version. Deterministic per
    seed on one machine, for any `workers` (each clip depends on its seed only)."""
    if n_clips < 1 or workers < 1 or shard_clips < 1:
        raise ValueError(f"need n_clips, workers, shard_clips >= 1 (got {n_clips}, {workers}, {shard_clips})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = dict(format=FORMAT, n_clips=n_clips, seconds=seconds, seed0=seed0, audio_frames=audio_frames(seconds),
                    sample_rate=SAMPLE_RATE, fps=FPS, size=SIZE, audio_scale=32767, tracks=list(TRACKS),
                    pose_fields=list(POSE_FIELDS), espeak_ng=espeak_version(), numpy=np.__version__,
                    soxr=soxr.__version__, files={}, clips=[])
    make = functools.partial(make_clip, seconds=seconds)
    seeds = range(seed0, seed0 + n_clips)
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        clips = pool.imap(make, seeds, chunksize=2) if pool else map(make, seeds)
        shard: list[Clip] = []
        for clip in tqdm(clips, total=n_clips, desc="synth", unit="clip"):
            manifest["clips"].append(dict(seed=clip.seed, shard=len(manifest["clips"]) // shard_clips,
                                          row=len(shard), identity=asdict(clip.identity)))
            shard.append(clip)
            if len(shard) == shard_clips or clip.seed == seeds[-1]:
                manifest["files"].update(_write_shard(out, manifest["clips"][-1]["shard"], shard))
                shard = []
    text = json.dumps(manifest, indent=1)
    (out / "manifest.json").write_text(text)
    return json.loads(text)                 # JSON types (lists, not tuples), equal to the file's content


def load_dataset(out_dir: str | Path, verify: bool = True) -> dict[str, np.ndarray]:
    """A built set in memory: frames uint8 [N, 1+A, 64, 64, 3], audio float32 [N, 640 A], seeds int64 [N] and the
    TRACKS (float32 [N, 1+A], pose [N, 1+A, 5]), shards concatenated in seed order. verify checks every sha256."""
    out = Path(out_dir)
    if not (out / "manifest.json").exists():
        raise FileNotFoundError(f"{out / 'manifest.json'} not found: build the set with build_dataset first")
    manifest = json.loads((out / "manifest.json").read_text())
    if verify:
        for name, digest in manifest["files"].items():
            if sha256_file(out / name) != digest:
                raise ValueError(f"{out / name} does not match its sha256 in manifest.json: rebuild the set")
    n_shards = 1 + manifest["clips"][-1]["shard"]
    data = {key: np.concatenate([np.load(out / f"shard{i:04d}.{key}.npy") for i in range(n_shards)])
            for key in ("frames", "audio", "seeds", *TRACKS)}
    data["audio"] = data["audio"].astype(np.float32) / manifest["audio_scale"]
    return data


def save_grid(frames: np.ndarray, path: str | Path, columns: int = 10, scale: int = 2) -> None:
    """PNG of clips x `columns` frames spaced evenly from frame 0 (the reference), upscaled `scale` x (nearest).
    frames: uint8 [N, F, 64, 64, 3]; one row per clip."""
    N, F = frames.shape[:2]
    picks = np.linspace(0, F - 1, min(columns, F)).round().astype(int)
    grid = frames[:, picks]                                                   # [N, c, H, W, 3]
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(N * SIZE, len(picks) * SIZE, 3)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a synthetic talking-head set (train/synth.py).")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0, help="first clip's seed; clip i uses seed + i")
    p.add_argument("--workers", type=int, default=1, help="processes (results do not depend on it)")
    # -- inspection
    p.add_argument("--grid", default=None, help="also write a PNG grid of sample frames here")
    p.add_argument("--grid-rows", type=int, default=6)
    args = p.parse_args(argv)
    start = time.perf_counter()
    manifest = build_dataset(args.out, args.clips, args.seconds, args.seed, args.workers)
    wall = time.perf_counter() - start
    frames = args.clips * (1 + manifest["audio_frames"]) * SIZE * SIZE * 3
    print(f"{args.clips} clips x {args.seconds} s in {wall:.1f} s ({frames / 2**20:.0f} MiB of frames) -> {args.out}")
    if args.grid:
        first = np.load(Path(args.out) / "shard0000.frames.npy", mmap_mode="r")
        save_grid(np.asarray(first[:args.grid_rows]), args.grid)
        print(f"grid -> {args.grid}")


if __name__ == "__main__":
    main()
