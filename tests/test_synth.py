"""train/synth.py: the cartoon-face renderer, mouth tracks from audio, espeak-ng speech and dataset files.

Renderer and track tests drive the clip with synthetic audio (tone bursts and silences with a known pattern), so
they run without espeak-ng; the speech and dataset tests skip when espeak-ng is not installed. Clips are 0.6-2 s.
"""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from train import synth
from train.synth import (HEAD_Y, HOP, SAMPLE_RATE, FaceState, Identity, build_dataset, ellipse_coverage,
                         load_dataset, make_clip, mouth_track, random_utterance, render_frame, save_grid, speak)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def bursts(pattern, freq=300.0, noise=0.05, seed=0):
    """16 kHz float32 audio of len(pattern) 40 ms frames: 1 = a loud tone plus a little noise, 0 = silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(len(pattern) * HOP) / SAMPLE_RATE
    loud = 0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.shape)
    return (loud * np.repeat(np.asarray(pattern, float), HOP)).astype(np.float32)


SPEECH = [0] * 5 + [1] * 10 + [0] * 10 + [1] * 5              # 30 audio frames = 1.2 s


# ---------------------------------------------------------------------------------------------- renderer
def test_same_seed_same_bytes_and_seeds_differ():
    pcm = bursts(SPEECH)
    a, b, c = make_clip(5, 1.2, audio=pcm), make_clip(5, 1.2, audio=pcm), make_clip(6, 1.2, audio=pcm)
    assert a.frames.tobytes() == b.frames.tobytes() and a.pose.tobytes() == b.pose.tobytes()
    assert a.identity == b.identity == Identity.random(synth._rngs(5)[0])
    assert c.identity != a.identity
    assert (a.frames[0] != c.frames[0]).mean() > 0.3                  # another face, not a few pixels
    assert not np.array_equal(a.pose, c.pose) and not np.array_equal(a.blink, c.blink)
    np.testing.assert_array_equal(a.mouth_open, c.mouth_open)         # the mouth comes from the audio only


def test_frame_contract_and_neutral_reference():
    clip = make_clip(3, 1.2, audio=bursts(SPEECH)[:20 * HOP])          # short audio is zero-padded
    A = 30
    assert clip.frames.shape == (1 + A, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (A * HOP,) and clip.audio.dtype == np.float32
    assert not clip.audio[20 * HOP:].any()
    for track in (clip.mouth_open, clip.roundness, clip.blink):
        assert track.shape == (1 + A,) and track.dtype == np.float32 and track[0] == 0
    assert clip.pose.shape == (1 + A, 5) and not clip.pose[0].any()
    np.testing.assert_array_equal(clip.frames[0], render_frame(clip.identity, FaceState()))


def test_mouth_and_blink_change_only_their_regions():
    idn = Identity.random(np.random.default_rng(11))
    neutral = render_frame(idn).astype(int)
    mouth_rows = np.nonzero((render_frame(idn, FaceState(mouth_open=1.0)) != neutral).any(axis=(1, 2)))[0]
    eye_rows = np.nonzero((render_frame(idn, FaceState(blink=1.0)) != neutral).any(axis=(1, 2)))[0]
    assert len(mouth_rows) >= 5 and mouth_rows.min() > HEAD_Y        # an open mouth is below the head centre
    assert len(eye_rows) >= 2 and eye_rows.max() < HEAD_Y + 2        # a blink is at eye height
    assert render_frame(idn, FaceState(mouth_open=1.0, roundness=1.0)).tobytes() != \
        render_frame(idn, FaceState(mouth_open=1.0, roundness=-1.0)).tobytes()


def test_coverage_is_anti_aliased_with_the_right_area():
    rx, ry = 10.3, 6.1
    cov = ellipse_coverage(31.7, 30.2, rx, ry, angle=0.4)
    edge = (cov > 0.02) & (cov < 0.98)
    assert edge.sum() > 30                                            # a soft rim all around, not a hard step
    assert abs(cov.sum() - np.pi * rx * ry) < 0.02 * np.pi * rx * ry
    assert cov[30, 31] == 1.0 and cov[5, 5] == 0.0


def test_thin_ellipse_does_not_leak_past_its_box_and_has_no_nan():
    cov = ellipse_coverage(32.0, 32.0, 20.0, 0.2, angle=0.3)         # a hair-thin, long, tilted line
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    along = np.abs((xs - 32) * np.cos(0.3) + (ys - 32) * np.sin(0.3))
    assert cov[along > 21.5].max() == 0.0 and cov.max() > 0.3
    centred = ellipse_coverage(32.5, 32.5, 3.0, 2.0)                  # centre on a pixel centre: grad f = 0
    assert np.isfinite(centred).all() and centred[32, 32] == 1.0


# ---------------------------------------------------------------------------------------------- tracks
def test_mouth_track_opens_on_loud_frames_and_closes_in_silence():
    opening, roundness = mouth_track(bursts(SPEECH))
    assert opening.shape == (31,) and np.isfinite(opening).all() and np.isfinite(roundness).all()
    assert not opening[:6].any()                    # silent audio frames 0..4 -> video frames 1..5 closed
    assert opening[6] > 0.6                         # first loud audio frame 5 shows at video frame 6 (attack 0.7)
    assert opening[8:16].min() > 0.95
    assert opening[22:26].max() < 0.05              # 6+ frames into the pause the mouth is shut again
    assert opening[28:31].min() > 0.95
    np.testing.assert_allclose(mouth_track(0.1 * bursts(SPEECH))[0], opening, atol=1e-5)   # level-relative
    silent_open, silent_round = mouth_track(np.zeros(20 * HOP, np.float32))
    assert not silent_open.any() and not silent_round.any()


def test_roundness_rounded_for_low_vowels_spread_for_hiss():
    vowel = mouth_track(bursts([0] + [1] * 12, freq=400.0, noise=0.0))[1]
    hiss = mouth_track(np.random.default_rng(1).standard_normal(13 * HOP).astype(np.float32) * 0.2)[1]
    assert vowel[0] == 0 and vowel[1] == 0          # reference frame, then a silent audio frame
    assert vowel[6:].min() > 0.8 and hiss[6:].max() < -0.8


# ---------------------------------------------------------------------------------------------- espeak-ng
def test_missing_espeak_names_program_and_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))                          # a PATH with no programs on it
    for call in (lambda: speak("hello"), lambda: make_clip(0, 1.0)):
        with pytest.raises(FileNotFoundError, match=r"espeak-ng was not found.*apt-get install espeak-ng"):
            call()


@needs_espeak
def test_speech_is_deterministic_16k_audio():
    a, b = speak("Hello there, how are you?", "en-gb+f2", 170, 60, 120), speak("Hello there, how are you?",
                                                                                "en-gb+f2", 170, 60, 120)
    assert a.dtype == np.float32 and a.ndim == 1 and len(a) > 0.5 * SAMPLE_RATE
    assert a.tobytes() == b.tobytes() and 0.01 < np.sqrt(np.mean(a * a)) and np.abs(a).max() <= 1.0
    u1, u2 = random_utterance(np.random.default_rng(1), 2.0), random_utterance(np.random.default_rng(1), 2.0)
    assert u1.shape == (2 * SAMPLE_RATE,) and u1.tobytes() == u2.tobytes()


@needs_espeak
def test_speech_clip_same_seed_same_bytes():
    a, b = make_clip(21, 2.0), make_clip(21, 2.0)
    assert a.frames.tobytes() == b.frames.tobytes() and a.audio.tobytes() == b.audio.tobytes()
    assert a.mouth_open.max() > 0.5 and a.mouth_open.min() == 0.0       # speech and a closed mouth both occur


@needs_espeak
def test_dataset_files_hashes_and_workers(tmp_path):
    m1 = build_dataset(tmp_path / "a", n_clips=3, seconds=0.8, seed0=40, shard_clips=2)
    m2 = build_dataset(tmp_path / "b", n_clips=3, seconds=0.8, seed0=40, shard_clips=2, workers=2)
    assert m1["files"] == m2["files"] and len(m1["files"]) == 2 * 7              # 2 shards x 7 arrays
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m1
    assert m1["espeak_ng"].startswith("eSpeak NG") and [c["seed"] for c in m1["clips"]] == [40, 41, 42]
    data = load_dataset(tmp_path / "a")
    clip = make_clip(42, 0.8)
    assert Identity.from_dict(m1["clips"][2]["identity"]) == clip.identity
    np.testing.assert_array_equal(data["frames"][2], clip.frames)
    np.testing.assert_allclose(data["audio"][2], clip.audio, atol=1 / 32767)
    np.testing.assert_array_equal(data["seeds"], [40, 41, 42])
    (tmp_path / "a" / "shard0001.frames.npy").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="sha256"):
        load_dataset(tmp_path / "a")


@needs_espeak
def test_cli_writes_set_and_grid(tmp_path):
    synth.main(["--out", str(tmp_path / "set"), "--clips", "2", "--seconds", "0.6", "--grid", str(tmp_path / "g.png")])
    assert (tmp_path / "set" / "manifest.json").exists()
    assert Image.open(tmp_path / "g.png").size == (10 * 128, 2 * 128)   # 10 frames x 2 clips at 2x


def test_grid_layout(tmp_path):
    frames = np.stack([make_clip(s, 0.4, audio=bursts([1] * 10)).frames for s in (1, 2)])   # [2, 11, 64, 64, 3]
    save_grid(frames, tmp_path / "g.png", columns=4, scale=1)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (128, 256, 3)
    np.testing.assert_array_equal(grid[64:, :64], frames[1, 0])
    np.testing.assert_array_equal(grid[:64, 192:], frames[0, 10])
