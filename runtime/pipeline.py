"""AvatarPipeline: the loaded components plus the two entry points, `session()` (streaming) and `generate()` (offline).

    pipe = AvatarPipeline.from_preset("tiny", device="cpu", dtype=torch.float32, seed=0)   # random weights
    pipe = AvatarPipeline.from_pretrained("/path/to/weights", device="cuda")              # released weights
    sess = pipe.session(image, stream=StreamConfig.preset("official"), text="", seed=0)
    video = pipe.generate(image, audio, stream=..., audio_mode="clip" | "stream", seed=0)

Components: `dit` (AvatarDiT), `vae` (encoder of the reference image and default decoder), `decoder` (the VAE or
the TAEHV tiny decoder, per ModelConfig.decoder), `audio_encoder` (wav2vec2 features), `text_encoder` (umT5, or
None when a preset's encoder is too large to build with random weights: the text context is then zeros).
`random_components` names the parts that carry random weights (their output is noise, not a face).

Not here: the loop itself (session.py), file formats (weights.py), media I/O (media.py).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .audio import LogMelFeatures, StreamingAudioFeatures, Wav2Vec2Features
from .config import TOY_ASSETS, ModelConfig, StreamConfig, check_seed
from .dit import AvatarDiT, init_random_
from .frame_ae import FrameAE
from .media import load_audio
from .scheduler import build_plan
from .session import StreamSession
from .text import TextEncoder, load_text_embedding
from .tiny_decoder import TAEHV
from .vae import WanVAE

# A random text encoder larger than this is not built (umT5-XXL would take ~23 GB); the context is zeros instead.
MAX_RANDOM_TEXT_PARAMS = 200_000_000


def _build(cls, cfg: ModelConfig, device, dtype, seed: int | None) -> nn.Module:
    """Build on the meta device, then materialise on `device` (random init unless seed is None)."""
    with torch.device("meta"):
        module = cls(cfg)
    if str(device) == "meta":
        return module.to(dtype=dtype)
    module = module.to_empty(device=device).to(dtype=dtype)
    for sub in module.modules():          # buffers hold no data after to_empty: let modules refill them
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
    if seed is not None:
        init_random_(module, seed)
    return module.eval().requires_grad_(False)


class AvatarPipeline:
    def __init__(self, config: ModelConfig, *, dit: AvatarDiT, vae: nn.Module, decoder: nn.Module | None = None,
                 audio_encoder=None, text_encoder: TextEncoder | None = None, device="cpu",
                 dtype=torch.float32, random_components: tuple[str, ...] = ()):
        self.config, self.dit, self.vae = config, dit, vae
        self.decoder = decoder if decoder is not None else vae
        self.audio_encoder, self.text_encoder = audio_encoder, text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.vae_dtype = dtype
        self.random_components = tuple(random_components)
        self.default_stream = StreamConfig.preset("official")     # what session()/generate() use by default
        self.live_stream: StreamConfig | None = None    # what live serving uses (runtime.live); None: default_stream
        self._text_cache: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str = "tiny", *, device=None, dtype=torch.float32, seed: int = 0,
                    **overrides) -> "AvatarPipeline":
        """All components with deterministic random weights (`device="meta"`: shapes only, no memory).
        `overrides` change ModelConfig fields of the preset, e.g. `decoder="taehv"`. The `toy-talker` preset
        loads its shipped trained weights instead (`random_weights=True` for a random one, as training starts).
        `device`: default "cuda" when CUDA is available, else "cpu"; `dtype` default float32."""
        device, dtype, seed = resolve_device(device, allow_meta=True), resolve_dtype(dtype), check_seed(seed)
        if name == "toy-talker" and not overrides.pop("random_weights", False):
            return cls.from_toy(TOY_ASSETS, device=device, dtype=dtype)
        overrides.pop("random_weights", None)
        cfg = ModelConfig.preset(name, **overrides)
        meta = str(device) == "meta"
        dit = _build(AvatarDiT, cfg, device, dtype, seed)
        vae = _build(codec_class(cfg), cfg, device, dtype, seed + 1)
        decoder = _build(TAEHV, cfg, device, dtype, seed + 2) if cfg.decoder == "taehv" else None
        audio = text = None
        if not meta:
            audio = random_audio_encoder(cfg, seed + 3).to(device)
            if _t5_params(cfg) <= MAX_RANDOM_TEXT_PARAMS:
                text = TextEncoder.random(cfg, seed + 4).to(device)
        parts = ("dit", "vae", "audio", "text") + (("decoder",) if decoder is not None else ())
        return cls(cfg, dit=dit, vae=vae, decoder=decoder, audio_encoder=audio, text_encoder=text, device=device,
                   dtype=dtype, random_components=parts)

    @classmethod
    def from_toy(cls, path: str | Path = TOY_ASSETS, *, device=None, dtype=torch.float32) -> "AvatarPipeline":
        """The toy-talker written by `python -m train.toy` (toy-talker.safetensors + toy-talker.json)."""
        from safetensors.torch import load_file
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        path = Path(path)
        weights, meta_file = path / "toy-talker.safetensors", path / "toy-talker.json"
        if not weights.is_file() or not meta_file.is_file():
            raise FileNotFoundError(f"no toy-talker in {path} (toy-talker.safetensors + toy-talker.json); train one "
                                    f"with `python -m train.toy --out DIR --install`")
        meta = json.loads(meta_file.read_text())
        cfg, stream = ModelConfig.from_dict(meta["model"]), StreamConfig.from_dict(meta["stream"])
        tensors = load_file(weights)
        parts = {}
        for prefix, klass in (("dit.", AvatarDiT), ("ae.", FrameAE)):     # small: built directly on the CPU
            module = klass(cfg)
            module.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
            parts[prefix] = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        text = _EmbeddingText(tensors["text.context"].float())
        pipe = cls(cfg, dit=parts["dit."], vae=parts["ae."], audio_encoder=LogMelFeatures.from_config(cfg),
                   text_encoder=text, device=device, dtype=dtype)
        pipe.default_stream = stream
        if meta.get("live_stream"):           # a preset measured to match the model's own stream with less delay
            pipe.live_stream = StreamConfig.preset(meta["live_stream"])
        return pipe

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, dit=None, vae=None, wav2vec=None, text=None,
                        tokenizer=None, taehv=None, preset: str = "wan-1.3b", lora: str = "merge",
                        lora_alpha: float = 64.0, use_ema: bool = False, device=None,
                        dtype=None, seed: int = 0) -> "AvatarPipeline":
        """Load released weights. `path`: a directory in the official download layout (see weights.py and the
        README); keywords point at single files and override it. A component not found is built with random
        weights and a warning names it. `device`: default "cuda" when CUDA is available, else "cpu"; `dtype`:
        default bfloat16 on CUDA (the official computation), float32 on the CPU."""
        from .weights import load_dit, load_vae, resolve_layout
        device, seed = resolve_device(device), check_seed(seed)
        dtype = resolve_dtype(dtype, default=torch.bfloat16 if device.type == "cuda" else torch.float32)
        cfg = ModelConfig.preset(preset)
        found = resolve_layout(path) if path is not None else {}
        paths = {"dit": dit or found.get("dit"), "vae": vae or found.get("vae"),
                 "wav2vec": wav2vec or found.get("wav2vec"), "text": text or found.get("text"),
                 "tokenizer": tokenizer or found.get("tokenizer"), "taehv": taehv or found.get("taehv")}
        random_parts = []
        model = _build(AvatarDiT, cfg, "meta", dtype, None)
        if paths["dit"]:
            load_dit(model, paths["dit"], lora=lora, lora_alpha=lora_alpha, use_ema=use_ema)
            model = model.to(device).eval().requires_grad_(False)
        else:
            model, _ = _build(AvatarDiT, cfg, device, dtype, seed), random_parts.append("dit")

        def codec_part(cls, file, seed_offset, name):
            part = _build(cls, cfg, device, dtype, None if file else seed + seed_offset)
            if not file:
                random_parts.append(name)
                return part
            load_vae(part, file)
            return part.to(device=device, dtype=dtype)

        codec = codec_part(WanVAE, paths["vae"], 1, "vae")
        decoder = codec_part(TAEHV, paths["taehv"], 2, "decoder") if cfg.decoder == "taehv" else None
        if paths["wav2vec"]:
            audio = Wav2Vec2Features.from_pretrained(paths["wav2vec"]).to(device)
        else:
            audio = Wav2Vec2Features.random(cfg, seed + 3).to(device)
            random_parts.append("audio")
        text_encoder = None
        if paths["text"] and str(paths["text"]).endswith(".safetensors"):
            text_encoder = _EmbeddingText(load_text_embedding(paths["text"], cfg))
        elif paths["text"]:
            if not paths["tokenizer"]:
                raise FileNotFoundError("the umT5 weights need their tokenizer directory (google/umt5-xxl); "
                                        "pass tokenizer=... or use the official layout")
            text_encoder = TextEncoder.from_wan(paths["text"], paths["tokenizer"], dtype=dtype).to(device)
        else:
            random_parts.append("text")
        if random_parts:
            warnings.warn(f"no weights found for {', '.join(random_parts)}: using random weights for them "
                          "(their output is noise); see the README section 'Real weights'", stacklevel=2)
        return cls(cfg, dit=model, vae=codec, decoder=decoder, audio_encoder=audio, text_encoder=text_encoder,
                   device=device, dtype=dtype, random_components=tuple(random_parts))

    # ------------------------------------------------------------------ component helpers
    def _stream(self, stream) -> StreamConfig:
        return self.default_stream if stream is None else _stream(stream)

    def encode_text(self, text) -> Tensor:
        """Text context [text_len, text_dim]: a string (through the text encoder, cached per string), a tensor,
        or a path to an embedding file written by `runtime.text.save_text_embedding`.

        A model without a text encoder (no umT5 loaded: zeros; toy-talker: its trained context) takes only the
        empty string, its fixed context; any other string is a ValueError rather than a prompt silently ignored."""
        cfg = self.config
        if isinstance(text, Tensor):
            emb = text
        elif isinstance(text, Path) or (isinstance(text, str) and text.endswith(".safetensors")):
            emb = load_text_embedding(text, cfg)
        elif isinstance(text, str):
            if text not in self._text_cache:
                self._text_cache[text] = self._encode_string(text)
            emb = self._text_cache[text]
        else:
            raise TypeError(f"text must be a string, a tensor [text_len, text_dim] or an embedding file path, "
                            f"got {type(text).__name__}")
        if tuple(emb.shape) != (cfg.text_len, cfg.text_dim):
            raise ValueError(f"text context must be [{cfg.text_len}, {cfg.text_dim}], got {tuple(emb.shape)}")
        return emb.to(device=self.device, dtype=self.dtype)

    def _encode_string(self, text: str) -> Tensor:
        encoder = self.text_encoder
        if encoder is not None and not isinstance(encoder, _EmbeddingText):
            return encoder.encode(text)
        if text:
            fixed = "no text encoder is loaded: it is zeros" if encoder is None else "one precomputed embedding"
            raise ValueError(f"text {text!r} cannot be encoded: this model's text context is fixed ({fixed}), so "
                             "a prompt would be ignored. Leave the text empty, or pass a text embedding instead: a "
                             ".safetensors file written by runtime.text.save_text_embedding or a tensor "
                             f"[{self.config.text_len}, {self.config.text_dim}]")
        return torch.zeros(self.config.text_len, self.config.text_dim) if encoder is None else encoder.emb

    def streaming_audio(self, stream: StreamConfig) -> StreamingAudioFeatures:
        """A fresh incremental audio feature extractor with the stream's left context (log-mel is causal:
        one frame of context makes it exact)."""
        context = 1 if isinstance(self.audio_encoder, LogMelFeatures) else \
            round(stream.audio_left_context_s * self.config.fps)
        return StreamingAudioFeatures(self.audio_encoder, left_context_frames=context)

    # ------------------------------------------------------------------ entry points
    def session(self, image, stream: StreamConfig | str | None = None, text="", seed: int = 0,
                fit: str = "error", engine: bool | None = None, compile: bool = False,
                inference: bool = True, dit=None, decoder=None) -> StreamSession:
        """A streaming session for one reference image (see session.py). `engine`: run steady-state steps
        through the static-shape engine (default: on CUDA); `compile`: torch.compile the engine's step;
        `dit` / `decoder`: other backends for the DiT calls and the decoder (step.py says what they are), e.g.
        the exported graphs: `pipe.session(image, **export.backend.ort_backends(DIR))`."""
        return StreamSession(self, image, stream=self._stream(stream), text=text, seed=seed, fit=fit,
                             engine=engine, compile=compile, inference=inference, dit=dit, decoder=decoder)

    def generate(self, image, audio, stream: StreamConfig | str | None = None, audio_mode: str = "clip",
                 seed: int = 0, text="", fit: str = "error", num_latent_frames: int | None = None,
                 sample_rate: int | None = None, progress: bool = False) -> Tensor:
        """Offline: every frame for the whole audio, uint8 [T, H, W, 3].

        `audio_mode="clip"` extracts features from the whole clip and draws noise in the official order: with
        `num_latent_frames` N given (and audio at least (4N + 80) / 25 s long) this is the official computation
        end to end, 1 + 4(N - 1) frames. Without it N covers the audio and 1 + A frames are returned (A = audio
        frames). `audio_mode="stream"` is exactly a session fed the whole audio at once.
        """
        stream = self._stream(stream)
        pcm = load_audio(audio, sample_rate=sample_rate)
        if audio_mode == "stream":
            sess = self.session(image, stream=stream, text=text, seed=seed, fit=fit)
            return torch.cat([sess.push_audio(pcm), sess.flush()])
        if audio_mode != "clip":
            raise ValueError(f"audio_mode={audio_mode!r}: expected 'clip' or 'stream'")
        cfg = self.config
        audio_frames = math.ceil(len(pcm) / cfg.samples_per_frame)
        limit = None
        if num_latent_frames is not None:
            if isinstance(num_latent_frames, bool) or not isinstance(num_latent_frames, (int, np.integer)):
                raise TypeError(f"num_latent_frames must be an int, got {num_latent_frames!r}")
            num_latent_frames = int(num_latent_frames)
            build_plan(stream, num_latent_frames)            # names the valid lengths before any audio check
        else:
            per_block = stream.block_frames * cfg.audio_frames_per_latent
            num_latent_frames = 1 + stream.block_frames * math.ceil(audio_frames / per_block)
            limit = 1 + audio_frames
        teacher_len = cfg.audio_frames_per_latent * num_latent_frames + 80   # the official extraction length
        if limit is None and audio_frames < teacher_len:      # the official loader's rule: ceil(samples / 640)
            raise ValueError(f"audio is too short for num_latent_frames={num_latent_frames}: the official extraction "
                             f"needs {teacher_len} audio frames of 40 ms (more than {(teacher_len - 1) / cfg.fps:.2f} "
                             f"s), got {audio_frames} ({len(pcm) / cfg.sample_rate:.2f} s); omit num_latent_frames "
                             "to cover the audio given")
        feats = self.audio_encoder.clip(pcm, teacher_len)[1:]                 # drop the zero row
        sess = StreamSession(self, image, stream=stream, text=text, seed=seed, fit=fit, features=feats,
                             num_latent_frames=num_latent_frames, noise="official", frame_limit=limit)
        return sess.flush()


class _EmbeddingText:
    """Stands in for the text encoder when the user ships a precomputed context."""

    def __init__(self, emb: Tensor):
        self.emb = emb

    def encode(self, text: str) -> Tensor:
        return self.emb


def codec_class(cfg: ModelConfig):
    """The latent codec named by the config: the Wan 2.1 VAE or the toy-talker's per-frame autoencoder."""
    return FrameAE if cfg.vae == "frame-ae" else WanVAE


