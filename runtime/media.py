"""Media I/O: the reference image, the driving audio, and the output mp4 (H.264 + AAC), with clear errors.

Input side, matching the official AvatarForcing preprocessing (`inference.py`, `utils/dataset.py`):
- image: decoded to 8-bit RGB (`PIL.Image.convert("RGB")` for 8-bit modes: alpha dropped, no EXIF rotation, as the
  official loader; 16-bit and float images scaled by their own range, see `load_image`), resized with PIL
  BILINEAR (antialiased; what torchvision's `resize` runs on a PIL image), then /255 and (x - 0.5) / 0.5 into
  [-1, 1] as `ToTensor` + `Normalize(0.5, 0.5)`. The model's size is fixed per config, so
  `prepare_image` refuses a mismatched aspect ratio unless asked to crop; `official_size` gives the official
  `ResizeKeepRatioArea16` size ("official quirk mode": any aspect, area <= 480*832, sides truncated to 16).
- audio: float32 mono 16 kHz. Files are decoded with PyAV (any container/codec FFmpeg reads), channels averaged,
  resampled with soxr. The official code reads with libsndfile and resamples with torchaudio, so resampled or mp3
  input matches it closely but not bit for bit; 16 kHz int16 wav/flac input matches exactly. Files and arrays
  share one level rule (`load_audio`): overshoot up to 4x full scale is clipped to [-1, 1], more is refused.
Output side: `frames_to_uint8` is the official write path (clamp, (x+1)/2, x255, truncating uint8 cast);
`Mp4Writer` streams frames into an mp4 and publishes it by atomic rename only when it is complete.

Shapes: T frames, H/W pixel size, C = 3 colour channels; PCM is a 1-D float32 array in [-1, 1].
Not here: audio features (audio.py), the VAE (vae.py), video input other than reading back our own mp4s for tests.
"""
from __future__ import annotations

import glob
import io
import math
import os
import re
import uuid
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:                       # file decoding/encoding and resampling; the GPU benchmark images may lack them
    import av
    import soxr
except ImportError as _missing:   # arrays at 16 kHz and uint8 frames still work without them
    av = soxr = None
    _MEDIA_IMPORT_ERROR = _missing


def _require_media() -> None:
    if av is None or soxr is None:
        raise ImportError(f"media files and resampling need PyAV and soxr ({_MEDIA_IMPORT_ERROR}): "
                          "pip install av soxr")

SAMPLE_RATE = 16000           # the model's audio rate (wav2vec2 input)
FPS = 25                      # the model's video rate
AAC_RATE = 48000              # AAC track rate: the most widely supported one; 16 kHz input is upsampled by soxr
AAC_FRAME = 1024              # samples per AAC frame (the encoder's frame_size)
ASPECT_TOLERANCE = 0.02       # relative aspect mismatch accepted as a plain (slightly stretching) resize
PEAK_LIMIT = 4.0              # float PCM peaks up to 4x full scale are overshoot, clipped; beyond: refused (load_audio)
OFFICIAL_AREA = (480, 832)    # ResizeKeepRatioArea16 target area (h, w)
UINT16_MAX = 65535            # full scale of 16-bit images (PNG, TIFF, PGM): scaled to 255, not clipped at 255
# Pillow modes whose samples are 8-bit and which its own convert("RGB") maps correctly (CMYK by the naive
# formula R = (255 - C)(255 - K) / 255, without any embedded ICC profile). Alpha is dropped, not composited.
PIL_RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV")
FLOAT_IMAGE_SLACK = 0.5 / 255    # float images may leave [0, 1] by half an 8-bit step (rounds the same)
IMAGE_HELP = ("accepted: a file path, its bytes, a PIL image, or a uint8 / uint16 numpy array (torch tensor) "
              "[H, W, 3|4] or [H, W]")
