"""Train the toy-talker end to end with the paper's method, and package it as the runtime's default model.

    python -m train.toy --out DIR [--device cpu|cuda] [--students ode,ode-cfg,ode-cfg-mouth] [--clips 600]
                        [--seed 0] [--threads 2] [--minutes-per-stage ae=10,teacher=35,ode=10,dmd=12] [--install]
    python -m train.toy --out DIR --stop-after teacher        # then: --out DIR2 --resume DIR (same options)
    python -m train.toy --out DIR --harden-decoder SRC [--install]

Stages (reference/toy-talker-plan.md is the measured plan this follows): synthetic data (train/synth.py) ->
per-frame autoencoder (FrameAE) and latent / log-mel statistics -> bidirectional flow-matching teacher (audio
dropped 10% of the time) -> ODE backfill at the exact stream noise levels, with each student's audio guidance ->
stage 1, ODE regression of each one-step student (one masked pass = the cached streaming computation), with the
loss weighted on the mouth for some -> optionally stage 2, DMD on rollouts of the runtime's StreamSession with a
critic (`STUDENTS`) -> the decoder hardened against the DiT's latent noise, with its temporal context trained
(encoder frozen, so it changes nothing the DiT learned; `--harden-decoder SRC` runs only this step on a model
trained before it existed) -> quality metrics of every student and of the installed toy-talker (`--baseline`) on
unseen identities -> a gate that ships the student with the widest mouth among those that articulate at least as
well as the baseline and meet the identity, drift and flicker targets (`gate`, `TARGETS`); if none does, the run
ends without writing a model.
Every stage uses the runtime's own AvatarDiT, FrameAE, log-mel extractor, scheduler and session.

Output: DIR/toy-talker.safetensors (fp16: DiT, autoencoder, text context), DIR/toy-talker.json (ModelConfig with
the measured statistics, StreamConfig, every student's metrics, the gate's reasons, timings, sha256 manifest),
reference faces and a speech clip; DIR/stages/teacher.pt keeps the fp32 teacher (with its text context, the
autoencoder and the run's random state: `--resume` continues from it) and DIR/stages/<student>.pt each student;
`--install` copies the model to runtime/assets/toy/. Deterministic per seed and thread count on one machine
(espeak-ng's version and CPU float paths differ across machines; the manifest records both).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.config import TOY_ASSETS, ModelConfig, StreamConfig
from runtime.dit import AvatarDiT, init_random_
from runtime.frame_ae import FrameAE

from . import ae as ae_stage
from .data import Batches, device_of, encode_latents, logmel_rows, logmel_stats, make_clips, normalise_rows
from .distill import backfill, dmd_losses, latent_weight, ode_example, ode_loss, rollout_window, stream_sigmas
from .synth import espeak_version, mouth_region, sha256_file
from .teacher import EMA, TextEmbedding, cosine_lr, teacher_loss

# Stages run a fixed number of steps, so a run is deterministic per seed and thread count; --minutes-per-stage
# adds a wall-clock cap (a quick run then depends on the machine's speed; the manifest records the steps done).
DEFAULT_STEPS = dict(ae=3000, decoder=2400, teacher=3000, ode=600, dmd=500)
NO_TIME_CAP = 1e9
STREAM = "low-delay"                          # B = 1 latent, L = 4, N = 1, re-indexed anchor: 0.48 s look-ahead
# The students a run can train, by name: stage 1 (ODE regression) on teacher trajectories sampled with audio
# guidance `cfg` (1 = none), its loss weighted up to 1 + `mouth` times more on the latent cells where the mouth
# moves (0 = plain MSE); or stage 2 (DMD) from the stage-1 student `source`. The gate compares each with the
# baseline (`gate`).
STUDENTS = {
    "ode": dict(cfg=1.0, mouth=0.0, source=None),          # the first toy-talker's student
    "ode-cfg": dict(cfg=4.5, mouth=0.0, source=None),
    "ode-mouth": dict(cfg=1.0, mouth=4.0, source=None),
    "ode-cfg-mouth": dict(cfg=4.5, mouth=4.0, source=None),
    "dmd": dict(source="ode"),
    "dmd-cfg-mouth": dict(source="ode-cfg-mouth"),
}
DEFAULT_STUDENTS = "ode-cfg-mouth"
# The targets on unseen identities (README, bench.quality), relative ones against the ground truth of the same
# streams. The gate enforces identity, drift and flicker; articulation and lip-sync are recorded with the metrics.
TARGETS = dict(identity=0.99, drift=1.5, flicker=2.0, mouth_amplitude=0.9, mouth_amplitude_worst=0.7,
               sync_fraction=0.9)


def parse_minutes(text: str | None) -> dict:
    minutes = dict(ae=NO_TIME_CAP, teacher=NO_TIME_CAP, backfill=NO_TIME_CAP, ode=NO_TIME_CAP, dmd=NO_TIME_CAP)
    if text:
        for part in text.split(","):
            if "=" in part:
                k, v = part.split("=")
                if k.strip() not in minutes:
                    raise ValueError(f"unknown stage {k!r} in --minutes-per-stage; stages: {', '.join(minutes)}")
                minutes[k.strip()] = float(v)
            else:
                minutes = {k: float(part) for k in minutes}
    return minutes


def training_device(name: str) -> torch.device:
    """The device every stage runs on. The stages draw their random numbers from CPU generators (then move them),
    so a CUDA run trains on the data, noise and initial weights a CPU run with the same seed uses; the StreamSession
    rollouts of DMD and the metrics' streams draw their noise on the device, as the runtime does. Float results
    differ across devices (other kernels, non-deterministic reductions in some backward passes): only CPU runs are
    byte-reproducible."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.toy: --device cuda needs a CUDA build of torch and a visible GPU "
                         f"(torch {torch.__version__} sees none here); run with --device cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def timed_loop(name: str, minutes: float, cap: int, step_fn, log) -> dict:
    """Run step_fn(step) until the time budget or the step cap; tqdm progress with the running loss."""
    start, losses, step = time.perf_counter(), [], 0
    deadline = start + 60 * minutes
    with tqdm(total=cap, desc=name, unit="step") as bar:
        while step < cap and time.perf_counter() < deadline:
            losses.append(float(step_fn(step)))
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4g}")
    info = dict(steps=step, seconds=round(time.perf_counter() - start, 1),
                final_loss=float(np.mean(losses[-50:])) if losses else None)
    log(f"{name}: {info}")
    return info


