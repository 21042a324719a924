"""AvatarPipeline construction, text context, stats, and the CLI demo end to end."""
import numpy as np
import pytest
import torch

from runtime import AvatarPipeline
from runtime import generate as cli
from runtime.media import probe, read_video


def test_wan_1_3b_on_the_meta_device_allocates_nothing():
    pipe = AvatarPipeline.from_preset("wan-1.3b", device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in pipe.dit.parameters()) == 1_421_187_232
    assert len(pipe.dit.state_dict()) == 857
    enc = sum(p.numel() for n, p in pipe.vae.named_parameters() if n.startswith(("encoder.", "conv1.")))
    dec = sum(p.numel() for n, p in pipe.vae.named_parameters() if n.startswith(("decoder.", "conv2.")))
    assert (enc, dec) == (53_595_872 + 1_056, 73_295_331 + 272)
    assert all(p.is_meta for p in pipe.dit.parameters()) and all(p.is_meta for p in pipe.vae.parameters())
    assert pipe.dit.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the defaults of a machine without CUDA")
def test_defaults_without_cuda_are_the_cpu_in_float32():
    assert AvatarPipeline.from_preset("tiny").device == torch.device("cpu")
    toy = AvatarPipeline.from_preset("toy-talker")
    assert (toy.device, toy.dtype) == (torch.device("cpu"), torch.float32)
    with pytest.warns(UserWarning, match="random weights"):
        pipe = AvatarPipeline.from_pretrained(preset="tiny")
    assert (pipe.device, pipe.dtype, pipe.dit.dtype) == (torch.device("cpu"), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"device 'cuda' asked for, but .*use device='cpu'"):
        AvatarPipeline.from_preset("tiny", device="cuda")