AUDIO_HELP = "accepted: a file path (wav, mp3, flac, ogg, m4a, ...) or a 1-D float32 (in [-1, 1]) / int16 array"
HELP = {"audio": AUDIO_HELP, "video": "accepted: a video file FFmpeg decodes (mp4, mkv, webm, ...)"}


# --------------------------------------------------------------------------------------------- image

class UnsupportedImageMode(ValueError):
    """A decoded image whose pixel mode or values have no faithful 8-bit RGB rendering here."""


def load_image(image) -> Image.Image:
    """A path, an encoded file's bytes, a PIL image or an array -> 8-bit RGB PIL image.

    Pillow modes: the 8-bit ones in PIL_RGB_MODES go through `convert("RGB")` as in the official loader; 16-bit
    gray (I;16, I;16B/L/N, and I, which Pillow uses for 16-bit PGM) is scaled by 255 / 65535 and rounded; F (32-bit
    float) is read as [0, 1], the float convention of the rest of the runtime. Pillow itself decodes 16-bit RGB(A)
    PNGs to 8-bit (the high byte). Other modes, I values outside [0, 65535] and F values outside [0, 1] are refused.
    Arrays: uint8 or uint16 (scaled as above) [H, W, 3], [H, W, 4] or [H, W] gray.
    Alpha (RGBA, LA, PA, P with transparency, [H, W, 4]) is dropped, not composited: a transparent pixel shows the
    colour stored under it, as the official loader's convert("RGB") does. EXIF orientation is not applied (official).
    """
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(_existing_file(image, "image"))
    if isinstance(image, (bytes, bytearray)):                 # an encoded file's bytes (e.g. an upload)
        return _read_image_file(io.BytesIO(image), "the image data")
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.dtype not in (torch.uint8, torch.uint16):
            raise TypeError(f"image tensor has dtype {image.dtype}; expected torch.uint8 in [0, 255] or "
                            f"torch.uint16 in [0, 65535] ({IMAGE_HELP})")
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _image_from_array(image)
    raise TypeError(f"unsupported image type {type(image).__name__}; {IMAGE_HELP}")


def _read_image_file(source, name: str | None = None) -> Image.Image:
    """Decode a file (a path or a binary file object) to RGB; `name` says what it is in messages."""
    what = name or f"image {source}"
    try:
        with Image.open(source) as im:
            im.load()                 # decode now: a truncated file fails here, not later inside resize
            return _pil_to_rgb(im, what)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what} is too large to decode safely: {e}") from None
    except UnsupportedImageMode:
        raise
    except (OSError, SyntaxError, ValueError) as e:   # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {what}: not a valid image or the file is corrupt/truncated "
                         f"({e}); use a PNG or JPEG file") from None


def _pil_to_rgb(im: Image.Image, what: str = "image") -> Image.Image:
    """Any supported Pillow mode -> 8-bit RGB (see load_image for the rules per mode)."""
    mode = im.mode
    if mode in PIL_RGB_MODES:
        return im.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(im)
        if a.dtype.kind == "i" and a.size and (int(a.min()) < 0 or int(a.max()) > UINT16_MAX):
            raise UnsupportedImageMode(
                f"{what} has mode {mode!r} (32-bit integer) with values in [{a.min()}, {a.max()}]; only the 16-bit "
                f"range [0, {UINT16_MAX}] is understood. Rescale it to 8-bit yourself and pass a uint8 RGB array, "
                f"or save it as an 8-bit PNG")
        return _gray_to_rgb(_uint16_to_uint8(a))
    if mode == "F":
        return _gray_to_rgb(_unit_float_to_uint8(np.asarray(im), f"{what} has mode 'F' (32-bit float)"))
    raise UnsupportedImageMode(f"{what} has Pillow mode {mode!r}, which has no RGB conversion here; convert it to "
                               f"8-bit RGB first (e.g. save it as an 8-bit RGB PNG or JPEG)")


