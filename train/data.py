"""Toy-talker training data in memory: synthetic clips (train/synth.py), their log-mel rows and AE latents,
and the batch samplers of every stage.

A clip of A audio frames has 1 + A video frames (frame 0 = the neutral reference, frame v >= 1 shows audio frame
v - 1), so 1 + A/4 latent frames: latent 0 is the reference, latent k >= 1 holds video frames 4k-3 .. 4k and is
driven by audio rows 4k-4 .. 4k-1 (the runtime's frame contract). Everything is kept as numpy/torch arrays:
600 clips of 4 s are ~750 MB of uint8 frames plus ~60 MB of fp16 latents.

Not here: the renderer (synth.py), the models and losses (teacher.py, distill.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from runtime.audio import LogMelFeatures

FRAMES_PER_LATENT = 4


@dataclass
class ClipSet:
    frames: np.ndarray          # uint8 [N, 1 + A, H, W, 3]
    audio: np.ndarray           # float32 [N, 640 A]
    mouth: np.ndarray           # float32 [N, 1 + A] ground-truth mouth opening
    roundness: np.ndarray       # float32 [N, 1 + A]
    seeds: list

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def audio_frames(self) -> int:
        return self.frames.shape[1] - 1

    @classmethod
    def of(cls, clips: list) -> "ClipSet":
        """Stack train.synth Clips (equal lengths) into one set."""
        return cls(frames=np.stack([c.frames for c in clips]), audio=np.stack([c.audio for c in clips]),
                   mouth=np.stack([c.mouth_open for c in clips]).astype(np.float32),
                   roundness=np.stack([c.roundness for c in clips]).astype(np.float32),
                   seeds=[c.seed for c in clips])

    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.frames, self.audio, self.mouth, self.roundness):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def make_clips(n: int, seconds: float, seed0: int, desc: str = "clips") -> ClipSet:
    """n clips of `seconds` each from seeds seed0 .. seed0 + n - 1 (deterministic per seed on one machine)."""
    from train.synth import make_clip
    return ClipSet.of([make_clip(seed0 + i, seconds) for i in tqdm(range(n), desc=desc, unit="clip")])


def to_pixels(frames: np.ndarray, device="cpu") -> Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1] on `device` (moved as uint8: 4x fewer bytes)."""
    x = torch.from_numpy(frames).to(device).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------- audio
def logmel_rows(clips: ClipSet, bins: int) -> Tensor:
    """Unnormalised log-mel rows [N, A, 4 bins] (the extractor's own computation, clip by clip)."""
    lm = LogMelFeatures(bins)
    A = clips.audio_frames
    return torch.stack([lm.clip(a, A)[1:] for a in clips.audio])


def logmel_stats(rows: Tensor, bins: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std over every hop of the training rows (what the runtime normalises with)."""
    per_band = rows.reshape(-1, bins).double()
    return tuple(per_band.mean(0).tolist()), tuple(per_band.std(0).clamp_min(1e-3).tolist())


def normalise_rows(rows: Tensor, mean, std) -> Tensor:
    hops = rows.shape[-1] // len(mean)
    m, s = torch.tensor(mean).repeat(hops), torch.tensor(std).repeat(hops)
    return ((rows - m) / s).float()


# ---------------------------------------------------------------------------------------------- latents
@torch.no_grad()
def encode_latents(ae, clips: ClipSet, batch: int = 8) -> Tensor:
    """Normalised latents [N, 16, 1 + A/4, h, w] (fp16, kept on the CPU) of every clip through the runtime's
    FrameAE.encode on the autoencoder's device."""
    out = []
    for i in tqdm(range(0, len(clips), batch), desc="encode", unit="batch"):
        video = to_pixels(clips.frames[i:i + batch], device_of(ae)).transpose(1, 2)     # [b, 3, 1 + A, H, W]
        out.append(ae.encode(video).half().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- samplers
class Batches:
    """Random windows of latents with their audio rows, drawn from a (CPU) torch.Generator; the data stays where it
    is and each window is moved to `device`."""

    def __init__(self, latents: Tensor, rows: Tensor, generator: torch.Generator, device="cpu"):
        self.latents, self.rows, self.g = latents, rows, generator     # [N, 16, T, h, w], [N, A, 128]
        self.device = torch.device(device)

    def window(self, batch: int, frames: int) -> dict:
        """{ref [B,16,1,h,w], x0 [B,16,F,h,w], audio [B,4F,A], clip, start} for F consecutive latents >= 1."""
        N, T = self.latents.shape[0], self.latents.shape[2]
        clip = torch.randint(0, N, (batch,), generator=self.g)
        start = torch.randint(1, T - frames + 1, (batch,), generator=self.g)
        x0 = torch.stack([self.latents[c, :, s:s + frames] for c, s in zip(clip.tolist(), start.tolist())])
        audio = torch.stack([self.rows[c, FRAMES_PER_LATENT * (s - 1):FRAMES_PER_LATENT * (s - 1 + frames)]
                             for c, s in zip(clip.tolist(), start.tolist())])
        to = dict(device=self.device, dtype=torch.float32)
        return dict(ref=self.latents[clip, :, :1].to(**to), x0=x0.to(**to), audio=audio.to(**to), clip=clip,
                    start=start)
