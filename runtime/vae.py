"""Wan 2.1 VAE: the encoder (reference image -> latent) and the causal decoder with an explicit streaming cache.

Layout and numerics follow the released `Wan2.1_VAE.pth` (read from wan/modules/vae.py): submodule names give its
exact state-dict keys (`encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`), so the file loads with strict checking.
Shape vocabulary: B batch, C channels, T latent frames, F video frames, h/w latent size, H/W pixel size (= 8h, 8w).
- video:   [B, 3, F, H, W] RGB in [-1, 1], F = 1 + 4(T - 1) (the first latent is one frame, every later one four);
- latents: [B, 16, T, h, w], *normalised*: z = (mu - mean) / std per channel, roughly N(0, 1) (what the DiT sees).

Causality. Every 3-tap CausalConv3d sees the 2 frames before its input; the official code keeps them in a Python
list with a `None` / 'Rep' sentinel and variable lengths. Here each slot always holds exactly 2 frames (zeros where
the official has None, 'Rep' or one frame), which gives the same numbers, because the official pads the missing
frames with zeros. The one real first-frame special case is the decoder's temporal upsampling (`time_conv` of
'upsample3d'): it is skipped for a stream's first latent, which therefore yields one frame, and its slot stays zero
(for latent 1 the official runs it on [0, 0, x1], exactly what a zero slot gives). So the decoder state is 32
fixed-shape tensors from the start plus a Python bool: one graph for the first latent and one steady graph, each
taking and returning the 32 tensors (what CUDA graphs and an ONNX export need).

Not here: sampling from the posterior (only the mean is used), attention inside the up/down stages (`attn_scales`
is empty for Wan 2.1), tiling, training-time dropout, and the weight-file loader (weights.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .decoder import DecodeCache

CACHE_T = 2            # past frames a 3-tap causal conv needs
IMAGE_CHANNELS = 3


def _to_images(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], batch-major (frame t of video b is row b*T + t)."""
    return x.transpose(1, 2).flatten(0, 1)


def _to_video(x: Tensor, batch: int) -> Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space (inside the conv) and not in time: the `time_pad` = 2 * padding_t
    frames in front come from the cache (CacheCursor.causal), zeros at the start of a sequence."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(c_in, c_out, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt


class RMSNorm(nn.Module):
    """x / rms over channels * gamma (F.normalize * sqrt(C), eps 1e-12, no bias). gamma is [C,1,1,1] for video,
    [C,1,1] for images: the checkpoint's shapes."""

    def __init__(self, channels: int, images: bool):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest x2 in space, computed in fp32 and cast back (as the official, whose bf16 nearest was unsupported).
    'nearest' equals the official 'nearest-exact' at exactly x2 and exports as a plain Resize."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)


class CacheCursor:
    """Hands out cache slots in layer order (the official `feat_idx` walk). Each causal conv replaces its slot by
    the last 2 frames of its padded input, so old and new state never coexist in memory. A None slot means zeros
    (the encoder makes them lazily; the decoder's are preallocated). `first`: this is a sequence's first chunk."""

    def __init__(self, slots: list, first: bool):
        self.slots, self.first, self.index = slots, first, 0

    def take(self) -> int:
        if self.index == len(self.slots):      # the encoder's list grows on its first chunk
            self.slots.append(None)
        self.index += 1
        return self.index - 1

    def causal(self, conv: CausalConv3d, x: Tensor) -> Tensor:
        i = self.take()
        past = self.slots[i]
        if past is None:
            b, c, _, h, w = x.shape
            past = x.new_zeros(b, c, conv.time_pad, h, w)
        x = torch.cat([past, x], dim=2)                        # [B, C, 2 + T, H, W]
        self.slots[i] = x[:, :, -conv.time_pad:].clone()
        return conv(x)


