"""The install: our import names shadow no dependency's, and the runtime's import and demo path stay cheap.

Top-level names are whatever the repo root puts on sys.path when a command runs from it (`python -m ...`, the C
host), which includes everything the project installs, and host/'s glue module.
"""
import importlib.metadata as md
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIST = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]


def our_top_level_names() -> set[str]:
    """Packages and modules at the repo root (what `pip install .` installs is a subset: see pyproject's package
    list) and the C host's glue module in host/."""
    names = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in ROOT.glob("*.py")}
    return names | {p.stem for p in (ROOT / "host").glob("*.py")}


def run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_top_level_names_are_ours_alone():
    names = our_top_level_names()
    assert {"runtime", "export", "bench", "train"} <= names
    owners = md.packages_distributions()
    normal = lambda dist: dist.lower().replace("_", "-")              # noqa: E731
    clashes = {name: sorted(d for d in owners.get(name, []) if normal(d) != normal(DIST)) for name in names}
    assert not {name: dists for name, dists in clashes.items() if dists}, \
        f"top-level names also provided by installed distributions: {clashes}"
    # the Triton kernels live inside the runtime; Hugging Face's hub-kernel package owns the top-level name
    assert "kernels" not in names


def test_transformers_and_hub_kernels_import_from_the_repo_root():
    done = run_python("import transformers.activations, importlib.util as u; s = u.find_spec('kernels'); "
                      "print(s.origin if s else 'absent')")
    assert done.returncode == 0, done.stderr[-2000:]
    origin = done.stdout.strip().splitlines()[-1]
    # transformers 5 requires Hugging Face's `kernels`, 4.x does not; where it is installed, `import kernels` from
    # the repo root must find that distribution's own files
    try:
        hub = md.distribution("kernels")
    except md.PackageNotFoundError:
        assert origin == "absent", origin
    else:
        assert Path(origin).resolve() == Path(hub.locate_file("kernels/__init__.py")).resolve()


def test_runtime_import_and_toy_demo_stay_light(tmp_path):
    """`import runtime` and the CLI's toy-talker demo import no transformers, ONNX, SciPy or Triton."""
    rate = 16000
    t = np.arange(int(0.6 * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    wav = tmp_path / "a.wav"
    np.save(tmp_path / "a.npy", pcm)
    code = f"""
import sys, numpy as np
from runtime.media import Mp4Writer
import runtime
heavy = ("transformers", "onnx", "onnxruntime", "onnxscript", "scipy", "triton")
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
from runtime.generate import main
import av
pcm = np.load({str(tmp_path / "a.npy")!r})
with av.open({str(wav)!r}, "w", format="wav") as c:
    s = c.add_stream("pcm_s16le", rate=16000, layout="mono")
    f = av.AudioFrame.from_ndarray((pcm * 32767).astype(np.int16)[None], format="s16", layout="mono")
    f.sample_rate = 16000
    for p in s.encode(f): c.mux(p)
    for p in s.encode(None): c.mux(p)
code = main(["--preset", "toy-talker", "--audio", {str(wav)!r}, "--out", {str(tmp_path / "out.mp4")!r}])
print("loaded:", sorted(m for m in heavy if m in sys.modules))
sys.exit(code)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"
    assert (tmp_path / "out.mp4").is_file()
