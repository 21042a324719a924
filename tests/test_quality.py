"""bench.quality's articulation metric: the gain of the generated mouth opening against the ground truth's."""
import numpy as np
import pytest

from bench.quality import evaluate, mouth_gain


def speech_like(n: int = 400, seed: int = 0) -> np.ndarray:
    """An opening track in [0, 1] with syllable-rate movement."""
    rng = np.random.default_rng(seed)
    raw = np.convolve(rng.random(n), np.ones(5) / 5, mode="same")
    return np.clip((raw - raw.min()) / (raw.max() - raw.min()), 0, 1)


@pytest.mark.parametrize("scale", [1.0, 0.6, 0.25])
def test_gain_reads_the_scale_of_a_shrunk_mouth(scale):
    truth = speech_like()
    gen = 0.3 + scale * (truth - truth.mean())                   # shrunk toward a resting opening
    assert mouth_gain(gen, truth) == pytest.approx(scale, rel=1e-9)


def test_gain_ignores_noise_and_a_small_lag():
    """Probe noise on generated frames widens a standard deviation, not the gain; a one-frame lag is aligned."""
    truth = speech_like()
    noise = np.random.default_rng(1).normal(0, 0.15, truth.shape)
    noisy = 0.5 * truth + noise
    assert np.std(noisy) / np.std(truth) > 0.75                  # what a ratio of deviations would have read
    assert mouth_gain(noisy, truth) == pytest.approx(0.5, abs=0.08)
    late = np.concatenate([[truth[0]], truth[:-1]])             # the same mouth, one frame late
    assert mouth_gain(late, truth) == pytest.approx(1.0, abs=0.02)


def test_evaluate_reports_articulation_per_identity(monkeypatch):
    """evaluate() averages the gain over identities, keeps the worst one, and divides lip-sync by the ground
    truth's."""
    import types

    import bench.quality as quality
    clips = [types.SimpleNamespace(frames=np.zeros((50, 4, 4, 3), np.uint8), mouth_open=speech_like(50, s))
             for s in range(3)]
    gains = iter([1.0, 0.5, 0.8])

    def fake_metrics(probes, frames, mouth_gt, reference, truth_frames=None):
        return dict(sync_r=0.8, identity=1.0, mouth_amplitude=next(gains), sync_r_truth=0.95)

    monkeypatch.setattr(quality, "metrics", fake_metrics)
    monkeypatch.setattr(quality, "stream_clip", lambda pipe, c, stream, engine=None: c.frames)
    out = evaluate(None, None, None, clips)
    assert out["mouth_amplitude"] == pytest.approx(2.3 / 3) and out["mouth_amplitude_worst"] == 0.5
    assert out["sync_fraction"] == pytest.approx(0.8 / 0.95)


def test_ground_truth_frames_score_full_articulation():
    """metrics() on the ground-truth frames themselves: gain 1 and the ground truth's own lip-sync r."""
    import torch

    from bench.quality import Probe, Probes, metrics
    from train.synth import make_clip
    torch.manual_seed(0)
    speech = np.sin(np.linspace(0, 60, 16000)).astype(np.float32) * np.repeat(speech_like(25), 640)[:16000]
    clip = make_clip(7, 1.0, audio=speech)
    probe = Probe(2).eval()
    m = metrics(Probes(probe, probe, torch.zeros(192)), clip.frames, clip.mouth_open, clip.frames[0], clip.frames)
    assert m["mouth_amplitude"] == pytest.approx(1.0, abs=1e-6)
    assert m["sync_r"] == pytest.approx(m["sync_r_truth"], abs=1e-6)
