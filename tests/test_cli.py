"""`python -m runtime.generate` as a new user meets it: a SIGKILLed run's part file is removed by the next run to
the same path, never the part of a run still in progress; a text prompt the model cannot use is refused.
Runs the shipped toy-talker (64x64, fast on a CPU)."""
import os
import re
import signal
import subprocess
import sys
import time
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
PART = r"\.out\.mp4\.(\d+)\.[0-9a-f]{12}\.part"      # Mp4Writer's temporary file for out.mp4


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


def start_cli(log: Path, *args) -> subprocess.Popen:
    """Start the CLI as a real process, stderr to `log` (the progress bar would fill a pipe nobody reads)."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "runtime.generate", *map(str, args)], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


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


# ------------------------------------------------------------------------------------ text the model cannot use

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
