"""CPU tests for model.py against references: the tap against diffusers' own forward, the sigmas
against diffusers' scheduler, the losses against their closed forms, the heads' init invariants,
score() against a hand-written ensemble, LoRA / frozen / full fine-tune, checkpoint I/O."""
import copy
import json
import math
import os
import sys
from statistics import NormalDist

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from model import (BACKBONES, LORA_TARGETS, DiTTap, add_noise, build_reward_model, bt_loss,  # noqa: E402
                   check_names, load_checkpoint, load_reward_model, load_transformer, make_tiny_pipeline, sample_t,
                   save_checkpoint, sd3_sigmas, shift_t, thurstone_loss, trainable_state)

PROMPTS = ["a red cat", "two blue dogs"]


def _encode(pipe, prompts=PROMPTS):
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=8)
    return pe, pooled


@pytest.fixture(scope="module")
def tiny():
    """The tiny pipeline (seed 0, read-only: tests that mutate weights build their own transformer)
    and real prompt embeddings from its two CLIP encoders."""
    pipe = make_tiny_pipeline(0)
    pe, pooled = _encode(pipe)
    return pipe, pe, pooled


@pytest.fixture(scope="module")
def models():
    """One RewardModel per head on fresh tiny transformers (seed 0), eval mode, read-only."""
    return {h: build_reward_model("tiny", h).eval() for h in ("dina", "drm", "ditr")}


def _latents(B=2, C=4, H=8, W=8, seed=1):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the tap


def _check_tap_against_diffusers(transformer, pe, pooled, n_blocks, taps, H=8, W=8):
    """DiTTap's (temb, vis, txt) == the block outputs hooked inside diffusers' own forward."""
    x = _latents(2, transformer.config.in_channels, H, W)
    t = torch.tensor([0.13, 0.87])  # per-sample noise levels
    hooked = {}
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: hooked.__setitem__(j, o))
             for j, b in enumerate(transformer.transformer_blocks)]
    try:
        with torch.no_grad():
            ref_out = transformer(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled,
                                  timestep=1000 * t).sample
            assert sorted(hooked) == list(range(len(transformer.transformer_blocks)))
            ref = dict(hooked)
            hooked.clear()
            tap = DiTTap(transformer, n_blocks, taps)
            temb, vis, txt = tap(x, t, pe, pooled)
            ref_temb = transformer.time_text_embed(1000 * t, pooled)
    finally:
        for h in hooks:
            h.remove()
    assert ref_out.shape == x.shape
    torch.testing.assert_close(temb, ref_temb, atol=1e-5, rtol=0)
    assert len(vis) == len(txt) == len(taps)
    for i, v, s in zip(sorted(taps), vis, txt):
        ref_ctx, ref_x = ref[i - 1]  # tap i = output of transformer_blocks[i-1], returned as (ctx, x)
        torch.testing.assert_close(v, ref_x, atol=1e-5, rtol=0)
        if ref_ctx is None:  # the model's last block is context_pre_only
            assert s is None
        else:
            torch.testing.assert_close(s, ref_ctx, atol=1e-5, rtol=0)
    # the per-sample t matters: sample 1 differs from what it would be at sample 0's level
    with torch.no_grad():
        _, vis_same_t, _ = DiTTap(transformer, n_blocks, taps)(x, torch.full((2,), 0.13), pe, pooled)
    torch.testing.assert_close(vis_same_t[-1][0], vis[-1][0], atol=1e-5, rtol=0)
    assert (vis_same_t[-1][1] - vis[-1][1]).abs().max() > 1e-3
    # running stops after the last tap: no later block is called
    assert sorted(hooked) == list(range(max(taps))), f"blocks run {sorted(hooked)} for taps {taps}"


@pytest.mark.parametrize("n_blocks,taps", [(4, (1, 2, 3, 4)), (4, (2,)), (3, (1, 3)), (4, (4,))])
def test_tap_matches_diffusers_forward_tiny(tiny, n_blocks, taps):
    pipe, pe, pooled = tiny
    _check_tap_against_diffusers(pipe.transformer, pe, pooled, n_blocks, taps)


