"""FrameAE: the toy-talker's per-frame autoencoder, packed into the Wan latent layout.

Each RGB frame [3, H, W] in [-1, 1] is encoded to a small code [c, H/4, W/4] (c = `frame_ae_code_channels`, 4);
four consecutive frame codes are stacked on channels into one latent frame of 4c = 16 channels, exactly Wan's
z_dim and temporal stride. Latent frame 0 is the reference frame's code repeated four times, so N latent frames
are 1 + 4(N - 1) video frames as with the Wan VAE. Latents are normalised per channel with cfg.latent_mean/std
(measured on the training set), so the DiT sees roughly unit-variance inputs.

Decoding is per frame, so streaming decode equals offline decode exactly and the decode state is just whether
the stream's first latent was seen. The interface is the Wan VAE's: `encode`, `decode`, `init_decode_cache`,
`decode_step`, `forward(z, state, first)`.

Not here: training (train/toy.py), anything temporal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelConfig


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


@dataclass
class FrameAECache:
    """Per-frame decoding keeps no state beyond whether the stream's first latent has been decoded."""
    first_done: bool = False

    def nbytes(self) -> int:
        return 0

    def reset(self) -> None:
        self.first_done = False


class FrameAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1, c2, c3 = cfg.frame_ae_channels
        code = cfg.frame_ae_code_channels
        self.code, self.group, self.stride = code, cfg.vae_stride[0], cfg.vae_stride[1]
        if code * self.group != cfg.vae_z_dim or cfg.vae_stride[1] != 4 or cfg.vae_stride[2] != 4:
            raise ValueError(f"FrameAE packs {self.group} frames of {code} channels at 1/4 size: needs vae_z_dim = "
                             f"{code * self.group} and vae_stride (t, 4, 4), got {cfg.vae_z_dim}, {cfg.vae_stride}")
        self.encoder = nn.Sequential(                                                     # [N, 3, H, W] ->
            nn.Conv2d(3, c1, 3, padding=1), _Res(c1),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), _Res(c2),                          # H/2
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), _Res(c3),                          # H/4
            nn.Conv2d(c3, code, 1))                                                      # [N, code, H/4, W/4]
        self.decoder = nn.Sequential(
            nn.Conv2d(code, c3, 3, padding=1), _Res(c3), _Res(c3),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c3, c2, 3, padding=1), _Res(c2),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c2, c1, 3, padding=1), _Res(c1),
            nn.Conv2d(c1, 3, 3, padding=1))
        self._stats = (cfg.latent_mean, cfg.latent_std)
        self.register_buffer("latent_mean", torch.empty(cfg.vae_z_dim), persistent=False)
        self.register_buffer("latent_std", torch.empty(cfg.vae_z_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)fill the normalisation buffers from the config (also after `to_empty`)."""
        if self.latent_mean.is_meta:
            return
        with torch.no_grad():
            self.latent_mean.copy_(torch.tensor(self._stats[0]))
            self.latent_std.copy_(torch.tensor(self._stats[1]))

    # ------------------------------------------------------------------ per frame
    def encode_frames(self, frames: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> raw codes [N, code, H/4, W/4]."""
        return self.encoder(frames)

    def decode_frames(self, codes: Tensor) -> Tensor:
        """Raw codes [N, code, h, w] -> frames [N, 3, 4h, 4w] (unclamped; training uses this)."""
        return self.decoder(codes)

    def pack(self, codes: Tensor) -> Tensor:
        """Raw codes [B, T, code, h, w] (T = 1 + 4k; frame 0 alone) -> normalised z [B, 16, 1 + k, h, w]."""
        first = codes[:, :1].expand(-1, self.group, -1, -1, -1)          # latent 0 = the first code x 4
        rest = codes[:, 1:]
        groups = torch.cat([first, rest], 1).unflatten(1, (-1, self.group))   # [B, T', 4, code, h, w]
        z = groups.flatten(2, 3).transpose(1, 2)                             # [B, 4 code, T', h, w]
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def unpack(self, z: Tensor) -> Tensor:
        """Normalised z [B, 16, T', h, w] -> raw codes [B, T', 4, code, h, w]."""
        raw = z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        return raw.transpose(1, 2).unflatten(2, (self.group, self.code))

    # ------------------------------------------------------------------ the codec interface
    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalised latents [B, 16, 1 + k, H/4, W/4]."""
        B, _, T = video.shape[:3]
        if (T - 1) % self.group:
            raise ValueError(f"video has {T} frames; FrameAE latents need 1 + {self.group} k")
        codes = self.encode_frames(video.transpose(1, 2).flatten(0, 1)).unflatten(0, (B, T))
        return self.pack(codes)

    def decode(self, z: Tensor) -> Tensor:
        """Offline: [B, 16, T', h, w] -> [B, 3, 1 + 4 (T' - 1), H, W] clamped to [-1, 1]."""
        cache = self.init_decode_cache(z.shape[0], z.dtype, z.device, 0, 0)
        return self.decode_step(z, cache)

    def init_decode_cache(self, batch, dtype, device, height, width) -> FrameAECache:
        return FrameAECache()

    def decode_step(self, z_frames: Tensor, cache: FrameAECache) -> Tensor:
        """Streaming: the stream's first latent gives 1 frame, every later latent 4 (any number per call)."""
        frames, _ = self.forward(z_frames, [], first=not cache.first_done)
        cache.first_done = True
        return frames

    def forward(self, z_frames: Tensor, state: list, first: bool = False) -> tuple[Tensor, list]:
        """Pure step: (z [B, 16, t, h, w], state) -> (frames [B, 3, n, H, W] in [-1, 1], state)."""
        codes = self.unpack(z_frames)                                    # [B, t, 4, code, h, w]
        if first:                                                        # latent 0: its first code is the frame
            codes = torch.cat([codes[:, 0, :1], codes[:, 1:].flatten(1, 2)], 1)
        else:
            codes = codes.flatten(1, 2)
        B, n = codes.shape[:2]
        frames = self.decode_frames(codes.flatten(0, 1)).clamp(-1, 1).unflatten(0, (B, n))   # [B, n, 3, H, W]
        return frames.transpose(1, 2), state
