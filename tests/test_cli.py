"""`python -m runtime.generate` as a new user meets it: bad arguments fail at once with one "error: ..." line and
exit code 2, before the model loads or the audio is decoded; a stopped run removes its partial mp4 and exits with
128 + the signal number; a SIGKILLed run's part file is removed by the next run to the same path; a text prompt
the model cannot use is refused (CLI and API). Runs the shipped toy-talker (64x64, fast on a CPU)."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from runtime import AvatarPipeline
from runtime import generate as cli
from runtime import media
from runtime.text import save_text_embedding

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534                     # uid/gid of `nobody`: a user without write access to root's directories
PART = r"\.out\.mp4\.(\d+)\.[0-9a-f]{12}\.part"      # Mp4Writer's temporary file for out.mp4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def write_wav(path, seconds, rate=16000):
    """A 220 Hz tone as 16-bit mono wav, encoded with PyAV one second per frame."""
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        for start in range(0, pcm.size, rate):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + rate], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def short_wav(tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("audio") / "short.wav", 0.3)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """Five minutes of audio: a toy-talker run on it takes minutes on a CPU, so it is still generating when
    signalled."""
    return write_wav(tmp_path_factory.mktemp("audio") / "long.wav", 300)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI decodes the audio or builds the pipeline: bad arguments must be refused first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CLI read the inputs or loaded the model before rejecting a bad argument")
    monkeypatch.setattr(cli, "build_pipeline", refuse)
    monkeypatch.setattr(media, "load_audio", refuse)


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr, "error: ...". Returns that line."""
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def start_cli(log: Path, *args) -> subprocess.Popen:
    """Start the CLI as a real process, stderr to `log` (the progress bar would fill a pipe nobody reads).
    Signals this test run ignores (nohup ignores SIGHUP) are set back to the default for the child, since the CLI
    rightly keeps an inherited ignore."""
    ignored = [s for s in STOP_SIGNALS if signal.getsignal(s) is signal.SIG_IGN]
    for sig in ignored:
        signal.signal(sig, signal.SIG_DFL)
    try:
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "runtime.generate", *map(str, args)], cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    finally:
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)
    return proc


def wait_for_frames(proc, directory: Path, log: Path) -> Path:
    """Wait until the run's part file has mp4 data in it (frames were generated and encoded); returns it."""
    deadline = time.monotonic() + 300           # a hang guard, not a timing assertion
    while time.monotonic() < deadline:
        parts = [p for p in directory.glob(".out.mp4.*.part") if p.stat().st_size > 0]
        if parts:
            return parts[0]
        assert proc.poll() is None, f"the CLI exited ({proc.returncode}) before writing frames:\n{log.read_text()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no frames written within 300 s:\n{log.read_text()}")


