"""One command for a GPU machine: the GPU tests, then the GPU benchmarks, each stage in its own process with its own
time cap, results appended under bench/results/ as each stage ends.

    python -m bench.gpu_check                 # or: make gpu-check   (about 8 minutes at most on one H100)
    python -m bench.gpu_check --dry-run       # the same driver on a CPU: every stage's tiny stand-in

Stages, in order (correctness first, so a short lease still answers the most important question):
  gpu-tests           pytest -m "gpu and not slow" on the files that hold GPU tests
  kernels             bench.kernels: each Triton kernel against PyTorch / cuDNN / flash SDPA at the real shapes
  latency-official    bench.latency, wan-1.3b, official stream, with the naive official-style loop as baseline
  latency-low-delay   bench.latency, wan-1.3b, low-delay stream, and two low-delay sessions side by side
  compile             bench.latency, wan-1.3b, low-delay, the engine step under torch.compile
The model is built on the device with random weights (nothing is downloaded), and nothing here needs PyAV or soxr
(GPU images may lack them). Before each stage the cap is cut to what is left of --budget, so the whole run ends in
time; a stage past its cap is killed and recorded as "timeout". After each stage the results so far are written
to DIR/<date>-<gpu>.json (every stage's command, exit code, seconds, output tails and JSON result) and .md (a
readable summary), so a run cut short keeps what finished. Exit code: 0 when the GPU tests passed, 1 otherwise,
2 without CUDA (unless --dry-run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GPU_TEST_FILES = ("tests/test_engine.py", "tests/test_kernels.py", "tests/test_train.py")
BUDGET_S = 480                 # the whole run on one H100: 8 minutes


@dataclass
class Stage:
    name: str
    args: list[str]            # after `python -m`
    cap_s: int                 # seconds on a GPU
    dry_args: list[str] = field(default_factory=list)    # the CPU stand-in (tiny shapes)
    dry_cap_s: int = 240


def stages() -> list[Stage]:
    tests = ["pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not slow", *GPU_TEST_FILES]
    latency = ["bench.latency", "--preset", "wan-1.3b", "--realtime-seconds", "4"]
    tiny = ["bench.latency", "--preset", "tiny", "--device", "cpu", "--frames", "16", "--realtime-seconds", "3"]
    return [
        Stage("gpu-tests", tests, 120, dry_args=[*tests, "--collect-only"]),
        Stage("kernels", ["bench.kernels", "--reps", "20"], 45, dry_args=["bench.kernels", "--reps", "2"]),
        Stage("latency-official", [*latency, "--stream", "official", "--frames", "160", "--baseline", "naive"], 110,
              dry_args=[*tiny, "--stream", "official", "--baseline", "naive"]),
        Stage("latency-low-delay", [*latency, "--stream", "low-delay", "--frames", "120", "--sessions", "2"], 90,
              dry_args=[*tiny, "--stream", "low-delay", "--sessions", "2"]),
        Stage("compile", [*latency, "--stream", "low-delay", "--frames", "120", "--compile"], 100,
              dry_args=[*tiny, "--stream", "low-delay", "--compile"]),
    ]


def run(cmd: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
    return dict(cmd=" ".join(cmd), code=code, seconds=round(time.perf_counter() - start, 1),
                stdout_tail=str(out)[-6000:], stderr_tail=str(err)[-3000:], result=last_json(str(out)))


def last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run every stage's CPU stand-in (no GPU needed)")
    p.add_argument("--results", default=str(RESULTS), help="directory for the .json and .md (default bench/results)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default 480)")
    p.add_argument("--only", help="comma-separated stage names to run (default: all)")
    args = p.parse_args(argv)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine (or --dry-run for the CPU stand-ins)",
              file=sys.stderr)
        return 2
    plan = stages()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",")]
        unknown = sorted(set(wanted) - {s.name for s in plan})
        if unknown:
            print(f"gpu-check: unknown stages {unknown}; stages: {', '.join(s.name for s in plan)}", file=sys.stderr)
            return 2
        plan = [s for s in plan if s.name in wanted]
    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    base = Path(args.results) / f"{stamp}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    report = dict(gpu=device, date=stamp, torch=torch.__version__, cuda=torch.version.cuda, dry_run=args.dry_run,
                  budget_s=args.budget, stages={})
    deadline = time.monotonic() + args.budget
    for stage in plan:
        cap = stage.dry_cap_s if args.dry_run else stage.cap_s
        left = deadline - time.monotonic()
        if left < 5:
            report["stages"][stage.name] = dict(code="not run", seconds=0, reason="the budget was spent")
        else:
            cmd = [sys.executable, "-m", *(stage.dry_args if args.dry_run else stage.args)]
            print(f"gpu-check: {stage.name} (cap {min(cap, left):.0f} s) ...", file=sys.stderr, flush=True)
            report["stages"][stage.name] = run(cmd, min(cap, left))
            print(f"gpu-check: {stage.name}: exit {report['stages'][stage.name]['code']} in "
                  f"{report['stages'][stage.name]['seconds']} s", file=sys.stderr, flush=True)
        write(base, report)
    print(summary(report))
    print(f"wrote {base}.json and .md")
    return 0 if report["stages"].get("gpu-tests", {}).get("code") == 0 else 1


def write(base: Path, report: dict) -> None:
    """Both files, replaced whole after each stage (atomically, so a killed run leaves the last complete pair)."""
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", summary(report))):
        tmp = base.with_name(base.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, base.with_name(base.name + suffix))


def summary(r: dict) -> str:
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"   # noqa: E731
    title = "dry run on a CPU (tiny stand-ins, not GPU numbers)" if r["dry_run"] else r["gpu"]
    lines = [f"# GPU check {r['date']}: {title}", "", f"torch {r['torch']}, CUDA {r['cuda']}, budget {r['budget_s']:.0f} s",
             "", "| stage | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {e['code']} | {e['seconds']} |" for name, e in r["stages"].items()]
    tests = r["stages"].get("gpu-tests")
    if tests and "stdout_tail" in tests:
        lines += ["", "## gpu tests", "```", tests["stdout_tail"][-1500:].strip(), "```"]
    runs = {k: e for k, e in r["stages"].items() if k.startswith(("latency", "compile")) and e.get("result")}
    if runs:
        lines += ["", "## latency (random weights)", "",
                  "| run | steady ms/frame p50 | p99 | throughput ms/frame | TTFF ms | A/V delay p50 ms | peak GiB | notes |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, e in runs.items():
            res = e["result"]
            notes = f"{res.get('preset')} {res.get('stream')} {res.get('dtype')}"
            if "ratio_time" in res:
                notes += f"; naive {fmt(res['naive']['ms_per_frame'])} ms/frame ({fmt(res['ratio_time'])}x)"
            if "per_session_fps" in res:
                notes += f"; {res['sessions']} sessions: {fmt(res['per_session_fps'])} fps each"
            if res.get("compile"):
                notes += f"; first steady step {fmt(res.get('warmup_first_steady_ms'))} ms (compile)"
            lines.append(f"| {k} | {fmt(res.get('ms_per_frame_p50'))} | {fmt(res.get('ms_per_frame_p99'))} | "
                         f"{fmt(res.get('throughput_ms_per_frame'))} | {fmt(res.get('time_to_first_frame_ms'))} | "
                         f"{fmt(res.get('audio_to_video_delay_ms_p50'))} | "
                         f"{fmt((res.get('peak_memory_bytes') or 0) / 2 ** 30)} | {notes} |")
    kernels = r["stages"].get("kernels")
    if kernels and "stdout_tail" in kernels:
        lines += ["", "## kernels", "```", kernels["stdout_tail"][-4000:].strip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
