"""Checkpoint loaders on small checkpoints written here in the real formats (real weights cannot be downloaded)."""
import re

import pytest
import torch

from runtime.config import ModelConfig
from runtime.dit import AvatarDiT, init_random_
from runtime.rope import Rope
from runtime.weights import LORA_TARGETS, LoRALinear, load_dit, load_vae, resolve_layout, save_safetensors

CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return init_random_(AvatarDiT(CFG), seed=0).eval()


def official(state: dict, rank: int = 8, fsdp: bool = False, seed: int = 0) -> dict:
    """The released layout: model.-prefixed keys, peft LoRA on the target linears."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    prefix = "model._fsdp_wrapped_module." if fsdp else "model."
    for k, v in state.items():
        name, leaf = k.rsplit(".", 1)
        if name.split(".", 2)[-1] in LORA_TARGETS:
            out[f"{prefix}{name}.base_layer.{leaf}"] = v.clone()
            if leaf == "weight":
                out[f"{prefix}{name}.lora_A.default.weight"] = torch.randn(rank, v.shape[1], generator=g) * 0.1
                out[f"{prefix}{name}.lora_B.default.weight"] = torch.randn(v.shape[0], rank, generator=g) * 0.1
        else:
            out[f"{prefix}{k}"] = v.clone()
    return out


def to_diffusers(state: dict) -> dict:
    """Wan -> diffusers names, written here from the reference doc's table (independent of runtime.weights)."""
    rules = [("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
             ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
             ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
             ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
             ("time_projection.1", "condition_embedder.time_proj"), ("head.modulation", "scale_shift_table"),
             ("head.head", "proj_out"), ("modulation", "scale_shift_table"), ("ffn.0", "ffn.net.0.proj"),
             ("ffn.2", "ffn.net.2"), ("norm3", "norm2"), ("self_attn.o", "attn1.to_out.0"),
             ("cross_attn.o", "attn2.to_out.0"), ("self_attn.norm_", "attn1.norm_"), ("cross_attn.norm_", "attn2.norm_"),
             ("self_attn.", "attn1.to_"), ("cross_attn.", "attn2.to_")]
    out = {}
    for k, v in state.items():
        for old, new in rules:
            if old in k:
                k = k.replace(old, new)
                break
        out[k] = v
    return out


def forward(model):
    g = torch.Generator().manual_seed(1)
    h, w = CFG.latent_hw
    x, y = torch.randn(1, 16, 2, h, w, generator=g), torch.randn(1, 17, 2, h, w, generator=g)
    audio = torch.randn(1, 8, CFG.audio_input_dim, generator=g)
    ctx = model.context_kv(torch.randn(1, CFG.text_len, CFG.text_dim, generator=g))
    with torch.no_grad():
        return model(x, y, torch.tensor([[300.0, 700.0]]), audio, ctx, Rope([1, 2], CFG.grid_hw, CFG.head_dim))


def meta_model():
    with torch.device("meta"):
        return AvatarDiT(CFG)


def test_official_model_pt_merges_lora(model, tmp_path):
    ckpt = official(model.state_dict())
    torch.save({"generator": ckpt, "critic": {}}, tmp_path / "model.pt")
    m = meta_model()
    report = load_dit(m, tmp_path / "model.pt", lora_alpha=4.0)          # rank 8, alpha 4 -> scale 0.5
    assert report["format"] == "official" and report["rank"] == 8 and report["scale"] == 0.5
    assert not any(p.is_meta for p in m.parameters())
    for name in ("blocks.0.self_attn.q", "blocks.5.ffn.2", "blocks.3.cross_attn.o"):
        A, B = ckpt[f"model.{name}.lora_A.default.weight"], ckpt[f"model.{name}.lora_B.default.weight"]
        W = ckpt[f"model.{name}.base_layer.weight"]
        assert torch.allclose(m.get_submodule(name).weight, W + 0.5 * B @ A, atol=1e-6)
    assert torch.equal(m.audio_proj.proj.weight, model.audio_proj.proj.weight)


def test_keep_and_merge_agree_in_fp32(model, tmp_path):
    torch.save({"generator_ema": official(model.state_dict(), fsdp=True), "generator": {}}, tmp_path / "model.pt")
    merged, kept = meta_model(), meta_model()
    load_dit(merged, tmp_path / "model.pt", use_ema=True, lora_alpha=4.0)
    load_dit(kept, tmp_path / "model.pt", use_ema=True, lora="keep", lora_alpha=4.0)
    assert isinstance(kept.blocks[2].ffn[0], LoRALinear) and "blocks.2.ffn.0.lora_A.default.weight" in kept.state_dict()
    assert (forward(merged) - forward(kept)).abs().max() <= 1e-5


def test_release_lora_shapes_on_the_meta_device():
    """wan-1.3b: rank 128, alpha 64 -> scale 0.5; the loader reads the rank from the LoRA shapes."""
    with torch.device("meta"):
        m = AvatarDiT(ModelConfig.preset("wan-1.3b"))
    lora_params = sum(128 * (mod.in_features + mod.out_features) for name, mod in m.named_modules()
                      if name.split(".", 2)[-1] in LORA_TARGETS)
    assert lora_params == 174_981_120                                  # the reference doc's LoRA parameter count


@pytest.mark.parametrize("fmt", ["wan", "diffusers"])
@pytest.mark.parametrize("container", ["pth", "safetensors"])
def test_plain_formats(model, tmp_path, fmt, container):
    state = model.state_dict() if fmt == "wan" else to_diffusers(model.state_dict())
    assert fmt == "wan" or any(".attn1.to_q." in k for k in state)
    path = tmp_path / f"dit.{container}"
    if container == "pth":
        torch.save({"state_dict": state}, path)
    else:
        save_safetensors(state, path)
    m = meta_model()
    assert load_dit(m, path)["format"] == fmt
    assert torch.equal(forward(m), forward(model))


def test_save_safetensors_round_trip(model, tmp_path):
    save_safetensors(model, tmp_path / "merged.safetensors", metadata={"preset": "tiny"})
    m = meta_model()
    load_dit(m, tmp_path / "merged.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))


def test_vae_loader(tmp_path):
    from runtime.vae import WanVAE
    vae = WanVAE(CFG)
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    other = WanVAE(CFG)
    load_vae(other, tmp_path / "vae.pth")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), other.state_dict().values()))
    bad = dict(vae.state_dict())
    bad.pop("decoder.head.2.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys: decoder.head.2.weight"):
        load_vae(WanVAE(CFG), tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------- errors
def test_errors(model, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "config.json").write_text('{"dim": 64}')
    for name in ("truncated.pt", "noise.bin", "config.json"):
        with pytest.raises(ValueError, match="truncated, corrupt or not a checkpoint"):
            load_dit(meta_model(), tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_dit(meta_model(), tmp_path / "absent.pt")
    state = dict(model.state_dict())
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"].clone()
    state["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=re.escape("'blocks.0.ffn.0.weight' contains NaN")):
        load_dit(meta_model(), tmp_path / "nan.pt")
    state = dict(model.state_dict())
    del state["head.head.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match="missing keys: head.head.bias.*unexpected keys: extra.weight"):
        load_dit(meta_model(), tmp_path / "keys.pt")
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_dit(meta_model(), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="lora="):
        load_dit(meta_model(), good, lora="fold")


def test_checkpoint_of_another_preset(model, tmp_path):
    cfg = ModelConfig.preset("tiny", dim=96, num_heads=3, ffn_dim=192)
    torch.save(init_random_(AvatarDiT(cfg), 0).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another preset"):
        load_dit(meta_model(), tmp_path / "other.pt")


def test_shape_mismatch_names_the_dimensions_that_differ(tmp_path):
    cfg = ModelConfig.preset("tiny", ffn_dim=96)                    # same width (64), narrower FFN
    torch.save(init_random_(AvatarDiT(cfg), 0).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError) as err:
        load_dit(meta_model(), tmp_path / "other.pt")
    message = str(err.value)
    assert re.search(r"'blocks\.\d+\.ffn\.0\.weight' has shape \(96, 64\) in the file but \(128, 64\) in the model "
                     r"\(dim 0: 96 in the file vs 128 in the model\); .*another preset", message), message
    assert "64 vs 64" not in message and "dim 1" not in message


def test_shape_mismatch_in_the_number_of_dims(model, tmp_path):
    state = dict(model.state_dict())
    state["head.head.bias"] = state["head.head.bias"][None]
    torch.save(state, tmp_path / "dims.pt")
    with pytest.raises(ValueError, match=r"'head\.head\.bias'.*\(2 dims in the file vs 1 in the model\)"):
        load_dit(meta_model(), tmp_path / "dims.pt")


@pytest.mark.parametrize("container", ["pth", "safetensors"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool], ids=str)
def test_integer_tensors_where_weights_are_expected(model, tmp_path, container, dtype):
    state = dict(model.state_dict())
    state["blocks.1.cross_attn.q.weight"] = state["blocks.1.cross_attn.q.weight"].mul(100).to(dtype)
    path = tmp_path / f"quantised.{container}"
    if container == "pth":
        torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, path)     # the official layout
    else:
        save_safetensors(state, path)
    words = rf"'blocks\.1\.cross_attn\.q\.weight' holds {dtype} values where the model expects floating-point weights"
    for target in (meta_model(), init_random_(AvatarDiT(CFG), seed=1)):
        with pytest.raises(ValueError, match=words + ".*unquantised"):
            load_dit(target, path)


def test_directory_given_for_a_checkpoint_file(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match=r"is a directory, but a checkpoint file is expected.*it holds dit\.pt"):
        load_dit(meta_model(), tmp_path)
    from runtime.vae import WanVAE
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' is a directory.*holds no checkpoint file.*from_pretrained\(DIR\)"):
        load_vae(WanVAE(CFG), tmp_path / "empty")


def test_file_given_for_the_weights_directory(model, tmp_path):
    from runtime import AvatarPipeline
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"'.*model\.pt' is a file, but the directory of the official download layout.*"
                                         r"from_pretrained\(dit="):
        resolve_layout(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is a file, but the directory"):
        AvatarPipeline.from_pretrained(tmp_path / "model.pt", preset="tiny", device="cpu")


def test_resolve_layout(tmp_path):
    wan = tmp_path / "wan_models" / "Wan2.1-T2V-1.3B"
    (wan / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.pt").write_bytes(b"x")
    (wan / "Wan2.1_VAE.pth").write_bytes(b"x")
    paths = resolve_layout(tmp_path)
    assert paths["dit"] == tmp_path / "checkpoints" / "model.pt" and paths["vae"] == wan / "Wan2.1_VAE.pth"
    assert paths["tokenizer"] == wan / "google" / "umt5-xxl" and paths["wav2vec"] is None and paths["text"] is None
    with pytest.raises(FileNotFoundError):
        resolve_layout(tmp_path / "nope")
