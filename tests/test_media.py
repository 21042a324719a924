"""Tests for runtime/media.py: image loading and the official resize/normalise (checked against an explicit PIL
computation), audio decoding of files the tests write with PyAV (44.1 kHz stereo wav/flac/mp3 -> 16 kHz mono, content
checked against the analytic signal), PCM array checks, the truncating uint8 conversion, and Mp4Writer round trips
(probe, frame counts, AAC duration, odd sizes, no partial files on errors).
"""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from runtime.media import (PEAK_LIMIT, Mp4Writer, frames_to_uint8, load_audio, load_image, official_size,
                           prepare_image, probe, read_audio_track, read_video, validate_pcm)

RATE_IN = 44100


def random_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_rgb(t, h, w):
    """Frames that survive lossy H.264 well: gradients that move with t. uint8 [T, H, W, 3]."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 4 + 9 * i) % 256, (y * 5) % 256, np.full_like(x, 40 + 5 * i)], -1) for i in range(t)]
    return np.stack(frames).astype(np.uint8)


def expected_prepared(img: Image.Image, height, width):
    """The official preprocessing restated: PIL bilinear resize, ToTensor (/255), Normalize(0.5, 0.5), in fp32."""
    a = np.asarray(img.resize((width, height), Image.BILINEAR)).astype(np.float32) / np.float32(255)
    return torch.from_numpy((a - np.float32(0.5)) / np.float32(0.5)).permute(2, 0, 1)


def two_tone(n, rate):
    """Stereo test signal [2, n]: 440 Hz left, 1000 Hz right; the mono mix is their average."""
    t = np.arange(n) / rate
    return np.stack([0.6 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)])


def write_audio(path, x, rate, codec, fmt):
    """Encode x [C, n] (float in [-1, 1]) with PyAV; fmt is the encoder's sample format."""
    layout = "stereo" if x.shape[0] == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if fmt == "s16":                                   # packed int16 [1, n*C]
            data = np.round(x.T.reshape(1, -1) * 32767).astype(np.int16)
        elif fmt == "flt":                                 # packed float [1, n*C]
            data = x.T.reshape(1, -1).astype(np.float32)
        else:                                              # planar float [C, n]
            data = x.astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate = rate
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    return path


def peak_hz(pcm, rate):
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size)))
    return np.argmax(spectrum) * rate / pcm.size


# --------------------------------------------------------------------------------------------- images

def test_load_image_accepts_files_pil_and_arrays(tmp_path):
    rgb = random_rgb(20, 30)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png")), rgb)
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "a.png"))), rgb)
    jpg = np.asarray(load_image(tmp_path / "a.jpg"))
    assert jpg.shape == (20, 30, 3) and load_image(tmp_path / "a.jpg").mode == "RGB"
    assert np.array_equal(np.asarray(load_image(Image.fromarray(rgb))), rgb)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(rgb))), rgb)
    assert np.array_equal(np.asarray(load_image(rgb[:, ::-1])), rgb[:, ::-1])        # non-contiguous view


def test_load_image_rgba_and_gray():
    rgba = np.concatenate([random_rgb(8, 9), np.full((8, 9, 1), 7, np.uint8)], -1)
    assert np.array_equal(np.asarray(load_image(rgba)), rgba[..., :3])                # alpha dropped, not blended
    gray = random_rgb(8, 9)[..., 0]
    for g in (gray, gray[..., None]):
        assert np.array_equal(np.asarray(load_image(g)), np.repeat(gray[..., None], 3, -1))


def picture(h=6, w=7, seed=0):
    """A picture as floats in [0, 1] [H, W, 3], the 8-bit rendering every mode below must reproduce."""
    return np.random.default_rng(seed).random((h, w, 3))


def as8(x):
    return np.round(np.asarray(x) * 255).astype(np.uint8)


def as16(x):
    return np.round(np.asarray(x) * 65535).astype(np.uint16)


