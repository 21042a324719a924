"""wav2vec2 audio features, 10,752-d per 25 fps video frame: whole-clip mode (official parity) and streaming mode.

The network is transformers' `Wav2Vec2Model` (wav2vec2-base-960h: 7-layer CNN at 50 Hz, 12 transformer layers of
width 768); this file only sequences it the way the official AvatarForcing code does (`utils/dataset.py`,
`wan/models/wav2vec.py`):

    x     = (pcm - mean) / sqrt(var + 1e-7)          over the WHOLE given pcm (Wav2Vec2FeatureExtractor)
    x     = x[: F * 640]                              F audio frames = F video frames (16 kHz / 25 fps)
    cnn   = feature_encoder(x)                        [1, 512, 2F - 1]  (stride 320, receptive field 400)
    cnn   = interpolate(cnn, size=F, linear, align_corners=True)   before the projection and the transformer
    h     = transformer(feature_projection(cnn))      bidirectional over all F frames
    rows  = cat([last_hidden_state, hidden_states[0..L]], -1)      [F, (L + 2) * H] = [F, 14 * 768]
    out   = cat([zeros(1, width), rows])                           row r >= 1 is audio frame r - 1

Two consequences worth knowing. F * 640 samples always give 2F - 1 CNN frames, so the align_corners interpolation
samples CNN frame 2v exactly for audio frame v: the one whose receptive field [640 v, 640 v + 400) starts at that
frame's first sample (a decimation, not a blend). And the CNN's first layer (no bias) is followed by a GroupNorm per
channel over time, which cancels any affine change of the input up to its eps: the whole-file normalisation changes
the features only at that eps level, except where zero padding follows it (padding happens after it, as here).
Both are checked by the tests. Bit-exactness against the official code under transformers 4.49 was checked outside
the repo (0.0 max abs error, base-size random weights).

Streaming (`StreamingAudioFeatures`): the encoder is bidirectional and its first GroupNorm takes statistics over the
whole input, so features cannot be computed incrementally and exactly.
Each request runs the clip computation on a bounded segment instead (left context + requested frames), which makes
the result a pure function of the samples and the requested range, whatever the push chunking. It approaches the
clip features away from the segment's right edge; it never equals them.

Shapes: F audio frames, S samples, width = (L + 2) * H. PCM is float32 mono 16 kHz in [-1, 1].
Not here: resampling and file decoding (media.py), AudioPack and the injection into the DiT (dit.py), the log-mel
features of the toy-talker.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .media import validate_pcm

SAMPLE_RATE = ModelConfig().sample_rate             # 16,000 Hz: wav2vec2's input rate
SAMPLES_PER_FRAME = ModelConfig().samples_per_frame  # 640 samples = one 25 fps video frame
# wav2vec2-base feature encoder: 7 convolutions, total stride 320 samples (50 Hz), receptive field 400 samples.
CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)
RECEPTIVE_FIELD = 400                                 # samples under one CNN output frame
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MIN_BUFFER = 16 * SAMPLES_PER_FRAME                   # smallest sample buffer a stream keeps allocated
DOWNLOAD_HINT = "download facebook/wav2vec2-base-960h (e.g. `huggingface-cli download facebook/wav2vec2-base-960h " \
                "--local-dir wan_models/wav2vec2-base-960h`)"


def num_audio_frames(num_samples: int) -> int:
    """Audio (= video) frames covered by `num_samples` samples; a partial last frame counts (it is zero-padded)."""
    return math.ceil(num_samples / SAMPLES_PER_FRAME)


class Wav2Vec2Features:
    """A wav2vec2 encoder (eval, float32) and its feature extractor, producing per-video-frame feature rows."""

    def __init__(self, model, extractor):
        """`model`: a transformers Wav2Vec2Model; `extractor`: its Wav2Vec2FeatureExtractor."""
        if not extractor.do_normalize:
            raise ValueError("the wav2vec2 feature extractor must have do_normalize=True (the official features "
                             "are computed on normalised audio)")
        self.model = model.float().eval().requires_grad_(False)
        self.extractor = extractor
        # The only change the official code makes to Wav2Vec2Model.forward is a linear interpolation of the CNN
        # output to the frame count; one hook, registered once, inserts it so that transformers runs everything
        # else as released. The frame count of the call in flight is per thread: a pipeline shared by threads
        # never mutates the model per call.
        self._call = threading.local()
        self._first_call = threading.Lock()       # transformers >= 5 installs its capture hooks on the first call
        self._warm = False
        model.feature_extractor.register_forward_hook(self._to_frame_rate)
        # transformers >= 5 records hidden states through hooks and raises if output_attentions is set with SDPA;
        # attentions are never needed here, so the config is left as loaded.

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, cfg: ModelConfig, seed: int) -> "Wav2Vec2Features":
        """Random weights with the wav2vec2-base layout scaled by the cfg.wav2vec_* fields; same seed, same weights."""
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
        config = Wav2Vec2Config(
            hidden_size=cfg.wav2vec_hidden, num_hidden_layers=cfg.wav2vec_layers,
            num_attention_heads=cfg.wav2vec_heads, intermediate_size=cfg.wav2vec_ffn,
            conv_dim=(cfg.wav2vec_conv_dim,) * len(CONV_KERNELS), conv_kernel=CONV_KERNELS, conv_stride=CONV_STRIDES,
            conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False,
            num_conv_pos_embeddings=cfg.wav2vec_pos_kernel, num_conv_pos_embedding_groups=cfg.wav2vec_pos_groups)
        with torch.random.fork_rng(devices=[]):       # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            model = Wav2Vec2Model(config)
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                             do_normalize=True, return_attention_mask=False)
        features = cls(model, extractor)
        if features.width != cfg.audio_input_dim:
            raise ValueError(f"ModelConfig {cfg.name!r}: audio_input_dim={cfg.audio_input_dim} but a wav2vec2 with "
                             f"{cfg.wav2vec_layers} layers of width {cfg.wav2vec_hidden} gives "
                             f"(layers + 2) * width = {features.width}")
        return features

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Wav2Vec2Features":
        """A local wav2vec2 directory (config.json, preprocessor_config.json, model.safetensors or
        pytorch_model.bin), e.g. wav2vec2-base-960h. Nothing is downloaded."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"wav2vec2 directory {str(path)!r} does not exist; {DOWNLOAD_HINT}")
        missing = [name for name in ("config.json", "preprocessor_config.json") if not (path / name).is_file()]
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            missing.append(" or ".join(WEIGHT_FILES))
        if missing:
            raise FileNotFoundError(f"wav2vec2 directory {str(path)!r} lacks {', '.join(missing)}; {DOWNLOAD_HINT}")
        import transformers
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model
        # transformers >= 4.54 takes `use_kernels`, and later 5.x releases default it on: it would swap layers for
        # Hugging Face hub kernels (a download) unless USE_HUB_KERNELS=0. The released forward is what is wanted.
        version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
        no_hub = {"use_kernels": False} if version >= (4, 54) else {}
        model, info = Wav2Vec2Model.from_pretrained(path, local_files_only=True, output_loading_info=True, **no_hub)
        # transformers fills missing weights with random ones and only logs it; refuse instead. masked_spec_embed
        # is a training-time masking vector, unused here. (A CTC checkpoint's lm_head is unexpected and ignored.)
        missing = sorted(k for k in info["missing_keys"] if k != "masked_spec_embed")
        if missing:
            raise ValueError(f"wav2vec2 checkpoint in {str(path)!r} lacks {len(missing)} weights, e.g. {missing[:6]}; "
                             f"it is incomplete or not a wav2vec2 model")
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(path, local_files_only=True)
        return cls(model, extractor)

    def to(self, device) -> "Wav2Vec2Features":
        """Move the encoder (features always come back on the CPU, float32)."""
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        """Feature width per frame: last_hidden_state + (L + 1) hidden states, each H wide."""
        config = self.model.config
        return (config.num_hidden_layers + 2) * config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ computation
    def normalize(self, pcm: np.ndarray) -> np.ndarray:
        """(x - mean) / sqrt(var + 1e-7) over all of `pcm`, by the feature extractor itself (float32 numpy)."""
        values = self.extractor(pcm, sampling_rate=SAMPLE_RATE).input_values
        return np.asarray(values[0], dtype=np.float32).reshape(-1)

    def encode(self, normalized: np.ndarray, num_frames: int, keep_device: bool = False) -> Tensor:
        """Normalised samples [num_frames * 640] (the last frame may be partial) -> feature rows [num_frames, width] (no zero row), float32 on the
        CPU, or left on the encoder's device with `keep_device` (no device-to-host copy: the GPU engine uses it)."""
        if normalized.ndim != 1 or num_audio_frames(len(normalized)) != num_frames or \
                len(normalized) < RECEPTIVE_FIELD:
            raise ValueError(f"encode needs {num_frames} x {SAMPLES_PER_FRAME} samples (the last frame may be "
                             f"partial, at least {RECEPTIVE_FIELD} samples in all), got shape {normalized.shape}")

        x = torch.from_numpy(np.ascontiguousarray(normalized)).to(self.device)[None]              # [1, S]
        self._call.frames = num_frames
        try:
            if self._warm:
                out = self._forward(x)
            else:
                with self._first_call:
                    out = self._forward(x)
                    self._warm = True
        finally:
            self._call.frames = None
        expected = self.model.config.num_hidden_layers + 1
        if out.hidden_states is None or len(out.hidden_states) != expected:
            got = None if out.hidden_states is None else len(out.hidden_states)
            raise RuntimeError(f"wav2vec2 returned {got} hidden states, expected {expected}: "
                               "unsupported transformers version")
        rows = torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)[0]             # [F, width]
        return rows.float() if keep_device else rows.float().cpu()

    def _forward(self, x: Tensor):
        with torch.no_grad():
            return self.model(x, output_hidden_states=True)

    def _to_frame_rate(self, module, inputs, cnn: Tensor):
        """Forward hook on the CNN: [1, C_cnn, 2F - 1] -> [1, C_cnn, F] for the F frames of this thread's call."""
        frames = getattr(self._call, "frames", None)
        if frames is None:                  # the model called directly, not through encode(): leave it as released
            return None
        return F.interpolate(cnn, size=frames, mode="linear", align_corners=True)

    def clip(self, pcm, num_frames: int) -> Tensor:
        """Official whole-clip features [num_frames + 1, width], CPU float32; row 0 is zeros, row r >= 1 is audio
        frame r - 1 (samples [640 (r - 1), 640 r)).

        The pcm is normalised as a whole and then cut to num_frames * 640 samples. Audio that ends inside the last
        frame is used as it is, unpadded, as the official loader does (`utils/dataset.py`: a clip is skipped only
        when ceil(samples / 640) < num_frames, then cut to num_frames * 640 samples): the CNN sees fewer samples and
        its frames are interpolated to num_frames. Audio shorter than that by a whole frame or more, which the
        official code would skip, is zero-padded after the normalisation (`generate` uses this to cover a clip).
        """
        pcm = validate_pcm(pcm)
        if not _is_index(num_frames) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        num_frames = int(num_frames)
        needed = num_frames * SAMPLES_PER_FRAME
        x = self.normalize(pcm)[:needed]
        if num_audio_frames(len(x)) < num_frames or len(x) < RECEPTIVE_FIELD:
            x = np.concatenate([x, np.zeros(needed - len(x), np.float32)])
        rows = self.encode(x, num_frames)
        return torch.cat([rows.new_zeros(1, rows.shape[1]), rows])