def _unit_float_to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UnsupportedImageMode(f"{what} contains NaN or inf; save it as an 8-bit PNG")
    if lo < -FLOAT_IMAGE_SLACK or hi > 1 + FLOAT_IMAGE_SLACK:
        raise UnsupportedImageMode(f"{what} has values in [{lo:.4g}, {hi:.4g}]; float images are read as [0, 1]. "
                                   f"Scale it (e.g. divide 0..255 data by 255) or pass a uint8 array")
    return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by the full range, rounded half up in integers: round(v * 255 / 65535)."""
    return ((a.astype(np.uint32) * 255 + UINT16_MAX // 2) // UINT16_MAX).astype(np.uint8)


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(a[..., None], 3, axis=-1)), "RGB")


def _image_from_array(a: np.ndarray) -> Image.Image:
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:        # uint16 in either byte order
        a = _uint16_to_uint8(a)
    if a.dtype != np.uint8:
        raise TypeError(f"image array has dtype {a.dtype}; expected uint8 in [0, 255] or uint16 in [0, 65535] "
                        f"(for floats in [0, 1] use (a * 255).round().astype(np.uint8)); {IMAGE_HELP}")
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        raise ValueError(f"image array shape {a.shape} looks channels-first; transpose to [H, W, C]")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or a.size == 0:
        raise ValueError(f"image array shape {a.shape} not understood; {IMAGE_HELP}")
    a = np.ascontiguousarray(a)
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    return Image.fromarray(a[..., :3].copy(), "RGB")    # [H, W, 4] -> [H, W, 3]: alpha dropped, not composited


def official_size(h: int, w: int, area: tuple[int, int] = OFFICIAL_AREA, div: int = 16) -> tuple[int, int]:
    """(height, width) that the official `ResizeKeepRatioArea16(area, div)` gives an h x w image.

    Official quirk mode: keeps the aspect ratio, shrinks (never enlarges) to at most area[0]*area[1] pixels and
    truncates each side to a multiple of `div`. Only sizes with (H/16)*(W/16) == 1560 suit the released
    checkpoint's hard-coded 1560 tokens per frame (e.g. 480x832); e.g. a 960x960 image gives 624x624.
    """
    s = min(1.0, math.sqrt(area[0] * area[1] / (h * w)))
    return max(div, int(h * s) // div * div), max(div, int(w * s) // div * div)   # same float ops as official


def prepare_image(image, height: int, width: int, fit: str = "error") -> torch.Tensor:
    """Image -> float32 [3, height, width] in [-1, 1], resized as the official preprocessing.

    fit: "error" refuses an aspect ratio more than 2% away from width/height; "crop" centre-crops to the target
    aspect first; "stretch" resizes regardless (the official path with `official_size` sizes).
    """
    if fit not in ("error", "crop", "stretch"):
        raise ValueError(f"fit={fit!r}; expected 'error', 'crop' or 'stretch'")
    img = load_image(image)
    w, h = img.size
    mismatch = max(w * height, h * width) / min(w * height, h * width) - 1.0
    if mismatch > ASPECT_TOLERANCE and fit == "error":
        raise ValueError(f"image is {w}x{h} (WxH) but the model takes {width}x{height}: aspect ratios differ by "
                         f"{mismatch:.1%}; pass fit='crop' to centre-crop, or resize the image yourself")
    if mismatch > ASPECT_TOLERANCE and fit == "crop":
        img = _centre_crop(img, width / height)
        w, h = img.size
    if 2 * w < width or 2 * h < height:
        raise ValueError(f"image is too small: {w}x{h} (WxH) for a {width}x{height} model input; "
                         f"need at least {math.ceil(width / 2)}x{math.ceil(height / 2)}")
    img = img.resize((width, height), Image.Resampling.BILINEAR)   # antialiased when shrinking, as official
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)     # [H, W, 3] -> [3, H, W]
    return x.float().div(255).sub(0.5).div(0.5)            # ToTensor then Normalize(0.5, 0.5), same fp32 ops


def _centre_crop(img: Image.Image, aspect: float) -> Image.Image:
    w, h = img.size
    if w / h > aspect:                                     # too wide: trim columns
        cw = round(h * aspect)
        left = (w - cw) // 2
        return img.crop((left, 0, left + cw, h))
    ch = round(w / aspect)                                 # too tall: trim rows
    top = (h - ch) // 2
    return img.crop((0, top, w, top + ch))


# --------------------------------------------------------------------------------------------- audio

def load_audio(audio, sample_rate: int | None = None) -> np.ndarray:
    """A file path or a 1-D array -> float32 mono PCM at 16 kHz in [-1, 1].

    Arrays are taken to be 16 kHz unless `sample_rate` (an int, Hz) says otherwise (then resampled). Files carry
    their own rate, so `sample_rate` must be None for them.

    Level rule, one for files and arrays (and for `validate_pcm`, which the session runs on every pushed chunk):
    samples must be finite (NaN or inf is refused, naming the file); at 16 kHz, a peak up to PEAK_LIMIT = 4x full
    scale (+12 dB) is taken for codec or resampler overshoot and clipped to [-1, 1]; a higher peak is refused as
    mis-scaled audio. Why 4x: lossy decoding and soxr resampling push a full-scale signal past full scale, most of
    all hard-clipped content. Measured on 2 s full-scale test signals, the worst 16 kHz peaks were 2.57x
    (hard-clipped speech-like signal through mp3 at 32 kbit/s) and 2.49x (a 3 kHz square wave through FFmpeg's AAC
    at 128 kbit/s at 44.1 kHz, then soxr to 16 kHz), while the shipped speech clips, peak-normalised and even
    driven 4x into hard clipping, stayed below 1.17x through mp3 and AAC. Mis-scaled audio lands far beyond 4x:
    int16 values stored as floats reach 32768x.
    """
    if isinstance(audio, (str, os.PathLike)):
        if sample_rate is not None:
            raise ValueError(f"sample_rate={sample_rate} given with a file; a file carries its own rate")
        pcm, rate = read_audio_track(audio)
        source = audio
    else:
        rate = SAMPLE_RATE if sample_rate is None else check_sample_rate(sample_rate)
        pcm, source = _as_pcm(audio, allow_empty=False), None
    if rate != SAMPLE_RATE:
        _peak(pcm, source)                    # NaN / inf named here: resampling would smear them
        pcm = _resample(pcm, rate)
        if pcm.size == 0:
            raise ValueError(f"audio is too short: nothing left after resampling from {rate} Hz to {SAMPLE_RATE} Hz")
    return _limit_peak(pcm, source)


def validate_pcm(pcm, sample_rate: int = SAMPLE_RATE, allow_empty: bool = False) -> np.ndarray:
    """Check one chunk of 16 kHz mono PCM and return it as float32 in [-1, 1] (may share memory with the input).

    Accepts 1-D numpy arrays or torch tensors: float or int16 (scaled by 1/32768), under load_audio's level rule
    (finite; peaks up to PEAK_LIMIT clipped, beyond refused). Cheap enough to run on every pushed chunk: no copy
    for float32 input within [-1, 1], then one min and one max.
    """
    rate = check_sample_rate(sample_rate)
    if rate != SAMPLE_RATE:
        raise ValueError(f"audio must be {SAMPLE_RATE} Hz mono, got sample_rate={rate}; "
                         f"convert it with runtime.media.load_audio(pcm, sample_rate={rate})")
    return _limit_peak(_as_pcm(pcm, allow_empty))


def pcm_to_int16(pcm: np.ndarray) -> np.ndarray:
    """float PCM in [-1, 1] -> int16, the inverse of the 1/32768 scaling applied to int16 input (so int16 audio
    passed through the runtime comes back bit for bit); beyond full scale it clips."""
    return np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16)


def check_sample_rate(sample_rate) -> int:
    """A sample rate in Hz as a positive int (numpy ints too); a string, float or bool is a TypeError."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise TypeError(f"sample_rate must be an int (Hz), got {sample_rate!r} of type {type(sample_rate).__name__}; "
                        f"pass e.g. sample_rate={SAMPLE_RATE}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int (Hz), got {sample_rate}")
    return int(sample_rate)