@contextmanager
def unprivileged():
    """Run as `nobody` when the tests run as root, for whom a chmod 0o555 directory is still writable."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
    except PermissionError:
        os.setegid(0)
        pytest.skip("running as root without CAP_SETUID: no directory can be made unwritable to this process")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


# ------------------------------------------------------------------------------------ bad arguments fail fast

def test_out_that_is_a_directory_exits_2_before_generating(tmp_path):
    """Once, as a real process: the exit status and stderr the shell sees."""
    (tmp_path / "results").mkdir()
    proc = subprocess.run([sys.executable, "-m", "runtime.generate", "--preset", "toy-talker",
                           "--out", str(tmp_path / "results")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "is a directory" in lines[0] and str(tmp_path / "results" / "out.mp4") in lines[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "results"] and not any((tmp_path / "results").iterdir())


def test_out_in_a_missing_directory_is_refused_before_loading(tmp_path, capsys, no_model):
    line = cli_error(capsys, "--preset", "toy-talker", "--out", tmp_path / "nowhere" / "out.mp4")
    assert "does not exist" in line and "mkdir -p" in line and str(tmp_path / "nowhere") in line
    (tmp_path / "file.txt").write_text("")
    line = cli_error(capsys, "--preset", "toy-talker", "--out", tmp_path / "file.txt" / "out.mp4")
    assert "is not a directory" in line
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_out_in_an_unwritable_directory_is_refused_before_loading(capsys, no_model):
    with tempfile.TemporaryDirectory() as root:       # not under pytest's root-only tmp dir: nobody can enter it
        os.chmod(root, 0o755)
        locked = Path(root) / "locked"
        locked.mkdir(mode=0o555)
        with unprivileged():
            line = cli_error(capsys, "--preset", "toy-talker", "--out", locked / "out.mp4")
        assert "not writable" in line and str(locked) in line
        assert list(locked.iterdir()) == []


def test_cuda_without_cuda_is_refused_before_loading(tmp_path, capsys, no_model):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"   # one past the last
    line = cli_error(capsys, "--preset", "toy-talker", "--out", tmp_path / "out.mp4", "--device", device)
    assert line.startswith(f"error: --device {device}:") and ("no CUDA" in line or "visible" in line)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chunk_ms", ["inf", "nan", "0", "-200"])
def test_chunk_ms_must_be_positive_and_finite(tmp_path, capsys, no_model, chunk_ms):
    line = cli_error(capsys, "--preset", "toy-talker", "--out", tmp_path / "out.mp4", "--chunk-ms", chunk_ms)
    assert "--chunk-ms must be a positive, finite number of milliseconds" in line
    assert line.endswith(f"got {float(chunk_ms):g}") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", ["0", "-2"])
def test_scale_must_be_positive(tmp_path, capsys, no_model, scale):
    line = cli_error(capsys, "--preset", "toy-talker", "--out", tmp_path / "out.mp4", "--scale", scale)
    assert "--scale must be a positive integer" in line and line.endswith(f"got {scale}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ text the model cannot use

def test_text_prompt_on_a_fixed_context_model_is_refused(tmp_path, capsys, short_wav, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the --text check")
    monkeypatch.setattr(AvatarPipeline, "session", refuse)
    monkeypatch.setattr(AvatarPipeline, "generate", refuse)
    line = cli_error(capsys, "--preset", "toy-talker", "--audio", short_wav, "--out", tmp_path / "out.mp4",
                     "--text", "a woman smiling")
    assert line.startswith("error: --text:") and "'a woman smiling'" in line
    assert "fixed" in line and "embedding" in line
    assert list(tmp_path.iterdir()) == []


def test_encode_text_refuses_strings_it_cannot_encode(tmp_path):
    toy = AvatarPipeline.from_preset("toy-talker")
    cfg = toy.config
    context = toy.encode_text("")                              # the trained context, as before
    assert torch.equal(context, toy.text_encoder.emb)
    with pytest.raises(ValueError, match=r"'hello' cannot be encoded: this model's text context is fixed") as info:
        toy.encode_text("hello")
    assert ".safetensors" in str(info.value) and f"[{cfg.text_len}, {cfg.text_dim}]" in str(info.value)
    other = torch.randn(cfg.text_len, cfg.text_dim)            # an embedding still replaces the fixed context
    assert torch.equal(toy.encode_text(other), other)
    save_text_embedding(tmp_path / "ctx.safetensors", other)
    assert torch.equal(toy.encode_text(str(tmp_path / "ctx.safetensors")), other)

    wan = AvatarPipeline.from_preset("wan-1.3b", device="meta")   # no umT5 built: the context is zeros
    assert wan.text_encoder is None and wan.encode_text("").shape == (wan.config.text_len, wan.config.text_dim)
    with pytest.raises(ValueError, match="no text encoder is loaded"):
        wan.encode_text("hello")


# ------------------------------------------------------------------------------------ stopped and killed runs

@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_stop_signal_removes_the_part_and_exits_128_plus_n(tmp_path, long_wav, sig):
    out, log = tmp_path / "run" / "out.mp4", tmp_path / "stderr.txt"
    out.parent.mkdir()
    out.write_bytes(b"previous result")
    proc = start_cli(log, "--preset", "toy-talker", "--audio", long_wav, "--out", out)
    wait_for_frames(proc, out.parent, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 128 + sig
    last = log.read_text().strip().splitlines()[-1]
    assert last == f"interrupted by {sig.name}: the run stopped before the video was complete, nothing was " \
                   f"written to {out}"
    assert "Traceback" not in log.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"] and out.read_bytes() == b"previous result"


def test_sigkilled_part_is_removed_by_the_next_run(tmp_path, long_wav, short_wav, capsys):
    out, log = tmp_path / "run" / "out.mp4", tmp_path / "stderr.txt"
    out.parent.mkdir()
    proc = start_cli(log, "--preset", "toy-talker", "--audio", long_wav, "--out", out)
    killed = wait_for_frames(proc, out.parent, log)
    proc.kill()
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert killed.exists() and re.fullmatch(PART, killed.name), killed.name
    assert int(re.fullmatch(PART, killed.name).group(1)) == proc.pid
    live = out.parent / f".out.mp4.{os.getpid()}.0123456789ab.part"   # a run still in progress: must be kept
    live.write_bytes(b"")
    assert cli.main(["--preset", "toy-talker", "--audio", str(short_wav), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([live.name, "out.mp4"])
    assert media.probe(out)["streams"][0]["frames"] > 0


# ------------------------------------------------------------------------------------ what worked still works

def test_relative_out_replaces_an_existing_file_with_a_complete_one(tmp_path, short_wav, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                   # `make demo` runs `--out demo.mp4`
    Path("demo.mp4").write_bytes(b"previous result")
    assert cli.main(["--preset", "toy-talker", "--audio", str(short_wav), "--out", "demo.mp4"]) == 0
    err = capsys.readouterr().err
    assert "generating" in err and "wrote demo.mp4" in err        # the progress bar, then the summary
    frames, fps = media.read_video(tmp_path / "demo.mp4")
    assert fps == 25 and len(frames) == 1 + -(-int(0.3 * 16000) // 640)
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]
