"""bench.gpu_check, the driver that `make gpu-check` runs on a GPU machine, checked here through its CPU dry run:
every stage's tiny stand-in, in a Python where PyAV and soxr cannot be imported (the GPU images lack them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import main, stages

ROOT = Path(__file__).resolve().parents[1]
# Imported by Python at start-up from PYTHONPATH: the path finder stops finding av and soxr, so importing them fails
# as on a machine that lacks them (importlib.util.find_spec says None, as transformers checks), in the child
# processes too.
HIDE_MEDIA = '''import sys
from importlib.machinery import PathFinder


class _PathFinderWithout(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in ("av", "soxr") else super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithout if f is PathFinder else f for f in sys.meta_path]
'''


def test_dry_run_needs_neither_pyav_nor_soxr(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_MEDIA)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import av"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'av'" in probe.stderr
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--results", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [json_file] = (tmp_path / "out").glob("*.json")
    report = json.loads(json_file.read_text())
    assert report["dry_run"] and list(report["stages"]) == [s.name for s in stages()]
    assert all(e["code"] == 0 for e in report["stages"].values()), {k: e["stderr_tail"] for k, e in
                                                                     report["stages"].items() if e["code"] != 0}
    collected = report["stages"]["gpu-tests"]["stdout_tail"]          # the GPU tests import without av and soxr
    assert "test_engine.py::test_gpu_toy_talker_through_the_captured_decode_graph" in collected
    assert "test_kernels.py::test_ring_attention_bf16" in collected and "error" not in collected.lower()
    official = report["stages"]["latency-official"]["result"]
    assert official["preset"] == "tiny" and official["naive"]["ms_per_frame"] > 0
    assert report["stages"]["latency-low-delay"]["result"]["sessions"] == 2
    assert report["stages"]["compile"]["result"]["compile"] is True
    assert "| latency-official | 0 |" in json_file.with_suffix(".md").read_text()


def test_budget_spent_leaves_stages_not_run_and_writes_what_it_has(tmp_path):
    assert main(["--dry-run", "--budget", "1", "--results", str(tmp_path)]) == 1      # the GPU tests did not pass
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {e["code"] for e in report["stages"].values()} == {"not run"}
    assert main(["--dry-run", "--only", "no-such-stage", "--results", str(tmp_path)]) == 2
