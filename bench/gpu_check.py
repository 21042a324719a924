"""One command for a GPU machine: every `gpu` test and the GPU benchmarks, summarised under bench/results/.

    python -m bench.gpu_check            # or: make gpu-check

Runs `pytest -m gpu`, `bench.kernels`, and `bench.latency` for the official and low-delay presets of wan-1.3b
(plus two concurrent low-delay sessions and the naive baseline), each in its own process so that one failure does
not hide the others. Writes bench/results/<date>-<gpu>.json (everything) and .md (a readable summary) to commit.
Without CUDA it exits 2 and says so.
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
LATENCY_RUNS = {
    "official": ["--stream", "official", "--baseline", "naive"],
    "low-delay": ["--stream", "low-delay"],
    "low-delay-2-sessions": ["--stream", "low-delay", "--sessions", "2"],
}


def run(cmd: list[str], timeout: int) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = "timeout", exc.stdout or "", exc.stderr or ""
    return dict(cmd=" ".join(cmd), code=code, seconds=round(time.perf_counter() - start, 1),
                stdout_tail=str(out)[-6000:], stderr_tail=str(err)[-3000:])


def last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = f"{stamp}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"
    RESULTS.mkdir(exist_ok=True)
    py = sys.executable
    report = dict(gpu=gpu, date=stamp, torch=torch.__version__, cuda=torch.version.cuda)
    report["tests"] = run([py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], timeout=1200)
    report["kernels"] = run([py, "-m", "bench.kernels"], timeout=900)
    report["latency"] = {k: run([py, "-m", "bench.latency", "--preset", "wan-1.3b", *args], timeout=1500)
                         for k, args in LATENCY_RUNS.items()}
    for entry in [report["kernels"], *report["latency"].values()]:
        entry["result"] = last_json(entry["stdout_tail"])
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(summary(report))
    print(summary(report))
    print(f"wrote {RESULTS / name}.json and .md")
    return 0 if report["tests"]["code"] == 0 else 1


def summary(r: dict) -> str:
    lines = [f"# GPU check {r['date']}: {r['gpu']}", "", f"torch {r['torch']}, CUDA {r['cuda']}", "",
             f"## gpu tests: exit {r['tests']['code']} ({r['tests']['seconds']} s)", "```",
             r["tests"]["stdout_tail"][-1500:].strip(), "```", "", "## latency (wan-1.3b, random weights, bf16)", "",
             "| run | steady ms/frame p50 | p99 | throughput ms/frame | TTFF ms | A/V delay p50 ms | peak GiB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for k, e in r["latency"].items():
        res = e.get("result") or {}
        fmt = lambda v: "-" if v is None else f"{v:.1f}"   # noqa: E731
        notes = f"exit {e['code']}"
        if "ratio_time" in res:
            notes += f"; naive {fmt(res['naive']['ms_per_frame'])} ms/frame ({fmt(res['ratio_time'])}x)"
        if "per_session_fps" in res:
            notes += f"; {fmt(res['per_session_fps'])} fps per session"
        lines.append(f"| {k} | {fmt(res.get('ms_per_frame_p50'))} | {fmt(res.get('ms_per_frame_p99'))} | "
                     f"{fmt(res.get('throughput_ms_per_frame'))} | {fmt(res.get('time_to_first_frame_ms'))} | "
                     f"{fmt(res.get('audio_to_video_delay_ms_p50'))} | "
                     f"{fmt((res.get('peak_memory_bytes') or 0) / 2 ** 30)} | {notes} |")
    lines += ["", "## kernels", "```", r["kernels"]["stdout_tail"][-4000:].strip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