def palette_image(p, transparent=None):
    """P mode: each pixel indexes its own palette entry holding the pixel's 8-bit colour."""
    rgb = as8(p).reshape(-1, 3)
    im = Image.fromarray(np.arange(rgb.shape[0], dtype=np.uint8).reshape(p.shape[:2]), "P")
    im.putpalette(rgb.reshape(-1).tolist())
    if transparent is not None:
        im.info["transparency"] = transparent
    return im


def png_round_trip(im, tmp_path):
    im.save(tmp_path / "in.png")
    return tmp_path / "in.png"


def png16_rgb(p, tmp_path):
    """A 16-bit RGB PNG (rgb48), written with FFmpeg's encoder: Pillow has no 16-bit RGB mode."""
    frame = av.VideoFrame.from_ndarray(as16(p), format="rgb48le")
    with av.open(str(tmp_path / "rgb48.png"), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = p.shape[1], p.shape[0], "rgb48be"
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    return tmp_path / "rgb48.png"


SHOWN = {"rgb": lambda p: p, "gray": lambda p: p[..., :1].repeat(3, -1),
         "binary": lambda p: (p[..., :1] > 0.5).repeat(3, -1).astype(float)}

# (mode, what the mode can show of a picture, how to build the image from that picture p and tmp_path)
IMAGE_MODES = [
    ("I;16", "gray", lambda p, t: Image.fromarray(as16(p[..., 0]))),
    ("I;16B", "gray", lambda p, t: Image.fromarray(as16(p[..., 0]).astype(">u2"))),
    ("I;16 png", "gray", lambda p, t: png_round_trip(Image.fromarray(as16(p[..., 0])), t)),
    ("I", "gray", lambda p, t: Image.fromarray(as16(p[..., 0]).astype(np.int32))),
    ("I pgm", "gray", lambda p, t: (Image.fromarray(as16(p[..., 0])).save(t / "in.pgm"), t / "in.pgm")[1]),
    ("F", "gray", lambda p, t: Image.fromarray(p[..., 0].astype(np.float32))),
    ("L", "gray", lambda p, t: Image.fromarray(as8(p[..., 0]))),
    ("LA", "gray", lambda p, t: Image.fromarray(np.stack([as8(p[..., 0]), 255 - as8(p[..., 0])], -1), "LA")),
    ("1", "binary", lambda p, t: Image.fromarray(p[..., 0] > 0.5)),
    ("P", "rgb", lambda p, t: palette_image(p)),
    ("P transparent", "rgb", lambda p, t: png_round_trip(palette_image(p, transparent=3), t)),
    ("RGBA", "rgb", lambda p, t: Image.fromarray(np.concatenate([as8(p), as8(p[..., :1])], -1), "RGBA")),
    ("CMYK", "rgb", lambda p, t: Image.fromarray(np.concatenate([as8(1 - p), np.zeros_like(as8(p[..., :1]))], -1),
                                                 "CMYK")),
    ("rgb48 png", "rgb", png16_rgb),
    ("uint16 array", "rgb", lambda p, t: as16(p)),
    ("uint16 gray array", "gray", lambda p, t: as16(p[..., 0])),
    ("uint16 tensor", "rgb", lambda p, t: torch.from_numpy(as16(p).astype(np.int32)).to(torch.uint16)),
]


@pytest.mark.parametrize("mode, shown, make", IMAGE_MODES, ids=[m[0] for m in IMAGE_MODES])
def test_load_image_modes_match_the_8_bit_picture(tmp_path, mode, shown, make):
    """Each mode renders like the 8-bit RGB version of the same picture, within one level of rounding: 16-bit
    values are scaled by 65535 (not clipped at 255), alpha is dropped (not composited)."""
    p = SHOWN[shown](picture())
    got = load_image(make(p, tmp_path))
    assert got.mode == "RGB" and got.size == (p.shape[1], p.shape[0])
    assert np.abs(np.asarray(got).astype(int) - as8(p).astype(int)).max() <= 1


def test_load_image_cmyk_with_black():
    """CMYK with K > 0: Pillow's naive conversion R = (255 - C)(255 - K) / 255 (no ICC profile is applied)."""
    cmyk = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint8).astype(float)
    expected = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    got = np.asarray(load_image(Image.fromarray(cmyk.astype(np.uint8), "CMYK"))).astype(float)
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("image, words", [
    (Image.fromarray(np.array([[0, 70000]], np.int32)), r"mode 'I'.*\[0, 70000\].*\[0, 65535\]"),
    (Image.fromarray(np.array([[0, -5]], np.int32)), r"mode 'I'.*\[-5, 0\]"),
    (Image.fromarray(np.array([[0.0, 255.0]], np.float32)), r"mode 'F'.*\[0, 255\].*\[0, 1\].*divide"),
    (Image.fromarray(np.array([[0.0, np.nan]], np.float32)), r"mode 'F'.*NaN"),
    (Image.new("La", (4, 4)), r"mode 'La'.*8-bit RGB"),
], ids=["I above 16 bits", "I negative", "F in 0..255", "F NaN", "La"])
def test_load_image_refuses_modes_it_cannot_render(image, words):
    with pytest.raises(ValueError, match=words):
        load_image(image)


