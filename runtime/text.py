"""Text context for the DiT's cross-attention: the umT5-XXL encoder, or an embedding file that skips it.

The encoder is transformers' `UMT5EncoderModel`. Wan ships it as `models_t5_umt5-xxl-enc-bf16.pth`, a plain state
dict of Wan's own T5Encoder (`wan/modules/t5.py`); `TextEncoder.from_wan` maps its keys onto the transformers
layout (the two implementations compute the same function: RMS layer norms without bias, unscaled attention with a
per-layer bidirectional relative-position bias of 32 buckets up to distance 128, gated tanh-GELU FFN).

`encode(text)` follows the official WanTextEncoder: clean the text, tokenize with EOS, pad to text_len, run the
encoder with the padding masked, then zero every row past the real tokens; the DiT gets a fixed
[text_len, text_dim] tensor (S text tokens = text_len, C = text_dim; 512 x 4096 for Wan).

`save_text_embedding` / `load_text_embedding` store that tensor as safetensors ("context"), so a deployment can
skip the 11 GB encoder for a fixed prompt.
Not here: the DiT's cross-attention (dit.py), prompt templates or negative prompts (the official loop has no CFG).
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import regex
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import ModelConfig

try:        # Wan's cleaning starts with ftfy.fix_text (mojibake repair); optional here, it changes only broken text
    import ftfy
except ImportError:
    ftfy = None

PAD_ID, EOS_ID = 0, 1        # T5 vocabulary: <pad> = 0, </s> = 1 (2 = <unk>)
BYTE_OFFSET = 3              # byte tokenizer: byte b -> id b + 3, after the special ids
NUM_BUCKETS, MAX_DISTANCE = 32, 128     # Wan's T5RelativeEmbedding defaults (umT5-XXL)
WAN_DOWNLOAD_HINT = "download Wan-AI/Wan2.1-T2V-1.3B (models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/)"

# Wan T5Encoder keys -> UMT5EncoderModel keys. Wan's FFN is fc2(fc1(x) * gelu(gate(x))); transformers' is
# wo(act(wi_0(x)) * wi_1(x)), so gate -> wi_0 (the GELU branch) and fc1 -> wi_1 (the linear branch).
TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = regex.compile(r"blocks\.(\d+)\.(.+)")


def clean_text(text: str) -> str:
    """Wan's `whitespace_clean(basic_clean(text))`: (ftfy if installed), HTML unescape twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def map_wan_t5_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Wan T5Encoder state dict -> UMT5EncoderModel state dict (the tied input embedding under both names)."""
    mapped, unknown = {}, []
    for key, value in state.items():
        block = _BLOCK_KEY.fullmatch(key)
        if key in TOP_KEYS:
            mapped[TOP_KEYS[key]] = value
        elif block and block[2] in BLOCK_KEYS:
            mapped[f"encoder.block.{block[1]}.{BLOCK_KEYS[block[2]]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a Wan umT5 encoder state dict: {len(unknown)} unmapped keys, e.g. {unknown[:8]}")
    if "shared.weight" in mapped:
        mapped["encoder.embed_tokens.weight"] = mapped["shared.weight"]
    return mapped


def umt5_config_from_wan(state: dict[str, Tensor]):
    """The encoder's shape, read from the Wan state dict (umT5-XXL: 4096 wide, 24 layers, 64 heads x 64, ffn 10240)."""
    needed = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight",
              "blocks.0.ffn.fc1.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"not a Wan umT5 encoder state dict: missing {missing}")
    vocab, d_model = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = state["blocks.0.attn.q.weight"].shape[0]
    d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
    layers = 1 + max(int(m[1]) for k in state if (m := _BLOCK_KEY.fullmatch(k)))
    return _umt5_config(vocab=vocab, d_model=d_model, d_kv=dim_attn // heads, d_ff=d_ff, layers=layers,
                        heads=heads, buckets=buckets)


def _umt5_config(*, vocab, d_model, d_kv, d_ff, layers, heads, buckets=NUM_BUCKETS):
    from transformers import UMT5Config
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=buckets, relative_attention_max_distance=MAX_DISTANCE,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      pad_token_id=PAD_ID, eos_token_id=EOS_ID)


