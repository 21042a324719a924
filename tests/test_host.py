"""The C host linkage: CMake builds libavatar_runtime + examples/host_demo, ctest runs the demo on the shipped sample
and checks its frames against the Python session (tests/host_check.py), and the ABI's error paths are called
directly through ctypes.

The ctypes calls run inside this pytest process, so they exercise the library's "Python already running" path
(the ctest run covers the embedded-interpreter start). Skipped only when cmake or a C compiler is missing.
"""
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import AvatarPipeline
from runtime.generate import SAMPLE_AUDIO, SAMPLE_IMAGE
from runtime.media import load_audio

ROOT = Path(__file__).resolve().parents[1]
OK, ERR_ARGUMENT, ERR_STATE, ERR_BUFFER = 0, -1, -3, -4   # avatar_status in avatar_runtime.h
CHUNK = 3200                                                                # 200 ms at 16 kHz

COMPILER = shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed: the C host cannot be built"),
    pytest.mark.skipif(COMPILER is None, reason="no C compiler (cc/gcc/clang or $CC): the C host cannot be built"),
]


def run(cmd, **kw):
    """Run a build/test command; on failure the assertion shows its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("host_build")
    run(["cmake", "-S", ROOT, "-B", out, f"-DPython3_EXECUTABLE={sys.executable}"])
    run(["cmake", "--build", out, "-j", "2"])
    return out


class Options(ctypes.Structure):
    _fields_ = [("stream", ctypes.c_char_p), ("text", ctypes.c_char_p), ("device", ctypes.c_char_p),
                ("dtype", ctypes.c_char_p), ("fit", ctypes.c_char_p), ("seed", ctypes.c_uint64)]


@pytest.fixture(scope="module")
def lib(build):
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this Python links libpython statically: loading the library in-process would start a second "
                    "interpreter (the ctest run still covers the ABI)")
    lib = ctypes.CDLL(str(build / "libavatar_runtime.so"))
    session, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "avatar_last_error": (ctypes.c_char_p, []),
        "avatar_create_from_preset": (session, [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(Options)]),
        "avatar_create_from_weights": (session, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                                 ctypes.POINTER(Options)]),
        "avatar_push_audio": (ctypes.c_int, [session, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]),
        "avatar_flush": (ctypes.c_int, [session]),
        "avatar_reset": (ctypes.c_int, [session]),
        "avatar_frames_available": (i64, [session]),
        "avatar_frame_size": (ctypes.c_int, [session, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
        "avatar_pull_frames": (i64, [session, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t]),
        "avatar_stats_json": (ctypes.c_int, [session, ctypes.c_char_p, ctypes.c_size_t]),
        "avatar_destroy": (None, [session]),
    }
    for name, (restype, argtypes) in signatures.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


def error(lib) -> str:
    return lib.avatar_last_error().decode()


def sample_options(seed=0):
    return Options(stream=b"official", device=b"cpu", fit=b"crop", seed=seed)


def push(lib, s, pcm: np.ndarray) -> int:
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    return lib.avatar_push_audio(s, pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(pcm))


def pull_all(lib, s) -> np.ndarray:
    w, h = ctypes.c_int(), ctypes.c_int()
    assert lib.avatar_frame_size(s, ctypes.byref(w), ctypes.byref(h)) == OK
    n = lib.avatar_frames_available(s)
    buf = np.zeros((max(n, 1), h.value, w.value, 3), dtype=np.uint8)
    got = lib.avatar_pull_frames(s, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), n)
    assert got == n and lib.avatar_frames_available(s) == 0
    return buf[:got]


def create_sample_session(lib):
    s = lib.avatar_create_from_preset(b"tiny", str(SAMPLE_IMAGE).encode(), ctypes.byref(sample_options()))
    assert s, error(lib)
    return s


@pytest.fixture(scope="module")
def shared(lib):
    s = create_sample_session(lib)
    yield s
    lib.avatar_destroy(s)


@pytest.fixture
def session(lib, shared):
    """A fresh stream (reset is much cheaper than a new session: the reference stays encoded)."""
    assert lib.avatar_reset(shared) == OK, error(lib)
    return shared


@pytest.fixture(scope="module")
def flushed(lib):
    """A whole stream through the ABI: 200 ms chunks, a partial last chunk and frame; flushed and pulled."""
    s = create_sample_session(lib)
    pcm = load_audio(SAMPLE_AUDIO)[:CHUNK + 1000]
    for i in range(0, len(pcm), CHUNK):
        assert push(lib, s, pcm[i:i + CHUNK]) == OK, error(lib)
    assert lib.avatar_flush(s) == OK, error(lib)
    yield s, pcm, pull_all(lib, s)
    lib.avatar_destroy(s)


# ------------------------------------------------------------------------------------------ ctest


def test_ctest_host_demo_frames_equal_python_session(build):
    """The must-show: the C demo streams the sample in 200 ms chunks; ctest's second test reruns it in Python."""
    log = run(["ctest", "--test-dir", build, "--output-on-failure"])
    assert "host_demo_matches_python" in log and "100% tests passed" in log
    meta = json.loads((build / "host_demo_out" / "frames.json").read_text())
    samples = len(load_audio(SAMPLE_AUDIO))
    assert meta["samples"] == samples and meta["frames"] == 1 + math.ceil(samples / 640)
    assert (build / "host_demo_out" / "frames.rgb").stat().st_size == meta["frames"] * 32 * 48 * 3


