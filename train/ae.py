"""Training of the toy-talker's per-frame autoencoder (runtime/frame_ae.py) and its latent statistics.

Loss on random training frames: MSE + 0.5 L1 on pixels in [-1, 1] + 1e-4 |code|^2, with Gaussian noise added to
the codes (decaying from `noise` to 0) so the decoder tolerates the small latent errors a one-step DiT makes.
AdamW with a one-cycle (warm-up, cosine) learning rate. After training, the per-code-channel mean and std over
the training set become ModelConfig.latent_mean/std (repeated for the 4 frames of a latent), so the DiT sees
unit-variance latents as with Wan's VAE statistics. Then `harden_decoder` fine-tunes the decoder alone on codes
with a fixed amount of noise, so the DiT's small per-frame latent errors do not show as flicker.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from .data import ClipSet, to_pixels
from .teacher import cosine_lr


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def pixel_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE + 0.5 L1 on pixels in [-1, 1]: the reconstruction loss of both autoencoder phases."""
    return (y - x).pow(2).mean() + 0.5 * (y - x).abs().mean()


def random_frames(clips: ClipSet, n: int, rng: np.random.Generator) -> torch.Tensor:
    c = rng.integers(0, len(clips), n)
    f = rng.integers(0, clips.frames.shape[1], n)
    return to_pixels(clips.frames[c, f])                                     # [n, 3, H, W]


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
        x = random_frames(clips, batch, rng)
        code = ae.encode_frames(x)
        sigma = noise * max(0.0, 1 - step / (0.8 * max_steps))
        y = ae.decode_frames(code + sigma * torch.randn_like(code))
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


def harden_decoder(ae, clips: ClipSet, code_std, *, steps: int, noise: float = 0.2, batch: int = 32,
                   lr: float = 5e-4, seed: int = 0, log=print) -> dict:
    """Fine-tune the decoder alone (the encoder, hence the latent space the DiT learns, is frozen) on codes with
    Gaussian noise of `noise` x each channel's std (`code_std`, raw code units). A one-step DiT's latent error is
    small (RMS ~0.04 std, the student's final regression loss) but independent per frame, and a decoder trained
    on clean codes turns it into frame-to-frame flicker (0.02 std of noise on ground-truth codes raised flicker
    from 0.47 to 1.03); trained on noisy codes it maps a neighbourhood of a code to one image, at a small cost in
    PSNR. All randomness comes from `seed` (numpy + a torch.Generator), not the global RNG."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    params = list(ae.decoder.parameters())
    ae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    std = torch.tensor(code_std[:ae.code], dtype=torch.float32).view(1, -1, 1, 1)
    ae.train()
    start, losses = time.perf_counter(), []
    for step in tqdm(range(steps), desc="decoder", unit="step"):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50, floor=0.05)
        x = random_frames(clips, batch, rng)
        with torch.no_grad():
            code = ae.encode_frames(x)
        y = ae.decode_frames(code + noise * std * torch.randn(code.shape, generator=g))
        loss = pixel_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ae.eval().requires_grad_(False)
    info = dict(steps=steps, noise=noise, seconds=round(time.perf_counter() - start, 1),
                final_loss=float(np.mean(losses[-50:])) if losses else None)
    log(f"decoder: {info}")
    return info


@torch.no_grad()
def evaluate_ae(ae, clips: ClipSet, n: int = 512, seed: int = 1) -> float:
    """PSNR (dB) of reconstructions of n random frames."""
    x = random_frames(clips, n, np.random.default_rng(seed))
    y = torch.cat([ae.decode_frames(ae.encode_frames(x[i:i + 64])).clamp(-1, 1) for i in range(0, n, 64)])
    return psnr(y, x)


@torch.no_grad()
def code_statistics(ae, clips: ClipSet, n: int = 2048, seed: int = 2, group: int = 4):
    """Per-channel mean/std of raw codes over n training frames, repeated for the `group` frames of a latent."""
    x = random_frames(clips, n, np.random.default_rng(seed))
    codes = torch.cat([ae.encode_frames(x[i:i + 128]) for i in range(0, n, 128)])       # [n, c, h, w]
    mean = codes.mean(dim=(0, 2, 3)).tolist()
    std = codes.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(mean * group), tuple(std * group)
