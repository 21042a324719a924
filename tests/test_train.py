"""Training code against the runtime: the student's one-pass training computation is the streaming computation,
and the teacher sampler records states exactly at the stream's noise levels."""
import copy

import numpy as np
import pytest
import torch

from runtime import AvatarPipeline, StreamConfig
from runtime.scheduler import step_plan
from train.distill import block_causal_mask, one_pass, stream_sigmas
from train.teacher import TextEmbedding, euler_grid, sample


@pytest.fixture(scope="module")
def toy():
    pipe = AvatarPipeline.from_preset("toy-talker", seed=0, random_weights=True)   # the check is structural
    text = TextEmbedding(pipe.config.text_len, pipe.config.text_dim)
    pipe.text_encoder = None
    return pipe, text


def test_one_pass_equals_the_streaming_session(toy):
    """Window 5 of a low-delay stream (history = frames 1, 2 from cache passes, window = frames 3..6) computed
    by the session equals one masked call over [anchor | history | window] (tolerance 1e-5 in fp32)."""
    pipe, text = toy
    stream = StreamConfig.preset("low-delay")
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    feats = torch.randn(40, pipe.config.audio_input_dim, generator=torch.Generator().manual_seed(1))
    sess = pipe.session(image, stream=stream, text=text.context[0].detach(), seed=3)
    emitted = {}
    sess.on_block = lambda b, x0: emitted.__setitem__(b, x0.clone())
    with torch.inference_mode():
        sess.push_features(feats[:20])                            # windows 0..4: frames 1 and 2 are history
        sess.source.push(feats[20:24])                            # window 5's audio, without running it
        sp = step_plan(stream, 5, None, sess.state.levels_t)
        assert sess.next_window == 5 and sp.passes[0].history == (1, 2) and sp.passes[0].frames == (3, 4, 5, 6)
        x = torch.cat([sess.state.noisy[b] for b in sp.blocks[:-1]] + [sess.state.fresh_block(sp.fresh_block)], dim=2)
        audio = sess.rows(*sp.passes[0].audio_rows)
        session_x0 = sess.reference.dit_pass(x, sp.passes[0], audio)
        rows = feats.unsqueeze(0)
        history = torch.cat([emitted[0], emitted[1]], 2)
        sig = torch.tensor(stream_sigmas(stream))[[3, 2, 1, 0]]     # oldest at the lowest level
        ours = one_pass(pipe.dit, text, sess.state.z_ref, history, x, sig,
                        {"history": rows[:, 0:8], "window": rows[:, 8:24]})
    err = (ours - session_x0).abs().max().item()
    assert err <= 1e-5, err


def test_block_causal_mask():
    m = block_causal_mask(2, 3, 1)
    assert m[0].tolist() == [True, False, False, False, False, False]
    assert m[1].tolist() == [True, True, False, False, False, False]
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert all(m[i].all() for i in range(3, 6))
    assert block_causal_mask(1, 1, 4).shape == (12, 12)


