"""Checkpoint loaders: the official AvatarForcing `model.pt`, Wan and diffusers DiT state dicts, Wan VAE `.pth`,
any of them as safetensors, and saving merged weights.

Formats are recognised by CONTENT (keys and nesting), never by file name:
- official: a pickle dict with 'generator' (and 'generator_ema', 'critic'); keys prefixed `model.` (and maybe
  `_fsdp_wrapped_module.`), each LoRA-targeted linear as `X.base_layer.{weight,bias}`, `X.lora_A.default.weight`
  [r, in] and `X.lora_B.default.weight` [out, r] (peft, alpha 64, rank read from the shapes: 128 in the release);
- wan: the runtime's own names (= CausalWanModel's), possibly wrapped in 'state_dict' / 'model';
- diffusers: WanTransformer3DModel names (attn1/attn2, condition_embedder, scale_shift_table, proj_out, norm2/3
  swapped), renamed to wan's.

`lora="merge"` folds W + (alpha / r) B @ A in float32 and casts; `lora="keep"` swaps each targeted nn.Linear for a
`LoRALinear` (peft's names and arithmetic: base(x) + lora_B(lora_A(x)) * scale, in the input dtype), bit-exact with
the official unmerged bf16 path. Tensors are read from a memory map (`torch.load(mmap=True)`, safetensors) and
assigned into the model, which may live on the meta device: no second full copy of the weights is held in RAM.

Official download layout (`resolve_layout`), as the AvatarForcing README places it:
    ROOT/checkpoints/model.pt
    ROOT/wan_models/Wan2.1-T2V-1.3B/{Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/}
    ROOT/wan_models/wav2vec2-base-960h/
(a flat directory holding those names directly works too).

Not here: building models (pipeline.py), the text and audio encoders' own loaders (text.py, audio.py).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
DEFAULT_LORA_ALPHA = 64.0
FORMATS = ("official AvatarForcing model.pt ('generator' with model.-prefixed LoRA keys)",
           "Wan DiT state dict", "diffusers WanTransformer3DModel state dict", "any of these as .safetensors")
MAX_LISTED = 10
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")   # only to suggest files in a directory

# diffusers -> wan (the inverse of diffusers' convert_wan_to_diffusers.py renames), applied per key by regex
_DIFFUSERS = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),                 # diffusers' norm2 is the affine cross-attn norm
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.norm_([qk])\.", r"\1.self_attn.norm_\2."),
    (r"^(blocks\.\d+)\.attn2\.norm_([qk])\.", r"\1.cross_attn.norm_\2."),
]


class LoRALinear(nn.Module):
    """A linear layer with an unmerged LoRA, named and computed like peft's (keys `base_layer`, `lora_A.default`,
    `lora_B.default`): y = base(x) + lora_B(lora_A(x)) * scale."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base_layer, self.scale = base, scale
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)})

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scale


# ---------------------------------------------------------------------------------------------- reading
def read_file(path) -> dict:
    """The raw object of a checkpoint file (mmap'd pickle or safetensors) with clear errors."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
        holds = f"it holds {_listed(inside)}: pass one of them" if inside else "it holds no checkpoint file"
        raise ValueError(f"checkpoint {str(path)!r} is a directory, but a checkpoint file is expected here "
                         f"({'; '.join(FORMATS)}); {holds}. A whole download in the official layout goes to "
                         f"AvatarPipeline.from_pretrained(DIR) (CLI: --weights DIR)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a regular file; pass the path of a checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)                     # the magic only: checkpoints are GBs
    try:
        if head[:2] == b"PK" or head[:1] == b"\x80":            # torch zip or legacy pickle
            return torch.load(path, map_location="cpu", mmap=head[:2] == b"PK", weights_only=True)
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    except Exception as err:          # zip, pickle and safetensors parsers raise assorted types: say it plainly
        raise ValueError(f"{str(path)!r} ({size:,} bytes) is truncated, corrupt or not a checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                         f"expected one of: {'; '.join(FORMATS)}") from None


def _unwrap(obj, use_ema: bool) -> tuple[dict, str]:
    """(flat state dict, format name) from a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict; expected one of: "
                         f"{'; '.join(FORMATS)}")
    if "generator" in obj or "generator_ema" in obj:
        key = "generator_ema" if use_ema else "generator"
        if key not in obj:
            raise ValueError(f"official checkpoint has no {key!r} (has {sorted(obj)}); "
                             f"{'drop use_ema' if use_ema else 'pass use_ema=True'}")
        return obj[key], "official"
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in obj and isinstance(obj[wrapper], dict):
            return _unwrap(obj[wrapper], use_ema)
    if not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"unrecognised checkpoint layout (top-level keys {_listed(sorted(obj))}); expected one of: "
                         f"{'; '.join(FORMATS)}")
    return obj, "state_dict"


