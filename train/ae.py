"""Training of the toy-talker's autoencoder (runtime/frame_ae.py) and its latent statistics.

Loss on random training frames: MSE + 0.5 L1 on pixels in [-1, 1] + 1e-4 |code|^2, with Gaussian noise added to
the codes (decaying from `noise` to 0) so the decoder tolerates the small latent errors a one-step DiT makes.
AdamW with a one-cycle (warm-up, cosine) learning rate. After training, the per-code-channel mean and std over
the training set become ModelConfig.latent_mean/std (repeated for the 4 frames of a latent), so the DiT sees
unit-variance latents as with Wan's VAE statistics. This phase trains the per-frame path (the decoder's temporal
context layer stays zero). Then `harden_decoder` fine-tunes the decoder and trains its context layer, with the
encoder frozen, on codes with noise independent per frame and shared per latent, so the DiT's small per-frame and
per-latent errors do not show as flicker.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from runtime.frame_ae import context_index, latent_of

from .data import ClipSet, device_of, to_pixels
from .teacher import cosine_lr, randn


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def pixel_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE + 0.5 L1 on pixels in [-1, 1]: the reconstruction loss of both autoencoder phases."""
    return (y - x).pow(2).mean() + 0.5 * (y - x).abs().mean()


def random_frames(clips: ClipSet, n: int, rng: np.random.Generator, device="cpu") -> torch.Tensor:
    c = rng.integers(0, len(clips), n)
    f = rng.integers(0, clips.frames.shape[1], n)
    return to_pixels(clips.frames[c, f], device)                             # [n, 3, H, W]


def train_ae(ae, clips: ClipSet, *, minutes: float, max_steps: int, batch: int = 32, lr: float = 2e-3,
             noise: float = 0.1, seed: int = 0, log=print) -> dict:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    ae.train()
    start, step, losses = time.perf_counter(), 0, []
    deadline = start + 60 * minutes
    bar = tqdm(total=max_steps, desc="autoencoder", unit="step")
    while step < max_steps and time.perf_counter() < deadline:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, max_steps, lr, warmup=50, floor=0.05)
        x = random_frames(clips, batch, rng, device_of(ae))
        code = ae.encode_frames(x)
        sigma = noise * max(0.0, 1 - step / (0.8 * max_steps))
        # the global CPU RNG, in the code's memory layout (channels-last: to_pixels gives an NHWC view)
        y = ae.decode_frames(code + sigma * torch.randn_like(code, device="cpu").to(code.device))
        loss = pixel_loss(y, x) + 1e-4 * code.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    bar.close()
    ae.eval()
    return dict(steps=step, seconds=round(time.perf_counter() - start, 1), final_loss=float(np.mean(losses[-50:])))


@torch.no_grad()
def frame_codes(ae, clips: ClipSet, batch: int = 256) -> torch.Tensor:
    """Raw codes of every frame of every clip, [N, T, code, h, w] float32 (the encoder is frozen while used)."""
    frames = clips.frames.reshape(-1, *clips.frames.shape[2:])
    codes = torch.cat([ae.encode_frames(to_pixels(frames[i:i + batch], device_of(ae)))
                       for i in tqdm(range(0, len(frames), batch), desc="decoder codes", unit="batch")])
    return codes.unflatten(0, clips.frames.shape[:2])


def frame_context(ae, frame: torch.Tensor, frames_per_clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's inputs for frames `frame` [B] of clips: (frame numbers [B, span]: the `context_index`
    neighbours, then the frame itself; masks [B, later])."""
    index, mask = context_index(frame, ae.earlier, ae.later, ae.group)
    return torch.cat([index, frame.view(-1, 1)], 1).clamp_max(frames_per_clip - 1), mask


def decode_with_context(ae, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Frames (unclamped) from `frame_context`'s codes and masks."""
    context = ae.context_input(x[:, :-1], mask) if ae.context is not None else None
    return ae.decode_frames(x[:, -1], context)


