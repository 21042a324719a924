"""The shipped toy-talker: it loads, fits the size budget, and its mouth follows the speech (the one test that
checks meaning, not shapes). Plus a `slow` end-to-end smoke run of the training script."""
import json
import shutil

import numpy as np
import pytest
import torch

from runtime import AvatarPipeline
from runtime.media import load_audio, load_image
from runtime.pipeline import TOY_ASSETS
from toyprobe import SECONDS, clips_on, probe_for

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng): train.toy synthesises speech with it")


def test_shipped_files_and_budget():
    meta = json.loads((TOY_ASSETS / "toy-talker.json").read_text())
    weights = TOY_ASSETS / "toy-talker.safetensors"
    assert weights.stat().st_size <= 5 * 2 ** 20
    import hashlib
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["sha256"]["toy-talker.safetensors"]
    from train.toy import STUDENTS
    assert meta["shipped"] in STUDENTS and meta["model"]["audio_features"] == "logmel"
    assert meta["gate"][meta["shipped"]] == "passed"
    for name in ("hello.wav", "ref_0.png"):
        assert (TOY_ASSETS / name).is_file()


def test_identity_probe_tells_faces_apart_and_ignores_the_mouth():
    """bench.quality's identity yardstick (CSIM stand-in): unseen identities' own frames, with the mouth and head
    moving, score near 1 against their reference image; another identity's frames score near 0."""
    from bench.quality import identity_score, train_probes
    speech = load_audio(TOY_ASSETS / "hello.wav")
    probes = train_probes(clips_on(speech, 30, 300_000), steps=250)
    faces = clips_on(speech, 4, 400_000).frames
    same = [identity_score(probes, f[1:], f[0]) for f in faces]
    other = [identity_score(probes, faces[(i + 1) % 4][1:], f[0]) for i, f in enumerate(faces)]
    assert min(same) > 0.9 and max(other) < 0.5, (same, other)


def test_demo_clip_mouth_follows_the_speech():
    """2 s of the shipped speech through the shipped model: a probe's mouth opening on the generated frames
    correlates with the renderer's ground-truth opening for that audio (r > 0.5; wrong audio scores ~0.2)."""
    from bench.quality import pearson
    from train.synth import mouth_track
    torch.manual_seed(0)
    pipe = AvatarPipeline.from_preset("toy-talker")
    speech = load_audio(TOY_ASSETS / "hello.wav")
    clip = speech[:int(16000 * SECONDS)]
    frames = pipe.generate(np.asarray(load_image(TOY_ASSETS / "ref_0.png")), clip, audio_mode="stream")
    assert frames.shape == (1 + int(SECONDS * 25), 64, 64, 3)                  # the frame contract: 1 + A
    probe, _ = probe_for(speech)
    with torch.no_grad():
        opening = probe(frames)[1][:, 0].numpy()
    truth, _ = mouth_track(clip)
    r = pearson(opening[1:], truth[1:])
    assert r > 0.5, r


@pytest.mark.slow
@needs_espeak
def test_training_smoke_run(tmp_path):
    from train.toy import main
    assert main(["--out", str(tmp_path), "--smoke", "--students", "ode,ode-cfg,ode-cfg-mouth"]) == 0
    meta = json.loads((tmp_path / "toy-talker.json").read_text())
    assert meta["shipped"] in ("ode", "ode-cfg", "ode-cfg-mouth")
    assert set(meta["metrics"]) == {"ode", "ode-cfg", "ode-cfg-mouth", "shipped"}
    assert set(meta["gate"]) == {"ode", "ode-cfg", "ode-cfg-mouth"}
    assert meta["timings"]["decoder"]["steps"] == 20
    assert (tmp_path / "toy-talker.safetensors").stat().st_size <= 5 * 2 ** 20
    pipe = AvatarPipeline.from_toy(tmp_path)
    video = pipe.generate(np.asarray(load_image(tmp_path / "ref_0.png")), np.zeros(3200, np.float32),
                          audio_mode="stream")
    assert video.shape == (6, 64, 64, 3)


