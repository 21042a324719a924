"""Triton kernels for the DiT hot paths, one file per op: kernel, launcher, pure-PyTorch `*_ref`.

    rope.py            q/k RMSNorm + 3-D RoPE in one pass; also re-indexes cached (pre-RoPE) anchor / history keys
    ring_attention.py  attention over [anchor | temporal ring (wrap-around) | window] held in separate buffers
    audio_inject.py    residual += per-frame audio token, then LayerNorm and per-frame adaLN modulation

`HAS_TRITON` says whether triton is installed; it is looked up, not imported, so that importing the runtime stays
cheap (the kernel modules import triton themselves). Kernels run on CUDA, or on CPU tensors under TRITON_INTERPRET=1
(set before this package is imported: triton reads it when `@triton.jit` decorates). The DiT decides whether to
call them (runtime/dit.py `use_kernels`); nothing here swaps implementations behind the caller's back.
"""
import importlib.util
import os

# The runtime works without triton: it uses the PyTorch reference path.
HAS_TRITON = importlib.util.find_spec("triton") is not None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check(cond: bool, message: str) -> None:
    """Launcher argument check: a ValueError that names the offending shapes, not a kernel crash."""
    if not cond:
        raise ValueError(message)