class StreamingAudioFeatures:
    """Incremental audio: push samples as they arrive, ask for the feature rows of any range of audio frames.

    `features(start, stop)` runs the clip computation on audio frames [max(0, start - left_context_frames), stop)
    (normalisation over that segment, interpolation to its frame count) and returns the rows of [start, stop).
    Frame indices are 0-based audio frames (no zero row) and stay absolute after `release`. A caller that wants
    future context for the rows it uses asks for a few frames more than it uses and drops them (look-ahead).
    """

    def __init__(self, encoder: Wav2Vec2Features, left_context_frames: int):
        if not _is_index(left_context_frames) or left_context_frames < 0:
            raise ValueError(f"left_context_frames must be an int >= 0, got {left_context_frames!r}")
        self.encoder = encoder
        self.left_context_frames = int(left_context_frames)
        self.keep_device = False        # True: rows stay on the encoder's device (set by the GPU engine)
        self._buf = np.zeros(MIN_BUFFER, np.float32)   # grows by doubling; shrinks on release
        self._len = 0              # valid samples in _buf
        self._offset = 0           # absolute sample index of _buf[0]
        self._released = 0         # no feature request may start before this frame
        self._ended = False        # pad_to() was called: the stream is complete

    @property
    def width(self) -> int:
        return self.encoder.width

    @property
    def received_samples(self) -> int:
        return self._offset + self._len

    @property
    def available_frames(self) -> int:
        """Complete 640-sample frames received so far (padding included after pad_to)."""
        return self.received_samples // SAMPLES_PER_FRAME

    @property
    def buffered_samples(self) -> int:
        """Samples held in memory (bounded by release)."""
        return self._len

    @property
    def capacity_samples(self) -> int:
        return len(self._buf)

    def push(self, pcm) -> None:
        """Append float32 mono 16 kHz samples, any length (empty is fine)."""
        if self._ended:
            raise RuntimeError("push() after pad_to(): the stream was ended; start a new StreamingAudioFeatures")
        pcm = validate_pcm(pcm, allow_empty=True)
        self._reserve(self._len + len(pcm))
        self._buf[self._len:self._len + len(pcm)] = pcm
        self._len += len(pcm)

    def pad_to(self, num_frames: int) -> None:
        """End of stream: append zero samples up to num_frames whole frames (nothing if already that long)."""
        if not _is_index(num_frames) or num_frames < 0:
            raise ValueError(f"pad_to(num_frames={num_frames!r}): need an int >= 0")
        missing = int(num_frames) * SAMPLES_PER_FRAME - self.received_samples
        if missing > 0:
            self._reserve(self._len + missing)
            self._buf[self._len:self._len + missing] = 0.0
            self._len += missing
        self._ended = True

    def features(self, start: int, stop: int) -> Tensor:
        """Feature rows [stop - start, width] (CPU float32) for audio frames [start, stop)."""
        if not (_is_index(start) and _is_index(stop) and 0 <= start <= stop):
            raise ValueError(f"features(start={start!r}, stop={stop!r}): need ints with 0 <= start <= stop")
        if stop > self.available_frames:
            raise ValueError(f"audio frames [{start}, {stop}) requested but only {self.available_frames} complete "
                             f"frames were received; push more audio (or pad_to() at the end of the stream)")
        if start < self._released:
            raise ValueError(f"audio frames [{start}, {stop}) requested but frames before {self._released} were "
                             f"released; request before releasing, or release less")
        start, stop = int(start), int(stop)
        if start == stop:
            return torch.zeros(0, self.width)
        first = max(0, start - self.left_context_frames)
        lo, hi = first * SAMPLES_PER_FRAME - self._offset, stop * SAMPLES_PER_FRAME - self._offset
        segment = self._buf[lo:hi].copy()                              # [(stop - first) * 640]
        rows = self.encoder.encode(self.encoder.normalize(segment), stop - first, self.keep_device)
        return rows[start - first:]

    def release(self, before_frame: int) -> None:
        """Promise that no request will start before `before_frame`: drop the samples only such requests need
        (the left context of `before_frame` is kept)."""
        if not _is_index(before_frame):
            raise ValueError(f"release(before_frame={before_frame!r}): need an int")
        if before_frame <= self._released:
            return
        self._released = before_frame = int(before_frame)
        keep_from = max(0, before_frame - self.left_context_frames) * SAMPLES_PER_FRAME
        drop = min(keep_from - self._offset, self._len)
        if drop <= 0:
            return
        rest = self._len - drop
        self._buf[:rest] = self._buf[drop:self._len]
        self._offset += drop
        self._len = rest
        if len(self._buf) > 4 * max(rest, MIN_BUFFER):   # give memory back after a long burst
            self._buf = self._buf[:max(2 * rest, MIN_BUFFER)].copy()

    def _reserve(self, size: int) -> None:
        if size > len(self._buf):
            grown = np.zeros(max(size, 2 * len(self._buf)), np.float32)
            grown[:self._len] = self._buf[:self._len]
            self._buf = grown


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- log-mel (toy)
class LogMelFeatures:
    """Causal log-mel features for the toy-talker: 4 hops of 10 ms per 40 ms audio frame, `logmel_bins` mel bands
    each, so a frame has 4 x bins values (128 at 32 bins), normalised with fixed per-band training statistics.

    Hop k of audio frame j is a 25 ms Hann window ending at sample 640 j + 160 (k + 1): frame j reads samples up
    to the end of its own 40 ms and 240 samples of the previous frame (zeros before the stream). So features
    never look ahead, and a segment with one frame of left context reproduces the whole-clip rows exactly:
    streaming equals clip mode bit for bit. Power spectrum through torch.fft, HTK mel triangles over 60-7,600 Hz
    (torchaudio's wheels do not match recent torch builds, and the filterbank is a few lines).

    Same interface as Wav2Vec2Features (`clip`, `normalize`, `encode`, `width`), so StreamingAudioFeatures and the
    session drive it unchanged.
    """

    WINDOW, HOP, F_MIN, F_MAX, EPS = 400, 160, 60.0, 7600.0, 1e-6

    def __init__(self, bins: int = 32, mean=None, std=None):
        self.bins = bins
        self.hops = SAMPLES_PER_FRAME // self.HOP                                    # 4 per audio frame
        self.window = torch.hann_window(self.WINDOW, periodic=True, dtype=torch.float64)
        self.filters = _mel_filters(bins, self.WINDOW, SAMPLE_RATE, self.F_MIN, self.F_MAX)   # [bins, 201]
        self.mean = torch.zeros(bins) if mean is None or len(mean) == 0 else torch.tensor(mean, dtype=torch.float32)
        self.std = torch.ones(bins) if std is None or len(std) == 0 else torch.tensor(std, dtype=torch.float32)
        self._device = torch.device("cpu")

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "LogMelFeatures":
        return cls(cfg.logmel_bins, cfg.logmel_mean, cfg.logmel_std)

    def to(self, device) -> "LogMelFeatures":
        self._device = torch.device(device)          # computed on the CPU (it is tiny); rows moved on request
        return self

    @property
    def width(self) -> int:
        return self.hops * self.bins

    @property
    def device(self) -> torch.device:
        return self._device

    def normalize(self, pcm: np.ndarray) -> np.ndarray:
        """No whole-signal normalisation (that would not be causal): the samples as float32."""
        return np.asarray(pcm, dtype=np.float32)

    def log_mel(self, samples: np.ndarray, num_frames: int) -> Tensor:
        """Unnormalised log-mel [num_frames, hops, bins] of frames starting at samples[0] (zeros before)."""
        x = torch.from_numpy(np.ascontiguousarray(samples)).double()
        x = F.pad(x, (self.WINDOW - self.HOP, 0))                      # hop m ends at sample 160 (m + 1)
        windows = x.unfold(0, self.WINDOW, self.HOP)[:num_frames * self.hops]      # [4F, 400]
        power = torch.fft.rfft(windows * self.window).abs().pow(2)                 # [4F, 201]
        mel = (power @ self.filters.T).float()                                       # [4F, bins]
        return torch.log(mel + self.EPS).view(num_frames, self.hops, self.bins)

    def encode(self, samples: np.ndarray, num_frames: int, keep_device: bool = False) -> Tensor:
        """Samples [num_frames * 640] -> normalised rows [num_frames, hops * bins] (no zero row)."""
        if samples.shape != (num_frames * SAMPLES_PER_FRAME,):
            raise ValueError(f"encode needs exactly {num_frames} x {SAMPLES_PER_FRAME} samples, got {samples.shape}")
        rows = ((self.log_mel(samples, num_frames) - self.mean) / self.std).flatten(1)
        return rows.to(self._device) if keep_device else rows

    def clip(self, pcm, num_frames: int) -> Tensor:
        """Whole-clip rows [num_frames + 1, width]; row 0 is zeros, row r >= 1 is audio frame r - 1."""
        pcm = validate_pcm(pcm)
        if not _is_index(num_frames) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        needed = int(num_frames) * SAMPLES_PER_FRAME
        x = np.zeros(needed, np.float32)
        x[:min(needed, len(pcm))] = pcm[:needed]
        rows = self.encode(x, int(num_frames))
        return torch.cat([rows.new_zeros(1, rows.shape[1]), rows])


def _mel_filters(bins: int, n_fft: int, rate: int, f_min: float, f_max: float) -> Tensor:
    """HTK-style triangular mel filters [bins, n_fft // 2 + 1] (float64): mel(f) = 2595 log10(1 + f / 700)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)                # noqa: E731
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)                 # noqa: E731
    edges = hz(np.linspace(mel(f_min), mel(f_max), bins + 2))
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.minimum((freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre))
    return torch.from_numpy(np.clip(tri, 0.0, None))