def test_load_image_mode_error_names_the_file(tmp_path):
    Image.fromarray(np.array([[0.0, 2.0]], np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=r"depth\.tif has mode 'F'"):
        load_image(tmp_path / "depth.tif")


@pytest.mark.parametrize("make, error, words", [
    (lambda p: p / "missing.png", FileNotFoundError, "not found"),
    (lambda p: p, ValueError, "not a regular file"),
    (lambda p: (p / "text.png").write_text("not an image") and p / "text.png", ValueError, "cannot read image"),
    (lambda p: [[1, 2, 3]], TypeError, "unsupported image type"),
    (lambda p: np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
    (lambda p: torch.zeros(4, 4, 3), TypeError, "torch.uint8"),
    (lambda p: np.zeros((5, 5, 2), np.uint8), ValueError, "not understood"),
    (lambda p: np.zeros((3, 8, 8), np.uint8), ValueError, "channels-first"),
    (lambda p: np.zeros((0, 8, 3), np.uint8), ValueError, "not understood"),
])
def test_load_image_errors(tmp_path, make, error, words):
    with pytest.raises(error, match=words):
        load_image(make(tmp_path))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_load_image_truncated_file(tmp_path, ext):
    Image.fromarray(random_rgb(40, 40)).save(tmp_path / f"full.{ext}")
    data = (tmp_path / f"full.{ext}").read_bytes()
    (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt/truncated"):
        load_image(tmp_path / f"cut.{ext}")


@pytest.mark.parametrize("size_in, size_out", [((96, 64), (48, 32)), ((97, 64), (48, 32)), ((49, 33), (48, 32)),
                                               ((48, 32), (48, 32)), ((30, 20), (48, 32))])
def test_prepare_image_matches_official_resize(size_in, size_out):
    img = Image.fromarray(random_rgb(size_in[1], size_in[0]))
    x = prepare_image(img, height=size_out[1], width=size_out[0])
    assert x.shape == (3, size_out[1], size_out[0]) and x.dtype == torch.float32
    assert torch.equal(x, expected_prepared(img, size_out[1], size_out[0]))
    assert x.min() >= -1 and x.max() <= 1


def test_prepare_image_normalisation_values():
    levels = np.array([0, 128, 255], np.uint8)
    x = prepare_image(np.broadcast_to(levels[None, :, None], (2, 3, 3)).copy(), height=2, width=3)
    mid = (np.float32(128) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)      # fp32, as ToTensor + Normalize
    assert torch.equal(x[0, 0], torch.tensor([-1.0, mid, 1.0]))


def test_prepare_image_crop_is_centred():
    img = Image.fromarray(random_rgb(60, 120))            # 120x60 (2:1) into 48x32 (3:2): keep the middle 90 columns
    x = prepare_image(img, height=32, width=48, fit="crop")
    assert torch.equal(x, expected_prepared(img.crop((15, 0, 105, 60)), 32, 48))
    tall = Image.fromarray(random_rgb(101, 48))           # 48x101 into 48x32: keep rows 34..66 (crop height 32)
    assert torch.equal(prepare_image(tall, 32, 48, fit="crop"), expected_prepared(tall.crop((0, 34, 48, 66)), 32, 48))


def test_prepare_image_stretch_is_the_official_path():
    img = Image.fromarray(random_rgb(37, 100))
    h, w = official_size(37, 100, area=(16, 64))          # a small area so the tiny image gets shrunk
    assert torch.equal(prepare_image(img, h, w, fit="stretch"), expected_prepared(img, h, w))


def test_prepare_image_aspect_error_names_sizes():
    with pytest.raises(ValueError, match=r"120x60.*48x32.*fit='crop'"):
        prepare_image(random_rgb(60, 120), height=32, width=48)
    with pytest.raises(ValueError, match="fit="):
        prepare_image(random_rgb(32, 48), height=32, width=48, fit="pad")


def test_prepare_image_too_small():
    with pytest.raises(ValueError, match="too small.*at least 24x16"):
        prepare_image(random_rgb(14, 21), height=32, width=48)
    assert prepare_image(random_rgb(16, 24), height=32, width=48).shape == (3, 32, 48)
    with pytest.raises(ValueError, match="too small: 21x14"):                # reported at the cropped size
        prepare_image(random_rgb(14, 60), height=32, width=48, fit="crop")


def test_official_size():
    assert official_size(960, 960) == (624, 624)            # the README example: 1521 tokens, "quirk mode"
    assert official_size(480, 832) == (480, 832) and official_size(832, 480) == (832, 480)
    assert official_size(1080, 1920) == (464, 832)          # int(473.97) = 473 -> 464; int(842.6) = 842 -> 832
    assert official_size(320, 320) == (320, 320)            # never enlarged
    assert official_size(10, 10) == (16, 16)                # max(div, ...)


# --------------------------------------------------------------------------------------------- audio

@pytest.mark.parametrize("codec, ext, fmt, tol", [
    ("pcm_s16le", "wav", "s16", 2e-3), ("pcm_f32le", "wav", "flt", 2e-3), ("flac", "flac", "s16", 2e-3),
    ("libmp3lame", "mp3", "fltp", None),
])
def test_load_audio_file_stereo_44k(tmp_path, codec, ext, fmt, tol):
    n = RATE_IN // 2
    path = write_audio(tmp_path / f"a.{ext}", two_tone(n, RATE_IN), RATE_IN, codec, fmt)
    pcm = load_audio(path)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(pcm.size - n * 16000 / RATE_IN) <= 1
    expected = two_tone(pcm.size, 16000).mean(0)
    mid = slice(400, pcm.size - 400)                       # resampler edge effects stay near the ends
    if tol is not None:                                    # lossless: sample-exact up to quantisation + resampling
        assert np.abs(pcm[mid] - expected[mid]).max() < tol
    lags = range(-3, 4)                                    # mp3: lossy, but aligned (the decoder drops its padding)
    corr = [np.corrcoef(np.roll(pcm, k)[mid], expected[mid])[0, 1] for k in lags]
    assert max(corr) > 0.99 and lags[int(np.argmax(corr))] == 0
    assert abs(peak_hz(pcm[mid], 16000) - 440) < 5


def test_load_audio_16k_int16_wav_is_exact(tmp_path):
    x = np.sin(np.arange(1600) * 0.05)[None] * 0.5
    pcm = load_audio(write_audio(tmp_path / "a.wav", x, 16000, "pcm_s16le", "s16"))
    assert np.array_equal(pcm, np.round(x[0] * 32767).astype(np.int16) / np.float32(32768))
    pcm2, rate = read_audio_track(tmp_path / "a.wav")
    assert rate == 16000 and np.array_equal(pcm, pcm2)


def test_load_audio_arrays():
    x = (0.5 * np.sin(np.arange(16000) * 0.1)).astype(np.float32)
    assert np.array_equal(load_audio(x), x)
    assert np.array_equal(load_audio(torch.from_numpy(x)), x)
    assert np.array_equal(load_audio(np.array([-32768, 0, 16384], np.int16)), np.array([-1, 0, 0.5], np.float32))
    y = np.sin(2 * np.pi * 440 * np.arange(RATE_IN) / RATE_IN) * 0.5       # float64 at 44.1 kHz
    z = load_audio(y, sample_rate=RATE_IN)
    assert z.dtype == np.float32 and z.size == 16000 and abs(peak_hz(z, 16000) - 440) < 2


@pytest.mark.parametrize("pcm, error, words", [
    (np.array([0.0, np.nan], np.float32), ValueError, "NaN"),
    (np.array([0.0, np.inf], np.float32), ValueError, "inf"),
    (np.array([0.1, -5.0], np.float32), ValueError, r"max \|x\| = 5 is beyond the 4x overshoot.*normalise"),
    (np.array([1, 2], np.int32), TypeError, "int16"),
    (np.zeros((2, 100), np.float32), ValueError, "average the channels"),
    (np.zeros(0, np.float32), ValueError, "empty"),
    ([0.0, 0.1], TypeError, "unsupported audio type"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "dtype"),
])
def test_audio_array_errors(pcm, error, words):
    with pytest.raises(error, match=words):
        load_audio(pcm)
    with pytest.raises(error, match=words):
        validate_pcm(pcm)


def test_validate_pcm_rules():
    assert validate_pcm(np.zeros(0, np.float32), allow_empty=True).shape == (0,)
    assert validate_pcm(torch.zeros(0), allow_empty=True).dtype == np.float32
    assert validate_pcm(np.array([1.0005, -1.0], np.float32)).dtype == np.float32       # within the tolerance
    assert validate_pcm(torch.tensor([0.5], dtype=torch.bfloat16))[0] == 0.5
    with pytest.raises(ValueError, match=r"16000 Hz.*load_audio\(pcm, sample_rate=44100\)"):
        validate_pcm(np.zeros(10, np.float32), sample_rate=44100)
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        load_audio(np.zeros(10, np.float32), sample_rate=0)


@pytest.mark.parametrize("rate", ["16000", 16000.0, True, None])
def test_sample_rate_must_be_an_int(rate):
    with pytest.raises(TypeError, match=r"sample_rate must be an int \(Hz\), got .*" + type(rate).__name__):
        validate_pcm(np.zeros(10, np.float32), sample_rate=rate)
    if rate is not None:                                  # None means 16 kHz for load_audio
        with pytest.raises(TypeError, match=r"sample_rate must be an int \(Hz\)"):
            load_audio(np.zeros(10, np.float32), sample_rate=rate)
    assert validate_pcm(np.zeros(3, np.float32), sample_rate=np.int64(16000)).shape == (3,)


def float_wav(path, x, rate):
    return write_audio(path, np.asarray(x, np.float64)[None], rate, "pcm_f32le", "flt")


@pytest.mark.parametrize("rate", [16000, RATE_IN])
def test_one_level_rule_for_files_and_arrays(tmp_path, rate):
    """Peaks up to PEAK_LIMIT are clipped and beyond it refused, alike for a float WAV file and the same samples as
    an array (through load_audio, and through validate_pcm, the session's check, at 16 kHz)."""
    t = np.arange(rate // 4) / rate
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    for gain in (1.5, 0.99 * PEAK_LIMIT):
        x = gain * tone
        from_file = load_audio(float_wav(tmp_path / "hot.wav", x, rate))
        from_array = load_audio(x, sample_rate=rate)
        assert np.array_equal(from_file, from_array) and np.abs(from_file).max() == 1.0
        if rate == 16000:
            assert np.array_equal(from_array, np.clip(x, -1, 1)) and np.array_equal(validate_pcm(x), from_array)
    for gain in (1.01 * PEAK_LIMIT, 50.0):
        x = gain * tone
        with pytest.raises(ValueError, match=r"loud\.wav peaks at max \|x\| = .*dB above full scale.*volume=-"):
            load_audio(float_wav(tmp_path / "loud.wav", x, rate))
        with pytest.raises(ValueError, match=r"max \|x\| = .* beyond the 4x overshoot"):
            load_audio(x, sample_rate=rate)
        if rate == 16000:
            with pytest.raises(ValueError, match=r"max \|x\| = .* beyond the 4x overshoot"):
                validate_pcm(x)


@pytest.mark.parametrize("rate", [16000, RATE_IN])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_audio_names_the_file_holding_nan_or_inf(tmp_path, rate, bad):
    x = np.zeros(rate // 10)
    x[100:103] = bad
    word = "NaN" if np.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=rf"audio file .*broken\.wav contains {word} \(3 samples\).*re-export"):
        load_audio(float_wav(tmp_path / "broken.wav", x, rate))


def test_load_audio_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("hello " * 50)
    with pytest.raises(ValueError, match="cannot decode audio file"):
        load_audio(tmp_path / "text.wav")
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / "img.png")
    with pytest.raises(ValueError, match="no audio stream"):
        load_audio(tmp_path / "img.png")
    mp3 = (write_audio(tmp_path / "a.mp3", two_tone(RATE_IN, RATE_IN), RATE_IN, "libmp3lame", "fltp")).read_bytes()
    middle = len(mp3) // 3                                  # garbage mid-file: an error, not a silent time shift
    bad = mp3[:middle] + np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes() + mp3[middle + 3000:]
    (tmp_path / "bad.mp3").write_bytes(bad)
    with pytest.raises(ValueError, match="cannot decode audio file"):
        load_audio(tmp_path / "bad.mp3")
    with pytest.raises(ValueError, match="carries its own rate"):
        load_audio(tmp_path / "a.mp3", sample_rate=44100)


# --------------------------------------------------------------------------------------------- frames

def test_frames_to_uint8_truncates_like_the_official_writer():
    v = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 2 * 199.99 / 255 - 1, 2 * 200.3 / 255 - 1])
    out = frames_to_uint8(v.view(1, 7, 1, 1).expand(3, 7, 1, 1)[None])          # [1, 3, T=7, 1, 1]
    assert out.dtype == torch.uint8 and out.shape == (7, 1, 1, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 127, 255, 255, 199, 200]          # 127.5 -> 127, 199.99 -> 199
    x = torch.rand(3, 4, 5, 6) * 2.4 - 1.2                                       # [3, T, H, W], some out of range
    ref = np.clip(np.clip(x.numpy(), -1, 1) * np.float32(0.5) + np.float32(0.5), 0, 1) * np.float32(255)
    assert np.array_equal(frames_to_uint8(x).numpy(), np.floor(ref).astype(np.uint8).transpose(1, 2, 3, 0))
    assert torch.equal(frames_to_uint8(x.bfloat16()), frames_to_uint8(x.bfloat16().float()))


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 1, 4, 4), torch.zeros(4, 1, 4, 4), np.zeros((3, 1, 4, 4))])
def test_frames_to_uint8_rejects(bad):
    with pytest.raises((ValueError, TypeError)):
        frames_to_uint8(bad)


