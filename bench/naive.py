"""The official AvatarForcing loop written plainly: the baseline that tests and benchmarks compare against.

What makes it naive, on purpose, like the released code: absolute RoPE frames (the anchor re-rotated from its raw K
at every use), post-RoPE history kept in a growing Python list and concatenated in every layer of every call, a
device counter read back with `.item()` in every layer (the official cache bookkeeping), and the whole video decoded
at the end. It shares only the DiT module (weights and block math) with the runtime, not its plan, cache or session
code, so it is an independent check of all three. B = 4, L = 4, two history frames, the official timesteps.
"""
from __future__ import annotations

import torch

from runtime.rope import apply_rope, grid_positions, rope_cos_sin

LEVELS = (1000.0, 952.3810424804688, 769.2307739257812, 555.5556030273438)


def _sigma_table():
    u = torch.linspace(1.0, 0.0, 1001)[:-1]
    return 5 * u / (1 + 4 * u)


def naive_official(pipe, z_ref, context_kv, feats, n_blocks: int, seed: int, noise_upfront: bool = False,
                   sync_counters: bool = False, decode: bool = False):
    """Run the official loop; returns {block: x0 latents} (and the decoded video if `decode`).

    feats [A, width] audio feature rows (no zero row); `noise_upfront`: all fresh noise drawn as one [N-1, 16, h, w]
    tensor first (the official script's order) instead of per block as it enters; `sync_counters`: read a device
    counter with .item() in every layer, as the official cache code does (for op-count and timing baselines).
    """
    dit, cfg = pipe.dit, pipe.config
    B, L, W, S = 4, 4, 2, cfg.tokens_per_frame
    dev, dt = z_ref.device, z_ref.dtype
    sig_table = _sigma_table()

    def sigma(t):
        return float(sig_table[torch.argmin((sig_table.double() * 1000 - t).abs())])

    def rope(frames):
        return rope_cos_sin(grid_positions(frames, cfg.grid_hw), cfg.head_dim, dev)

    gen = torch.Generator(dev).manual_seed(seed)
    h, w = cfg.latent_hw
    upfront = torch.randn(n_blocks * B, 16, h, w, generator=gen, device=dev, dtype=dt) if noise_upfront else None
    rows = torch.cat([torch.zeros(1, feats.shape[1]), feats]).unsqueeze(0).to(device=dev, dtype=dt)
    y = torch.cat([z_ref, torch.ones_like(z_ref[:, :1])], 1)
    counter = torch.zeros((), dtype=torch.long, device=dev)
    anchor, history = {}, {i: [] for i in range(cfg.num_layers)}
    dit(z_ref, torch.cat([z_ref, torch.zeros_like(z_ref[:, :1])], 1), torch.zeros(1, 1, device=dev),
        torch.zeros(1, 4, feats.shape[1], device=dev, dtype=dt), context_kv, rope([0]),
        kv_sink=lambda i, k, v: anchor.__setitem__(i, (k, v)))

    def prefix_at(anchor_frame, n_hist):
        def prefix(i):
            if sync_counters:
                counter.add_(1).item()        # the official loop reads its cache indices back every layer
            ks, vs = [apply_rope(anchor[i][0], *rope([anchor_frame]))], [anchor[i][1]]
            if n_hist:
                ks.append(torch.cat([k for k, _ in history[i]], 1)[:, -n_hist * S:])
                vs.append(torch.cat([v for _, v in history[i]], 1)[:, -n_hist * S:])
            return torch.cat(ks, 1), torch.cat(vs, 1)
        return prefix

    noisy, out = {}, {}
    for wi in range(n_blocks + L - 1):
        sb, eb = max(0, wi - L + 1), min(n_blocks - 1, wi)
        fs, fe = 1 + B * sb, 1 + B * (eb + 1)
        if eb == wi:
            fresh = upfront[B * eb:B * (eb + 1)] if noise_upfront else \
                torch.randn(B, 16, h, w, generator=gen, device=dev, dtype=dt)
            noisy[eb] = fresh.permute(1, 0, 2, 3).unsqueeze(0)
        x = torch.cat([noisy[b] for b in range(sb, eb + 1)], 2)
        ts = [LEVELS[wi - b] for b in range(sb, eb + 1) for _ in range(B)]
        n_hist = 0 if fs == 1 else W
        flow = dit(x, y.expand(-1, -1, fe - fs, -1, -1), torch.tensor([ts], device=dev), rows[:, 4 * fs - 3:4 * fe - 3],
                   context_kv, rope(range(fs, fe)), prefix=prefix_at(fs - n_hist - 1, n_hist))
        sig = torch.tensor([sigma(t) for t in ts], dtype=torch.float64, device=dev).view(1, 1, -1, 1, 1)
        x0 = (x.double() - sig * flow.double()).to(dt)
        for b in range(sb, eb + 1):
            j = wi - b
            if j < L - 1:
                eps = torch.randn(fe - fs, 16, h, w, generator=gen, device=dev, dtype=dt)
                eps = eps.permute(1, 0, 2, 3).unsqueeze(0)
                s = torch.tensor(sigma(LEVELS[j + 1]), device=dev)
                i0 = B * (b - sb)
                noisy[b] = ((1 - s) * x0[:, :, i0:i0 + B].float() + s * eps[:, :, i0:i0 + B].float()).to(dt)
        if wi >= L - 1:
            out[sb] = x0[:, :, :B]
            if wi < n_blocks + L - 2:
                def store(i, k, v, frames=range(fs, fs + B)):
                    history[i].append((apply_rope(k, *rope(frames)), v))
                dit(x0[:, :, :B], y.expand(-1, -1, B, -1, -1), torch.zeros(1, B, device=dev),
                    rows[:, 4 * fs - 3:4 * (fs + B) - 3], context_kv, rope(range(fs, fs + B)),
                    prefix=prefix_at(0, n_hist), kv_sink=store)
    if not decode:
        return out
    latents = torch.cat([z_ref] + [out[b] for b in range(n_blocks)], dim=2)
    return out, pipe.vae.decode(latents.to(pipe.vae_dtype))