class ResidualBlock(nn.Module):
    """residual(x) + shortcut(x); residual = norm, SiLU, conv3, norm, SiLU, dropout, conv3 (indices as the keys)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(c_in, images=False), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out, images=False), nn.SiLU(), nn.Identity(),   # 5: dropout slot, identity at inference
            CausalConv3d(c_out, c_out, 3, padding=1))
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cursor: CacheCursor) -> Tensor:
        r = self.residual
        h = cursor.causal(r[2], r[1](r[0](x)))
        h = cursor.causal(r[6], r[4](r[3](h)))
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Per-frame single-head attention over the H*W positions (scale 1/sqrt(C)), plus a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(_to_images(x)))                     # [B*T, 3C, H, W]
        # [B*T, 1, 3C, S] -> [B*T, 1, S, 3C]; q, k, v are the channel thirds, S = H*W tokens
        q, k, v = y.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)                   # [B*T, 1, S, C]
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return _to_video(self.proj(y), b) + x


class Resample(nn.Module):
    """x2 up or down in space per frame ('upsample2d' / 'downsample2d'), with a causal time conv for the 3d modes.
    upsample3d: time_conv C -> 2C makes each frame two (channels [0:C] then [C:2C]), then space; skipped on the
    first chunk. downsample3d: space first, then a stride-2 time conv over [last frame of previous chunk, chunk]."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # 0: parameter-free upsample, 1: the conv (key `resample.1`); halves the channels
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(channels, channels // 2, 3, padding=1))
        else:
            # pad right/bottom by one, then a stride-2 3x3 conv: H -> H/2 for even H
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cursor: CacheCursor) -> Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if cursor.first:
                cursor.take()               # the first frame is not doubled; its slot stays zero
            else:
                x = cursor.causal(self.time_conv, x)                       # [B, 2C, T, H, W]
                # [B, 2, C, T, H, W] -> [B, C, T, 2, H, W] -> [B, C, 2T, H, W]: frame 2t, then 2t + 1
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = _to_video(self.resample(_to_images(x)), b)
        if self.mode == "downsample3d":
            i = cursor.take()
            prev, cursor.slots[i] = cursor.slots[i], x[:, :, -1:].clone()
            if not cursor.first:            # the first frame passes alone; later chunks: 1 + 2n frames -> n
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


def _head(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(c_in, images=False), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1))


def _middle(c: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))


def _run(blocks, x: Tensor, cursor: CacheCursor) -> Tensor:
    for block in blocks:
        x = block(x) if isinstance(block, AttentionBlock) else block(x, cursor)
    return x


