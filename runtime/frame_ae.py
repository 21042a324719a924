"""FrameAE: the toy-talker's autoencoder, packed into the Wan latent layout.

Each RGB frame [3, H, W] in [-1, 1] is encoded to a small code [c, H/4, W/4] (c = `frame_ae_code_channels`, 4);
four consecutive frame codes are stacked on channels into one latent frame of 4c = 16 channels, exactly Wan's
z_dim and temporal stride. Latent frame 0 is the reference frame's code repeated four times, so N latent frames
are 1 + 4(N - 1) video frames as with the Wan VAE. Latents are normalised per channel with cfg.latent_mean/std
(measured on the training set), so the DiT sees roughly unit-variance inputs.

The encoder is per frame. With `frame_ae_context` = (n, f) the decoder of frame t also sees the n codes before
it (t - n .. t - 1; frame 0's code stands in for frames before the stream's start) and the f codes after it that
belong to the same latent (t + 1 .. t + f, the latent's last code repeated beyond its end, with one mask channel
each saying which are real), through a convolution added to its first layer. Later codes of the same latent
arrive in the same decode call, so this adds no latency; earlier ones are the streaming state (the last n codes),
so streaming decode equals offline decode exactly. Seeing its neighbours lets the decoder tell the one-step DiT's
independent per-frame and per-latent errors (flicker) from motion, as the Wan VAE's causal temporal decoder
does; (0, 0) decodes each frame alone. The interface is the Wan VAE's: `encode`, `decode`, and the streaming
decoder interface of decoder.py (`init_decode_cache`, `decode_step`, `forward(z, state, first)`).

Not here: training (train/ae.py, train/toy.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelConfig
from .decoder import DecodeCache


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def latent_of(frames: Tensor, group: int = 4) -> Tensor:
    """The latent each stream frame number belongs to: frame 0 -> latent 0, frames 4k-3 .. 4k -> latent k."""
    return (frames + group - 1) // group


def context_index(frames: Tensor, earlier: int, later: int, group: int = 4) -> tuple[Tensor, Tensor]:
    """Which codes frame t's decoder sees, as stream frame numbers (latent 0 = frame 0 alone, latent k >= 1 =
    frames 4k-3 .. 4k): frames [N] -> (numbers [N, earlier + later]: t - earlier .. t - 1 clamped to frame 0,
    then t + 1 .. t + later clamped to the last frame of t's latent; mask [N, later]: 1.0 where that later frame
    is real), on the device of `frames`. Runtime decode and decoder training build the context from this one
    definition."""
    frames = frames.long().view(-1, 1)
    before = (frames - torch.arange(earlier, 0, -1, device=frames.device)).clamp_min(0)
    last = group * latent_of(frames, group)                                # frame 0: its own latent
    after = frames + torch.arange(1, later + 1, device=frames.device)
    return torch.cat([before, torch.minimum(after, last)], 1), (after <= last).float()


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 convolution with zero weights, made without drawing from the global RNG (so adding it to a model
    leaves every later random initialisation of a training run unchanged)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, device="meta")
    conv.weight = nn.Parameter(torch.zeros(c_out, c_in, 3, 3))
    conv.bias = nn.Parameter(torch.zeros(c_out))
    return conv


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
        self.earlier, self.later = cfg.frame_ae_context
        # neighbouring codes (+ masks) enter beside the first decoder layer; zero at the start = the per-frame decoder
        width = (self.earlier + self.later) * code + self.later
        self.context = _zero_conv(width, c3) if width else None
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

    def context_input(self, neighbours: Tensor, mask: Tensor) -> Tensor:
        """Raw codes [N, earlier + later, code, h, w] and masks [N, later] (as `context_index` orders them) ->
        the context layer's input [N, C, h, w]."""
        h, w = neighbours.shape[-2:]
        planes = mask.to(neighbours.dtype)[:, :, None, None].expand(-1, -1, h, w)
        return torch.cat([neighbours.flatten(1, 2), planes], 1)

    def decode_frames(self, codes: Tensor, context: Tensor | None = None) -> Tensor:
        """Raw codes [N, code, h, w] (+ their `context_input`) -> frames [N, 3, 4h, 4w] (unclamped; training uses
        this). Without `context` the context layer is left out (the per-frame decoder)."""
        h = self.decoder[0](codes)
        if context is not None and self.context is not None:
            h = h + self.context(context)
        return self.decoder[1:](h)

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
        cache = self.init_decode_cache(z.shape[0], z.dtype, z.device, z.shape[-2] * 4, z.shape[-1] * 4)
        return self.decode_step(z, cache)

    def init_decode_cache(self, batch, dtype, device, height, width) -> DecodeCache:
        """Zero state for a stream of `batch` videos of height x width pixels (multiples of 4): tensors = [the last
        `earlier` frame codes, raw, [B, earlier * code, h, w]] (empty without earlier context)."""
        if height <= 0 or width <= 0 or height % 4 or width % 4:
            raise ValueError(f"output size {width}x{height} must be positive multiples of 4")
        shape = (batch, self.earlier * self.code, height // 4, width // 4)
        return DecodeCache([torch.zeros(shape, dtype=dtype, device=device)] if self.earlier else [],
                           batch, height, width)

    def decode_step(self, z_frames: Tensor, cache: DecodeCache) -> Tensor:
        """Streaming: the stream's first latent gives 1 frame, every later latent 4 (any number per call)."""
        return cache.step(self, z_frames)

    def forward(self, z_frames: Tensor, state: list[Tensor], first: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Pure step: (z [B, 16, t, h, w], state) -> (frames [B, 3, m, H, W] in [-1, 1], state with its entry
        replaced by the last `earlier` codes; the caller's list is updated). `first`: z starts the stream (the
        state is not read; frame 0's code stands in for the frames before it)."""
        codes = self.unpack(z_frames)                                    # [B, t, 4, code, h, w]
        if first:                                                        # latent 0: its first code is the frame
            codes = torch.cat([codes[:, 0, :1], codes[:, 1:].flatten(1, 2)], 1)
        else:
            codes = codes.flatten(1, 2)
        B, m = codes.shape[:2]
        context = None
        if self.context is not None:
            n = self.earlier
            before = codes[:, :1].expand(-1, n, -1, -1, -1) if first or not n else state[0].unflatten(1, (n, self.code))
            seq = torch.cat([before.to(codes.dtype), codes], 1)          # [B, n + m, code, h, w]
            # stream numbers of this call's frames: from 0, or from a latent start far enough in that no clamp
            start = 0 if first else self.group * (n // self.group + 1) + 1
            # built on the codes' device: no host-to-device copy, so a CUDA graph can capture the step
            frame_numbers = torch.arange(start, start + m, device=codes.device)
            index, mask = context_index(frame_numbers, n, self.later, self.group)
            neighbours = seq[:, index - start + n]                      # [B, m, n + f, code, h, w]
            context = self.context_input(neighbours.flatten(0, 1), mask.repeat(B, 1))
            if n:
                state[0] = seq[:, -n:].flatten(1, 2).to(state[0].dtype)
        frames = self.decode_frames(codes.flatten(0, 1), context).clamp(-1, 1).unflatten(0, (B, m))
        return frames.transpose(1, 2), state
