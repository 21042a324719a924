"""Text context: encode contract (shape, zero padding, EOS, cleaning, masking), determinism, Wan umT5 key mapping
on checkpoints written here in Wan's key layout, and the embedding file. Tiny random umT5 from preset "tiny"."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from runtime.config import ModelConfig
from runtime.text import EOS_ID, PAD_ID, TextEncoder, load_text_embedding, save_text_embedding

CFG = ModelConfig.preset("tiny")
# Wan's T5Encoder parameter names (wan/modules/t5.py), per block and at the top: the checkpoint format.
WAN_BLOCK = ["norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "norm2.weight",
             "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight", "pos_embedding.embedding.weight"]
HF_BLOCK = ["layer.0.layer_norm.weight", "layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight",
            "layer.0.SelfAttention.v.weight", "layer.0.SelfAttention.o.weight", "layer.1.layer_norm.weight",
            "layer.1.DenseReluDense.wi_0.weight", "layer.1.DenseReluDense.wi_1.weight",
            "layer.1.DenseReluDense.wo.weight", "layer.0.SelfAttention.relative_attention_bias.weight"]


@pytest.fixture(scope="module")
def enc():
    return TextEncoder.random(CFG, seed=0)


def to_wan_layout(model) -> dict:
    """Inverse of the loader's mapping, written independently: UMT5EncoderModel -> Wan T5Encoder keys."""
    hf = model.state_dict()
    wan = {"token_embedding.weight": hf["shared.weight"], "norm.weight": hf["encoder.final_layer_norm.weight"]}
    for i in range(model.config.num_layers):
        for w, h in zip(WAN_BLOCK, HF_BLOCK):
            wan[f"blocks.{i}.{w}"] = hf[f"encoder.block.{i}.{h}"].clone()
    return wan


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small T5-style tokenizer (<pad> 0, </s> 1, <unk> 2, EOS appended) saved like google/umt5-xxl/."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 300)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    path = tmp_path_factory.mktemp("umt5-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan_pth(enc, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(to_wan_layout(enc.model), path)
    return path


# ---------------------------------------------------------------------------------------------- encode
def test_encode_shape_padding_and_eos(enc):
    ids, mask = enc.tokenize("hi")
    assert ids.tolist() == [[ord("h") + 3, ord("i") + 3, EOS_ID] + [PAD_ID] * (CFG.text_len - 3)]
    assert mask.tolist() == [[1, 1, 1] + [0] * (CFG.text_len - 3)]
    ctx = enc.encode("hi")
    assert ctx.shape == (CFG.text_len, CFG.text_dim) and ctx.dtype == torch.float32
    assert (ctx[:3].abs().sum(1) > 0).all() and torch.equal(ctx[3:], torch.zeros(CFG.text_len - 3, CFG.text_dim))
    long_ids, long_mask = enc.tokenize("a much longer prompt than eight bytes")
    assert long_ids[0, -1] == EOS_ID and long_mask.all()                      # truncated, EOS kept
    empty = enc.encode("")
    assert (empty[0].abs().sum() > 0) and torch.equal(empty[1:], torch.zeros(CFG.text_len - 1, CFG.text_dim))


def test_real_tokens_do_not_see_the_padding(enc):
    ids, mask = enc.tokenize("hey")
    with torch.no_grad():
        alone = enc.model(input_ids=ids[:, :4]).last_hidden_state[0]            # no padding at all
    torch.testing.assert_close(enc.encode("hey")[:4], alone, rtol=1e-5, atol=1e-5)


def test_whitespace_and_html_cleaning(enc):
    assert torch.equal(enc.encode("  a \n\t b "), enc.encode("a b"))
    assert torch.equal(enc.encode("a &amp;lt; b"), enc.encode("a < b"))             # unescaped twice, like Wan
    assert not torch.equal(enc.encode("a b"), enc.encode("ab"))


def test_deterministic_per_seed(enc):
    same, other = TextEncoder.random(CFG, seed=0), TextEncoder.random(CFG, seed=1)
    assert torch.equal(same.encode("talk"), enc.encode("talk"))
    assert torch.equal(enc.encode("talk"), enc.encode("talk"))
    assert not torch.allclose(other.encode("talk"), enc.encode("talk"))
    with pytest.raises(TypeError, match="str"):
        enc.encode(None)


# ---------------------------------------------------------------------------------------------- Wan checkpoint
def test_wan_checkpoint_round_trip(enc, wan_pth, tokenizer_dir):
    loaded = TextEncoder.from_wan(wan_pth, tokenizer_dir, text_len=CFG.text_len)
    for key, value in enc.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    ids, mask = loaded.tokenize("w5   w9 w200")
    assert ids.tolist() == [[5, 9, 200, EOS_ID] + [PAD_ID] * (CFG.text_len - 4)] and mask.sum() == 4
    ids, _ = loaded.tokenize(" ".join(["w7"] * 20))
    assert ids[0, -1] == EOS_ID and (ids[0, :-1] == 7).all()                   # truncated to text_len, EOS kept
    with torch.no_grad():
        want = enc.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    assert torch.equal(loaded.encode(" ".join(["w7"] * 20)), want)


def test_wan_checkpoint_in_bf16(wan_pth, tokenizer_dir):
    loaded = TextEncoder.from_wan(wan_pth, tokenizer_dir, dtype=torch.bfloat16, text_len=CFG.text_len)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    ctx = loaded.encode("w3 w4")
    assert ctx.dtype == torch.float32 and ctx.shape == (CFG.text_len, CFG.text_dim)


def test_wan_checkpoint_key_errors(enc, tokenizer_dir, tmp_path):
    state = to_wan_layout(enc.model)
    torch.save({**state, "blocks.0.attn.rotary.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unmapped keys.*blocks\.0\.attn\.rotary\.weight"):
        TextEncoder.from_wan(tmp_path / "extra.pth", tokenizer_dir)
    del state["blocks.1.norm2.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \['encoder\.block\.1\.layer\.1\.layer_norm\.weight'\]"):
        TextEncoder.from_wan(tmp_path / "missing.pth", tokenizer_dir)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        TextEncoder.from_wan(tmp_path / "list.pth", tokenizer_dir)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        TextEncoder.from_wan(tmp_path / "junk.pth", tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="umT5 weights"):
        TextEncoder.from_wan(tmp_path / "absent.pth", tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        TextEncoder.from_wan(tmp_path / "missing.pth", tmp_path / "no-tokenizer")


# ---------------------------------------------------------------------------------------------- embedding file
def test_embedding_file_round_trip_and_errors(enc, tmp_path):
    ctx = enc.encode("hello")
    save_text_embedding(tmp_path / "ctx.safetensors", ctx)
    assert torch.equal(load_text_embedding(tmp_path / "ctx.safetensors", CFG), ctx)
    assert not (tmp_path / "ctx.safetensors.tmp").exists()
    wan = ModelConfig.preset("wan-1.3b")
    with pytest.raises(ValueError, match=r"is \[8, 32\].*\[text_len=512, text_dim=4096\]"):
        load_text_embedding(tmp_path / "ctx.safetensors", wan)
    with pytest.raises(FileNotFoundError, match="save_text_embedding"):
        load_text_embedding(tmp_path / "none.safetensors", CFG)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_text_embedding(tmp_path / "bad.safetensors", CFG)
    with pytest.raises(ValueError, match=r"\[text_len, text_dim\]"):
        save_text_embedding(tmp_path / "x.safetensors", ctx[None])
