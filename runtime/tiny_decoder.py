"""TAEHV tiny decoder for Wan 2.1 latents (the `taew2_1` weights): offline `decode` and a streaming `decode_step`.

TAEHV (madebyollin/taehv, MIT; layout read from taehv.py @ 1f14a568f24b) is a 2-D conv decoder whose only temporal
mixing is (a) `MemBlock`s, which see their own input at the previous frame, and (b) `TGrow`s, a 1x1 conv that
turns each frame into `stride` frames. For `taew2_1` the three stages upsample space x2 each (x8 in all) and time
x1, x2, x2 (x4 in all), so one latent becomes 4 frames; the first 3 frames of a stream are dropped, which gives the
Wan VAE's frame count 1 + 4(T - 1).

Conventions of this project, not of TAEHV:
- latents in:  z [B, C=16, T, h, w] (BCFHW, Wan's order), the DiT's *normalised* latents, no mean/std applied;
- frames out:  [B, 3, F, H, W] RGB in [-1, 1] (TAEHV's [0, 1] clamp, then 2x - 1), H = 8h, W = 8w.
Shape vocabulary: B batch, T latent frames, F video frames, C channels, h/w latent size, H/W pixel size.

Streaming keeps one memory per MemBlock (its input at the last frame it saw, zeros at the start) in a DecodeCache
(decoder.py): fixed-shape tensors updated in place, so every step with the same number of latents has the same
shapes. `forward(z_frames, memories, first)` is the pure step with the state as explicit inputs and outputs (what
an exported graph runs; `first` trims the startup frames); `decode_step` wraps it with the in-place cache update,
and `decode` is `decode_step` on a fresh cache, so any chunking equals it up to floating-point reassociation.

Not here: encoding. The encoder modules exist only so that a released `taew2_1.pth` / `.safetensors` loads with
strict key checking; the reference image goes through the Wan VAE encoder (vae.py). Reduced-upscale preview modes
of the published code are not offered either.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelConfig
from .decoder import DecodeCache

DECODER_TIME_UPSCALE = (1, 2, 2)     # TGrow stride per decoder stage (taew2_1 defaults): x4 frames per latent
ENCODER_TIME_DOWNSCALE = (2, 2, 1)   # TPool stride per encoder stage: 4 frames -> 1 latent
SPACE_UPSCALE = 2                    # nearest x2 per stage, 3 stages = x8 = the Wan VAE's spatial stride
MEMBLOCKS_PER_STAGE = 3
FRAMES_TO_TRIM = DECODER_TIME_UPSCALE[0] * DECODER_TIME_UPSCALE[1] * DECODER_TIME_UPSCALE[2] - 1
LATENT_CLAMP = 3.0                   # soft clamp 3 tanh(z / 3): keeps outlier latents from blowing up the convs
IMAGE_CHANNELS = 3


def _conv3x3(c_in: int, c_out: int, *, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """x -> 3 tanh(x / 3): identity near 0, saturates at +-3."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / LATENT_CLAMP) * LATENT_CLAMP


class MemBlock(nn.Module):
    """ReLU(convs(cat[x, past]) + x), three 3x3 convs (2C->C, C->C, C->C); `past` is x at the previous frame."""

    def __init__(self, channels: int):
        super().__init__()
        # Sub-module indices 0, 2, 4 are the checkpoint's `conv.0/2/4` keys; 1 and 3 are parameter-free ReLUs.
        self.conv = nn.Sequential(_conv3x3(2 * channels, channels), nn.ReLU(),
                                  _conv3x3(channels, channels), nn.ReLU(), _conv3x3(channels, channels))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """1x1 conv C -> stride*C, then channel block j becomes sub-frame j: [N, C, H, W] -> [N*stride, C, H, W]."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # [N, s*C, H, W] -> [N*s, C, H, W]: frames are batch-major, so frame t's sub-frames land at t*s .. t*s+s-1.
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TPool(nn.Module):
    """Encoder time pooling: a 1x1 conv stride*C -> C over `stride` stacked frames. Holds weights only here."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)