# --------------------------------------------------------------------------------------------- mp4

def test_mp4_round_trip_chunked_with_audio(tmp_path):
    frames = smooth_rgb(25, 32, 48)
    tone = (0.5 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)).astype(np.float32)
    with Mp4Writer(tmp_path / "out.mp4", audio=tone) as w:
        for chunk in (frames[:7], frames[7:7], torch.from_numpy(frames[7:])):  # chunks of 7, 0 and 18 frames
            w.write(chunk)
    info = probe(tmp_path / "out.mp4")
    video = [s for s in info["streams"] if s["type"] == "video"]
    audio = [s for s in info["streams"] if s["type"] == "audio"]
    assert len(video) == 1 and len(audio) == 1
    assert (video[0]["codec"], video[0]["fps"], video[0]["frames"]) == ("h264", 25.0, 25)
    assert (video[0]["width"], video[0]["height"], video[0]["pix_fmt"]) == (48, 32, "yuv420p")
    assert audio[0]["codec"] == "aac" and audio[0]["channels"] == 1 and abs(audio[0]["duration"] - 1.0) < 0.05
    decoded, fps = read_video(tmp_path / "out.mp4")
    assert fps == 25.0 and decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4                         # crf 18 on smooth content
    pcm, rate = read_audio_track(tmp_path / "out.mp4")
    assert abs(peak_hz(pcm, rate) - 300) < 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]                     # no temp file left