def canonical(state: dict) -> tuple[dict, str]:
    """Strip wrappers' prefixes and rename diffusers keys: -> (wan-named state dict, 'wan' | 'diffusers')."""
    out = {}
    for k, v in state.items():
        k = k.replace("_fsdp_wrapped_module.", "")
        k = k[len("model."):] if k.startswith("model.") else k
        out[k] = v
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in out):
        renamed = {}
        for k, v in out.items():
            for pattern, repl in _DIFFUSERS:
                k2 = re.sub(pattern, repl, k)
                if k2 != k:
                    k = k2
                    break
            renamed[k] = v
        return renamed, "diffusers"
    return out, "wan"


# ---------------------------------------------------------------------------------------------- LoRA
def _lora_groups(state: dict) -> dict:
    """{module: {"base": W, "bias": b, "A": A, "B": B}} for peft LoRA keys; plain keys are left in `state`."""
    groups = {}
    for k in list(state):
        m = re.match(r"^(.*)\.(base_layer\.(weight|bias)|lora_A\.default\.weight|lora_B\.default\.weight)$", k)
        if not m:
            continue
        name, part = m.group(1), m.group(2)
        slot = {"base_layer.weight": "base", "base_layer.bias": "bias", "lora_A.default.weight": "A",
                "lora_B.default.weight": "B"}[part]
        groups.setdefault(name, {})[slot] = state.pop(k)
    return groups


def _merge(groups: dict, state: dict, alpha: float) -> dict:
    info = {}
    for name, g in groups.items():
        if {"base", "A", "B"} - set(g):
            raise ValueError(f"LoRA module {name!r} is incomplete: has {sorted(g)}")
        rank = g["A"].shape[0]
        scale = alpha / rank
        merged = g["base"].float() + scale * (g["B"].float() @ g["A"].float())
        state[f"{name}.weight"] = merged.to(g["base"].dtype)
        if "bias" in g:
            state[f"{name}.bias"] = g["bias"]
        info = dict(rank=rank, scale=scale)
    return info


def _keep(model: nn.Module, groups: dict, state: dict, alpha: float) -> dict:
    """Swap targeted linears for LoRALinear and put their tensors under peft's names."""
    info = {}
    for name, g in groups.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA keys for {name!r}, which is a {type(base).__name__}, not a Linear")
        rank = g["A"].shape[0]
        info = dict(rank=rank, scale=alpha / rank)
        setattr(parent, child, LoRALinear(base, rank, alpha / rank))
        state[f"{name}.base_layer.weight"], state[f"{name}.lora_A.default.weight"] = g["base"], g["A"]
        state[f"{name}.lora_B.default.weight"] = g["B"]
        if "bias" in g:
            state[f"{name}.base_layer.bias"] = g["bias"]
    return info


# ---------------------------------------------------------------------------------------------- loading
def _listed(keys) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _shape_difference(file_shape, model_shape) -> str:
    """Which dimensions differ, e.g. 'dim 0: 96 in the file vs 128 in the model'."""
    if len(file_shape) != len(model_shape):
        return f"{len(file_shape)} dims in the file vs {len(model_shape)} in the model"
    return ", ".join(f"dim {i}: {a} in the file vs {b} in the model"
                     for i, (a, b) in enumerate(zip(file_shape, model_shape)) if a != b)