def test_tap_matches_diffusers_forward_non_square(tiny):
    pipe, pe, pooled = tiny
    _check_tap_against_diffusers(pipe.transformer, pe, pooled, 4, (1, 3), H=8, W=12)


def test_tap_matches_diffusers_forward_toy_size():
    pipe = make_tiny_pipeline(0, size="toy")  # 6 blocks, width 128, patch 2 on 16x16 latents
    assert pipe.transformer.config.patch_size == 2 and len(pipe.transformer.transformer_blocks) == 6
    assert pipe.vae_scale_factor == 2  # the toy VAE: 32x32 images -> 16x16 latents
    pe, pooled = _encode(pipe)
    _check_tap_against_diffusers(pipe.transformer, pe, pooled, 4, BACKBONES["toy"]["taps"]["dina"], H=16, W=16)


def test_tap_gradient_checkpointing_same_values(tiny):
    pipe, pe, pooled = tiny
    x, t = _latents(), torch.tensor([0.3, 0.6])
    tap = DiTTap(pipe.transformer, 3, (1, 3))
    with torch.no_grad():
        temb0, vis0, txt0 = tap(x, t, pe, pooled)
    tap.grad_ckpt = True
    temb1, vis1, txt1 = tap(x.requires_grad_(), t, pe, pooled)
    for a, b in zip(vis0 + txt0, vis1 + txt1):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)
    vis1[-1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- sigmas, noising, t sampling


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 10, 28, 50])
def test_sd3_sigmas_match_diffusers_scheduler(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = sd3_sigmas(n, shift)
    assert ours.shape == (n + 1,) and ours[-1] == 0 and ours[0] == 1
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)


def test_add_noise_per_sample_t():
    x0, eps = _latents(3, seed=2), _latents(3, seed=3)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = add_noise(x0, t, eps)
    for b in range(3):
        tb = float(t[b])
        torch.testing.assert_close(xt[b], (1 - tb) * x0[b] + tb * eps[b])
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])