def test_teacher_records_states_exactly_at_stream_levels(toy):
    pipe, text = toy
    ref = torch.randn(2, 16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    audio = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1))
    levels = stream_sigmas(StreamConfig.preset("official"))
    g = torch.Generator().manual_seed(5)
    x0, states = sample(pipe.dit, text, ref, audio, 4, g, steps=8, record_levels=tuple(levels))
    noise = torch.randn(2, 16, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(states[1.0], noise)                          # sigma = 1 is the drawn noise itself
    assert set(states) == set(levels) and x0.shape == noise.shape
    grid = euler_grid(8)
    assert not any(torch.isclose(grid, torch.tensor(lv)).any() for lv in levels[1:])   # levels fall between grid points


def random_clips():
    """Two clips of 9 random frames (2 latents after the reference), silent: enough for the decoder step."""
    from train.data import ClipSet
    rng = np.random.default_rng(0)
    return ClipSet(frames=rng.integers(0, 256, (2, 9, 64, 64, 3), dtype=np.uint8),
                   audio=np.zeros((2, 5120), np.float32), mouth=np.zeros((2, 9), np.float32),
                   roundness=np.zeros((2, 9), np.float32), seeds=[0, 1])


def test_harden_decoder_trains_only_the_decoder():
    """The decoder phase trains the decoder and its temporal context layer but leaves the encoder (the latent
    space the DiT learns) and the global RNG untouched, its result is deterministic per seed, and the trained
    context is used: decoding with it differs from decoding without."""
    from runtime.config import ModelConfig
    from runtime.frame_ae import FrameAE
    from train.ae import harden_decoder
    clips = random_clips()
    torch.manual_seed(0)
    base = FrameAE(ModelConfig.preset("toy-talker", frame_ae_context=(2, 3)))
    runs = []
    for _ in range(2):
        ae = copy.deepcopy(base)
        state = torch.get_rng_state()
        info = harden_decoder(ae, clips, [1.0] * 16, steps=3, batch=4, seed=5, log=lambda m: None)
        assert torch.equal(torch.get_rng_state(), state) and info["context"] == [2, 3]
        runs.append(ae)
    before, after = base.state_dict(), runs[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert not torch.equal(before["context.weight"], after["context.weight"])
    assert all(torch.equal(after[k], runs[1].state_dict()[k]) for k in before)
    z = runs[0].encode(torch.rand(1, 3, 9, 64, 64) * 2 - 1)
    with torch.no_grad():
        with_context = runs[0].decode(z)
        codes = runs[0].unpack(z)[0].flatten(0, 1)[3:]                      # frames 0..8 (latent 0 = frame 0 x 4)
        alone = runs[0].decode_frames(codes).clamp(-1, 1)
    assert (with_context[0].transpose(0, 1) - alone).abs().max() > 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_device_cuda_without_a_gpu_says_so(tmp_path):
    from train.toy import main
    with pytest.raises(SystemExit, match="--device cuda needs a CUDA build of torch and a visible GPU"):
        main(["--out", str(tmp_path), "--device", "cuda"])
    assert not (tmp_path / "log.txt").exists()                      # refused before anything is written


@pytest.fixture
def exact_cuda():
    """fp32 CUDA matmuls and convolutions without TF32, so CPU and CUDA differ only by summation order."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
def test_stages_on_cuda_draw_the_cpu_noise(toy, exact_cuda):
    """`train.toy --device cuda`: the teacher sampler (backfill), the teacher's flow loss, the DMD losses and the
    decoder step draw their noise from CPU generators, so on CUDA they compute what the CPU computes, within fp32
    summation-order error (a noise draw on the device would differ by O(1))."""
    from runtime.config import ModelConfig
    from runtime.frame_ae import FrameAE
    from train.ae import harden_decoder
    from train.distill import dmd_losses
    from train.teacher import teacher_loss
    pipe, text = toy
    dev = exact_cuda
    dit_gpu, text_gpu = copy.deepcopy(pipe.dit).to(dev), copy.deepcopy(text).to(dev)
    g = lambda: torch.Generator().manual_seed(3)                            # noqa: E731
    ref = torch.randn(2, 16, 1, 16, 16, generator=g())
    audio = torch.randn(2, 16, 128, generator=g())
    x0, _ = sample(pipe.dit, text, ref, audio, 4, g(), steps=4)
    x0_gpu, _ = sample(dit_gpu, text_gpu, ref.to(dev), audio.to(dev), 4, g(), steps=4)
    torch.testing.assert_close(x0_gpu.cpu(), x0, rtol=1e-3, atol=1e-3)
    batch = dict(ref=ref, x0=x0, audio=audio)
    with torch.no_grad():
        loss = teacher_loss(pipe.dit, text, batch, g())
        loss_gpu = teacher_loss(dit_gpu, text_gpu, {k: v.to(dev) for k, v in batch.items()}, g())
        losses = dmd_losses(x0, ref, audio, pipe.dit, pipe.dit, text, text, g())
        losses_gpu = dmd_losses(x0.to(dev), ref.to(dev), audio.to(dev), dit_gpu, dit_gpu, text_gpu, text_gpu, g())
    torch.testing.assert_close(loss_gpu.cpu(), loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(losses_gpu, losses):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)

    clips = random_clips()
    torch.manual_seed(0)
    ae = FrameAE(ModelConfig.preset("toy-talker"))
    ae_gpu = copy.deepcopy(ae).to(dev)
    for model in (ae, ae_gpu):
        harden_decoder(model, clips, [1.0] * 16, steps=3, batch=4, seed=5, log=lambda m: None)
    for k, v in ae.state_dict().items():
        torch.testing.assert_close(ae_gpu.state_dict()[k].cpu(), v, rtol=1e-4, atol=1e-4, msg=k)


def scores(amp, worst, identity=0.995, last10=0.4, first=0.4, flicker=0.6, flicker_truth=0.4):
    return dict(mouth_amplitude=amp, mouth_amplitude_worst=worst, identity=identity, de2000_last10=last10,
                de2000_first=first, flicker=flicker, flicker_truth=flicker_truth)


def test_gate_ships_the_widest_mouth_that_keeps_the_targets():
    from train.toy import gate
    runs = {"ode": scores(0.6, 0.3), "wide": scores(0.9, 0.7), "wider-but-blurred": scores(1.0, 0.8, identity=0.98),
            "wider-but-flickers": scores(1.0, 0.8, flicker=0.9), "narrow-worst": scores(0.95, 0.2)}
    choice, reasons = gate(runs, "ode")
    assert choice == "wide"
    assert reasons == {"ode": "passed", "wide": "passed", "wider-but-blurred": "failed identity",
                       "wider-but-flickers": "failed flicker", "narrow-worst": "failed articulation"}


def test_gate_keeps_the_baseline_when_no_candidate_passes():
    from train.toy import gate
    choice, reasons = gate({"ode": scores(0.6, 0.3, flicker=1.0), "new": scores(0.9, 0.7, last10=0.7)}, "ode")
    assert choice == "ode" and reasons == {"ode": "failed flicker", "new": "failed drift"}


def test_mouth_weight_is_centred_on_the_mouth():
    """The ODE loss weight: mean 1, largest on the latent cells under the rendered mouth, 1 / (1 + extra) of that
    far from it."""
    from train.distill import latent_weight
    from train.synth import mouth_region
    region = mouth_region(identities=8)
    w = latent_weight(region, (16, 16), 4.0)
    assert w.shape == (16, 16) and abs(w.mean().item() - 1) < 1e-6
    row, col = divmod(int(w.argmax()), 16)
    assert 8 <= row <= 11 and 6 <= col <= 9, (row, col)                  # below the eyes, centred
    assert w.max() / w[0, 0] == pytest.approx(5.0, rel=0.05)