@pytest.mark.slow
@needs_espeak
def test_resumed_teacher_gives_the_full_run(tmp_path):
    """A run stopped after its teacher and resumed from it writes the bytes of an uninterrupted run; a resume with
    another recipe is refused."""
    from train.toy import main
    assert main(["--out", str(tmp_path / "full"), "--smoke", "--students", "ode,dmd"]) == 0
    assert main(["--out", str(tmp_path / "teacher"), "--smoke", "--stop-after", "teacher"]) == 0
    assert not (tmp_path / "teacher" / "toy-talker.safetensors").exists()
    assert main(["--out", str(tmp_path / "resumed"), "--smoke", "--students", "ode,dmd",
                 "--resume", str(tmp_path / "teacher")]) == 0
    full, resumed = ((tmp_path / d / "toy-talker.safetensors").read_bytes() for d in ("full", "resumed"))
    assert full == resumed
    with pytest.raises(SystemExit, match="another recipe"):
        main(["--out", str(tmp_path / "other"), "--smoke", "--seed", "1", "--resume", str(tmp_path / "teacher")])
    # the guidance scan reads the same saved teacher
    from train.guidance import main as guidance
    assert guidance(["--run", str(tmp_path / "teacher"), "--clips", "2", "--probe-clips", "4",
                     "--scales", "1", "3"]) == 0


@pytest.mark.slow
@needs_espeak
def test_harden_decoder_step_equals_the_full_run(tmp_path):
    """`--harden-decoder SRC` on a model trained without the decoder step writes the same weights as a full run."""
    from train.toy import main
    assert main(["--out", str(tmp_path / "full"), "--smoke"]) == 0
    assert main(["--out", str(tmp_path / "before"), "--smoke", "--steps", "decoder=0"]) == 0
    assert main(["--out", str(tmp_path / "after"), "--smoke", "--harden-decoder", str(tmp_path / "before")]) == 0
    full, after = ((tmp_path / d / "toy-talker.safetensors").read_bytes() for d in ("full", "after"))
    assert full == after
    with pytest.raises(SystemExit, match="already hardened"):
        main(["--out", str(tmp_path / "again"), "--smoke", "--harden-decoder", str(tmp_path / "after")])


def shipped_speech(monkeypatch) -> None:
    """Where espeak-ng is missing (GPU images), train.toy's speech comes from pieces of the shipped hello.wav,
    one piece per sentence, chosen by the sentence's hash: deterministic, and speech-like enough for a smoke run."""
    import hashlib

    import train.synth
    import train.toy
    if shutil.which("espeak-ng") is not None:
        return
    speech = load_audio(TOY_ASSETS / "hello.wav")

    def speak(text, *args, **kwargs):
        start = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % (len(speech) - 16000)
        return speech[start:start + 8000 + 200 * len(text)].copy()

    monkeypatch.setattr(train.synth, "speak", speak)
    monkeypatch.setattr(train.toy, "espeak_version", lambda: "none: pieces of hello.wav (tests/test_toy.py)")


@pytest.mark.gpu
@pytest.mark.slow
def test_training_smoke_run_on_cuda(tmp_path, monkeypatch):
    """`train.toy --device cuda` end to end. Its stages see the CPU run's data, noise and initial weights, so
    each stage's loss over its 20 smoke steps is within 5% of the CPU run's (fp32 on both; the remaining
    difference is CUDA's summation order and TF32 convolutions, amplified by training). The result loads on the
    CPU."""
    from train.toy import main
    shipped_speech(monkeypatch)
    runs = {}
    for device in ("cpu", "cuda"):
        assert main(["--out", str(tmp_path / device), "--smoke", "--device", device,
                     "--students", "ode-cfg-mouth,dmd-cfg-mouth"]) == 0
        runs[device] = json.loads((tmp_path / device / "toy-talker.json").read_text())
    assert runs["cuda"]["training"]["device"] == torch.cuda.get_device_name()
    stages = {k: run["timings"] | run["timings"]["students"] for k, run in runs.items()}
    for stage in ("ae", "teacher", "ode-cfg-mouth", "decoder"):
        cpu, cuda = stages["cpu"][stage], stages["cuda"][stage]
        assert cpu["steps"] == cuda["steps"] == 20, (stage, cpu, cuda)
        cpu, cuda = cpu["final_loss"], cuda["final_loss"]
        assert abs(cuda - cpu) <= 0.05 * abs(cpu), (stage, cpu, cuda)
    assert np.isfinite(stages["cuda"]["dmd-cfg-mouth"]["final_loss"])
    pipe = AvatarPipeline.from_toy(tmp_path / "cuda")
    video = pipe.generate(np.asarray(load_image(tmp_path / "cuda" / "ref_0.png")), np.zeros(3200, np.float32),
                          audio_mode="stream")
    assert video.shape == (6, 64, 64, 3)