def test_mp4_audio_cut_to_video_and_set_audio(tmp_path):
    long_tone = (0.3 * np.sin(np.arange(16000 * 3) * 0.2)).astype(np.float32)
    with Mp4Writer(tmp_path / "out.mp4") as w:
        w.set_audio(long_tone)
        w.write(smooth_rgb(10, 16, 16))
        with pytest.raises(RuntimeError, match="before the first write"):
            w.set_audio(long_tone)
    audio = [s for s in probe(tmp_path / "out.mp4")["streams"] if s["type"] == "audio"][0]
    assert abs(audio["duration"] - 10 / 25) < 0.05                                 # -shortest, as the official mux


def test_mp4_odd_size_and_scale(tmp_path):
    frames = smooth_rgb(3, 33, 47)
    with Mp4Writer(tmp_path / "odd.mp4") as w:
        w.write(frames)
    decoded, _ = read_video(tmp_path / "odd.mp4")
    assert decoded.shape == (3, 34, 48, 3)                                         # padded by one edge pixel
    assert np.abs(decoded[:, :33, :47].astype(int) - frames).mean() < 4
    assert np.abs(decoded[:, :33, 47].astype(int) - frames[:, :, 46]).mean() < 6     # the pad repeats the edge
    with Mp4Writer(tmp_path / "big.mp4", scale=3) as w:
        w.write(frames[:, :16, :16])
    decoded, _ = read_video(tmp_path / "big.mp4")
    assert decoded.shape == (3, 48, 48, 3)
    assert np.abs(decoded[:, 1::3, 1::3].astype(int) - frames[:, :16, :16]).mean() < 6


