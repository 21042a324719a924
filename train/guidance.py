"""How wide the teacher opens the mouth at each audio-guidance scale: the measurement behind the students' `cfg`.

    python -m train.guidance --run DIR [--scales 1 2 3 4.5 6] [--clips 16]

DIR is a train.toy output directory with stages/teacher.pt (`--stop-after teacher` writes one). Unseen identities
(seeds from 500,000) speaking random 4 s sentences; the teacher samples each clip's 24 latents in windows of 6 (its
training length) from the clip's reference latent with 8 Euler steps at each scale, the autoencoder decodes them,
and bench.quality's probes read the frames: articulation (`mouth_gain` against the ground-truth frames), lip-sync
r, identity and flicker, as a table and one JSON line. The decoder is the run's per-frame one (before its
hardening step) and windows are independent, so flicker reads higher than in a stream; compare scales, not
absolute values.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import emit

WINDOW = 6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.guidance", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a train.toy output directory with stages/teacher.pt")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.5, 6.0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--probe-clips", type=int, default=200)
    args = p.parse_args(argv)
    path = Path(args.run) / "stages" / "teacher.pt"
    if not path.is_file():
        raise SystemExit(f"train.guidance: no {path}; `python -m train.toy --out {args.run} --stop-after teacher` "
                         "writes it")
    from bench.quality import PROBE_SEED0, identity_score, mouth_gain, mouth_opening, pearson, train_probes
    from runtime.config import ModelConfig
    from runtime.dit import AvatarDiT
    from runtime.frame_ae import FrameAE

    from .data import encode_latents, logmel_rows, logmel_stats, make_clips, normalise_rows
    from .teacher import TextEmbedding, sample
    from .toy import training_clips

    saved = torch.load(path, map_location="cpu", weights_only=True)
    recipe, base = saved["recipe"], ModelConfig.preset("toy-talker")
    ae = FrameAE(base)
    ae.load_state_dict(saved["ae"])
    ae.eval().requires_grad_(False)
    # the run's log-mel statistics, from its own training clips
    train_rows = logmel_rows(training_clips(recipe["clips"], recipe["seconds"], recipe["seed"]), base.logmel_bins)
    lm_mean, lm_std = logmel_stats(train_rows, base.logmel_bins)
    cfg = ModelConfig.from_dict({**base.to_dict(), "latent_mean": tuple(ae.latent_mean.tolist()),
                                 "latent_std": tuple(ae.latent_std.tolist()), "logmel_mean": lm_mean,
                                 "logmel_std": lm_std})
    teacher = AvatarDiT(cfg).eval().requires_grad_(False)
    teacher.load_state_dict(saved["dit"])
    text = TextEmbedding(cfg.text_len, cfg.text_dim).requires_grad_(False)
    text.load_state_dict(saved["text"])
    probes = train_probes(make_clips(args.probe_clips, 4.0, PROBE_SEED0, desc="probe clips"))
    clips = make_clips(args.clips, 4.0, 500_000, desc="clips")
    latents = encode_latents(ae, clips).float()
    rows = normalise_rows(logmel_rows(clips, base.logmel_bins), lm_mean, lm_std)
    windows = (latents.shape[2] - 1) // WINDOW * WINDOW
    result = dict(bench="guidance", run=str(args.run), clips=args.clips, scales={})
    print(f"{'cfg':>5} {'gain':>7} {'worst':>7} {'sync r':>7} {'identity':>9} {'flicker':>8} {'s':>5}")
    for scale in args.scales:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)                      # the same noise at every scale
        with torch.no_grad():
            parts = [sample(teacher, text, latents[:, :, :1], rows[:, 4 * k:4 * (k + WINDOW)], WINDOW, g,
                            cfg_scale=scale)[0] for k in range(0, windows, WINDOW)]
            video = ae.decode(torch.cat([latents[:, :, :1], *parts], 2))
        frames = ((video + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 4, 1).numpy()
        rows_m = []
        for i, f in enumerate(frames):
            gen, truth = mouth_opening(probes, f)[1:], mouth_opening(probes, clips.frames[i, :len(f)])[1:]
            rows_m.append(dict(gain=mouth_gain(gen, truth), sync_r=pearson(gen, clips.mouth[i, 1:len(f)]),
                               identity=identity_score(probes, f[1:], clips.frames[i, 0]),
                               flicker=float(np.abs(np.diff(f[1:].astype(np.float32), axis=0)).mean())))
        m = {k: float(np.mean([r[k] for r in rows_m])) for k in rows_m[0]}
        m["gain_worst"] = float(min(r["gain"] for r in rows_m))
        m["seconds"] = round(time.perf_counter() - t0, 1)
        result["scales"][f"{scale:g}"] = m
        print(f"{scale:>5g} {m['gain']:>7.3f} {m['gain_worst']:>7.3f} {m['sync_r']:>7.3f} {m['identity']:>9.4f} "
              f"{m['flicker']:>8.3f} {m['seconds']:>5.0f}", flush=True)
    return emit(result)


if __name__ == "__main__":
    sys.exit(main())
