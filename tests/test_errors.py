"""Bad input through the public API and the CLI: a clear error naming the problem, never a hang, a deep
torch traceback or a half-written output file."""
import wave

import numpy as np
import pytest
import torch

from runtime import AvatarPipeline, ModelConfig, StreamConfig
from runtime import generate as cli


@pytest.fixture(scope="module")
def pipe():
    return AvatarPipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)


@pytest.fixture
def session(pipe, image):
    return pipe.session(image, stream="low-delay")


def speech(seconds=0.5):
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def write_wav(path, pcm, rate=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype(np.int16).tobytes())
    return path


# ----------------------------------------------------------------------------------------------- audio
AUDIO_CASES = [
    ("empty", np.zeros(0, np.float32), "empty"),
    ("stereo", np.zeros((800, 2), np.float32), "channels"),
    ("nan", np.array([0.0, np.nan] * 400, np.float32), "NaN|finite"),
    ("inf", np.array([0.0, np.inf] * 400, np.float32), "inf|finite"),
    ("loud float", np.full(800, 50.0, np.float32), "range|\\[-1, 1\\]|max"),
    ("int32", np.full(800, 40000, np.int32), "int16|int32|integer"),
    ("not audio", "just a string that is not a file", "not found|does not exist|No such"),
]


@pytest.mark.parametrize("name,audio,match", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_bad_audio_in_generate(pipe, image, name, audio, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        pipe.generate(image, audio, stream="low-delay", audio_mode="stream")


def test_wrong_rate_in_push(session):
    with pytest.raises(ValueError, match="got 44100 Hz.*takes 16000 Hz.*Resample first"):
        session.push_audio(speech(), sample_rate=44100)


@pytest.mark.parametrize("rate", ["16000", 16000.0, None])
def test_push_audio_rate_that_is_not_an_int(session, rate):
    with pytest.raises(TypeError, match=r"sample_rate must be an int \(Hz\), got .*" + type(rate).__name__):
        session.push_audio(speech(), sample_rate=rate)
    session.push_audio(speech(0.1), sample_rate=np.int32(16000))       # numpy ints are ints
    assert session.samples_in == 1600


@pytest.mark.parametrize("pcm,match", [(np.zeros((10, 2), np.float32), "channels"),
                                       (np.array([np.nan], np.float32), "NaN|finite"),
                                       (np.array([40000], np.int32), "int16|int32|integer")])
def test_bad_chunks_in_push(session, pcm, match):
    with pytest.raises((ValueError, TypeError), match=match):
        session.push_audio(pcm)
    assert len(session.push_audio(speech(0.1))) >= 0       # the session is still usable afterwards


def test_unreadable_audio_file(pipe, image, tmp_path):
    bad = tmp_path / "talk.wav"
    bad.write_text("this is not a wav file")
    with pytest.raises(ValueError, match="talk.wav"):
        pipe.generate(image, str(bad))


def test_clip_mode_too_short_for_the_official_length(pipe, image):
    with pytest.raises(ValueError, match="too short|at least"):
        pipe.generate(image, speech(1.0), stream="official", audio_mode="clip", num_latent_frames=17)


def test_flush_without_audio_and_push_after_flush(session):
    with pytest.raises(ValueError, match="no audio"):
        session.flush()
    session.push_audio(speech(0.2))
    session.flush()
    with pytest.raises(RuntimeError, match="reset"):
        session.push_audio(speech(0.1))
    session.reset()
    assert len(session.push_audio(speech(0.1))) == 1        # frame 0 of the new stream


def test_features_of_the_wrong_width(session):
    with pytest.raises(ValueError, match=r"features must be \[T, 224\], got \(4, 7\)"):
        session.push_features(torch.zeros(4, 7))


WIDTH = 224                                               # the tiny preset's audio_input_dim


@pytest.mark.parametrize("feats, words", [
    ("abc", "got a str"),
    ([["0.5"] * WIDTH] * 2, "got a list of strings"),
    (np.zeros((2, WIDTH), dtype=object), "got a ndarray of Python objects"),
    (None, "got a NoneType of Python objects"),
    (np.zeros((2, WIDTH), dtype=bool), "booleans"),
    (torch.zeros(2, WIDTH, dtype=torch.complex64), "complex64"),
], ids=["str", "list of str", "object array", "None", "bool array", "complex tensor"])
def test_features_that_are_not_numbers(session, feats, words):
    with pytest.raises(TypeError, match=f"features must be (real )?numbers.*{words}"):
        session.push_features(feats)


def test_features_ragged_lists(session):
    with pytest.raises(ValueError, match="rectangular"):
        session.push_features([[0.0] * WIDTH, [0.0] * 3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_features_not_finite(session, bad):
    feats = torch.zeros(4, WIDTH)
    feats[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf \(1 values\)"):
        session.push_features(feats)


def test_features_beyond_the_magnitude_limit(session):
    from runtime.session import FEATURE_LIMIT
    for peak in (1e30, 1.01 * FEATURE_LIMIT):
        for feats in (torch.full((4, WIDTH), -peak), np.full((4, WIDTH), peak)):
            with pytest.raises(ValueError, match=f"features reach .*beyond {FEATURE_LIMIT:g}.*unscaled"):
                session.push_features(feats)
    rows = np.random.default_rng(0).uniform(-1, 1, (12, WIDTH)) * FEATURE_LIMIT      # float64, at the limit
    frames = session.push_features(rows)                  # nothing was queued by the refused calls
    assert session.audio_frames_in == 12 and frames.dtype == torch.uint8 and len(frames) >= 1


# ----------------------------------------------------------------------------------------------- image
def test_corrupt_image_file(pipe, tmp_path):
    bad = tmp_path / "face.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match="corrupt|truncated|cannot|read"):
        pipe.session(str(bad))


def test_missing_image_file(pipe, tmp_path):
    with pytest.raises(FileNotFoundError):
        pipe.session(str(tmp_path / "nope.png"))


def test_tiny_image(pipe):
    with pytest.raises(ValueError, match="small"):
        pipe.session(np.zeros((4, 6, 3), np.uint8))


def test_wrong_aspect(pipe):
    with pytest.raises(ValueError, match="crop"):
        pipe.session(np.zeros((64, 64, 3), np.uint8))
    assert pipe.session(np.zeros((64, 64, 3), np.uint8), fit="crop") is not None


@pytest.mark.parametrize("img", [[1, 2, 3], np.zeros((64, 96, 3), np.float32), torch.zeros(3, 64, 96)])
def test_image_of_the_wrong_type(pipe, img):
    with pytest.raises((TypeError, ValueError)):
        pipe.session(img)


# ----------------------------------------------------------------------------------------------- config
def test_unknown_presets():
    with pytest.raises(ValueError, match="unknown model preset"):
        AvatarPipeline.from_preset("huge")
    with pytest.raises(ValueError, match="unknown stream preset"):
        StreamConfig.preset("instant")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.preset("tiny", heads=3)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2 ** 64, ValueError), (1.5, TypeError),
                                         (True, TypeError), ("0", TypeError)])
def test_bad_seed(pipe, image, seed, error):
    with pytest.raises(error, match="seed"):
        pipe.session(image, seed=seed)


def test_bad_stream_and_mode(pipe, image):
    with pytest.raises(TypeError, match="StreamConfig"):
        pipe.session(image, stream=42)
    with pytest.raises(ValueError, match="audio_mode"):
        pipe.generate(image, speech(), audio_mode="live")


# ----------------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *args):
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def test_cli_bad_input_leaves_no_mp4(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    bad = tmp_path / "talk.wav"
    bad.write_text("garbage")
    code, err = run_cli(capsys, "--audio", str(bad), "--out", str(out))
    assert code == 2 and "error:" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_cli_failure_mid_stream_keeps_existing_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    audio = write_wav(tmp_path / "a.wav", speech(2.0))
    from runtime.session import StreamSession
    calls = {"n": 0}
    original = StreamSession.push_audio

    def failing(self, pcm, sample_rate=16000):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return original(self, pcm, sample_rate)

    monkeypatch.setattr(StreamSession, "push_audio", failing)
    code, err = run_cli(capsys, "--audio", str(audio), "--out", str(out), "--stream", "low-delay")
    assert code == 2 and "simulated device failure" in err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4"]


def test_cli_rejects_non_mp4_output(tmp_path, capsys):
    code, err = run_cli(capsys, "--out", str(tmp_path / "out.avi"))
    assert code == 2 and ".mp4" in err