class Encoder3d(nn.Module):
    """Video [B, 3, F, H, W] -> [B, 2 z, T, h, w] (mean and log-variance before `conv1`), chunk by chunk."""

    def __init__(self, base: int, z_out: int, dim_mult, num_res_blocks: int, temporal_down):
        super().__init__()
        dims = [base * m for m in (1, *dim_mult)]                      # 96, 96, 192, 384, 384 for Wan
        self.conv1 = CausalConv3d(IMAGE_CHANNELS, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [ResidualBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)]
            if i < len(dim_mult) - 1:
                blocks.append(Resample(c_out, "downsample3d" if temporal_down[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z_out)

    def forward(self, x: Tensor, cursor: CacheCursor) -> Tensor:
        x = cursor.causal(self.conv1, x)
        x = _run(self.middle, _run(self.downsamples, x, cursor), cursor)
        return cursor.causal(self.head[2], self.head[1](self.head[0](x)))


class Decoder3d(nn.Module):
    """Latents after `conv2` [B, z, T, h, w] -> video [B, 3, F, H, W] (unclamped), one call per latent frame."""

    def __init__(self, base: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_up):
        super().__init__()
        dims = [base * m for m in (dim_mult[-1], *dim_mult[::-1])]      # 384, 384, 384, 192, 96 for Wan
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            c_in = c_in // 2 if i > 0 else c_in                        # each Resample halved the channels
            blocks += [ResidualBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)]
            if i < len(dim_mult) - 1:
                blocks.append(Resample(c_out, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], IMAGE_CHANNELS)

    def forward(self, x: Tensor, cursor: CacheCursor) -> Tensor:
        x = cursor.causal(self.conv1, x)
        x = _run(self.upsamples, _run(self.middle, x, cursor), cursor)
        return cursor.causal(self.head[2], self.head[1](self.head[0](x)))

    def cache_shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """(channels, rows, cols) of every cache slot, in cursor order, for a latent of size h x w."""
        shapes = [(self.conv1.in_channels, h, w)]
        for block in (*self.middle, *self.upsamples):
            if isinstance(block, ResidualBlock):
                shapes += [(block.residual[2].in_channels, h, w), (block.residual[6].in_channels, h, w)]
            elif isinstance(block, Resample):
                if block.mode == "upsample3d":
                    shapes.append((block.time_conv.in_channels, h, w))
                h, w = 2 * h, 2 * w
        return shapes + [(self.head[2].in_channels, h, w)]


class WanVAE(nn.Module):
    """The Wan 2.1 VAE at cfg's size: `encode` (video -> normalised latents), offline `decode`, streaming
    `init_decode_cache` + `decode_step`, and `forward` = the pure decoder step with explicit state (for export)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mult, down = tuple(cfg.vae_dim_mult), tuple(cfg.vae_temporal_downsample)
        if len(down) != len(mult) - 1:
            raise ValueError(f"vae_temporal_downsample needs {len(mult) - 1} entries (one per downsampling), "
                             f"got {down}")
        stride = (2 ** sum(down), 2 ** (len(mult) - 1), 2 ** (len(mult) - 1))
        if tuple(cfg.vae_stride) != stride:
            raise ValueError(f"vae_dim_mult={mult} and vae_temporal_downsample={down} give a (time, row, col) "
                             f"stride of {stride}, but cfg.vae_stride is {cfg.vae_stride}; make them agree")
        z = cfg.vae_z_dim
        self.z_dim, self.time_stride, self.space_stride = z, stride[0], stride[1]
        self.encoder = Encoder3d(cfg.vae_base_dim, 2 * z, mult, cfg.vae_num_res_blocks, down)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)        # quant conv: -> (mu, log_var)
        self.conv2 = CausalConv3d(z, z, 1)                # post-quant conv
        self.decoder = Decoder3d(cfg.vae_base_dim, z, mult, cfg.vae_num_res_blocks, down[::-1])
        # Latent statistics are constants, not in the checkpoint: non-persistent buffers follow .to().
        self._stats = (tuple(cfg.latent_mean), tuple(cfg.latent_std))
        self.register_buffer("latent_mean", torch.tensor(self._stats[0]), persistent=False)
        self.register_buffer("latent_std", torch.tensor(self._stats[1]), persistent=False)

    def reset_buffers(self) -> None:
        """Refill the latent statistics (after `to_empty`, which leaves buffers uninitialised)."""
        with torch.no_grad():
            self.latent_mean.copy_(torch.tensor(self._stats[0]))
            self.latent_std.copy_(torch.tensor(self._stats[1]))

    def _stat(self, t: Tensor) -> Tensor:
        return t.view(1, self.z_dim, 1, 1, 1)

    # -- encoder --
    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + k, H/8, W/8] (posterior mean).
        Chunks as the official: the first frame alone, then 4 frames per latent, with a causal cache."""
        self._check_video(video)
        slots: list = []
        n = self.time_stride
        outs = [self.encoder(video[:, :, s:s + (n if s else 1)], CacheCursor(slots, first=(s == 0)))
                for s in [0, *range(1, video.shape[2], n)]]
        mu = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)[0]      # [B, z, T, h, w]
        # the official multiplies by 1/std (computed in the working dtype): same rounding here
        return (mu - self._stat(self.latent_mean)) * (1.0 / self._stat(self.latent_std))

    def _check_video(self, video: Tensor) -> None:
        if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[1] != IMAGE_CHANNELS:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"encode expects video [B, 3, F, H, W] in [-1, 1] (an image is F = 1), got {shape}")
        f, h, w = video.shape[2:]
        n = self.time_stride
        if f < 1 or (f - 1) % n:
            raise ValueError(f"encode needs 1 + {n}k frames (1, {1 + n}, {1 + 2 * n}, ...), got {f}; "
                             f"trim or pad the clip")
        if h % self.space_stride or w % self.space_stride or h == 0 or w == 0:
            raise ValueError(f"frame size {w}x{h} must be a positive multiple of {self.space_stride}")
        self._check_dtype_device(video)

    def _check_dtype_device(self, x: Tensor) -> None:
        weight = self.conv2.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"input is {x.dtype} but the VAE weights are {weight.dtype}; cast one to the other")
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device} but the VAE is on {weight.device}")

    # -- decoder --
    def init_decode_cache(self, batch: int, dtype: torch.dtype, device, height: int, width: int) -> DecodeCache:
        """Zero state for a stream of `batch` videos of output size height x width pixels (multiples of 8)."""
        s = self.space_stride
        if height <= 0 or width <= 0 or height % s or width % s:
            raise ValueError(f"output size {width}x{height} must be positive multiples of {s}")
        tensors = [torch.zeros(batch, c, CACHE_T, h, w, dtype=dtype, device=device)
                   for c, h, w in self.decoder.cache_shapes(height // s, width // s)]
        return DecodeCache(tensors, batch, height, width)

    def forward(self, z_frames: Tensor, caches: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        """The pure decoder step: normalised z_frames [B, 16, T, h, w] and the slot tensors -> video
        [B, 3, F, H, W] in [-1, 1] (F = 4T, or 4T - 3 when `first`) and the same list with its entries replaced
        (the caller's list is updated; an exporter passes a fresh one). `first`: z_frames starts the stream."""
        # de-normalise as the official does (divide by 1/std): same rounding
        z = z_frames / (1.0 / self._stat(self.latent_std)) + self._stat(self.latent_mean)
        x = self.conv2(z)
        # One latent per decoder call, as the official: the activations of one latent are the peak memory.
        frames = [self.decoder(x[:, :, i:i + 1], CacheCursor(caches, first=first and i == 0))
                  for i in range(x.shape[2])]
        return torch.cat(frames, dim=2).clamp(-1, 1), caches

    @torch.no_grad()
    def decode_step(self, z_frames: Tensor, cache: DecodeCache) -> Tensor:
        """Streaming: normalised z_frames [B, 16, T, h, w] (T >= 1) -> the video frames they complete,
        [B, 3, F, H, W] in [-1, 1]: 1 for a stream's first latent, 4 for every later one."""
        self._check_latents(z_frames)
        b, _, _, h, w = z_frames.shape
        s = self.space_stride
        if (b, h * s, w * s) != (cache.batch, cache.height, cache.width):
            raise ValueError(f"latents have batch {b} and decode to {w * s}x{h * s}, but the cache was made for "
                             f"batch {cache.batch} at {cache.width}x{cache.height}; call init_decode_cache again")
        if z_frames.dtype != cache.tensors[0].dtype:
            raise TypeError(f"latents are {z_frames.dtype} but the cache is {cache.tensors[0].dtype}")
        return cache.step(self, z_frames)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Offline: normalised z [B, 16, T, h, w] -> video [B, 3, 1 + 4(T - 1), 8h, 8w] in [-1, 1]."""
        self._check_latents(z)
        b, _, _, h, w = z.shape
        cache = self.init_decode_cache(b, z.dtype, z.device, h * self.space_stride, w * self.space_stride)
        return self.decode_step(z, cache)

    def _check_latents(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.ndim != 5 or z.shape[1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"the VAE decoder expects latents [B, {self.z_dim}, T, h, w] (BCFHW), got {shape}")
        if z.shape[2] == 0:
            raise ValueError("decoding needs at least one latent frame, got T = 0")
        self._check_dtype_device(z)


def _conv_macs(conv: nn.Module, h: int, w: int) -> int:
    """Multiply-adds of a conv per output frame at output size h x w (all convs here are stride 1 in space
    when this is called)."""
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):      # an identity shortcut
        return 0
    return conv.out_channels * conv.in_channels * math.prod(conv.kernel_size) * h * w


def vae_decode_flops(cfg: ModelConfig, first: bool) -> int:
    """FLOPs (2 x multiply-adds) to decode one latent frame at cfg's size: the stream's first (1 video frame) or a
    later one (4 frames). Convs and attention (QKV, projection, 2 N^2 C); norms and activations are not counted."""
    with torch.device("meta"):
        vae = WanVAE(cfg)
    dec = vae.decoder
    (h, w), frames = cfg.latent_hw, 1
    macs = _conv_macs(vae.conv2, h, w) + _conv_macs(dec.conv1, h, w)
    for block in (*dec.middle, *dec.upsamples):
        if isinstance(block, ResidualBlock):
            convs = [block.residual[2], block.residual[6], block.shortcut]
            macs += frames * sum(_conv_macs(c, h, w) for c in convs)
        elif isinstance(block, AttentionBlock):
            n, c = h * w, block.proj.in_channels
            macs += frames * (_conv_macs(block.to_qkv, h, w) + _conv_macs(block.proj, h, w) + 2 * n * n * c)
        elif isinstance(block, Resample):
            if block.mode == "upsample3d" and not first:
                macs += frames * _conv_macs(block.time_conv, h, w)
                frames *= 2
            h, w = 2 * h, 2 * w
            macs += frames * _conv_macs(block.resample[1], h, w)
    macs += frames * _conv_macs(dec.head[2], h, w)
    return 2 * macs