# ---------------------------------------------------------------------------------------------- stages
def train_teacher(cfg, batches: Batches, minutes, cap, seed, log):
    # built and initialised on the CPU, then moved: the same initial weights on every device
    teacher = init_random_(AvatarDiT(cfg), seed).to(batches.device).train().requires_grad_(True)
    with torch.no_grad():                              # zero-init output head: start from v = bias ~ 0
        teacher.head.head.weight.zero_()
    text = TextEmbedding(cfg.text_len, cfg.text_dim).to(batches.device)
    params = list(teacher.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    ema, ema_text = EMA(teacher, 0.998), EMA(text, 0.998)
    g = torch.Generator().manual_seed(seed + 11)

    def step(i):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, cap, 5e-4, warmup=100, floor=0.2)
        frames = 4 if torch.rand((), generator=g) < 0.7 else 6
        loss = teacher_loss(teacher, text, batches.window(16, frames), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(teacher)
        ema_text.update(text)
        return loss.item()

    info = timed_loop("teacher", minutes, cap, step, log)
    return ema.model, ema_text.model, info


def run_backfill(teacher, text, batches: Batches, levels, minutes, count, seed, log, history=2, window=4,
                 cfg_scale: float = 1.0):
    """`count` teacher trajectories of history + window frames (batches of 16), with audio guidance `cfg_scale`."""
    g = torch.Generator().manual_seed(seed + 21)
    out, start = [], time.perf_counter()
    for _ in tqdm(range(0, count, 16), desc=f"backfill cfg {cfg_scale:g}", unit="batch"):
        if time.perf_counter() - start > 60 * minutes:
            break
        b = batches.window(16, history + window)
        traj = backfill(teacher, text, b["ref"], b["audio"], history + window, levels, g, cfg_scale=cfg_scale)
        out.append(dict(ref=b["ref"].half(), audio=b["audio"].half(), x0=traj["x0"].half(),
                        states=traj["states"].half()))
    log(f"backfill (cfg {cfg_scale:g}): {16 * len(out)} trajectories in {time.perf_counter() - start:.1f} s")
    return out


def train_ode(teacher, text, trajectories, levels, minutes, cap, seed, log, weight=None, name="ode"):
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 31)

    def step(i):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, cap, 1e-4, warmup=50, floor=0.2)
        t = trajectories[int(torch.randint(0, len(trajectories), (), generator=g))]
        kind = ["steady", "steady", "steady", "steady", "steady", "steady", "steady", "steady", "rampup", "tail"][
            int(torch.randint(0, 10, (), generator=g))]
        ex = ode_example({"x0": t["x0"].float(), "states": t["states"].float()}, t["ref"].float(),
                         t["audio"].float(), levels, history=2, kind=kind)
        loss = ode_loss(student, text, ex, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return loss.item()

    info = timed_loop(name, minutes, cap, step, log)
    return student.eval().requires_grad_(False), info


def train_dmd(ode_student, teacher, text, make_pipe, clips, rows, stream, minutes, cap, seed, log):
    student = copy.deepcopy(ode_student).train().requires_grad_(True)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    critic_text = copy.deepcopy(text).requires_grad_(False)
    opt_g = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.0, 0.999))
    opt_c = torch.optim.AdamW(critic.parameters(), lr=2e-4, betas=(0.0, 0.999))
    pipe = make_pipe(student)
    g = torch.Generator().manual_seed(seed + 41)

    def step(i):
        xs, refs, audios = [], [], []
        for _ in range(4):
            c = int(torch.randint(0, len(clips), (), generator=g))
            windows = int(torch.randint(3, 8, (), generator=g))
            x0, ref, audio = rollout_window(pipe, clips.frames[c, 0], rows[c], stream, windows,
                                            seed=int(torch.randint(0, 2 ** 31, (), generator=g)))
            xs.append(x0)
            refs.append(ref.float())
            audios.append(audio.float())
        x0, ref, audio = torch.cat(xs), torch.cat(refs), torch.cat(audios)
        gen_loss, critic_loss = dmd_losses(x0, ref, audio, teacher, critic, text, critic_text, g)
        opt_g.zero_grad(set_to_none=True)
        gen_loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()
        for _ in range(2):                                  # critic steps on the same (detached) windows
            _, critic_loss = dmd_losses(x0.detach(), ref, audio, teacher, critic, text, critic_text, g)
            opt_c.zero_grad(set_to_none=True)
            critic_loss.backward()
            opt_c.step()
        return gen_loss.item()

    info = timed_loop("dmd", minutes, cap, step, log)
    return student.eval().requires_grad_(False), info