def byte_tokens(text: str, text_len: int) -> list[int]:
    """Fallback tokenizer for random-weight presets only (no vocabulary file): utf-8 bytes + 3, then EOS."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")][:text_len - 1] + [EOS_ID]


class TextEncoder:
    """umT5 encoder + tokenizer; `encode(text)` -> [text_len, text_dim] float32 on the CPU, padding rows zero."""

    def __init__(self, model, text_len: int, tokenizer=None):
        """`model`: a transformers UMT5EncoderModel."""
        self.model = model.eval().requires_grad_(False)
        self.text_len = text_len
        self.tokenizer = tokenizer          # a transformers tokenizer, or None for the byte fallback

    @classmethod
    def from_wan(cls, pth_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, dtype=torch.float32,
                 text_len: int = 512) -> "TextEncoder":
        """Wan's `models_t5_umt5-xxl-enc-bf16.pth` + its `google/umt5-xxl/` tokenizer directory. The official
        encoder runs in float32 (bf16 weights upcast); dtype=torch.bfloat16 halves the memory (~11 GB)."""
        pth_path, tokenizer_dir = Path(pth_path), Path(tokenizer_dir)
        if not pth_path.is_file():
            raise FileNotFoundError(f"umT5 weights {str(pth_path)!r} not found; {WAN_DOWNLOAD_HINT}")
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"umT5 tokenizer directory {str(tokenizer_dir)!r} not found; {WAN_DOWNLOAD_HINT}")
        try:
            state = torch.load(pth_path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:   # pickle/zip errors from torch are long; name the file and the expected format
            raise ValueError(f"cannot read {str(pth_path)!r} as a torch state dict ({type(err).__name__}: {err}); "
                             "expected Wan's models_t5_umt5-xxl-enc-bf16.pth") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{str(pth_path)!r} is not a plain state dict of tensors (Wan's umT5 encoder format)")
        from transformers import AutoTokenizer, UMT5EncoderModel
        with torch.device("meta"):
            model = UMT5EncoderModel(umt5_config_from_wan(state))
        mapped = {k: v.to(dtype) for k, v in map_wan_t5_keys(state).items()}
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
        if missing or unexpected:
            raise ValueError(f"{str(pth_path)!r} does not fit UMT5EncoderModel: missing {missing[:8]} "
                             f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")
        try:
            model.load_state_dict(mapped, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{str(pth_path)!r}: tensor shapes are inconsistent between layers: {err}") from None
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, text_len, tokenizer)

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int) -> "TextEncoder":
        """A random umT5 shaped by cfg.t5_* (width cfg.text_dim) with the byte tokenizer; same seed, same weights."""
        if cfg.t5_vocab < 256 + BYTE_OFFSET:
            raise ValueError(f"ModelConfig {cfg.name!r}: t5_vocab={cfg.t5_vocab} is too small for the byte "
                             f"tokenizer (needs >= {256 + BYTE_OFFSET})")
        from transformers import UMT5EncoderModel
        config = _umt5_config(vocab=cfg.t5_vocab, d_model=cfg.text_dim, d_kv=cfg.t5_d_kv, d_ff=cfg.t5_ffn,
                              layers=cfg.t5_layers, heads=cfg.t5_heads)
        with torch.random.fork_rng(devices=[]):      # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config)
        return cls(model, cfg.text_len)

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, text: str) -> tuple[Tensor, Tensor]:
        """Cleaned text -> ids [1, text_len] (EOS last, PAD after) and attention mask [1, text_len]."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = clean_text(text)
        if self.tokenizer is None:
            ids = byte_tokens(text, self.text_len)
        else:   # = Wan's tokenizer call with padding="max_length", truncation=True, max_length=text_len
            ids = self.tokenizer(text, truncation=True, max_length=self.text_len, add_special_tokens=True).input_ids
        n = len(ids)
        mask = torch.zeros(1, self.text_len, dtype=torch.long)
        mask[0, :n] = 1
        ids = torch.tensor([ids + [PAD_ID] * (self.text_len - n)])
        return ids, mask

    def encode(self, text: str) -> Tensor:
        """Text context [text_len, text_dim], float32, CPU; rows past the real tokens (EOS included) are zero."""
        ids, mask = self.tokenize(text)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        context = hidden[0].float().cpu()                                   # [text_len, text_dim]
        context[int(mask.sum()):] = 0.0                                     # the DiT's zero padding
        return context


# ---------------------------------------------------------------------------------------------- embedding files
def save_text_embedding(path: str | os.PathLike, emb: Tensor) -> None:
    """Write a text context [text_len, text_dim] as safetensors {"context": float32} (atomically)."""
    if not isinstance(emb, Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        raise ValueError(f"a text embedding is a float tensor [text_len, text_dim], got "
                         f"{tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"context": emb.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)


def load_text_embedding(path: str | os.PathLike, cfg: ModelConfig) -> Tensor:
    """Read a file written by `save_text_embedding`: float32 [cfg.text_len, cfg.text_dim]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embedding file {str(path)!r} not found (write one with "
                                "runtime.text.save_text_embedding)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a safetensors file: {err}") from None
    if "context" not in tensors:
        raise ValueError(f"{str(path)!r} has no 'context' tensor (found {sorted(tensors)})")
    emb = tensors["context"]
    if tuple(emb.shape) != (cfg.text_len, cfg.text_dim):
        raise ValueError(f"text embedding in {str(path)!r} is {list(emb.shape)}, model {cfg.name!r} needs "
                         f"[text_len={cfg.text_len}, text_dim={cfg.text_dim}]: it was made for another model")
    if not torch.isfinite(emb).all():
        raise ValueError(f"text embedding in {str(path)!r} contains NaN or inf")
    return emb.float()
