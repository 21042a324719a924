"""Two-stage streaming distillation of the toy-talker: ODE backfill + regression, then DMD on rollouts.

Stage 1. The teacher samples short clips (history + window latents) with Euler steps and the state of every frame
is recorded EXACTLY at the stream's noise levels (a partial step inside the grid segment that contains the level).
The one-step student then regresses the teacher's x0 of a window whose frames sit at their own levels:

    [anchor (t = 0, zero audio) | W clean history frames (t = 0) | window: oldest at the lowest level ... newest at 1]

in ONE DiT call with a block-causal frame mask: the anchor attends to itself, a history frame to the anchor and the
history up to itself, the window to everything. With the stream's relative positions (anchor 0, history 1..W,
window W+1..) this is exactly what the cached streaming computation does (`one_pass` is checked against
StreamSession in tests/test_train.py), so training and inference share one definition. Ramp-up windows (no history,
fewer frames at the last levels) and tail windows (fewer frames at the first levels) are trained too.

Stage 2. DMD on rolling-window rollouts of the student through the runtime's own StreamSession: a few windows
without gradients, then one window with them (mixed-window backpropagation), x0 re-noised to a random level,
gradient = (fake score x0 - real score x0) / mean |x0 - real| with the teacher as the real score (audio CFG) and a
critic (initialised from the teacher, trained by flow matching on the student's windows) as the fake score.

Not here: the teacher itself (train/teacher.py), data (train/data.py), the gate and shipping (train/toy.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime.config import StreamConfig
from runtime.scheduler import sigma_for, step_plan, warped_timesteps

from .teacher import conditioning, flow, randn, sample, shift, teacher_flow


def stream_sigmas(stream: StreamConfig) -> list[float]:
    """The stream's noise levels as sigmas (float32 table values), noisiest first: [1, .952, .769, .556]."""
    return [sigma_for(t, stream.shift) for t in warped_timesteps(stream)]


# ---------------------------------------------------------------------------------------------- backfill
@torch.no_grad()
def backfill(teacher, text, ref: Tensor, audio: Tensor, frames: int, levels: list[float],
             generator: torch.Generator, steps: int = 8, cfg_scale: float = 1.0) -> dict:
    """Teacher trajectories for `frames` consecutive latents: {"x0": [B,16,F,h,w], "states": [len(levels), B,
    16, F, h, w]} with states[i] the ODE state exactly at sigma = levels[i] (states at 1.0 are the drawn noise).
    `cfg_scale` > 1 follows the audio-guided flow (the teacher was trained with audio dropped 10% of the time)."""
    x0, recorded = sample(teacher, text, ref, audio, frames, generator, steps=steps, cfg_scale=cfg_scale,
                          record_levels=tuple(levels))
    return {"x0": x0, "states": torch.stack([recorded[lv] for lv in levels])}


# ---------------------------------------------------------------------------------------------- one pass
def block_causal_mask(history: int, window: int, tokens_per_frame: int) -> Tensor:
    """Bool [S, S] over [anchor | history | window] frames: True = may attend."""
    n = 1 + history + window
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[0, 0] = True                                          # the anchor pass sees only itself
    for i in range(1, 1 + history):                               # a cache pass sees anchor + earlier history
        allowed[i, :i + 1] = True
    allowed[1 + history:] = True                                  # the window sees everything
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def one_pass(student, text, ref: Tensor, history: Tensor, window: Tensor, sigmas: Tensor, audio: dict) -> Tensor:
    """x0 of the window frames from one masked call.

    ref [B,16,1,h,w]; history [B,16,W,h,w] clean; window [B,16,F,h,w] noisy at per-frame sigmas [F];
    audio {"history": [B,4W,A], "window": [B,4F,A]}. Positions: anchor 0, history 1..W, window W+1..W+F."""
    B, W, F, dev = ref.shape[0], history.shape[2], window.shape[2], window.device
    sigmas = sigmas.to(dev)
    x = torch.cat([ref, history, window], 2)
    t = torch.cat([torch.zeros(B, 1 + W, device=dev), (sigmas * 1000).view(1, F).expand(B, F)], 1)
    rows = torch.cat([torch.zeros(B, 4, audio["window"].shape[-1], device=dev), audio["history"], audio["window"]], 1)
    mask = block_causal_mask(W, F, student.cfg.tokens_per_frame).to(dev)
    v = flow(student, text, x, conditioning(ref, W + F), t, rows, range(1 + W + F), mask=mask)[:, :, 1 + W:]
    return window - sigmas.view(1, 1, F, 1, 1) * v


