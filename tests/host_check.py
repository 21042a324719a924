"""Check the C host's frames against the Python session's: `python tests/host_check.py DIR`.

DIR is what examples/host_demo wrote (frames.rgb + frames.json). This reruns the same stream through the Python API
(same preset, image, fit, stream preset, seed, device, dtype, and the same audio chunking, with the audio loaded by
runtime.media.load_audio rather than the demo's own wav reader) and requires the frames to be identical, uint8 for
uint8. Exit code 0 when they are, 1 with the first differing frame and the max difference when not.

Run by ctest (CMakeLists.txt) after host_demo; not a pytest module (tests/test_host.py drives ctest).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root, for `runtime`

import torch  # noqa: E402

from runtime.media import load_audio  # noqa: E402
from runtime.pipeline import AvatarPipeline  # noqa: E402


def python_frames(meta: dict) -> np.ndarray:
    """The same stream through StreamSession: uint8 [T, H, W, 3]."""
    stats = meta["stats"]
    device, dtype = stats["device"], getattr(torch, stats["dtype"])
    if meta["weights"]:
        raise SystemExit("host_check compares random-weight presets only (a --weights run has no Python twin here)")
    pipe = AvatarPipeline.from_preset(meta["preset"], device=device, dtype=dtype, seed=meta["seed"])
    sess = pipe.session(meta["image"], stream=meta["stream"], seed=meta["seed"], fit=meta["fit"])
    pcm = load_audio(meta["audio"])
    if len(pcm) != meta["samples"]:
        raise SystemExit(f"audio length differs: host read {meta['samples']} samples, load_audio {len(pcm)}")
    step = meta["chunk_samples"]
    chunks = [sess.push_audio(pcm[i:i + step]) for i in range(0, len(pcm), step)]
    return torch.cat(chunks + [sess.flush()]).numpy()


def main(out_dir: str) -> int:
    out = Path(out_dir)
    meta = json.loads((out / "frames.json").read_text())
    T, H, W = meta["frames"], meta["height"], meta["width"]
    host = np.fromfile(out / meta["raw"], dtype=np.uint8)
    if host.size != T * H * W * 3:
        print(f"FAIL: {meta['raw']} holds {host.size} bytes, frames.json says {T} frames of {W}x{H}x3")
        return 1
    host = host.reshape(T, H, W, 3)
    expected = 1 + -(-meta["samples"] // 640)        # the frame contract: 1 + ceil(S / 640) at 16 kHz / 25 fps
    if T != expected:
        print(f"FAIL: the host wrote {T} frames for {meta['samples']} samples; the frame contract says {expected}")
        return 1
    ref = python_frames(meta)
    if ref.shape != host.shape:
        print(f"FAIL: host frames {host.shape}, Python session frames {ref.shape}")
        return 1
    differ = np.flatnonzero((host != ref).reshape(T, -1).any(axis=1))
    if len(differ):
        diff = np.abs(host.astype(np.int16) - ref.astype(np.int16)).max()
        print(f"FAIL: {len(differ)} of {T} frames differ (first: frame {differ[0]}), max abs diff {diff}")
        return 1
    print(f"OK: {T} frames of {W}x{H} from the C host equal the Python session's, byte for byte")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[0])
    sys.exit(main(sys.argv[1]))