def test_sample_t_modes():
    g = lambda: torch.Generator().manual_seed(0)
    u = sample_t(20000, "uniform", g())
    assert u.shape == (20000,) and u.min() >= 0 and u.max() < 1
    assert u.min() < 0.01 and u.max() > 0.99 and abs(u.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(u, sample_t(20000, "uniform", g()))  # seeded
    ln = sample_t(20000, "logit-normal", g(), mu=0.5, s=0.8)
    assert ln.min() > 0 and ln.max() < 1
    z = torch.logit(ln.double())
    assert abs(z.mean().item() - 0.5) < 0.03 and abs(z.std().item() - 0.8) < 0.03
    f = sample_t(5, "fixed", t_fixed=0.25)
    assert f.shape == (5,) and (f == 0.25).all()
    with pytest.raises(ValueError, match="bogus"):
        sample_t(4, "bogus")


def test_shift_t_is_the_schedulers_shift_and_moves_quantiles():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # at init: the shifted training sigmas of timesteps / 1000
    t = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(shift_t(t, 3.0), sched.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(shift_t(shift_t(t, 0.125), 8.0), t, atol=1e-6, rtol=0)  # 1/s inverts s
    assert abs(shift_t(0.4, 0.125) - 0.0769) < 1e-4  # the toy's t_eval: DiNa's 0.4 at 16x16 latents
    u = sample_t(20000, "uniform", torch.Generator().manual_seed(0), shift=0.125)
    for q in (0.1, 0.5, 0.9):  # shift_t is monotone: the q-quantile of U(0,1) maps to shift_t(q)
        assert abs(torch.quantile(u, q).item() - shift_t(q, 0.125)) < 0.01
    torch.testing.assert_close(sample_t(5, "uniform", torch.Generator().manual_seed(1), shift=1.0),
                               sample_t(5, "uniform", torch.Generator().manual_seed(1)))


def test_toy_word_tokenizer_round_trip(tmp_path):
    """The toy pipelines' tokenizer: one token per toy word (9 tokens for a prompt), characters for any other
    text, and it reloads from the saved pipeline folder with the same ids."""
    from transformers import CLIPTokenizer
    tok = make_tiny_pipeline(0, size="toy").tokenizer
    ids = tok("a purple triangle on a gray background").input_ids
    assert len(ids) == 9 and tok.convert_ids_to_tokens(ids)[1:8] == [
        "a</w>", "purple</w>", "triangle</w>", "on</w>", "a</w>", "gray</w>", "background</w>"]
    assert tok.convert_ids_to_tokens(tok("a tiny cat").input_ids)[2:6] == ["t", "i", "n", "y</w>"]
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for p in ("a red circle on a white background", "two blue dogs"):
        assert again(p, padding="max_length").input_ids == tok(p, padding="max_length").input_ids
    assert again.model_max_length == tok.model_max_length == 16


# ----------------------------------------------------------------------------- losses vs closed forms

R_POS = [0.3, -1.2, 2.0, 0.0]
R_NEG = [0.1, 0.5, -0.7, 0.0]
TS = [0.1, 0.5, 0.9, 0.4]
YS = [1.0, 0.7, 0.2, 0.5]
T64 = lambda v: torch.tensor(v, dtype=torch.float64)
Phi = NormalDist().cdf
log_sig = lambda d: -math.log1p(math.exp(-d))


def test_bt_loss_closed_form():
    ds = [a - b for a, b in zip(R_POS, R_NEG)]
    ref = sum(-log_sig(d) for d in ds) / len(ds)
    assert bt_loss(T64(R_POS), T64(R_NEG)).item() == pytest.approx(ref, abs=1e-12)
    ref_soft = sum(-(y * log_sig(d) + (1 - y) * log_sig(-d)) for d, y in zip(ds, YS)) / len(ds)
    assert bt_loss(T64(R_POS), T64(R_NEG), T64(YS)).item() == pytest.approx(ref_soft, abs=1e-12)
    assert bt_loss(T64([0.0]), T64([0.0])).item() == pytest.approx(math.log(2), abs=1e-12)


def _thurstone_ref(r_pos, r_neg, ts, ys, k, sigma_u):
    out = []
    for a, b, t, y in zip(r_pos, r_neg, ts, ys):
        s2 = k * t ** 2 + sigma_u ** 2
        p = Phi((a - b) / math.sqrt(2 * s2))
        out.append(1 - math.sqrt(y * p + (1 - y) * (1 - p)))
    return sum(out) / len(out)


def test_thurstone_loss_closed_form():
    ones = [1.0] * len(R_POS)
    got = thurstone_loss(T64(R_POS), T64(R_NEG), T64(TS)).item()  # defaults k=2, sigma_u=0.1, y=1
    assert got == pytest.approx(_thurstone_ref(R_POS, R_NEG, TS, ones, 2.0, 0.1), abs=1e-10)
    got = thurstone_loss(T64(R_POS), T64(R_NEG), T64(TS), k=1.5, sigma_u=0.3, y=T64(YS)).item()
    assert got == pytest.approx(_thurstone_ref(R_POS, R_NEG, TS, YS, 1.5, 0.3), abs=1e-10)
    # per-sample t matters: permuting t changes the loss
    perm = thurstone_loss(T64(R_POS), T64(R_NEG), T64(TS[::-1])).item()
    assert perm == pytest.approx(_thurstone_ref(R_POS, R_NEG, TS[::-1], ones, 2.0, 0.1), abs=1e-10)
    assert abs(perm - thurstone_loss(T64(R_POS), T64(R_NEG), T64(TS)).item()) > 1e-3


def test_thurstone_fixed_variant_and_d_zero():
    got = thurstone_loss(T64(R_POS), T64(R_NEG), T64(TS), k=0.0, sigma_u=0.5, y=T64(YS)).item()
    assert got == pytest.approx(_thurstone_ref(R_POS, R_NEG, [0.0] * 4, YS, 0.0, 0.5), abs=1e-10)
    other_t = thurstone_loss(T64(R_POS), T64(R_NEG), T64([0.9, 0.1, 0.2, 0.7]), k=0.0, sigma_u=0.5, y=T64(YS)).item()
    assert other_t == pytest.approx(got, abs=1e-12)  # constant variance: t does not enter
    for t in (0.0, 0.5, 1.0):
        d0 = thurstone_loss(T64([0.7]), T64([0.7]), T64([t])).item()
        assert d0 == pytest.approx(1 - math.sqrt(0.5), abs=1e-12)
    # a perfectly separated pair costs ~0, a perfectly reversed one ~1
    assert thurstone_loss(T64([50.0]), T64([0.0]), T64([0.5])).item() == pytest.approx(0.0, abs=1e-6)
    assert thurstone_loss(T64([-50.0]), T64([0.0]), T64([0.5])).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_gradients_finite_at_large_d(dtype):
    for d in (-1e3, -60.0, -8.0, 8.0, 60.0, 1e3):
        for y in (None, torch.tensor([0.3], dtype=dtype)):
            for loss, kw in ((bt_loss, {}), (thurstone_loss, dict(t=torch.tensor([0.05], dtype=dtype))),
                             (thurstone_loss, dict(t=torch.tensor([0.5], dtype=dtype), k=0.0, sigma_u=0.5))):
                r = torch.tensor([d], dtype=dtype, requires_grad=True)
                val = loss(r, torch.zeros(1, dtype=dtype), y=y, **kw)
                val.backward()
                assert torch.isfinite(val) and torch.isfinite(r.grad).all(), (loss.__name__, d, y, kw)


def test_loss_gradient_direction():
    r = T64([0.2, -0.4]).requires_grad_()
    thurstone_loss(r, T64([0.0, 0.0]), T64([0.3, 0.6])).backward()
    assert (r.grad < 0).all()  # increasing the preferred reward lowers the loss
    r = T64([0.2, -0.4]).requires_grad_()
    bt_loss(r, T64([0.0, 0.0])).backward()
    sig = lambda d: 1 / (1 + math.exp(-d))
    torch.testing.assert_close(r.grad, T64([-(1 - sig(0.2)) / 2, -(1 - sig(-0.4)) / 2]))


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("head", ["dina", "drm", "ditr"])
def test_heads_return_batch_of_float32(models, tiny, head):
    _, pe, pooled = tiny
    m = models[head]
    with torch.no_grad():
        r = m(_latents(), torch.tensor([0.2, 0.8]), pe, pooled)
        r_swapped = m(_latents().flip(0), torch.tensor([0.8, 0.2]), pe.flip(0), pooled.flip(0))
    assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    torch.testing.assert_close(r.flip(0), r_swapped, atol=1e-5, rtol=1e-5)  # per-sample, no batch mixing
    assert abs(r[0] - r[1]) > 0  # depends on its input


def test_dina_init_film_identity_and_gates_half(models):
    """At init FiLM does not modulate (an adapter is proj(x + layer_embed)) and every value gate of attn1 is 0.5;
    attn2 is visual-only and ungated. Closing both gates leaves attn1 its residual plus to_out's bias."""
    head = models["dina"].head
    W = models["dina"].tap.width
    x, temb = torch.randn(2, 5, W), torch.randn(2, W) * 3
    with torch.no_grad():
        for a in [*head.layer_adapters_visual, *head.layer_adapters_text]:
            torch.testing.assert_close(a(x, temb), a.proj(x + a.layer_embed), atol=1e-6, rtol=0)
        ctx, txt = torch.randn(2, 7, W), torch.randn(2, 3, W)
        for gate in (head.attn1.gate_vis, head.attn1.gate_text):
            assert (torch.sigmoid(gate(ctx)) == 0.5).all()
    assert head.attn2.gate_vis is None and head.attn2.gate_text is None and head.attn2.norm_t is None
    h = copy.deepcopy(head.attn1)
    with torch.no_grad():
        q = torch.randn(2, 4, W)
        open_ = h(q, ctx, txt)
        h.gate_vis[2].bias.fill_(-1e4)
        h.gate_text[2].bias.fill_(-1e4)
        torch.testing.assert_close(h(q, ctx, txt), q + h.to_out[0].bias, atol=1e-5, rtol=0)
        assert (open_ - h(q, ctx, txt)).abs().max() > 1e-3  # the open gates let the values through


def test_drm_head_unpatchify_equals_diffusers_output(tiny):
    """With all blocks kept, the latent-shaped map the DRM head feeds its convs is exactly the
    diffusers transformer's own output (final norm + projection + unpatchify)."""
    _, pe, pooled = tiny
    transformer = make_tiny_pipeline(0).transformer
    m = build_reward_model("tiny", "drm", n_blocks=4, transformer=transformer).eval()
    assert m.tap.taps == (4,) and len(m.tap.blocks) == len(transformer.transformer_blocks)
    captured = []

    class Capture(torch.nn.Module):
        def forward(self, z):
            captured.append(z)
            return torch.zeros(z.shape[0], m.head.mlp[0].in_features, 1, 1)

    m.head.convs = Capture()
    x, t = _latents(2, 4, 8, 12), torch.tensor([0.25, 0.75])  # non-square: H and W must not swap
    with torch.no_grad():
        m(x, t, pe, pooled)
        ref = transformer(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=1000 * t).sample
    assert captured[0].shape == ref.shape == x.shape
    torch.testing.assert_close(captured[0], ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- score


def _noised_forward(m, x0, s, eps, pe, pooled):
    full = torch.full((x0.shape[0],), float(s))
    return m(add_noise(x0, full, eps), full, pe, pooled)


@pytest.mark.parametrize("head", ["dina", "drm", "ditr"])
def test_score_matches_hand_computed(models, tiny, head):
    _, pe, pooled = tiny
    m, x0 = models[head], _latents(seed=5)
    gen = lambda seed=7: torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=gen())
    ts = (0.2, 0.5, 0.7)
    with torch.no_grad():
        a = m.score(x0, pe, pooled, ts=ts, generator=gen())
        b = m.score(x0, pe, pooled, ts=ts, generator=gen())
        c = m.score(x0, pe, pooled, ts=ts, generator=gen(8))
        if head == "dina":
            toks = [m.head.tokens(*m.tap(add_noise(x0, torch.full((2,), s), eps), torch.full((2,), s), pe, pooled))
                    for s in ts]
            ref = m.head.readout(torch.cat([v for v, _ in toks], 1), torch.cat([s for _, s in toks], 1))
            mean_of_scores = torch.stack([_noised_forward(m, x0, s, eps, pe, pooled) for s in ts]).mean(0)
            assert (ref - mean_of_scores).abs().max() > 1e-6  # token concat is not the mean of scores
        else:
            ref = torch.stack([_noised_forward(m, x0, s, eps, pe, pooled) for s in ts]).mean(0)
        single = m.score(x0, pe, pooled, t=0.3, generator=gen())
        single_ref = _noised_forward(m, x0, 0.3, eps, pe, pooled)
    assert a.shape == (2,) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # deterministic for the same seed
    assert (a - c).abs().max() > 0  # and the noise really comes from the generator
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, single_ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- LoRA / frozen / full


def test_lora_trainable_set_and_identity_at_init(tiny):
    _, pe, pooled = tiny
    lora = build_reward_model("tiny", "ditr", lora_rank=4).eval()
    frozen = build_reward_model("tiny", "ditr").eval()
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    tap_trainable = {n for n in names if n.startswith("tap.")}
    assert tap_trainable and all("lora_" in n for n in tap_trainable)
    assert {n for n, _ in lora.named_parameters() if "lora_" in n} == tap_trainable
    assert {n for n, _ in lora.head.named_parameters(prefix="head")} <= names
    assert names == tap_trainable | {n for n, _ in lora.head.named_parameters(prefix="head")}
    assert names == set(trainable_state(lora))
    for target in LORA_TARGETS:  # every attention projection, the text-stream ones included
        assert any(f"attn.{target}.lora_A" in n for n in tap_trainable), target
    assert any(".attn.add_q_proj.lora_A" in n for n in tap_trainable)
    x, t = _latents(), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(lora(x, t, pe, pooled), frozen(x, t, pe, pooled), atol=1e-6, rtol=0)
    # the adapters are live: gradients reach lora_B, and a nonzero lora_B changes the output
    lora(x, t, pe, pooled).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        assert (lora(x, t, pe, pooled) - frozen(x, t, pe, pooled)).abs().max() > 1e-4


def test_frozen_and_full_finetune_trainable_sets():
    frozen = build_reward_model("tiny", "dina")
    assert not any(p.requires_grad for p in frozen.tap.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())
    assert not any("lora_" in n for n, _ in frozen.named_parameters())
    full = build_reward_model("tiny", "dina", full_finetune=True, lora_rank=4)
    assert all(p.requires_grad for p in full.tap.parameters())
    assert not any("lora_" in n for n, _ in full.named_parameters())  # full fine-tune wins over LoRA
    assert all(p.requires_grad for p in full.head.parameters())


def test_cast_frozen_bf16_storage_matches_autocast_of_float32(tiny):
    """train_reward on CUDA stores the frozen weights in bf16: what trains stays float32, and under bf16 autocast
    the rewards and LoRA gradients match the float32-stored model's (CPU autocast here; bf16 tolerances)."""
    _, pe, pooled = tiny
    ref = build_reward_model("tiny", "dina", lora_rank=4)
    with torch.no_grad():  # LoRA B starts at zero; make it non-zero so every LoRA weight gets a gradient
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    half = model.cast_frozen(copy.deepcopy(ref), torch.bfloat16)
    assert {p.dtype for p in trainable_state(half).values()} == {torch.float32}
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}
    x, t = _latents(), torch.tensor([0.3, 0.6])
    out = {}
    for name, m in (("ref", ref), ("half", half)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = m(x, t, pe, pooled)
        r.sum().backward()
        out[name] = r.detach(), {n: p.grad for n, p in trainable_state(m).items()}
    torch.testing.assert_close(out["half"][0], out["ref"][0], atol=0.05, rtol=0.05)
    scale = max(g.norm() for g in out["ref"][1].values())
    for n, g in out["ref"][1].items():
        assert out["half"][1][n].dtype == torch.float32
        if ".to_k_" in n and n.endswith(".bias"):  # a key bias shifts all of a query's logits alike: its gradient is 0
            assert g.norm() < 1e-3 * scale, n  # up to rounding, which is all that bf16 and fp32 could be compared on
            continue
        assert (out["half"][1][n] - g).norm() <= 0.1 * g.norm() + 1e-6, n


# ----------------------------------------------------------------------------- bad input


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="nosuchbackbone"):
        check_names("nosuchbackbone", "dina")
    with pytest.raises(ValueError, match="nosuchhead"):
        check_names("tiny", "nosuchhead")
    with pytest.raises(ValueError, match="nosuchbackbone"):
        build_reward_model("nosuchbackbone", "dina")
    with pytest.raises(ValueError, match="nosuchhead"):
        build_reward_model("tiny", "nosuchhead")
    check_names("sd35m", "drm")  # valid names pass


def test_wrong_channel_count_raises(models, tiny):
    _, pe, pooled = tiny
    for bad in (torch.randn(2, 16, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(4, 8, 8)):
        with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
            models["ditr"].tap(bad, torch.tensor([0.5, 0.5]), pe, pooled)
    with pytest.raises(ValueError, match=r"expects \(B, 4"):
        models["drm"](torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.5]), pe, pooled)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_plain_safetensors(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.safetensors")
    tensors = {"model.a": torch.randn(3, 4), "ema.a": torch.randn(3, 4).t(),  # non-contiguous
               "opt.step": torch.tensor([7], dtype=torch.int64), "b16": torch.randn(5).bfloat16()}
    meta = {"args": {"backbone": "tiny", "head": "dina", "taps": [1, 2]}, "step": 12, "note": "é"}
    save_checkpoint(path, tensors, meta)
    got, got_meta = load_checkpoint(path)
    assert got_meta == meta and set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k], v, atol=0, rtol=0)
    with open(path, "rb") as f:
        raw = f.read()
    assert not raw.startswith(b"PK\x03\x04")  # not a torch.save zip archive
    assert raw[:2] not in {b"\x80" + bytes([v]) for v in range(2, 6)}  # nor a bare pickle
    n = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then the JSON header
    header = json.loads(raw[8:8 + n])
    assert json.loads(header["__metadata__"]["meta"]) == meta
    assert set(header) - {"__metadata__"} == set(tensors)
    assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == len(raw) - 8 - n
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["meta"]) == meta and set(f.keys()) == set(tensors)
    assert os.listdir(tmp_path / "sub") == ["ckpt.safetensors"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.safetensors")
    old = {"w": torch.arange(6.0)}
    save_checkpoint(path, old, {"args": {"v": 1}})

    def partial_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\":")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_file", partial_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(6)}, {"args": {"v": 2}})
    monkeypatch.undo()
    got, meta = load_checkpoint(path)
    assert meta == {"args": {"v": 1}}
    torch.testing.assert_close(got["w"], old["w"])
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temp files left behind