def random_audio_encoder(cfg: ModelConfig, seed: int):
    """wav2vec2 with random weights, or the log-mel extractor (which has no weights)."""
    return LogMelFeatures.from_config(cfg) if cfg.audio_features == "logmel" else Wav2Vec2Features.random(cfg, seed)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device=None, allow_meta: bool = False) -> torch.device:
    """None -> "cuda" when CUDA is available, else "cpu". Accepts "cpu", "cuda", "cuda:N" or a torch.device
    (and "meta", shapes only, where `allow_meta`); anything else is a ValueError that says what to pass."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', or a torch.device; got "
                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    allowed = ("cpu", "cuda", "meta") if allow_meta else ("cpu", "cuda")
    if dev.type not in allowed:
        raise ValueError(f"device {device!r} is not supported: the runtime runs on {' or '.join(map(repr, allowed))}"
                         + (" ('meta' builds shapes only)" if allow_meta else ""))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {device!r} asked for, but {why}; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def resolve_dtype(dtype=None, default=torch.float32) -> torch.dtype:
    """None -> `default`; a torch floating dtype or one of the names in DTYPES ("float32", "bf16", ...)."""
    if dtype is None:
        return default
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16 "
                     "(or their names: 'float32', 'bfloat16', 'float16')")


def _stream(stream) -> StreamConfig:
    if stream is None:
        return StreamConfig.preset("official")
    if isinstance(stream, str):
        return StreamConfig.preset(stream)
    if not isinstance(stream, StreamConfig):
        raise TypeError(f"stream must be a StreamConfig or a preset name, got {type(stream).__name__}")
    return stream


def _t5_params(cfg: ModelConfig) -> int:
    d = cfg.text_dim
    per_layer = 4 * d * cfg.t5_heads * cfg.t5_d_kv + 3 * d * cfg.t5_ffn
    return cfg.t5_layers * per_layer + cfg.t5_vocab * d
