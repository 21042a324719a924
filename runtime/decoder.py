"""The one streaming-decoder interface shared by the Wan VAE, TAEHV, the toy-talker's FrameAE and exported graphs.

A decoder turns normalised latents [B, 16, T, h, w] into RGB frames [B, 3, n, H, W] in [-1, 1], latent by latent,
carrying a fixed set of state tensors from call to call:

    cache  = decoder.init_decode_cache(batch, dtype, device, height, width)   # a DecodeCache, zero state
    frames = decoder.decode_step(z, cache)      # n = 1 for a stream's first latent, 4 for every later one
    frames, new_state = decoder(z, state, first)   # the pure step: what CUDA graphs and ONNX export capture

`decode_step` checks its input and then calls `cache.step(decoder, z)`, which runs the pure step and copies the new
state into the cache's own tensors: the buffers never change, so a captured graph that reads them stays valid
across steps and `reset()`.

Not here: the decoders themselves (vae.py, tiny_decoder.py, frame_ae.py, export/backend.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DecodeCache:
    """Streaming decoder state: `tensors`, whose shapes and buffers never change (what each holds is the
    decoder's business), and `first_done`, False until the stream's first latent has been decoded."""
    tensors: list[Tensor]
    batch: int
    height: int      # output pixel rows H
    width: int       # output pixel columns W
    first_done: bool = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def reset(self) -> None:
        """Start a new stream with the same buffers."""
        for t in self.tensors:
            t.zero_()
        self.first_done = False

    def step(self, decoder, z: Tensor) -> Tensor:
        """One pure decoder step on this state; the new state is copied into the same buffers."""
        frames, new = decoder(z, list(self.tensors), not self.first_done)
        for old, fresh in zip(self.tensors, new):
            if fresh is not old:
                old.copy_(fresh)
        self.first_done = True
        return frames
