"""bench.parity end to end on the tiny preset: the ONNX Runtime session backend and the engine match the reference."""
import json

import pytest


def test_parity_report_for_engine_and_ort(capsys):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from bench.parity import main
    assert main(["--preset", "tiny", "--seconds", "2", "--backends", "reference,engine,ort,trt"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["backends"]
    assert r["reference"]["latent_max_abs"] == 0.0
    assert r["engine"]["latent_max_abs"] == 0.0 and r["engine"]["frames_equal"]       # same math, fp32, official
    assert r["ort"]["latent_max_abs"] <= 1e-4 and r["ort"]["pixel_max_abs"] <= 1      # uint8 truncation: one level
    assert len(r["ort"]["blocks"]) == len(r["reference"]["blocks"]) >= 3
    assert "skipped" in r["trt"] and "TensorRT" in r["trt"]["skipped"]


def test_other_backends_run_on_the_reference_path():
    """Backends other than the PyTorch modules cannot go through the static-shape engine: asking for it says so."""
    import numpy as np

    from runtime import AvatarPipeline
    pipe = AvatarPipeline.from_preset("tiny")
    image = np.zeros((32, 48, 3), np.uint8)
    with pytest.raises(ValueError, match="engine=True runs the PyTorch DiT and decoder"):
        pipe.session(image, engine=True, dit=lambda *a, **k: None)
    assert pipe.session(image, dit=lambda *a, **k: None).executor.__class__.__name__ == "ReferenceStep"
    sess = pipe.session(image, engine=True)
    assert sess.executor is sess.engine is not None