def _build_decoder(z_dim: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Indices match the checkpoint: 0 clamp, 1 conv, 2 ReLU, then per stage 3 MemBlocks, Upsample, TGrow, conv."""
    layers: list[nn.Module] = [SoftClamp(), _conv3x3(z_dim, widths[0]), nn.ReLU()]
    for stage, t_stride in enumerate(DECODER_TIME_UPSCALE):
        c, c_next = widths[stage], widths[stage + 1]
        layers += [MemBlock(c) for _ in range(MEMBLOCKS_PER_STAGE)]
        layers += [nn.Upsample(scale_factor=SPACE_UPSCALE), TGrow(c, t_stride), _conv3x3(c, c_next, bias=False)]
    layers += [nn.ReLU(), _conv3x3(widths[-1], IMAGE_CHANNELS)]
    return nn.Sequential(*layers)


def _build_encoder(z_dim: int, width: int) -> nn.Sequential:
    """The published encoder (width 64 for taew2_1): conv, ReLU, 3 x [TPool, strided conv, 3 MemBlocks], conv."""
    layers: list[nn.Module] = [_conv3x3(IMAGE_CHANNELS, width), nn.ReLU()]
    for t_stride in ENCODER_TIME_DOWNSCALE:
        layers += [TPool(width, t_stride), _conv3x3(width, width, stride=2, bias=False)]
        layers += [MemBlock(width) for _ in range(MEMBLOCKS_PER_STAGE)]
    layers.append(_conv3x3(width, z_dim))
    return nn.Sequential(*layers)


class TAEHV(nn.Module):
    """TAEHV with the `taew2_1` layout; widths from cfg.taehv_channels, latent channels cfg.vae_z_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = tuple(cfg.taehv_channels)
        if len(widths) != len(DECODER_TIME_UPSCALE) + 1 or min(widths) < 1:
            raise ValueError(f"taehv_channels must be 4 positive widths (e.g. (256, 128, 64, 64)), got {widths}")
        space = SPACE_UPSCALE ** len(DECODER_TIME_UPSCALE)
        if tuple(cfg.vae_stride) != (FRAMES_TO_TRIM + 1, space, space):
            raise ValueError(f"TAEHV decodes 1 latent to {FRAMES_TO_TRIM + 1} frames at x{space} size, but "
                             f"cfg.vae_stride is {cfg.vae_stride}; use decoder='vae' for this codec")
        self.z_dim = cfg.vae_z_dim
        self.widths = widths
        self.space_upscale = space
        self.decoder = _build_decoder(cfg.vae_z_dim, widths)
        self.encoder = _build_encoder(cfg.vae_z_dim, widths[-1])

    # -- streaming --
    def init_decode_cache(self, batch: int, dtype: torch.dtype, device, height: int, width: int) -> DecodeCache:
        """Zero state for a stream of `batch` videos of output size height x width (pixels, multiples of 8):
        tensors[k] [B, C_s, h * 2^s, w * 2^s] is the k-th MemBlock's input (stage s) at the last decoded frame."""
        if height % self.space_upscale or width % self.space_upscale or height <= 0 or width <= 0:
            raise ValueError(f"output size {width}x{height} must be positive multiples of {self.space_upscale}")
        h, w = height // self.space_upscale, width // self.space_upscale
        memories = []
        for stage, c in enumerate(self.widths[:-1]):
            size = (batch, c, h * SPACE_UPSCALE ** stage, w * SPACE_UPSCALE ** stage)
            memories += [torch.zeros(size, dtype=dtype, device=device) for _ in range(MEMBLOCKS_PER_STAGE)]
        return DecodeCache(memories, batch, height, width)

    @torch.no_grad()
    def decode_step(self, z_frames: Tensor, cache: DecodeCache) -> Tensor:
        """z_frames [B, 16, t, h, w] -> frames [B, 3, n, H, W] in [-1, 1]; n = 4t, minus 3 on a stream's first step."""
        self._check_step(z_frames, cache)
        if z_frames.shape[2] == 0:
            return z_frames.new_zeros(cache.batch, IMAGE_CHANNELS, 0, cache.height, cache.width)
        return cache.step(self, z_frames).contiguous()

    def forward(self, z_frames: Tensor, memories: list[Tensor], first: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The pure step (explicit state, for export): z_frames [B, 16, t, h, w] and the 9 MemBlock memories ->
        frames [B, 3, 4t, H, W] in [-1, 1] (4t - 3 when `first`: a stream's first latent drops TAEHV's startup
        frames) and the next memories (the MemBlock inputs at the last frame)."""
        b, _, t, h, w = z_frames.shape
        x = z_frames.transpose(1, 2).reshape(b * t, self.z_dim, h, w)     # [B*T, C, h, w], batch-major
        pasts = iter(memories)
        new_memories = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = x.unflatten(0, (b, -1))                             # [B, F_s, C, H_s, W_s]
                # past of frame i is frame i-1; of the chunk's first frame, the carried memory.
                past = torch.cat([next(pasts).unsqueeze(1), frames[:, :-1]], dim=1).flatten(0, 1)
                new_memories.append(frames[:, -1])
                x = layer(x, past)
            else:
                x = layer(x)
        y = x.unflatten(0, (b, -1)).transpose(1, 2)                          # [B, 3, 4T, H, W]
        if first:
            y = y[:, :, FRAMES_TO_TRIM:]
        # TAEHV's output convention is [0, 1] (clamped); this project's decoders return [-1, 1].
        return y.clamp(0, 1).mul(2).sub(1), new_memories

    def _check_step(self, z: Tensor, cache: DecodeCache) -> None:
        if not isinstance(z, Tensor) or z.ndim != 5 or z.shape[1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"TAEHV expects latents [B, {self.z_dim}, T, h, w] (BCFHW), got {shape}")
        b, _, _, h, w = z.shape
        want = (cache.batch, cache.height // self.space_upscale, cache.width // self.space_upscale)
        if (b, h, w) != want:
            raise ValueError(f"latents have batch {b} and size {w}x{h}, but the cache was made for batch {want[0]} "
                             f"and latent size {want[2]}x{want[1]}; call init_decode_cache with the stream's shape")
        weight = self.decoder[1].weight
        if z.dtype != weight.dtype or z.dtype != cache.tensors[0].dtype:
            raise TypeError(f"latents are {z.dtype}, decoder weights {weight.dtype}, cache "
                            f"{cache.tensors[0].dtype}; cast them to one dtype")
        if z.device != weight.device:
            raise ValueError(f"latents are on {z.device} but the decoder is on {weight.device}")

    # -- offline --
    def decode(self, z: Tensor) -> Tensor:
        """z [B, 16, T, h, w] (normalised) -> frames [B, 3, 1 + 4(T - 1), 8h, 8w] in [-1, 1]."""
        if not isinstance(z, Tensor) or z.ndim != 5:
            raise ValueError(f"TAEHV expects latents [B, {self.z_dim}, T, h, w] (BCFHW), got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if z.shape[2] == 0:
            raise ValueError("decode needs at least one latent frame, got T = 0")
        b, _, _, h, w = z.shape
        cache = self.init_decode_cache(b, z.dtype, z.device, h * self.space_upscale, w * self.space_upscale)
        return self.decode_step(z, cache)


def load_taehv_weights(model: TAEHV, path: str | Path) -> TAEHV:
    """Load a TAEHV state dict (`taew2_1.pth` or `.safetensors`, keys `decoder.N.*` / `encoder.N.*`), strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TAEHV weights not found at {path}; taew2_1.pth / safetensors/taew2_1.safetensors "
                                f"are published at https://github.com/madebyollin/taehv")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: unknown TAEHV weight format {path.suffix!r}; expected .pth, .pt or .safetensors")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat TAEHV state dict (name -> tensor)")
    _check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def _check_state_dict(model: TAEHV, state: dict[str, Tensor], path: Path) -> None:
    """Name every missing, unexpected and mis-shaped key before torch would (its message is a wall of text)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match TAEHV(taehv_channels={model.widths}, z_dim={model.z_dim}): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")


def _conv_macs(conv: nn.Conv2d, h: int, w: int) -> int:
    """Multiply-adds of a stride-1 conv producing an h x w map."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * h * w


def taehv_decode_flops(cfg: ModelConfig) -> int:
    """FLOPs (2 x multiply-adds) to decode one later latent frame into 4 video frames at cfg's output size."""
    with torch.device("meta"):
        decoder = TAEHV(cfg).decoder
    (h, w), frames, macs = cfg.latent_hw, 1, 0
    for layer in decoder:
        if isinstance(layer, nn.Upsample):
            h, w = h * SPACE_UPSCALE, w * SPACE_UPSCALE
        elif isinstance(layer, nn.Conv2d):
            macs += frames * _conv_macs(layer, h, w)
        elif isinstance(layer, MemBlock):
            macs += frames * sum(_conv_macs(c, h, w) for c in layer.conv if isinstance(c, nn.Conv2d))
        elif isinstance(layer, TGrow):
            macs += frames * _conv_macs(layer.conv, h, w)
            frames *= layer.stride
    return 2 * macs