def _as_pcm(pcm, allow_empty: bool) -> np.ndarray:
    """Type, shape and dtype checks -> float32 [S] (the level is checked by _limit_peak)."""
    if isinstance(pcm, torch.Tensor):
        pcm = pcm.detach().cpu()
        pcm = (pcm.float() if pcm.dtype in (torch.bfloat16, torch.float16) else pcm).numpy()
    if not isinstance(pcm, np.ndarray):
        raise TypeError(f"unsupported audio type {type(pcm).__name__}; {AUDIO_HELP}")
    if pcm.ndim != 1:
        raise ValueError(f"audio array has shape {pcm.shape}: stereo/multi-channel is not accepted as an array, "
                         f"average the channels first (e.g. pcm.mean(axis=...)) to get a 1-D mono array")
    if pcm.size == 0 and not allow_empty:
        raise ValueError("audio is empty (0 samples)")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / np.float32(32768.0)     # the libsndfile convention the official code reads
    if pcm.dtype.kind != "f":
        raise TypeError(f"audio array has dtype {pcm.dtype}; expected float32 in [-1, 1] or int16 "
                        f"(convert other integer PCM yourself, e.g. int32 / 2**31)")
    return pcm.astype(np.float32, copy=False)


def _limit_peak(pcm: np.ndarray, source=None) -> np.ndarray:
    """The level rule of load_audio: clip peaks up to PEAK_LIMIT to [-1, 1], refuse higher ones. `source`: the
    file the samples came from (named in errors), None for an array."""
    if pcm.size == 0:
        return pcm
    peak = _peak(pcm, source)
    if peak <= 1.0:
        return pcm
    if peak <= PEAK_LIMIT:
        return np.clip(pcm, -1.0, 1.0)
    if source is None:
        raise ValueError(f"float audio must lie in [-1, 1]; max |x| = {peak:.4g} is beyond the {PEAK_LIMIT:g}x "
                         f"overshoot that is clipped. Scale it (int16 PCM: divide by 32768) or normalise "
                         f"(pcm / abs(pcm).max())")
    cut = math.ceil(20 * math.log10(peak))
    raise ValueError(f"audio file {source} peaks at max |x| = {peak:.4g} ({20 * math.log10(peak):.1f} dB above full "
                     f"scale), beyond the {PEAK_LIMIT:g}x overshoot that is clipped: its float samples are mis-scaled. "
                     f"Lower its level by {cut} dB (e.g. ffmpeg -i IN -af volume=-{cut}dB OUT) or export it "
                     f"normalised to [-1, 1]")