def test_device_dtype_and_seed_arguments_are_checked_with_clear_messages():
    from runtime.pipeline import resolve_device, resolve_dtype
    assert resolve_dtype("bf16") == resolve_dtype("bfloat16") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32 and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported; use torch.float32"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="dtype torch.int64 is not supported"):
        AvatarPipeline.from_preset("tiny", dtype=torch.int64)
    with pytest.raises(ValueError, match=r"device 'mps' is not supported: the runtime runs on 'cpu' or 'cuda'"):
        AvatarPipeline.from_preset("toy-talker", device="mps")
    with pytest.raises(ValueError, match=r"device 'meta' is not supported"):
        AvatarPipeline.from_pretrained(preset="tiny", device="meta")
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device name; use 'cpu', 'cuda'"):
        resolve_device("gpu")
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(0.5)
    a = AvatarPipeline.from_preset("tiny", seed=np.int64(3))               # numpy integers are seeds too
    assert torch.equal(a.dit.blocks[0].self_attn.q.weight, AvatarPipeline.from_preset("tiny", seed=3)
                       .dit.blocks[0].self_attn.q.weight)
    image = np.full((64, 96, 3), 128, np.uint8)
    assert a.session(image, seed=np.int64(7)).seed == 7
    for bad, error in ((-1, ValueError), (2 ** 64, ValueError), ("3", TypeError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"seed must be an int in \[0, 2\*\*63\)"):
            AvatarPipeline.from_preset("tiny", seed=bad)
        with pytest.raises(error, match=r"seed must be an int in \[0, 2\*\*63\)"):
            a.session(image, seed=bad)


def test_random_presets_are_deterministic_and_say_so():
    a, b = AvatarPipeline.from_preset("tiny", seed=3), AvatarPipeline.from_preset("tiny", seed=3)
    c = AvatarPipeline.from_preset("tiny", seed=4)
    for (name, pa), pb, pc in zip(a.dit.state_dict().items(), b.dit.state_dict().values(), c.dit.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.dit.blocks[0].self_attn.q.weight, c.dit.blocks[0].self_attn.q.weight)
    assert set(a.random_components) >= {"dit", "vae", "audio", "text"}
    assert a.config.decoder == "vae" and a.decoder is a.vae
    assert AvatarPipeline.from_preset("tiny", decoder="taehv").decoder is not None


def test_text_context_forms(tmp_path):
    from runtime.text import save_text_embedding
    pipe = AvatarPipeline.from_preset("tiny")
    cfg = pipe.config
    emb = pipe.encode_text("hello there")
    assert emb.shape == (cfg.text_len, cfg.text_dim)
    assert torch.equal(pipe.encode_text("hello there"), emb)              # cached per string
    assert not torch.equal(pipe.encode_text("another prompt"), emb)
    path = tmp_path / "ctx.safetensors"
    save_text_embedding(path, emb)
    assert torch.equal(pipe.encode_text(str(path)), emb)
    assert torch.equal(pipe.encode_text(emb), emb)
    with pytest.raises(ValueError, match="text context must be"):
        pipe.encode_text(torch.zeros(3, cfg.text_dim))
    with pytest.raises(TypeError, match="text must be"):
        pipe.encode_text(42)


def test_stats_report_the_stream():
    pipe = AvatarPipeline.from_preset("tiny")
    sess = pipe.session(np.zeros((32, 48, 3), np.uint8), stream="low-delay")
    frames = sess.push_audio(np.zeros(24 * 640 + 100, np.float32))    # 24 whole audio frames + a partial one
    stats = sess.stats()
    assert stats["frames_out"] == len(frames) == 1 + 24 - 12               # 12 frames of look-ahead (L - 1 = 3 blocks)
    assert stats["audio_frames_in"] == 25 and stats["lookahead_frames"] == 12
    assert stats["steps"] == 6 and stats["main_passes"] == 6 and stats["cache_passes"] == 3
    assert stats["kv_bytes"] == sess.state.cache.nbytes > 0
    assert {"setup", "dit_main", "dit_cache", "decode", "audio"} <= set(stats["ms"])


def test_cli_demo_writes_a_25fps_mp4_with_audio(tmp_path, capsys):
    from runtime.media import load_audio
    out = tmp_path / "demo.mp4"
    assert cli.main(["--out", str(out)]) == 0
    err = capsys.readouterr().err
    if cli.DEFAULT_PRESET == "tiny":                  # random weights must be announced as such
        assert "RANDOM weights" in err and "--weights" in err
    else:
        assert "RANDOM" not in err
    info = probe(out)
    kinds = [s["type"] for s in info["streams"]]
    assert sorted(kinds) == ["audio", "video"]
    video = next(s for s in info["streams"] if s["type"] == "video")
    audio = next(s for s in info["streams"] if s["type"] == "audio")
    assert video["codec"] == "h264" and abs(video["fps"] - 25) < 1e-6
    assert audio["codec"] == "aac"
    frames, fps = read_video(out)
    samples = len(load_audio(cli.default_inputs(cli.DEFAULT_PRESET)[1]))
    assert frames.shape[0] == video["frames"] == 1 + -(-samples // 640)          # the frame contract: 1 + A


def test_from_pretrained_reads_the_official_layout(tmp_path):
    """A tiny checkpoint set in the official download layout: DiT (LoRA, model.pt) and VAE load; the
    missing encoders are random, with a warning that names them."""
    from test_weights import official
    src = AvatarPipeline.from_preset("tiny", seed=5)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"generator": official(src.dit.state_dict(), rank=4)}, tmp_path / "checkpoints" / "model.pt")
    wan = tmp_path / "wan_models" / "Wan2.1-T2V-1.3B"
    wan.mkdir(parents=True)
    torch.save(src.vae.state_dict(), wan / "Wan2.1_VAE.pth")
    with pytest.warns(UserWarning, match="audio, text"):
        pipe = AvatarPipeline.from_pretrained(tmp_path, preset="tiny", device="cpu", dtype=torch.float32,
                                              lora_alpha=2.0)
    assert set(pipe.random_components) == {"audio", "text"}
    assert torch.equal(pipe.vae.decoder.head[2].weight, src.vae.decoder.head[2].weight)
    q = "blocks.1.self_attn.q"
    assert not torch.equal(pipe.dit.get_submodule(q).weight, src.dit.get_submodule(q).weight)   # LoRA merged in
    frames = pipe.generate(np.zeros((32, 48, 3), np.uint8), np.zeros(6400, np.float32), audio_mode="stream")
    assert frames.shape == (11, 32, 48, 3)