def harden_decoder(ae, clips: ClipSet, code_std, *, steps: int, noise: float = 0.2, latent_noise: float = 0.2,
                   batch: int = 32, lr: float = 5e-4, seed: int = 0, log=print) -> dict:
    """Fine-tune the decoder and its context layer (runtime/frame_ae.py) with the encoder frozen, so the latent
    space the DiT learns is unchanged, on codes of the training frames with Gaussian noise in units of each
    channel's std (`code_std`, raw code units): `noise` independent per frame code and `latent_noise` shared by
    the four codes of a latent. This is the one-step DiT's error pattern on its streams: small (RMS ~0.04 std) but
    independent per frame and per emitted latent, which a decoder trained on clean codes turns into flicker, most
    of it at latent boundaries (0.02 std on ground-truth codes raised flicker from 0.47 to 1.03). Each sample is
    a random frame t >= 1 of a clip with its `context_index` neighbours; latent 0 (the reference) stays exact, as
    the stream's anchor latent is the encoded image. All randomness comes from `seed` (numpy + a
    torch.Generator), not the global RNG."""
    rng, g, dev = np.random.default_rng(seed), torch.Generator().manual_seed(seed), device_of(ae)
    ae.requires_grad_(False)
    codes = frame_codes(ae, clips)                                           # [N, T, code, h, w]
    params = list(ae.decoder.parameters()) + (list(ae.context.parameters()) if ae.context is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    std = torch.tensor(code_std[:ae.code], dtype=torch.float32, device=dev).view(1, 1, -1, 1, 1)
    latents = (ae.earlier + ae.later + ae.group) // ae.group + 1              # at most this many latents per sample
    ae.train()
    start, losses = time.perf_counter(), []
    for step in tqdm(range(steps), desc="decoder", unit="step"):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50, floor=0.05)
        c = torch.from_numpy(rng.integers(0, len(clips), batch))
        t = torch.from_numpy(rng.integers(1, codes.shape[1], batch))
        index, mask = frame_context(ae, t, codes.shape[1])
        x = codes[c[:, None], index].to(dev)                                 # [B, span, code, h, w]
        latent = latent_of(index, ae.group)                                  # latent of each code
        shared = torch.randn((batch, latents, *x.shape[2:]), generator=g)
        shared = shared[torch.arange(batch)[:, None], latent - latent.min(1, keepdim=True).values].to(dev)
        noisy = x + std * (noise * randn(x.shape, g, dev) + latent_noise * shared)
        noisy = torch.where((latent == 0).to(dev)[:, :, None, None, None], x, noisy)
        target = to_pixels(clips.frames[c.numpy(), t.numpy()], dev)
        loss = pixel_loss(decode_with_context(ae, noisy, mask.to(dev)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ae.eval().requires_grad_(False)
    info = dict(steps=steps, noise=noise, latent_noise=latent_noise, context=[ae.earlier, ae.later],
                seconds=round(time.perf_counter() - start, 1),
                final_loss=float(np.mean(losses[-50:])) if losses else None)
    log(f"decoder: {info}")
    return info


@torch.no_grad()
def evaluate_ae(ae, clips: ClipSet, n: int = 512, seed: int = 1) -> float:
    """PSNR (dB) of reconstructions of n random frames, each decoded with its clean context."""
    rng = np.random.default_rng(seed)
    c = torch.from_numpy(rng.integers(0, len(clips), n))
    f = torch.from_numpy(rng.integers(0, clips.frames.shape[1], n))
    ys, dev = [], device_of(ae)
    for i in range(0, n, 64):
        index, mask = frame_context(ae, f[i:i + 64], clips.frames.shape[1])
        frames = clips.frames[c[i:i + 64, None].numpy(), index.numpy()].reshape(-1, *clips.frames.shape[2:])
        codes = ae.encode_frames(to_pixels(frames, dev)).unflatten(0, index.shape)
        ys.append(decode_with_context(ae, codes, mask.to(dev)).clamp(-1, 1).cpu())
    return psnr(torch.cat(ys), to_pixels(clips.frames[c.numpy(), f.numpy()]))


@torch.no_grad()
def code_statistics(ae, clips: ClipSet, n: int = 2048, seed: int = 2, group: int = 4):
    """Per-channel mean/std of raw codes over n training frames, repeated for the `group` frames of a latent."""
    x = random_frames(clips, n, np.random.default_rng(seed), device_of(ae))
    codes = torch.cat([ae.encode_frames(x[i:i + 128]) for i in range(0, n, 128)])       # [n, c, h, w]
    mean = codes.mean(dim=(0, 2, 3)).tolist()
    std = codes.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(mean * group), tuple(std * group)