def load_into(model: nn.Module, state: dict, what: str) -> None:
    """Strict, shape-checked, NaN-checked assignment of `state` into `model` (meta parameters are materialised)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
        raise ValueError(f"{what} does not match the model: {'; '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{what}: {k!r} has shape {tuple(v.shape)} in the file but {tuple(expected[k].shape)} in "
                             f"the model ({_shape_difference(v.shape, expected[k].shape)}); the checkpoint belongs "
                             f"to another preset: pass the preset it was trained with")
        if v.is_floating_point() != expected[k].is_floating_point():
            kind = "floating-point weights" if expected[k].is_floating_point() else f"{expected[k].dtype} values"
            raise ValueError(f"{what}: {k!r} holds {v.dtype} values where the model expects {kind}; the file was "
                             f"quantised or cast to another type: use the original, unquantised checkpoint "
                             f"(float32, bfloat16 or float16 tensors)")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{what}: {k!r} contains NaN or inf")
    dtype = next(iter(expected.values())).dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)


def load_dit(model: nn.Module, path, *, lora: str = "merge", lora_alpha: float = DEFAULT_LORA_ALPHA,
             use_ema: bool = False) -> dict:
    """Load a DiT checkpoint of any supported format into `model`; returns what was found."""
    if lora not in ("merge", "keep"):
        raise ValueError(f"lora={lora!r}: expected 'merge' or 'keep'")
    raw, kind = _unwrap(read_file(path), use_ema)
    state, naming = canonical(raw)
    groups = _lora_groups(state)
    info = {}
    if groups:
        info = _merge(groups, state, lora_alpha) if lora == "merge" else _keep(model, groups, state, lora_alpha)
    load_into(model, state, f"DiT checkpoint {str(path)!r}")
    return dict(format="official" if kind == "official" else naming, tensors=len(raw), lora=bool(groups),
                lora_mode=lora if groups else None, **info, dtype=str(next(model.parameters()).dtype))


def load_vae(model: nn.Module, path) -> dict:
    """A VAE / decoder state dict (Wan2.1_VAE.pth, TAEHV, or safetensors) into `model`, strictly."""
    raw, _ = _unwrap(read_file(path), False)
    load_into(model, dict(raw), f"VAE checkpoint {str(path)!r}")
    return dict(tensors=len(raw))


def save_safetensors(model_or_state, path, metadata: dict | None = None) -> None:
    """Write (merged) weights with the official names; `load_dit` reads them back."""
    from safetensors.torch import save_file
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tmp = Path(f"{path}.part")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp,
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def resolve_layout(root) -> dict:
    """Paths of the official download layout under `root` (None where absent)."""
    root = Path(root)
    if root.is_file():
        raise ValueError(f"weights directory {str(root)!r} is a file, but the directory of the official download "
                         f"layout (checkpoints/model.pt, wan_models/...) is expected here; pass a single DiT "
                         f"checkpoint as AvatarPipeline.from_pretrained(dit={str(root)!r})")
    if not root.exists():
        raise FileNotFoundError(f"weights directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"weights directory {str(root)!r} is not a directory; pass the download directory")
    wan = root / "wan_models" / "Wan2.1-T2V-1.3B"
    candidates = {
        "dit": [root / "checkpoints" / "model.pt", root / "model.pt"],
        "vae": [wan / "Wan2.1_VAE.pth", root / "Wan2.1_VAE.pth"],
        "text": [wan / "models_t5_umt5-xxl-enc-bf16.pth", root / "models_t5_umt5-xxl-enc-bf16.pth"],
        "tokenizer": [wan / "google" / "umt5-xxl", root / "google" / "umt5-xxl"],
        "wav2vec": [root / "wan_models" / "wav2vec2-base-960h", root / "wav2vec2-base-960h"],
        "taehv": [root / "taew2_1.safetensors", root / "taew2_1.pth"],
    }
    return {k: next((p for p in paths if p.exists()), None) for k, paths in candidates.items()}