def teacher_recipe(args, caps: dict, minutes: dict) -> dict:
    """Everything the autoencoder and teacher stages depend on: a saved teacher is reused only for the same."""
    return dict(seed=args.seed, threads=args.threads, clips=args.clips, seconds=args.seconds, device=args.device,
                ae_steps=caps["ae"], teacher_steps=caps["teacher"], ae_minutes=minutes["ae"],
                teacher_minutes=minutes["teacher"], torch=str(torch.__version__))


def save_teacher(path: Path, recipe: dict, teacher, text, ae, batches: Batches, timings: dict) -> None:
    """The teacher stage's result with what later stages read from the run's state: the autoencoder (statistics
    included), the global torch RNG and the batch sampler's generator, so --resume continues the same run."""
    torch.save({"recipe": recipe, "dit": cpu_state(teacher), "text": cpu_state(text), "ae": cpu_state(ae),
                "rng": torch.get_rng_state(), "batches_rng": batches.g.get_state(),
                "timings": {k: timings[k] for k in ("ae", "teacher")}}, path)


def load_teacher_stage(src: Path, recipe: dict) -> dict:
    path = src / "stages" / "teacher.pt"
    if not path.is_file():
        raise SystemExit(f"train.toy: --resume {src}: no {path}; a run writes it once its teacher is trained "
                         "(--stop-after teacher ends a run there)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("recipe") != recipe:
        before = saved.get("recipe") or {}
        diff = {k: (before.get(k), v) for k, v in recipe.items() if before.get(k) != v}
        raise SystemExit(f"train.toy: --resume {src}: its teacher was trained on another recipe (saved, now): "
                         f"{diff}; run with the same options, or without --resume")
    return saved


def resumed_teacher(saved: dict, cfg: ModelConfig, batches: Batches, device):
    """The saved teacher and text context on `device`, with the run's random state as it was after the teacher."""
    teacher = AvatarDiT(cfg).to(device).eval().requires_grad_(False)
    teacher.load_state_dict(saved["dit"])
    text = TextEmbedding(cfg.text_len, cfg.text_dim).to(device).requires_grad_(False)
    text.load_state_dict(saved["text"])
    torch.set_rng_state(saved["rng"])
    batches.g.set_state(saved["batches_rng"])
    return teacher, text, saved["timings"]["teacher"]


# ---------------------------------------------------------------------------------------------- gate + ship
def gate(scores: dict, baseline: str) -> tuple[str, dict]:
    """Ship the student with the widest mouth (mean articulation) among those that meet the identity, drift and
    flicker targets and articulate at least as well as `baseline` (mean and worst identity); the baseline itself
    ships if none does. Returns (choice, {student: why it passed or failed})."""
    base = scores[baseline]
    reasons = {}
    for name, m in scores.items():
        checks = {"identity": m["identity"] >= TARGETS["identity"],
                  "drift": m["de2000_last10"] <= TARGETS["drift"] * m["de2000_first"],
                  "flicker": m["flicker"] <= TARGETS["flicker"] * m["flicker_truth"]}
        if name != baseline:
            checks["articulation"] = (m["mouth_amplitude"] >= base["mouth_amplitude"]
                                      and m["mouth_amplitude_worst"] >= base["mouth_amplitude_worst"])
        failed = [k for k, ok in checks.items() if not ok]
        reasons[name] = "passed" if not failed else "failed " + ", ".join(failed)
    better = [k for k in scores if k != baseline and reasons[k] == "passed"]
    return (max(better, key=lambda k: scores[k]["mouth_amplitude"]) if better else baseline), reasons


class Evaluation:
    """The gate's yardstick: bench.quality's probes trained on their own clips; 8 s streams of unseen identities,
    each once with random speech and once saying bench.quality's fixed sentence, for lip-sync, articulation,
    identity and flicker; 60 s streams for drift (bench/quality.py defines the metrics)."""

    def __init__(self, clips: int, identities: int, smoke: bool):
        from bench.quality import PROBE_SEED0, VAL_SEED0, ground_truth, sentence_clips, train_probes
        from train.synth import make_clip
        self.probes = train_probes(make_clips(max(2, clips // 3), 4.0, PROBE_SEED0, desc="probe clips"))
        self.val = [make_clip(VAL_SEED0 + i, 8.0) for i in range(identities)]
        self.sentence = sentence_clips(identities)
        self.long = [make_clip(VAL_SEED0 + i, 8.0 if smoke else 60.0) for i in range(min(2, identities))]
        self.flicker_truth = ground_truth(self.probes, self.val + self.sentence)["flicker"]

    def score(self, pipe, stream: StreamConfig) -> dict:
        from bench.quality import evaluate
        # the reference loop (engine=False): the same computation on every device
        short = evaluate(pipe, stream, self.probes, self.val + self.sentence, engine=False)
        drift = evaluate(pipe, stream, self.probes, self.long, engine=False)
        return {**short, "de2000_first": short["de2000"], "de2000_last10": drift["de2000_last10"],
                "de2000_60s": drift["de2000"], "flicker_truth": self.flicker_truth}


def training_clips(n: int, seconds: float, seed: int):
    """The training set of a run with this seed (seeds seed x 10^6 ..), so --harden-decoder can rebuild it."""
    return make_clips(n, seconds, seed0=seed * 1_000_000, desc="training clips")


def ae_validation_clips(smoke: bool):
    from bench.quality import VAL_SEED0
    return make_clips(2 if smoke else 20, 4.0, VAL_SEED0 + 1000, desc="autoencoder validation clips")


def finish_decoder(ae: FrameAE, clips, cfg: ModelConfig, steps: int, args, seed: int, log) -> dict:
    """Harden the decoder and train its temporal context against the DiT's latent noise (train/ae.py) as the very
    last training step, on the autoencoder rounded to its shipped fp16 weights. The encoder is frozen and no DiT
    stage ran after it, so it changes nothing the DiT learned, and `--harden-decoder SRC` applied to a shipped
    model gives the bytes a full run gives."""
    with torch.no_grad():
        for p in ae.parameters():
            p.copy_(p.half().float())
    return ae_stage.harden_decoder(ae, clips, cfg.latent_std, steps=steps, noise=args.decoder_noise,
                                   latent_noise=args.decoder_latent_noise, seed=seed, log=log)


def toy_pipeline(cfg: ModelConfig, dit, ae: FrameAE, text_context):
    """An fp32 AvatarPipeline on the models' device over models in training (the runtime's own session runs
    them)."""
    from runtime.audio import LogMelFeatures
    from runtime.pipeline import AvatarPipeline, _EmbeddingText
    return AvatarPipeline(cfg, dit=dit, vae=ae, audio_encoder=LogMelFeatures.from_config(cfg),
                          text_encoder=_EmbeddingText(text_context), device=device_of(dit), dtype=torch.float32)


def cpu_state(module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_model(out: Path, cfg: ModelConfig, stream: StreamConfig, dit, ae, text, extra: dict) -> dict:
    from safetensors.torch import save_file
    tensors = {f"dit.{k}": v.half().contiguous() for k, v in cpu_state(dit).items()}
    tensors |= {f"ae.{k}": v.half().contiguous() for k, v in cpu_state(ae).items()}
    tensors["text.context"] = text.context.detach()[0].cpu().half().contiguous()
    save_file(tensors, out / "toy-talker.safetensors")
    meta = dict(model=cfg.to_dict(), stream=stream.to_dict(), **extra)
    meta["sha256"] = {"toy-talker.safetensors": sha256_file(out / "toy-talker.safetensors")}
    (out / "toy-talker.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.toy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--minutes-per-stage", default=None,
                   help="wall-clock cap per stage, 'ae=10,teacher=35,ode=10,dmd=12' or one number for all "
                        "(default: no cap; the fixed step counts make the run deterministic)")
    p.add_argument("--steps", default=None, help="steps per stage, e.g. 'ae=2500,teacher=3000,ode=600,dmd=500'")
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--trajectories", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-identities", type=int, default=8)
    p.add_argument("--students", default=DEFAULT_STUDENTS,
                   help=f"students to train, from: {', '.join(STUDENTS)} (default {DEFAULT_STUDENTS})")
    p.add_argument("--baseline", default=str(TOY_ASSETS),
                   help="the toy-talker the gate compares the students with, measured on the same yardstick "
                        "(default: the installed one; 'none' or a missing directory: the first student listed)")
    p.add_argument("--install", action="store_true", help="copy the result into runtime/assets/toy/")
    p.add_argument("--smoke", action="store_true",
                   help="a few minutes end to end (tiny data, 20 steps per stage)")
    p.add_argument("--decoder-noise", type=float, default=0.2,
                   help="code noise of the decoder step, independent per frame, in units of each code channel's "
                        "std (default 0.2)")
    p.add_argument("--decoder-latent-noise", type=float, default=0.2,
                   help="code noise of the decoder step shared by the four frames of a latent (default 0.2)")
    p.add_argument("--stop-after", choices=["teacher"], default=None,
                   help="end the run once the teacher is trained and saved in OUT/stages/teacher.pt")
    p.add_argument("--resume", metavar="SRC", default=None,
                   help="take the autoencoder and teacher from SRC/stages/teacher.pt, written by a run with the same "
                        "seed, threads, data and autoencoder/teacher steps, instead of training them again; the "
                        "later stages then compute what a full run computes")
    p.add_argument("--harden-decoder", metavar="SRC", default=None,
                   help="only the last step: harden the decoder of the toy-talker in SRC (its training clips are "
                        "regenerated from its manifest) and write the result to --out")
    args = p.parse_args(argv)
    args.students = [x.strip() for x in args.students.split(",") if x.strip()]
    for name in args.students:
        if name not in STUDENTS:
            p.error(f"unknown student {name!r} in --students; students: {', '.join(STUDENTS)}")
        source = STUDENTS[name]["source"]
        if source and source not in args.students[:args.students.index(name)]:
            p.error(f"--students: {name} is trained from {source}; list {source} before it")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    device = training_device(args.device)
    minutes = parse_minutes(args.minutes_per_stage)
    caps = dict(DEFAULT_STEPS)
    for part in filter(None, (args.steps or "").split(",")):
        k, v = part.split("=")
        if k not in caps:
            raise SystemExit(f"unknown stage {k!r} in --steps; stages: {', '.join(caps)}")
        caps[k] = int(v)
    if args.smoke:              # step caps only, so a smoke run is as deterministic as a full one
        caps = {k: min(v, 20) for k, v in caps.items()}
        args.clips, args.trajectories, args.eval_identities = 12, 32, 1
        args.baseline = "none"          # a smoke student cannot beat a trained model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("w")

    def log(msg):
        print(msg, file=sys.stderr)
        print(msg, file=log_file, flush=True)

    if args.harden_decoder:
        return harden_trained(Path(args.harden_decoder), out, caps["decoder"], args, device, log)

    seed_everything(args.seed, args.threads)
    timings, t_all = {}, time.perf_counter()
    base = ModelConfig.preset("toy-talker")
    stream = StreamConfig.preset(STREAM)

    # -- data --
    t0 = time.perf_counter()
    clips = training_clips(args.clips, args.seconds, args.seed)
    timings["data"] = round(time.perf_counter() - t0, 1)
    log(f"data: {len(clips)} clips x {args.seconds} s in {timings['data']} s, sha256 {clips.sha256()[:16]}")

    # -- autoencoder (or the one a run with the same recipe saved with its teacher) + statistics --
    recipe = dict(teacher_recipe(args, caps, minutes), data_sha256=clips.sha256())
    saved = load_teacher_stage(Path(args.resume), recipe) if args.resume else None
    torch.manual_seed(args.seed + 1)
    ae = FrameAE(base).to(device)
    if saved:
        ae.load_state_dict(saved["ae"])
        timings["ae"] = saved["timings"]["ae"]
    else:
        timings["ae"] = ae_stage.train_ae(ae, clips, minutes=minutes["ae"], max_steps=caps["ae"],
                                          seed=args.seed + 1, log=log)
    ae_psnr_train = ae_stage.evaluate_ae(ae, clips)
    ae_val = ae_validation_clips(args.smoke)
    ae_psnr = ae_stage.evaluate_ae(ae, ae_val)
    latent_mean, latent_std = ae_stage.code_statistics(ae, clips)
    rows_raw = logmel_rows(clips, base.logmel_bins)
    lm_mean, lm_std = logmel_stats(rows_raw, base.logmel_bins)
    cfg = ModelConfig.from_dict({**base.to_dict(), "latent_mean": latent_mean, "latent_std": latent_std,
                                 "logmel_mean": lm_mean, "logmel_std": lm_std})
    ae.latent_mean.copy_(torch.tensor(latent_mean))
    ae.latent_std.copy_(torch.tensor(latent_std))
    ae._stats = (latent_mean, latent_std)
    ae.eval().requires_grad_(False)
    log(f"autoencoder: PSNR {ae_psnr:.2f} dB on unseen identities ({ae_psnr_train:.2f} dB on training frames)")
    latents = encode_latents(ae, clips)
    rows = normalise_rows(rows_raw, lm_mean, lm_std)
    batches = Batches(latents, rows, torch.Generator().manual_seed(args.seed + 2), device)

    # -- teacher (or the one a run with the same recipe saved), backfill, stage 1 --
    stages = out / "stages"
    stages.mkdir(exist_ok=True)
    if saved:
        teacher, text, timings["teacher"] = resumed_teacher(saved, cfg, batches, device)
        log(f"autoencoder and teacher: taken from {args.resume} (trained {timings['ae']}, {timings['teacher']})")
    else:
        teacher, text, timings["teacher"] = train_teacher(cfg, batches, minutes["teacher"], caps["teacher"],
                                                          args.seed + 3, log)
    save_teacher(stages / "teacher.pt", recipe, teacher, text, ae, batches, timings)
    if args.stop_after == "teacher":
        log(f"stopped after the teacher: {stages / 'teacher.pt'} (continue with --resume {out})")
        return 0
    levels = stream_sigmas(stream)
    students, timings["backfill"], timings["students"] = {}, {}, {}
    after_teacher, batches_state = torch.get_rng_state(), batches.g.get_state()
    trajectories = {}
    for name in args.students:
        recipe_s = STUDENTS[name]
        if recipe_s["source"]:
            continue
        scale = recipe_s["cfg"]
        if scale not in trajectories:          # every backfill draws the same windows and noise
            batches.g.set_state(batches_state)
            t0 = time.perf_counter()
            trajectories[scale] = run_backfill(teacher, text, batches, levels, minutes["backfill"],
                                               args.trajectories, args.seed + 4, log, cfg_scale=scale)
            timings["backfill"][f"cfg {scale:g}"] = round(time.perf_counter() - t0, 1)
        torch.set_rng_state(after_teacher)    # every student starts from the run's state after the teacher
        weight = latent_weight(mouth_region(), cfg.latent_hw, recipe_s["mouth"]) if recipe_s["mouth"] else None
        students[name], timings["students"][name] = train_ode(teacher, text, trajectories[scale], levels,
                                                              minutes["ode"], caps["ode"], args.seed + 5, log,
                                                              weight=weight, name=name)

    # -- stage 2 --
    def make_pipe(dit):
        return toy_pipeline(cfg, dit, ae, text.context[0].detach())

    for name in args.students:
        source = STUDENTS[name]["source"]
        if source:
            torch.set_rng_state(after_teacher)
            students[name], timings["students"][name] = train_dmd(
                students[source], teacher, text, make_pipe, clips, rows, stream, minutes["dmd"], caps["dmd"],
                args.seed + 6, log)
    for name, dit in students.items():
        torch.save({"dit": cpu_state(dit)}, stages / f"{name}.pt")

    # -- the decoder (it does not depend on the DiT; see finish_decoder), then metrics and the gate --
    timings["decoder"] = finish_decoder(ae, clips, cfg, caps["decoder"], args, args.seed + 7, log)
    ae_psnr = ae_stage.evaluate_ae(ae, ae_val)
    t0 = time.perf_counter()
    evaluation = Evaluation(args.clips, args.eval_identities, args.smoke)
    scores = {}
    for name, dit in students.items():
        scores[name] = evaluation.score(make_pipe(dit), stream)
        log(f"{name} student: {scores[name]}")
    if args.baseline.lower() != "none" and (Path(args.baseline) / "toy-talker.json").is_file():
        from runtime.pipeline import AvatarPipeline
        baseline = f"baseline ({args.baseline})"
        scores[baseline] = evaluation.score(AvatarPipeline.from_toy(args.baseline, device=device), stream)
        log(f"{baseline}: {scores[baseline]}")
    else:
        baseline = args.students[0]
    choice, reasons = gate(scores, baseline)
    if choice == baseline and baseline not in students:
        raise SystemExit(f"train.toy: no student passed the gate against {baseline} "
                         f"({'; '.join(f'{k}: {v}' for k, v in reasons.items())}); the model in {out} is not "
                         f"written (each student is in {stages})")
    timings["metrics"] = round(time.perf_counter() - t0, 1)
    log(f"gate: ship {choice} ({'; '.join(f'{k}: {v}' for k, v in reasons.items())})")
    shipped = students[choice]
    scores["shipped"] = scores[choice]

    # -- ship --
    for i, c in enumerate(evaluation.val[:4]):
        from PIL import Image
        Image.fromarray(c.frames[0]).save(out / f"ref_{i}.png")
    from train.synth import speak
    hello = speak("Hello! I am a small cartoon talker, trained on synthetic faces. Watch my mouth as I speak.",
                  voice="en-us", speed=150, pitch=50, amplitude=120)
    _write_wav(out / "hello.wav", hello)
    timings["total"] = round(time.perf_counter() - t_all, 1)
    meta = save_model(out, cfg, stream, shipped, ae, text, dict(
        shipped=choice, gate=reasons, targets=TARGETS, metrics=scores, autoencoder_psnr_db=round(ae_psnr, 2), timings=timings,
        training=dict(command=" ".join(["python -m train.toy"] + args.argv), seed=args.seed,
                      threads=args.threads, device=device_name(device), clips=args.clips, seconds=args.seconds,
                      students={k: STUDENTS[k] for k in args.students}, data_sha256=clips.sha256(),
                      espeak=espeak_version(), torch=torch.__version__, platform=platform.platform())))
    meta["sha256"] |= {f.name: sha256_file(f) for f in sorted(out.glob("ref_*.png"))}
    meta["sha256"]["hello.wav"] = sha256_file(out / "hello.wav")
    (out / "toy-talker.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"done in {timings['total']} s: {out / 'toy-talker.safetensors'}")
    if args.install:
        install(out, log)
    return 0


def install(out: Path, log) -> None:
    TOY_ASSETS.mkdir(parents=True, exist_ok=True)
    for f in ["toy-talker.safetensors", "toy-talker.json", "hello.wav", *[x.name for x in out.glob("ref_*.png")]]:
        shutil.copy(out / f, TOY_ASSETS / f)
    log(f"installed into {TOY_ASSETS}")


def harden_trained(src: Path, out: Path, steps: int, args, device: torch.device, log) -> int:
    """`--harden-decoder SRC`: finish_decoder on an already trained toy-talker, with the seed, thread count and
    training clips its manifest records (the same computation as the last step of a full run), then re-measure
    and write a complete toy-talker to `out`."""
    import types

    from runtime.pipeline import AvatarPipeline
    meta = json.loads((src / "toy-talker.json").read_text())
    if meta["timings"].get("decoder", {}).get("steps", 0) > 0:
        raise SystemExit(f"train.toy: the decoder in {src} is already hardened (its manifest records the step: "
                         f"{meta['timings']['decoder']}); run --harden-decoder on the model as its training wrote it")
    training = meta["training"]
    seed_everything(training["seed"], training["threads"])
    src_pipe = AvatarPipeline.from_toy(src, device=device)
    stream = src_pipe.default_stream
    # the decoder this version trains: a model made before the temporal context gets the context layer (zero,
    # i.e. its per-frame decoder) and then the same step as a full run
    cfg = ModelConfig.from_dict({**src_pipe.config.to_dict(),
                                 "frame_ae_context": ModelConfig.preset("toy-talker").frame_ae_context})
    ae = FrameAE(cfg).to(device)
    missing, unexpected = ae.load_state_dict(src_pipe.vae.state_dict(), strict=False)
    if unexpected or any(not k.startswith("context.") for k in missing):
        raise SystemExit(f"train.toy: the autoencoder in {src} does not fit this version's FrameAE "
                         f"(missing {missing}, unexpected {unexpected})")
    ae.eval().requires_grad_(False)
    pipe = toy_pipeline(cfg, src_pipe.dit, ae, src_pipe.text_encoder.emb)
    clips = training_clips(training["clips"], training["seconds"], training["seed"])
    if clips.sha256() != training["data_sha256"]:
        log("warning: the regenerated training clips differ from the ones the model was trained on (another "
            "espeak-ng version?); the decoder is hardened on these instead")
    t0 = time.perf_counter()
    info = finish_decoder(ae, clips, cfg, steps, args, training["seed"] + 7, log)
    psnr = ae_stage.evaluate_ae(ae, ae_validation_clips(args.smoke))
    evaluation = Evaluation(training["clips"], args.eval_identities, args.smoke)
    scores = dict(meta["metrics"], shipped=evaluation.score(pipe, stream))
    log(f"shipped ({meta['shipped']} student, hardened decoder): {scores['shipped']}; autoencoder PSNR {psnr:.2f} dB")
    timings = dict(meta["timings"], decoder=info, decoder_metrics=round(time.perf_counter() - t0 - info["seconds"], 1))
    training["decoder_command"] = " ".join(["python -m train.toy"] + args.argv)
    training["decoder_device"] = device_name(device)
    text = types.SimpleNamespace(context=pipe.text_encoder.emb[None])
    extra = {k: v for k, v in meta.items() if k not in ("model", "stream", "sha256")}
    extra |= dict(metrics=scores, autoencoder_psnr_db=round(psnr, 2), timings=timings, training=training)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != src.resolve():
        for f in ["hello.wav", *[x.name for x in src.glob("ref_*.png")]]:
            shutil.copy(src / f, out / f)
    new = save_model(out, cfg, stream, pipe.dit, ae, text, extra)
    new["sha256"] |= {k: v for k, v in meta["sha256"].items() if k != "toy-talker.safetensors"}
    (out / "toy-talker.json").write_text(json.dumps(new, indent=1) + "\n")
    log(f"done: {out / 'toy-talker.safetensors'}")
    if args.install:
        install(out, log)
    return 0


def _write_wav(path: Path, pcm: np.ndarray, rate: int = 16000) -> None:
    import wave
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes())


if __name__ == "__main__":
    sys.exit(main())
