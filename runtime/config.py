"""Model and stream configuration: two dataclasses and their named presets.

`ModelConfig` describes the networks (DiT, VAE, audio and text encoders, output size); `StreamConfig`
describes how a stream is scheduled (block size B, window L, passes N, noise levels, history, anchor).
Both are plain data: they serialize to JSON next to every exported artifact and are read back from it.
The window plan itself lives in scheduler.py; this file only holds numbers.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from pathlib import Path

# The toy-talker this project trains itself (train/toy.py) ships here: weights, config, reference faces, speech.
TOY_ASSETS = Path(__file__).parent / "assets" / "toy"

# Wan 2.1 VAE latent statistics (WanVAE.__init__): z_norm = (mu - mean) / std.
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass
class ModelConfig:
    name: str = "custom"
    # -- DiT (CausalWanModel) --
    dim: int = 1536                      # model width C
    ffn_dim: int = 8960                  # FFN hidden width
    num_heads: int = 12                  # N_h; head dim D = dim // num_heads
    num_layers: int = 30                 # transformer blocks
    in_dim: int = 33                     # noisy latent 16 + reference latent 16 + mask 1
    out_dim: int = 16                    # predicted flow channels
    patch_size: tuple[int, int, int] = (1, 2, 2)   # (time, row, col) patch of the latent grid
    freq_dim: int = 256                  # sinusoidal timestep embedding width
    text_len: int = 512                  # text tokens after zero padding (cross-attention length)
    text_dim: int = 4096                 # text encoder output width
    eps: float = 1e-6                    # eps of every LayerNorm / RMSNorm in the DiT
    qk_norm: bool = True                 # RMSNorm over the full width on q and k
    cross_attn_norm: bool = True         # affine LayerNorm (norm3) before cross-attention
    # -- audio conditioning (AudioPack + per-layer projections) --
    audio_features: str = "wav2vec2"     # "wav2vec2" (real model) or "logmel" (toy-talker)
    audio_input_dim: int = 10752         # feature width per audio frame (14 x 768 for wav2vec2-base)
    audio_hidden: int = 32               # AudioPack output width
    audio_norm_eps: float = 1e-5         # AudioPack LayerNorm eps (nn.LayerNorm default)
    # -- wav2vec2 encoder shape (used to build a random encoder; a loaded one brings its own config) --
    wav2vec_hidden: int = 768
    wav2vec_layers: int = 12
    wav2vec_heads: int = 12
    wav2vec_ffn: int = 3072
    wav2vec_conv_dim: int = 512
    wav2vec_pos_kernel: int = 128        # positional conv kernel (num_conv_pos_embeddings)
    wav2vec_pos_groups: int = 16
    # -- log-mel features (audio_features == "logmel") --
    logmel_bins: int = 32                # mel bins per 10 ms hop; 4 hops per audio frame
    logmel_mean: tuple[float, ...] = ()  # per-bin training statistics the log-mel is normalised with
    logmel_std: tuple[float, ...] = ()
    # -- text encoder (umT5) shape, for a random encoder --
    t5_layers: int = 24
    t5_heads: int = 64
    t5_d_kv: int = 64
    t5_ffn: int = 10240
    t5_vocab: int = 256384
    # -- latent codec --
    vae: str = "wan"                     # "wan" (Wan 2.1 VAE) or "frame-ae" (toy-talker per-frame AE)
    decoder: str = "vae"                 # "vae" (the codec's own decoder) or "taehv" (tiny decoder)
    vae_z_dim: int = 16                  # latent channels
    vae_base_dim: int = 96
    vae_dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    vae_temporal_downsample: tuple[bool, ...] = (False, True, True)
    vae_stride: tuple[int, int, int] = (4, 8, 8)    # (time, row, col) pixel -> latent
    latent_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN_LATENT_STD
    taehv_channels: tuple[int, ...] = (256, 128, 64, 64)   # TAEHV decoder widths per stage
    frame_ae_channels: tuple[int, ...] = (32, 64, 64)      # FrameAE encoder widths (toy-talker)
    frame_ae_code_channels: int = 4      # FrameAE channels per video frame; x4 frames = vae_z_dim
    frame_ae_context: tuple[int, int] = (0, 0)   # FrameAE decoder context: (earlier frame codes, later codes of
                                                 # the same latent) it sees besides the frame's own; (0, 0): per frame
    # -- video --
    height: int = 480                    # output pixel rows
    width: int = 832                     # output pixel columns
    fps: int = 25                        # video frames per second == audio frames per second
    sample_rate: int = 16000             # audio samples per second

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.vae_dim_mult = tuple(self.vae_dim_mult)
        self.vae_temporal_downsample = tuple(self.vae_temporal_downsample)
        self.vae_stride = tuple(self.vae_stride)
        self.latent_mean = tuple(self.latent_mean)
        self.latent_std = tuple(self.latent_std)
        self.taehv_channels = tuple(self.taehv_channels)
        self.frame_ae_channels = tuple(self.frame_ae_channels)
        self.frame_ae_context = tuple(self.frame_ae_context)
        self.logmel_mean, self.logmel_std = tuple(self.logmel_mean), tuple(self.logmel_std)
        problems = []
        if self.dim % self.num_heads:
            problems.append(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even for RoPE pairs")
        if self.in_dim != 2 * self.vae_z_dim + 1:
            problems.append(f"in_dim={self.in_dim} must be 2 * vae_z_dim + 1 = {2 * self.vae_z_dim + 1}")
        if self.audio_features not in ("wav2vec2", "logmel"):
            problems.append(f"audio_features={self.audio_features!r}: expected 'wav2vec2' or 'logmel'")
        if self.vae not in ("wan", "frame-ae"):
            problems.append(f"vae={self.vae!r}: expected 'wan' or 'frame-ae'")
        if self.decoder not in ("vae", "taehv"):
            problems.append(f"decoder={self.decoder!r}: expected 'vae' or 'taehv'")
        if len(self.frame_ae_context) != 2 or not all(isinstance(v, int) and v >= 0 for v in self.frame_ae_context) \
                or self.frame_ae_context[1] >= self.vae_stride[0]:
            problems.append(f"frame_ae_context={self.frame_ae_context!r}: expected (earlier >= 0, "
                            f"0 <= later < {self.vae_stride[0]})")
        if len(self.latent_mean) != self.vae_z_dim or len(self.latent_std) != self.vae_z_dim:
            problems.append(f"latent_mean/std need {self.vae_z_dim} entries")
        cell_h, cell_w = self.vae_stride[1] * self.patch_size[1], self.vae_stride[2] * self.patch_size[2]
        if self.height % cell_h or self.width % cell_w:
            problems.append(f"size {self.width}x{self.height} must be a multiple of {cell_w}x{cell_h}")
        if problems:
            raise ValueError(f"ModelConfig {self.name!r}: " + "; ".join(problems))

    # -- derived quantities --
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_audio_projs(self) -> int:
        """Audio is added before blocks 2 .. num_layers // 2 (the official `block_index` rule)."""
        return max(self.num_layers // 2 - 1, 0)

    @property
    def audio_frames_per_latent(self) -> int:
        """Audio frames (= video frames) per latent frame: the codec's temporal stride."""
        return self.vae_stride[0]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Token grid (rows, cols) of one latent frame after patching."""
        h, w = self.latent_hw
        return h // self.patch_size[1], w // self.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid_hw
        return gh * gw

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per video frame: 640 at 16 kHz and 25 fps."""
        return self.sample_rate // self.fps

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """K + V bytes per token across all layers."""
        return 2 * self.dim * self.num_layers * bytes_per_element

    # -- serialization --
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return _from_dict(cls, data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset, optionally with some fields changed (e.g. `decoder="taehv"`)."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(MODEL_PRESETS))}")
        return _from_dict(cls, {**MODEL_PRESETS[name], **overrides, "name": name})


MODEL_PRESETS: dict[str, dict] = {
    # The released AvatarForcing checkpoint on Wan 2.1 T2V-1.3B, 832x480 output.
    "wan-1.3b": dict(),
    # Same architecture at toy size: a whole stream runs on a CPU in seconds. 6 layers so that audio
    # reaches blocks 2 and 3; a 32x48 frame gives a 4x6 latent and 2x3 = 6 tokens per latent frame.
    "tiny": dict(
        dim=64, ffn_dim=128, num_heads=2, num_layers=6, text_len=8, text_dim=32,
        audio_input_dim=14 * 16,
        wav2vec_hidden=16, wav2vec_layers=12, wav2vec_heads=2, wav2vec_ffn=32, wav2vec_conv_dim=16,
        wav2vec_pos_kernel=16, wav2vec_pos_groups=2,
        t5_layers=2, t5_heads=2, t5_d_kv=16, t5_ffn=64, t5_vocab=384,
        vae_base_dim=8, taehv_channels=(16, 16, 8, 8),
        height=32, width=48,
    ),
    # The small model this project trains itself (train/toy.py) and ships as the default: 64x64 cartoon faces,
    # causal log-mel audio, a per-frame autoencoder, 64 tokens per latent frame. Its weights and measured
    # statistics live in runtime/assets/toy/ (toy-talker.safetensors + toy-talker.json).
    "toy-talker": dict(
        dim=128, ffn_dim=512, num_heads=4, num_layers=6, text_len=1, text_dim=16,
        audio_features="logmel", audio_input_dim=128, logmel_bins=32,
        vae="frame-ae", vae_stride=(4, 4, 4), frame_ae_channels=(24, 48, 64), frame_ae_code_channels=4,
        frame_ae_context=(2, 3),
        latent_mean=(0.0,) * 16, latent_std=(1.0,) * 16,
        height=64, width=64,
    ),
}


# ------------------------------------------------------------------------------------------------------
@dataclass
class StreamConfig:
    name: str = "custom"
    block_frames: int = 4                # B: latent frames per block (emitted per step)
    window_blocks: int = 4               # L: blocks in the denoising window (look-ahead = L - 1 blocks)
    passes: int = 1                      # N: joint denoising passes per step
    # Noise levels, noisiest first, L * N entries, as indices into the 1,000-step training table
    # (1000 = pure noise). With `warp` they map to the shifted table's timesteps; otherwise used as is.
    denoise_steps: tuple[int, ...] = (1000, 800, 400, 200)
    warp: bool = True                    # official `warp_denoising_step`
    shift: float = 5.0                   # flow-matching timestep shift of the table
    num_train_timesteps: int = 1000
    history_frames: int = 2              # clean latent frames kept as the temporal anchor
    anchor_offset: int = -1              # d: the style anchor sits at RoPE frame u + d (u = first history frame)
    # False (ablation): no RoPE re-indexing, the anchor stays at absolute frame 0 in every pass, so its distance
    # to the window grows with the stream.
    reindex_anchor: bool = True
    # Where the cache pass puts the anchor: "official" = absolute frame 0 (the released code),
    # "reindexed" = u + d like the main pass (every step translation invariant).
    anchor_in_cache_pass: str = "official"
    cache_pass_t: float = 0.0            # timestep of the cache pass (official `context_noise`)
    # Anchor audio: "zero" = zero features (official); "first" = the stream's first audio rows (ablation).
    anchor_audio: str = "zero"
    use_style_anchor: bool = True        # ablation switch: attend to the reference anchor
    use_temporal_anchor: bool = True     # ablation switch: attend to the history frames
    # Streaming wav2vec2: seconds of audio before the window fed to the encoder as left context.
    audio_left_context_s: float = 2.0

    def __post_init__(self):
        self.denoise_steps = tuple(self.denoise_steps)
        problems = []
        for f in ("block_frames", "window_blocks", "passes"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                problems.append(f"{f} must be a positive int, got {getattr(self, f)!r}")
        if not problems and len(self.denoise_steps) != self.window_blocks * self.passes:
            problems.append(f"denoise_steps needs L*N = {self.window_blocks * self.passes} entries, "
                            f"got {len(self.denoise_steps)}")
        if any(not 0 < s <= self.num_train_timesteps for s in self.denoise_steps):
            problems.append(f"denoise_steps must lie in (0, {self.num_train_timesteps}]")
        if list(self.denoise_steps) != sorted(self.denoise_steps, reverse=True):
            problems.append("denoise_steps must be ordered noisiest first")
        if self.history_frames < 0:
            problems.append("history_frames must be >= 0")
        if self.anchor_in_cache_pass not in ("official", "reindexed"):
            problems.append(f"anchor_in_cache_pass={self.anchor_in_cache_pass!r}: 'official' or 'reindexed'")
        if self.anchor_audio not in ("zero", "first"):
            problems.append(f"anchor_audio={self.anchor_audio!r}: 'zero' or 'first'")
        if problems:
            raise ValueError(f"StreamConfig {self.name!r}: " + "; ".join(problems))

    def lookahead_video_frames(self, frames_per_latent: int = 4) -> int:
        """Video frames of audio a frame waits for beyond its own: (L - 1) blocks."""
        return (self.window_blocks - 1) * self.block_frames * frames_per_latent

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamConfig":
        return _from_dict(cls, data)

    @classmethod
    def preset(cls, name: str, **overrides) -> "StreamConfig":
        """A named preset, optionally with some fields changed (e.g. `use_style_anchor=False`)."""
        if name not in STREAM_PRESETS:
            raise ValueError(f"unknown stream preset {name!r}; available: {', '.join(sorted(STREAM_PRESETS))}")
        return _from_dict(cls, {**STREAM_PRESETS[name], **overrides, "name": name})


STREAM_PRESETS: dict[str, dict] = {
    # The released loop: B=4, L=4, N=1, anchor at absolute 0 in the cache pass.
    "official": dict(),
    # As official, but the cache pass re-indexes the anchor too: every step is translation invariant.
    "relative": dict(anchor_in_cache_pass="reindexed"),
    # One latent frame per block: the same 4 refinements per frame with a quarter of the look-ahead.
    "low-delay": dict(block_frames=1, anchor_in_cache_pass="reindexed"),
    # As low-delay, with its four noise levels spent as two passes over a window of two blocks: 4 frames (0.16 s)
    # of look-ahead instead of 12. Live serving's stream for toy-talker (its json's `live_stream`).
    "live": dict(block_frames=1, window_blocks=2, passes=2, anchor_in_cache_pass="reindexed"),
}


def _from_dict(cls, data: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**data)


def save_json(path: str | Path, **configs) -> None:
    """Write {"model": ModelConfig, "stream": StreamConfig, ...} as JSON (dataclasses or plain dicts)."""
    out = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in configs.items()}
    Path(path).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> dict:
    """Read a file written by `save_json`; `model` and `stream` entries come back as dataclasses."""
    data = json.loads(Path(path).read_text())
    if "model" in data:
        data["model"] = ModelConfig.from_dict(data["model"])
    if "stream" in data:
        data["stream"] = StreamConfig.from_dict(data["stream"])
    return data


def check_seed(seed) -> int:
    """A seed as a plain int in [0, 2**63) (a torch.Generator's range); numpy integers are accepted."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, 2**63), got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {int(seed)}")
    return int(seed)