def _peak(pcm: np.ndarray, source=None) -> float:
    """max |x|; NaN or inf is an error naming `source` (a file) when given."""
    lo, hi = float(pcm.min()), float(pcm.max())     # NaN propagates through min/max: no separate isnan pass
    what = "audio" if source is None else f"audio file {source}"
    fix = "" if source is None else "; the file is corrupt or was written from invalid samples: re-export it"
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{what} contains NaN ({int(np.isnan(pcm).sum())} samples){fix}")
    peak = max(-lo, hi)
    if math.isinf(peak):
        raise ValueError(f"{what} contains inf ({int(np.isinf(pcm).sum())} samples){fix}")
    return peak


def read_audio_track(path) -> tuple[np.ndarray, int]:
    """Decode a file's first audio stream at its own rate -> (float32 mono PCM, sample rate)."""
    _require_media()
    with _first_stream(path, "audio") as (container, stream):
        chunks = [_frame_to_mono(f) for f in _decode_tolerating_tail(container, stream)]
        rate = stream.rate
    if not chunks or sum(c.size for c in chunks) == 0:
        raise ValueError(f"audio file {path} is empty (0 samples decoded)")
    return np.concatenate(chunks), int(rate)


def _decode_tolerating_tail(container, stream):
    """Yield decoded frames; a bad packet is an error unless it is the last one (a truncated download, which
    ffmpeg's own tools also accept). Skipping a bad packet mid-file would shift later audio against the video."""
    failure = None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError as e:
            failure = e
            continue
        if failure is not None and frames:
            raise failure                          # corruption followed by more audio: not just a cut-off end
        yield from frames


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame -> float32 [n], channels averaged like `audio.mean(axis=1)` in the official reader."""
    a = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        a = a.reshape(-1, channels).T          # packed [1, n*C] -> [C, n]
    if a.dtype == np.int16:
        a = a.astype(np.float32) / np.float32(32768.0)
    elif a.dtype == np.int32:
        a = (a / 2.0 ** 31).astype(np.float32)
    elif a.dtype == np.uint8:
        a = (a.astype(np.float32) - 128.0) / np.float32(128.0)
    else:
        a = a.astype(np.float32, copy=False)
    return a[0] if channels == 1 else a.mean(axis=0, dtype=np.float32)


def _resample(pcm: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    _require_media()
    if rate == target:
        return pcm
    return soxr.resample(pcm, rate, target).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- video

def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, T, H, W] or [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the same device.

    The official write path: fp32, clamp(-1, 1), x*0.5 + 0.5 (bitwise equal to (x+1)/2, scaling by 2 is exact),
    clamp(0, 1), x255, then a float -> uint8 cast, which truncates (199.99 -> 199), it does not round.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"frames_to_uint8 takes a torch tensor, got {type(video).__name__}")
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"batch of {video.shape[0]} videos; pass one video [1, 3, T, H, W]")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected video [1, 3, T, H, W] or [3, T, H, W], got {tuple(video.shape)}")
    x = (video.float().clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)
    return (x * 255.0).to(torch.uint8).permute(1, 2, 3, 0).contiguous()   # [3, T, H, W] -> [T, H, W, 3]


class Mp4Writer:
    """Stream uint8 frames [T, H, W, 3] into an H.264 (yuv420p) mp4, optionally with an AAC track.

    with Mp4Writer("out.mp4", audio=pcm) as w:     # pcm: float32 mono 16 kHz (or a file path)
        for frames in stream: w.write(frames)      # any number of frames per call, T = 0 allowed
    The file appears at `path` only when the block exits cleanly with at least one frame: frames go to a hidden
    temporary file beside it, renamed over `path` at the end, so an error never leaves a half-written mp4 nor
    clobbers an existing file. The temporary file is `.<name>.<pid>.<hex>.part` in the target's directory (name:
    the target's file name, pid: the writing process, hex: 12 random hex digits), created by the constructor, so an
    unwritable directory fails at once, not after the frames were computed. A process killed by SIGKILL cannot
    remove its part: the next Mp4Writer for the same path deletes the parts whose pid is no longer running, and
    never one of a live process (two writers to one path may run at once; the last to close wins).

    yuv420p needs even sides: an odd width/height is padded by repeating the last column/row. `scale` upsamples by
    an integer factor (nearest) before that, for tiny demo sizes. The audio track is cut to the video's duration
    (ffmpeg's -shortest, as the official muxing); audio shorter than the video leaves a shorter track.
    """

    def __init__(self, path, fps: int = FPS, audio=None, crf: int = 18, preset: str = "medium", scale: int = 1):
        _require_media()
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        self.path, self.fps, self.crf, self.preset, self.scale = self.check_path(path), fps, crf, preset, scale
        self._container = self._video = self._audio_stream = None
        self._pcm48 = None              # the AAC track's samples, float32 at AAC_RATE
        self._audio_pos = 0             # samples of _pcm48 already encoded
        self._size_in = None            # (H, W) of the frames as given, before scale and padding
        self._closed = False
        self.frames_written = 0
        if audio is not None:
            self.set_audio(audio)
        remove_stale_parts(self.path)
        # Hidden, unique, beside the target (so the final rename stays on one filesystem); created with the user's
        # umask (mkstemp would make the published mp4 owner-only). The first write reopens it as the mp4.
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part")
        try:
            os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:       # check_path passed, yet the directory refuses (read-only mount, name too long)
            raise type(e)(f"cannot create the temporary file {self._tmp.name} in {self.path.parent}: {e.strerror}; "
                          "choose another output path") from None

    @staticmethod
    def check_path(path) -> Path:
        """Check that an mp4 can be written at `path` (without writing anything) and return it as a Path.

        Raises IsADirectoryError (`path` is a directory), FileNotFoundError / NotADirectoryError (its parent is
        missing / not a directory) or PermissionError (the parent is not writable), each saying what to pass."""
        path = Path(path)
        parent = path.parent
        if path.is_dir():
            raise IsADirectoryError(f"output path {path} is a directory; give a file path in it, e.g. "
                                    f"{path / 'out.mp4'}")
        if not parent.exists():
            raise FileNotFoundError(f"output directory {parent} does not exist; create it first "
                                    f"(mkdir -p {parent}) or write elsewhere")
        if not parent.is_dir():
            raise NotADirectoryError(f"output directory {parent} is not a directory; write to a path inside a "
                                     "directory")
        if not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(f"output directory {parent} is not writable; write to a directory you can "
                                  "write to, or change its permissions")
        return path

    def set_audio(self, audio) -> None:
        """Attach the audio track: float32 mono 16 kHz PCM or a file path. Must come before the first write."""
        if self._container is not None:
            raise RuntimeError("set_audio must be called before the first write(): the mp4 header declares streams")
        self._pcm48 = _resample(load_audio(audio), SAMPLE_RATE, AAC_RATE)

    def write(self, frames) -> None:
        """Append uint8 frames [T, H, W, 3] (numpy or torch, any device)."""
        if self._closed:
            raise RuntimeError(f"Mp4Writer for {self.path} is already closed")
        frames = self._check_frames(frames)
        if frames.shape[0] == 0:
            return
        if self.scale > 1:
            frames = frames.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
        if self._container is None:
            self._open(frames.shape[2], frames.shape[1])
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = self.frames_written
            self._mux(self._video.encode(frame))
            self.frames_written += 1
        self._encode_audio(until=self._video_samples())

    def _check_frames(self, frames) -> np.ndarray:
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise TypeError(f"frames must be a uint8 array/tensor [T, H, W, 3], got "
                            f"{getattr(frames, 'dtype', type(frames).__name__)} (see frames_to_uint8)")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
        if self._size_in is not None and frames.shape[0] and self._size_in != frames.shape[1:3]:
            raise ValueError(f"frame size changed from {self._size_in} to {frames.shape[1:3]} (H, W) mid-video")
        if frames.shape[0]:
            self._size_in = frames.shape[1:3]
        return frames

    def _open(self, width: int, height: int) -> None:
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=Fraction(self.fps))
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.time_base = Fraction(1, self.fps)
        self._video.options = {"crf": str(self.crf), "preset": self.preset}
        if self._pcm48 is not None:
            self._audio_stream = self._container.add_stream("aac", rate=AAC_RATE, layout="mono")

    def _video_samples(self) -> int:
        return self.frames_written * AAC_RATE // self.fps     # AAC samples spanned by the frames so far

    def _encode_audio(self, until: int, final: bool = False) -> None:
        """Encode whole AAC frames of the track up to sample `until` (and the partial tail when final)."""
        if self._audio_stream is None:
            return
        until = min(until, self._pcm48.size)
        while self._audio_pos < until and (final or until - self._audio_pos >= AAC_FRAME):
            chunk = self._pcm48[self._audio_pos:self._audio_pos + min(AAC_FRAME, until - self._audio_pos)]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")   # [1 channel, n]
            frame.sample_rate, frame.pts = AAC_RATE, self._audio_pos
            self._mux(self._audio_stream.encode(frame))
            self._audio_pos += chunk.size
        if final:
            self._mux(self._audio_stream.encode(None))

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def close(self) -> None:
        """Flush encoders and publish the file at `path`; raises (leaving no file) if no frame was written."""
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written; nothing saved to {self.path}")
        try:
            self._mux(self._video.encode(None))
            self._encode_audio(until=self._video_samples(), final=True)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)      # atomic on one filesystem: readers see the old file or the new
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything written so far; the target path is left as it was."""
        self._closed = True
        try:
            if self._container is not None:
                self._container, container = None, self._container
                container.close()
        except av.FFmpegError:
            pass                                   # a half-initialised container: the temp file goes anyway
        finally:                                   # even when a signal handler raises during the close
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_stale_parts(path) -> list[Path]:
    """Delete the `.<name>.<pid>.<hex>.part` files an Mp4Writer for `path` left behind when its process was killed
    (see Mp4Writer); parts of running processes are kept. Returns the deleted paths."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[0-9a-f]{12}\.part")
    removed = []
    for part in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        match = pattern.fullmatch(part.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                part.unlink(missing_ok=True)       # missing: another writer swept it first
            except OSError:
                continue                           # not ours to delete (another user's, sticky directory)
            removed.append(part)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (signal 0 checks without sending; EPERM means another user's)."""
    if pid <= 0:
        return False                               # os.kill(0 or -n) would address process groups
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:                          # a pid no system hands out
        return False
    return True


# --------------------------------------------------------------------------------------------- reading back

def probe(path) -> dict:
    """Container facts via PyAV: {"duration": s, "streams": [{"type", "codec", ...}]} (video: fps, frames,
    width, height, pix_fmt, duration; audio: sample_rate, channels, frames, duration)."""
    _require_media()
    path = _existing_file(path, "media")
    try:
        with av.open(str(path)) as container:
            duration = container.duration / av.time_base if container.duration else None
            return {"duration": duration, "streams": [_stream_info(s) for s in container.streams]}
    except av.FFmpegError as e:
        raise ValueError(f"cannot open media file {path}: {e}") from None


def _stream_info(stream) -> dict:
    info = {"type": stream.type, "codec": stream.codec_context.name, "frames": stream.frames,
            "duration": float(stream.duration * stream.time_base) if stream.duration else None}
    if stream.type == "video":
        info.update(fps=float(stream.average_rate) if stream.average_rate else None, width=stream.width,
                    height=stream.height, pix_fmt=stream.codec_context.pix_fmt)
    elif stream.type == "audio":
        info.update(sample_rate=stream.rate, channels=stream.codec_context.layout.nb_channels)
    return info


def read_video(path) -> tuple[np.ndarray, float]:
    """Decode a file's first video stream -> (uint8 [T, H, W, 3] RGB, fps)."""
    _require_media()
    with _first_stream(path, "video") as (container, stream):
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate)
    if not frames:
        raise ValueError(f"video file {path} has no frames")
    return np.stack(frames), fps


@contextmanager
def _first_stream(path, kind: str):
    """Open a media file and yield (container, its first `kind` stream); FFmpeg errors become ValueErrors."""
    path = _existing_file(path, kind)
    try:
        with av.open(str(path)) as container:
            streams = getattr(container.streams, kind)
            if not streams:
                raise ValueError(f"{path} has no {kind} stream; {HELP[kind]}")
            yield container, streams[0]
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode {kind} file {path}: {e}; the file is corrupt or not {kind} "
                         f"({HELP[kind]})") from None


def _existing_file(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} path {path} is not a regular file")
    return path
