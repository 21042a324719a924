"""Quality of the toy-talker's streams: lip-sync, identity, colour drift and flicker, with the paper's ablations.

    python -m bench.quality [--weights runtime/assets/toy] [--identities 4] [--seconds 8 60] [--no-ablations]

Metrics need no downloaded weights: two probe CNNs are trained here on ground-truth synthetic frames
(train/synth.py) of identities the model never saw, then read the generated frames: a mouth probe (the renderer's
mouth opening and roundness, beside an identity classification) and an identity probe (identity classification
only, as ArcFace is trained for identity alone; an embedding that also has to read the mouth encodes the mouth, and
scored ground-truth frames of the same person only 0.96-0.97 against their reference).
- lip-sync (Sync-C stand-in): Pearson r between the mouth probe's opening on generated frames and the renderer's
  ground-truth opening for the same audio, at lag 0, and the best r over lags -4..4 (a non-zero best lag means an
  audio-visual offset). Ground truth scores ~0.97; wrong audio ~0.06 on 8 s clips.
- identity (CSIM stand-in): cosine between the identity probe's embeddings of each frame and of the reference,
  after subtracting the mean embedding of the probe's training frames (the raw embeddings share a large
  component). Ground truth scores ~0.996; another identity's frames ~0.
- colour drift: CIEDE2000 between each frame's mean CIELAB colour and the reference's; mean and last 10%.
- flicker: mean |frame_t - frame_{t-1}| in 0..255.
- articulation (`mouth_amplitude`): per identity, the gain of the mouth probe's opening on the generated frames
  against its opening on the ground-truth frames of the same identity and audio (`mouth_gain`: 1 = the mouth opens
  as wide as the renderer's; a student that regresses to the mean scores below 1; noise does not raise it); the
  mean over identities and the worst identity. With it, lip-sync as a fraction of the ground truth's own r (mean
  over identities of each).
Streams are 8 s and 60 s of identities never seen in training (seeds from 100,000) saying random sentences from
the training word list, and 8 s of the same identities each saying one fixed set of pangrams (`SENTENCE`, words
the list mostly lacks) in its own voice, pushed through the runtime's StreamSession exactly as a live caller
would. Ablations (each a StreamConfig change): no style anchor, anchor
without RoPE re-indexing, no temporal anchor, non-zero anchor audio, and (L, N) in {(1, 4), (2, 2), (4, 1)}.
A table, then one JSON line last. Swap the probes for SyncNet / ArcFace where real weights exist.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench import emit
from torch import nn

VAL_SEED0 = 100_000
PROBE_SEED0 = 200_000            # the probe's own training clips: not the runtime model's training set either
# 8 s of pangrams: most of their words are not in train/words.txt (only "few", "black", "my", "bad", "quick" are)
SENTENCE = "Amazingly few discotheques provide jukeboxes. Sphinx of black quartz, judge my vow. " \
           "Waltz, bad nymph, for quick jigs vex."


class Probe(nn.Module):
    """4 strided convs + BN -> (mouth opening, roundness) regression and identity classification."""

    def __init__(self, identities: int, width: int = 48):
        super().__init__()
        layers, c = [], 3
        for out in (width, 2 * width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())   # [N, 4 width]
        self.mouth = nn.Linear(c, 2)
        self.identity = nn.Linear(c, identities)

    def forward(self, frames: torch.Tensor):
        """frames uint8 [N, H, W, 3] -> (embedding [N, 4 width], mouth [N, 2], identity logits)."""
        x = frames.float().div(127.5).sub(1).permute(0, 3, 1, 2)
        emb = self.features(x)
        return emb, self.mouth(emb), self.identity(emb)


def train_probe(clips, steps: int = 400, batch: int = 64, seed: int = 0, mouth_weight: float = 10.0):
    """Fit the probe on ground-truth frames (loss: mouth_weight x mouth MSE + identity cross-entropy); returns
    (probe, mean training embedding)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    probe = Probe(len(clips))
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    frames = torch.from_numpy(clips.frames)                                  # [N, T, H, W, 3]
    targets = torch.from_numpy(np.stack([clips.mouth, clips.roundness], -1))  # [N, T, 2]
    probe.train()
    for _ in range(steps):
        c, f = rng.integers(0, len(clips), batch), rng.integers(0, frames.shape[1], batch)
        _, mouth, logits = probe(frames[c, f])
        loss = (mouth - targets[c, f]).pow(2).mean() * mouth_weight + \
            nn.functional.cross_entropy(logits, torch.from_numpy(c))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    with torch.no_grad():
        sample = frames[rng.integers(0, len(clips), 512), rng.integers(0, frames.shape[1], 512)]
        mean = probe(sample)[0].mean(0)
    return probe, mean