def test_load_checkpoint_rejects_files_without_meta(tmp_path):
    p = str(tmp_path / "plain.safetensors")
    save_file({"a": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match="plain.safetensors"):
        load_checkpoint(p)
    q = str(tmp_path / "noargs.safetensors")
    save_file({"a": torch.zeros(2)}, q, metadata={"meta": json.dumps({"step": 3})})
    with pytest.raises(ValueError, match="noargs.safetensors"):
        load_checkpoint(q)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("head,lora_rank", [("dina", 4), ("drm", 0)])
def test_load_reward_model_round_trip(tmp_path, tiny, head, lora_rank):
    _, pe, pooled = tiny
    torch.manual_seed(11)
    m = build_reward_model("tiny", head, lora_rank=lora_rank).eval()
    ema = copy.deepcopy(m)
    with torch.no_grad():
        for (n, p), (_, q) in zip(trainable_state(m).items(), trainable_state(ema).items()):
            p.add_(0.1 * torch.randn_like(p))
            q.add_(0.1 * torch.randn_like(q))
    path = str(tmp_path / "rm.safetensors")
    tensors = {"model." + n: p for n, p in trainable_state(m).items()}
    tensors.update({"ema." + n: p for n, p in trainable_state(ema).items()})
    args = {"backbone": "tiny", "head": head, "lora_rank": lora_rank, "seed": 0}
    save_checkpoint(path, tensors, {"args": args})
    x, t = _latents(seed=9), torch.tensor([0.35, 0.65])
    with torch.no_grad():
        want_model, want_ema = m(x, t, pe, pooled), ema(x, t, pe, pooled)
        assert (want_model - want_ema).abs().max() > 1e-5
        fresh = build_reward_model("tiny", head, lora_rank=lora_rank).eval()
        assert (fresh(x, t, pe, pooled) - want_model).abs().max() > 1e-5  # the perturbation is visible
        got_ema, meta = load_reward_model(path)
        got_model, _ = load_reward_model(path, ema=False, expect={"head": head, "backbone": "tiny"})
        torch.testing.assert_close(got_ema(x, t, pe, pooled), want_ema, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_model(x, t, pe, pooled), want_model, atol=1e-6, rtol=0)
    assert meta["args"] == args and not got_ema.training
    other = "drm" if head == "dina" else "dina"
    with pytest.raises(ValueError, match=f"head={head!r}"):
        load_reward_model(path, expect={"head": other})


def test_random_backbone_is_seeded_and_reloads(tmp_path):
    """--random-backbone (the papers' ablation): same architecture, fresh weights seeded by the run's seed,
    so a resumed run and load_reward_model rebuild exactly the frozen random backbone it trained on."""
    make_tiny_pipeline(0, size="toy").transformer.save_pretrained(str(tmp_path / "transformer"))
    pre = load_transformer("toy", str(tmp_path))
    r1, r2 = (load_transformer("toy", str(tmp_path), seed=3, random_init=True) for _ in range(2))
    for (n, a), b, c in zip(r1.state_dict().items(), r2.state_dict().values(), pre.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    assert any(not torch.equal(a, c) for a, c in zip(r1.state_dict().values(), pre.state_dict().values()))
    m = build_reward_model("toy", "ditr", path=str(tmp_path), seed=3, random_init=True).eval()
    args = dict(backbone="toy", head="ditr", backbone_path=str(tmp_path), seed=3, random_backbone=True, lora_rank=0)
    save_checkpoint(str(tmp_path / "c.safetensors"), {"model." + n: p for n, p in trainable_state(m).items()},
                    {"args": args, "step": 0})
    m2, _ = load_reward_model(str(tmp_path / "c.safetensors"))
    lat, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6])
    pe, pooled = torch.randn(2, 85, 64), torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(lat, t, pe, pooled), m2(lat, t, pe, pooled))