def test_mp4_exception_leaves_target_untouched(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    with pytest.raises(KeyError):
        with Mp4Writer(target) as w:
            w.write(smooth_rgb(5, 16, 16))
            raise KeyError("generation failed")
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_mp4_no_frames_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no frames were written"):
        with Mp4Writer(tmp_path / "out.mp4") as w:
            w.write(np.zeros((0, 16, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_mp4_bad_frames(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mp4Writer(tmp_path / "nowhere" / "out.mp4")
    with pytest.raises(TypeError, match="uint8"):
        with Mp4Writer(tmp_path / "a.mp4") as w:
            w.write(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="frame size changed"):
        with Mp4Writer(tmp_path / "b.mp4") as w:
            w.write(np.zeros((1, 16, 16, 3), np.uint8))
            w.write(np.zeros((1, 16, 18, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        with Mp4Writer(tmp_path / "c.mp4") as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        Mp4Writer(tmp_path / "d.mp4", audio=np.full(10, np.nan, np.float32))
    assert list(tmp_path.iterdir()) == []
    with Mp4Writer(tmp_path / "e.mp4") as w:
        w.write(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(RuntimeError, match="already closed"):
        w.write(np.zeros((1, 16, 16, 3), np.uint8))
    (tmp_path / "plain").write_bytes(b"")                     # the published mp4 gets the umask's mode, like this
    assert (tmp_path / "e.mp4").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