def ode_example(traj: dict, ref: Tensor, audio: Tensor, levels: list[float], history: int, kind: str) -> dict:
    """Build one regression example from backfilled trajectories of H + L frames (history first).

    kind "steady": full history, window of L frames at levels oldest = lowest ... newest = 1.0;
    "rampup": no history, k < L frames at the last k levels (the stream's first windows);
    "tail": full history, k < L frames at the first k levels (the windows after the audio ends)."""
    L = len(levels)
    states, x0 = traj["states"], traj["x0"]                         # [L, B, 16, H + L, h, w], [B, 16, H + L, h, w]
    frames = L if kind == "steady" else int(torch.randint(1, L, ()).item())
    if kind == "rampup":
        order = list(range(frames - 1, -1, -1))                     # oldest at level k-1 ... newest at level 0
        hist = x0[:, :, :0]
        first = history
    else:
        order = list(range(L - 1, L - 1 - frames, -1))              # oldest at the lowest level
        hist = x0[:, :, :history]
        first = history
    window = torch.stack([states[lv, :, :, first + i] for i, lv in enumerate(order)], 2)
    sig = torch.tensor([levels[lv] for lv in order])
    w_audio = audio[:, 4 * first:4 * (first + frames)]
    h_audio = audio[:, 4 * (first - hist.shape[2]):4 * first]
    return dict(ref=ref, history=hist, window=window, sigmas=sig, target=x0[:, :, first:first + frames],
                audio={"history": h_audio, "window": w_audio})


def ode_loss(student, text, ex: dict, weight: Tensor | None = None) -> Tensor:
    """MSE of the student's x0 against the teacher's; `weight` [h, w] (mean 1) weights latent cells, e.g. more
    on the mouth (`latent_weight`)."""
    x0 = one_pass(student, text, ex["ref"], ex["history"], ex["window"], ex["sigmas"], ex["audio"])
    err = (x0 - ex["target"]).pow(2)
    return err.mean() if weight is None else (err * weight.to(err.device)).mean()


def latent_weight(region, latent_hw: tuple[int, int], extra: float) -> Tensor:
    """A loss weight [h, w] over latent cells with mean 1: 1 + extra x the pixel `region` [H, W] in [0, 1]
    averaged over each cell (max-normalised), so the cells where the mouth moves count (1 + extra) times as much
    as still ones before normalising."""
    region = torch.as_tensor(region, dtype=torch.float32)[None, None]
    cells = torch.nn.functional.adaptive_avg_pool2d(region, latent_hw)[0, 0]
    w = 1 + extra * cells / cells.max()
    return w / w.mean()


# ---------------------------------------------------------------------------------------------- DMD
def rollout_window(pipe, image, feats: Tensor, stream: StreamConfig, windows: int, seed: int):
    """Roll the student (pipe.dit) through `windows` steps of a real StreamSession without gradients, then
    return the next steady window's inputs and its x0 computed WITH gradients: (x0 [1,16,F,h,w], ref, audio)."""
    sess = pipe.session(image, stream=stream, seed=seed, engine=False, inference=False)
    per_window = 4 * stream.block_frames
    need = per_window * (windows + 1)
    sess.push_features(feats[:need - per_window])                  # runs `windows` steps
    sess.source.push(feats[need - per_window:need].float())        # the graded window's rows, without a step
    state = sess.state
    sp = step_plan(stream, sess.next_window, None, state.levels_t)
    if sp.fresh_block is not None:
        state.noisy[sp.fresh_block] = state.fresh_block(sp.fresh_block)
    x = torch.cat([state.noisy[b] for b in sp.blocks], dim=2)
    audio = sess.rows(*sp.passes[0].audio_rows)
    with torch.enable_grad():
        x0 = sess.reference.dit_pass(x, sp.passes[0], audio).float()
    return x0, state.z_ref.detach(), audio.detach()


def dmd_losses(student_x0: Tensor, ref: Tensor, audio: Tensor, teacher, critic, text, critic_text,
               generator: torch.Generator, cfg_scale: float = 2.0) -> tuple[Tensor, Tensor]:
    """(generator loss, critic loss) for a batch of student windows x0 [B,16,F,h,w] with their audio rows."""
    B, dev = student_x0.shape[0], student_x0.device
    sigma = shift(0.02 + 0.96 * torch.rand(B, generator=generator)).to(dev)
    eps = randn(student_x0.shape, generator, dev)
    s = sigma.view(B, 1, 1, 1, 1)
    xt = (1 - s) * student_x0.detach() + s * eps
    with torch.no_grad():
        v_cond = teacher_flow(teacher, text, ref, xt, sigma, audio)
        v_unc = teacher_flow(teacher, text, ref, xt, sigma, torch.zeros_like(audio))
        real = xt - s * (v_unc + cfg_scale * (v_cond - v_unc))
        fake = xt - s * teacher_flow(critic, critic_text, ref, xt, sigma, audio)
        grad = (fake - real) / (student_x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    gen_loss = 0.5 * (student_x0 - (student_x0 - grad).detach()).pow(2).mean()
    # critic: flow matching on the (detached) student distribution
    sig_c = torch.rand(B, generator=generator).clamp(0.02, 1.0).to(dev)
    eps_c = randn(student_x0.shape, generator, dev)
    sc = sig_c.view(B, 1, 1, 1, 1)
    xt_c = (1 - sc) * student_x0.detach() + sc * eps_c
    v = teacher_flow(critic, critic_text, ref, xt_c, sig_c, audio)
    critic_loss = (v - (eps_c - student_x0.detach())).pow(2).mean()
    return gen_loss, critic_loss