@dataclass
class Probes:
    """The yardstick: the mouth probe (lip-sync) and the identity probe with its mean training embedding."""
    mouth: Probe
    identity: Probe
    mean_identity: torch.Tensor


def train_probes(clips, steps: int = 400, seed: int = 0) -> Probes:
    mouth, _ = train_probe(clips, steps, seed=seed)
    identity, mean = train_probe(clips, steps, seed=seed, mouth_weight=0.0)
    return Probes(mouth, identity, mean)


# ---------------------------------------------------------------------------------------------- metrics
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def _batches(frames: np.ndarray, size: int = 256):
    return [torch.from_numpy(frames[i:i + size]) for i in range(0, len(frames), size)]


@torch.no_grad()
def identity_score(probes: Probes, frames: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine between the centred identity embeddings of frames uint8 [T, H, W, 3] and of the reference."""
    emb = torch.cat([probes.identity(x)[0] for x in _batches(frames)]) - probes.mean_identity
    ref = probes.identity(torch.from_numpy(reference[None]))[0] - probes.mean_identity
    return torch.nn.functional.cosine_similarity(emb, ref, dim=1).mean().item()


@torch.no_grad()
def mouth_opening(probes: Probes, frames: np.ndarray) -> np.ndarray:
    """The mouth probe's opening [T] of frames uint8 [T, H, W, 3]."""
    return torch.cat([probes.mouth(x)[1] for x in _batches(frames)])[:, 0].numpy()


def _shifted(a: np.ndarray, b: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """a[t + lag] paired with b[t] (the overlap only)."""
    return a[max(0, lag):len(a) + min(0, lag)], b[max(0, -lag):len(b) - max(0, lag)]


def mouth_gain(gen: np.ndarray, truth: np.ndarray, max_lag: int = 2) -> float:
    """Articulation: the least-squares gain of the generated opening on the ground-truth frames' opening (both
    read by the probe), cov(gen, truth) / var(truth), at the lag within +-max_lag where they correlate best. 1: the
    mouth opens as wide as the ground truth's; a mouth shrunk toward its mean scores below 1. Movement that does
    not follow the ground truth (probe noise on generated frames, jitter) adds nothing, as it would to a plain
    ratio of standard deviations."""
    lag = max(range(-max_lag, max_lag + 1), key=lambda k: pearson(*_shifted(gen, truth, k)))
    g, t = _shifted(gen, truth, lag)
    g, t = g - g.mean(), t - t.mean()
    return float((g * t).sum() / max((t * t).sum(), 1e-12))


@torch.no_grad()
def metrics(probes: Probes, frames: np.ndarray, mouth_gt: np.ndarray, reference: np.ndarray,
            truth_frames: np.ndarray | None = None) -> dict:
    """frames uint8 [T, H, W, 3] (frame 0 = reference reconstruction), mouth_gt [T] ground truth. With the
    ground-truth frames `truth_frames` for the same audio, also the articulation (`mouth_amplitude`) and the
    ground truth's own lip-sync r (`sync_r_truth`)."""
    from skimage.color import deltaE_ciede2000, rgb2lab
    opening = mouth_opening(probes, frames)
    csim = identity_score(probes, frames[1:], reference)
    gen, gt = opening[1:], mouth_gt[1:]
    lags = {lag: pearson(*_shifted(gen, gt, lag)) for lag in range(-4, 5)}
    best = max(lags, key=lags.get)
    lab = rgb2lab(frames.reshape(-1, 1, 3).astype(np.float32) / 255).reshape(frames.shape)
    mean_lab = lab[1:].mean(axis=(1, 2))
    ref_lab = rgb2lab(reference.reshape(-1, 1, 3).astype(np.float32) / 255).reshape(reference.shape).mean(axis=(0, 1))
    de = deltaE_ciede2000(np.broadcast_to(ref_lab, mean_lab.shape), mean_lab)
    tail = max(1, len(de) // 10)
    flicker = np.abs(np.diff(frames[1:].astype(np.float32), axis=0)).mean()
    out = dict(sync_r=lags[0], sync_best_r=lags[best], sync_best_lag=best, identity=csim,
               de2000=float(de.mean()), de2000_last10=float(de[-tail:].mean()), flicker=float(flicker))
    if truth_frames is not None:
        truth = mouth_opening(probes, truth_frames)[1:]
        out["mouth_amplitude"] = mouth_gain(gen, truth)
        out["sync_r_truth"] = pearson(truth, gt)
    return out


def stream_clip(pipe, clip, stream, seed: int = 0, chunk: int = 3200, engine: bool | None = None) -> np.ndarray:
    """Generated frames for a clip: its frame 0 as the reference image, its audio pushed in 200 ms chunks
    (`engine`: StreamSession's choice, by default the CUDA engine on a GPU)."""
    sess = pipe.session(clip.frames[0], stream=stream, seed=seed, engine=engine)
    out = [sess.push_audio(clip.audio[i:i + chunk]) for i in range(0, len(clip.audio), chunk)]
    out.append(sess.flush())
    return torch.cat(out).numpy()


def ablations(base):
    """The paper's ablations as StreamConfig changes of the shipped stream."""
    from dataclasses import replace
    out = {"default": base,
           "no style anchor": replace(base, name="no-style-anchor", use_style_anchor=False),
           "anchor not re-indexed": replace(base, name="no-reindex", reindex_anchor=False),
           "no temporal anchor": replace(base, name="no-temporal-anchor", use_temporal_anchor=False),
           "anchor audio not zero": replace(base, name="anchor-audio", anchor_audio="first")}
    steps = base.denoise_steps
    for L, N in ((1, 4), (2, 2), (4, 1)):
        out[f"L={L}, N={N}"] = replace(base, name=f"L{L}N{N}", window_blocks=L, passes=N, denoise_steps=steps)
    return out


def evaluate(pipe, stream, probes: Probes, clips, engine: bool | None = None) -> dict:
    """Every metric's mean over the clips' identities, plus the worst identity's articulation
    (`mouth_amplitude_worst`) and lip-sync as a fraction of the ground truth's (`sync_fraction`)."""
    rows = [metrics(probes, stream_clip(pipe, c, stream, engine=engine), c.mouth_open, c.frames[0], c.frames)
            for c in clips]
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["mouth_amplitude_worst"] = float(min(r["mouth_amplitude"] for r in rows))
    out["sync_fraction"] = out["sync_r"] / out["sync_r_truth"]
    return out


def ground_truth(probes: Probes, clips) -> dict:
    rows = [metrics(probes, c.frames, c.mouth_open, c.frames[0]) for c in clips]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def sentence_clips(identities: int, seconds: float = 8.0) -> list:
    """The unseen identities (the seeds of the random-speech runs) each saying `SENTENCE` in a voice of its own
    (accent, variant, speed and pitch cycle with the index), trimmed or padded to `seconds`."""
    from train.synth import ACCENTS, VARIANTS, make_clip, speak
    clips = []
    for i in range(identities):
        voice = f"{ACCENTS[i % len(ACCENTS)]}+{VARIANTS[(5 * i) % len(VARIANTS)]}"
        speech = speak(SENTENCE, voice, speed=150 + 10 * (i % 3), pitch=30 + 10 * (i % 5), amplitude=120)
        clips.append(make_clip(VAL_SEED0 + i, seconds, audio=np.concatenate([np.zeros(4000, np.float32), speech])))
    return clips


def floors(probes: Probes, clips) -> dict:
    """A clip's true mouth track against the next clip's audio, and the next identity's frames against this
    clip's reference."""
    n = len(clips)
    wrong = float(np.mean([pearson(clips[i].mouth_open[1:], clips[(i + 1) % n].mouth_open[1:]) for i in range(n)]))
    other = float(np.mean([identity_score(probes, clips[(i + 1) % n].frames[1:], clips[i].frames[0])
                           for i in range(n)]))
    return {"wrong audio": {"sync_r": wrong}, "other identity": {"identity": other}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="toy-talker directory (default: the shipped one)")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--seconds", type=float, nargs="+", default=[8.0, 60.0])
    p.add_argument("--ablation-seconds", type=float, default=60.0)
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-sentence", action="store_true", help="skip the fixed-sentence run (it needs espeak-ng)")
    p.add_argument("--probe-clips", type=int, default=200)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from runtime import AvatarPipeline
    from train.data import make_clips
    from train.synth import make_clip
    t0 = time.perf_counter()
    pipe = AvatarPipeline.from_preset("toy-talker") if args.weights is None else \
        AvatarPipeline.from_toy(args.weights)
    stream = pipe.default_stream
    probe_clips = make_clips(args.probe_clips, 4.0, PROBE_SEED0, desc="probe clips")
    probes = train_probes(probe_clips)
    result = dict(bench="quality", stream=stream.name, identities=args.identities, runs={})
    runs = {f"{seconds:g}s": lambda seconds=seconds: [make_clip(VAL_SEED0 + i, seconds)
                                                      for i in range(args.identities)]
            for seconds in args.seconds}
    if not args.no_sentence:
        runs["sentence"] = lambda: sentence_clips(args.identities)
    for name, make in runs.items():
        clips = make()
        result["runs"][name] = {"ground truth": ground_truth(probes, clips),
                                "generated": evaluate(pipe, stream, probes, clips), **floors(probes, clips)}
    if not args.no_ablations:
        clips = [make_clip(VAL_SEED0 + i, args.ablation_seconds) for i in range(min(2, args.identities))]
        result["ablations"] = {name: evaluate(pipe, cfg, probes, clips)
                               for name, cfg in ablations(stream).items()}
        result["ablation_seconds"] = args.ablation_seconds
    result["seconds_total"] = round(time.perf_counter() - t0, 1)
    print_table(result)
    return emit(result, args.json_out)


def print_table(r: dict) -> None:
    cols = ("sync_r", "sync_best_r", "sync_best_lag", "sync_fraction", "mouth_amplitude", "mouth_amplitude_worst",
            "identity", "de2000", "de2000_last10", "flicker")
    head = f"{'run':<34}" + "".join(f"{c:>{max(10, len(c) + 1)}}" for c in cols)
    print(f"toy-talker quality | stream {r['stream']} | {r['identities']} unseen identities")
    print(head)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    for run, entries in r["runs"].items():
        for name, m in entries.items():
            print(f"{run + ' ' + name:<34}" + "".join(f"{fmt(m.get(c)):>{max(10, len(c) + 1)}}" for c in cols))
    for name, m in r.get("ablations", {}).items():
        print(f"{'ablation ' + name:<34}" + "".join(f"{fmt(m.get(c)):>{max(10, len(c) + 1)}}" for c in cols))


if __name__ == "__main__":
    sys.exit(main())