# ------------------------------------------------------------------------------------------ the ABI via ctypes


def test_pulled_frames_equal_python_session(flushed):
    _, pcm, frames = flushed
    pipe = AvatarPipeline.from_preset("tiny", device="cpu", dtype=torch.float32, seed=0)
    sess = pipe.session(SAMPLE_IMAGE, stream="official", seed=0, fit="crop")
    ref = torch.cat([sess.push_audio(pcm[i:i + CHUNK]) for i in range(0, len(pcm), CHUNK)] + [sess.flush()])
    assert frames.shape == (1 + math.ceil(len(pcm) / 640), 32, 48, 3)
    np.testing.assert_array_equal(frames, ref.numpy())


def test_bad_preset_returns_null_with_python_message(lib):
    s = lib.avatar_create_from_preset(b"no-such-preset", str(SAMPLE_IMAGE).encode(), None)
    assert not s
    assert error(lib).startswith("ValueError: unknown model preset 'no-such-preset'")


def test_missing_image_and_weights_are_not_found(lib, tmp_path):
    missing = tmp_path / "missing.png"
    assert not lib.avatar_create_from_preset(b"tiny", str(missing).encode(), None)
    assert error(lib) == f"FileNotFoundError: image file not found: {missing}"
    assert not lib.avatar_create_from_weights(str(tmp_path / "nope").encode(), b"tiny", str(SAMPLE_IMAGE).encode(),
                                              None)
    assert error(lib).startswith(f"FileNotFoundError: weights directory not found: {tmp_path / 'nope'}")


def test_push_after_flush_is_a_state_error_until_reset(lib, flushed):
    s, pcm, _ = flushed
    assert push(lib, s, pcm) == ERR_STATE
    assert error(lib) == "StateError: this stream was flushed; call avatar_reset() to start a new one"
    assert lib.avatar_flush(s) == ERR_STATE
    assert lib.avatar_reset(s) == OK and push(lib, s, pcm) == OK, error(lib)


def test_bad_arguments_report_and_never_abort(lib, session):
    assert push(lib, session, np.array([0.0, np.nan], dtype=np.float32)) == ERR_ARGUMENT
    assert error(lib).startswith("ValueError") and "NaN" in error(lib)
    assert lib.avatar_push_audio(None, None, 0) == ERR_ARGUMENT and "session is NULL" in error(lib)
    assert lib.avatar_pull_frames(session, None, 4) == ERR_ARGUMENT and "dst is NULL" in error(lib)
    assert lib.avatar_flush(session) == ERR_ARGUMENT and "no audio was pushed" in error(lib)
    bad_dtype = Options(device=b"cpu", dtype=b"int8", fit=b"crop")
    assert not lib.avatar_create_from_preset(b"tiny", str(SAMPLE_IMAGE).encode(), ctypes.byref(bad_dtype))
    assert "dtype 'int8' is not supported" in error(lib)
    huge_seed = Options(device=b"cpu", fit=b"crop", seed=2 ** 63)
    assert not lib.avatar_create_from_preset(b"tiny", str(SAMPLE_IMAGE).encode(), ctypes.byref(huge_seed))
    assert "seed 9223372036854775808 is too large" in error(lib)


def test_stats_json_and_small_buffer(lib, session):
    assert push(lib, session, load_audio(SAMPLE_AUDIO)[:CHUNK]) == OK
    buf = ctypes.create_string_buffer(8192)
    assert lib.avatar_stats_json(session, buf, len(buf)) == OK
    stats = json.loads(buf.value)
    assert stats["audio_frames_in"] == CHUNK // 640 and stats["device"] == "cpu" and stats["dtype"] == "float32"
    assert stats["frames_queued"] == lib.avatar_frames_available(session)
    small = ctypes.create_string_buffer(16)
    assert lib.avatar_stats_json(session, small, len(small)) == ERR_BUFFER
    assert len(small.value) == 15 and "too small" in error(lib)
