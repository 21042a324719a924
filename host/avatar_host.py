"""Python side of the C ABI (host/avatar_runtime.c): one streaming session plus a queue of finished frames.

The C library calls only this module, with plain types (str/None, int, memoryview), so the C code stays a thin
layer of argument checks, GIL handling and error mapping. Everything else is the runtime's own code: the
pipeline is built by `runtime.generate.build_pipeline` (the CLI's defaults for device and dtype) and frames come
from `StreamSession.push_audio` / `flush` unchanged, so the C host sees exactly the Python session's frames.

Shapes: frames are uint8 [T, H, W, 3] (RGB), PCM is float32 [S] mono 16 kHz.
Not here: any model code, media I/O beyond what the runtime offers, or error translation (the C side maps
exception types to status codes).
"""
from __future__ import annotations

import json
from argparse import Namespace
from collections import deque
from pathlib import Path

import numpy as np

import runtime.pipeline  # noqa: F401  the whole runtime now: a missing dependency fails at start-up, with a hint
from runtime.generate import build_pipeline, device_and_dtype

DTYPES = ("float32", "bfloat16", "float16")


class StateError(RuntimeError):
    """A call the stream's state does not allow now (the C side returns AVATAR_ERR_STATE for it)."""


class HostSession:
    """A StreamSession whose output frames wait in a queue until the host pulls them."""

    def __init__(self, *, preset, weights, image, stream, text, seed, device, dtype, fit):
        if not isinstance(image, str) or not image:
            raise ValueError("image_path must be a non-empty path to the reference image (png, jpg, ...)")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} (or NULL for the "
                             "device's default)")
        if weights is not None and not Path(weights).is_dir():
            raise FileNotFoundError(f"weights directory not found: {weights} (expected the official download "
                                    "layout, see the README section 'Real weights')")
        args = Namespace(preset=preset, weights=weights, device=device, dtype=dtype, seed=seed)
        self.pipe = build_pipeline(args, *device_and_dtype(device, dtype))
        self.session = self.pipe.session(image, stream=stream or "official", text=text or "", seed=seed,
                                         fit=fit or "error")
        self.queue: deque[np.ndarray] = deque()   # each [T, H, W, 3] uint8; T > 0
        self.queued = 0                           # frames in the queue (the sum of their T)

    def frame_size(self) -> tuple[int, int]:
        return self.pipe.config.width, self.pipe.config.height

    def push(self, pcm: memoryview) -> None:
        self._check_open()
        # copy out of the host's buffer now: the host may free it as soon as the call returns
        samples = np.frombuffer(pcm, dtype=np.float32).copy()
        self._enqueue(self.session.push_audio(samples))

    def flush(self) -> None:
        self._check_open()
        self._enqueue(self.session.flush())

    def reset(self) -> None:
        self.session.reset()
        self.queue.clear()
        self.queued = 0

    def pull_into(self, dst: memoryview, max_frames: int) -> int:
        """Copy up to `max_frames` oldest frames into the host buffer dst ([max_frames, H, W, 3] bytes)."""
        w, h = self.frame_size()
        out = np.frombuffer(dst, dtype=np.uint8).reshape(max_frames, h, w, 3)   # a view of the host buffer
        n = 0
        while n < max_frames and self.queue:
            head = self.queue[0]
            take = min(max_frames - n, len(head))
            out[n:n + take] = head[:take]
            n += take
            if take == len(head):
                self.queue.popleft()
            else:
                self.queue[0] = head[take:]
        self.queued -= n
        return n

    def stats_json(self) -> str:
        stats = self.session.stats()
        w, h = self.frame_size()
        stats.update(frames_queued=self.queued, width=w, height=h, preset=self.pipe.config.name,
                     device=str(self.pipe.device), dtype=str(self.pipe.dtype).removeprefix("torch."),
                     random_components=list(self.pipe.random_components))
        return json.dumps(stats)

    def _check_open(self) -> None:
        # the session raises a plain RuntimeError here; a distinct type lets C tell it from torch's RuntimeErrors
        if self.session.flushed:
            raise StateError("this stream was flushed; call avatar_reset() to start a new one")

    def _enqueue(self, frames) -> None:
        if len(frames):
            self.queue.append(frames.numpy())
            self.queued += len(frames)
