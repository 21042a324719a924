"""Test set-up: Triton kernels run under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any `@triton.jit` decorates (triton reads it then), so it is set here,
before the test modules import `runtime.kernels`.
"""
import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning workers of two processes
# (tests beside a training run) slow each other down by 10-40x. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    if not config.getoption("-m"):
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow (make test-all)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
