"""The sampler every alignment stage shares (against docs/design.md §6's formulas and diffusers' own pipeline), and
grpo.py / refl.py on the tiny backbone: the first importance ratio, the KL at initialisation, the LoRA export loaded by
diffusers, ReFL's and DRaFT-K's gradient against autograd by hand, no decode or text encoding in the loop, exact resume,
1 vs 2 processes, and bad input."""
import json
import math
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import align
import grpo
import model
import refl
import sample_stepwise
import step_grpo
from model import (build_reward_model, cps_step, make_tiny_pipeline, sample, save_checkpoint, sd3_sigmas, sde_step,
                   seeded, trainable_state)
from toy import toy_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [toy_prompt(c, s, "white") for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"))]


# ----------------------------------------------------------------------------- the sampler

def test_sde_step_reference_values():
    """docs/design.md §6: noise std std*sqrt(-dt) of steps 0-3 (10 steps, shift 3, a 0.7) and the log-prob's closed form."""
    s = sd3_sigmas(10)
    x, v, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, want in enumerate((0.700000, 0.742964, 0.536152, 0.445897)):
        _, _, mu, std = sde_step(v, x, s[i], s[i + 1], 0.7, sigma1=float(s[1]))
        assert std == pytest.approx(want, abs=1e-6)
        sig, dt = float(s[i]), float(s[i + 1] - s[i])
        a2 = 0.7 ** 2 * sig / (1 - (float(s[1]) if sig == 1 else sig))
        torch.testing.assert_close(mu, x + v * dt + a2 / (2 * sig) * (x + (1 - sig) * v) * dt)
    _, lp, mu, std = sde_step(v, x, s[0], s[1], 0.7, prev_sample=None, sigma1=float(s[1]))
    _, lp, _, _ = sde_step(v, x, s[0], s[1], 0.7, prev_sample=mu + std * z, sigma1=float(s[1]))
    closed = -0.5 * (z ** 2).mean((1, 2, 3)) - math.log(0.7) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lp, closed)
    assert -0.5 - math.log(0.7) - 0.5 * math.log(2 * math.pi) == pytest.approx(-1.062264, abs=1e-6)  # E[log_prob]
    with pytest.raises(ValueError, match="sigma1"):
        sde_step(v, x, s[0], s[1], 0.7)


def test_sde_step_euler_and_given_sample():
    s = sd3_sigmas(10)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x_next, lp, mu, _ = sde_step(v, x, s[3], s[4], 0.0)  # a = 0: the Euler step, log-prob 0
    torch.testing.assert_close(x_next, x + (s[4] - s[3]).item() * v)
    assert (lp == 0).all() and torch.equal(mu, x_next)
    g = torch.Generator().manual_seed(1)
    drawn, lp_drawn, _, _ = sde_step(v, x, s[3], s[4], 0.7, generator=g)
    again, lp_again, _, _ = sde_step(v, x, s[3], s[4], 0.7, prev_sample=drawn)  # training re-scores the sample
    assert torch.equal(again, drawn) and torch.equal(lp_again, lp_drawn)


def test_cps_step():
    s = sd3_sigmas(10)
    x, v, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sig, nxt = float(s[2]), float(s[3])
    _, _, mu, std = cps_step(v, x, sig, nxt, 0.8)
    assert std == pytest.approx(nxt * math.sin(0.8 * math.pi / 2))
    torch.testing.assert_close(mu, (1 - nxt) * (x - sig * v) + math.sqrt(nxt ** 2 - std ** 2) * (x + (1 - sig) * v))
    _, lp, _, _ = cps_step(v, x, sig, nxt, 0.8, prev_sample=mu + std * z)
    torch.testing.assert_close(lp, -0.5 * (z ** 2).mean((1, 2, 3)) - math.log(std) - 0.5 * math.log(2 * math.pi))
    last, lp_last, _, _ = cps_step(v, x, float(s[-2]), 0.0, 0.8)  # sigma_next 0: x0_hat, deterministic
    torch.testing.assert_close(last, x - float(s[-2]) * v)
    assert (lp_last == 0).all()


@pytest.fixture(scope="module")
def tiny():
    pipe = make_tiny_pipeline(0)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True,
                                                  negative_prompt="", negative_prompt_2="", negative_prompt_3="",
                                                  max_sequence_length=8)
    return pipe, pe, pooled, (npe[:1], npooled[:1]), (npe, npooled)


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_sample_ode_equals_the_pipeline(tiny, cfg):
    """noise 0: model.sample reproduces StableDiffusion3Pipeline(output_type="latent") from the same initial latents."""
    pipe, pe, pooled, neg, (npe, npooled) = tiny
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled,
               latents=z.clone(), num_inference_steps=6, guidance_scale=cfg, output_type="latent", height=32, width=32).images
    out = sample(pipe.transformer, z, sd3_sigmas(6), pe, pooled, cfg, neg)
    torch.testing.assert_close(out["latents"], ref, atol=1e-5, rtol=1e-5)
    assert out["trajectory"].shape == (3, 7, 4, 8, 8) and (out["log_probs"] == 0).all()


def test_sample_sde_window_and_per_image_noise(tiny):
    """Stochastic only in the window (log-probs elsewhere 0); one generator per image: an image's sample does not
    depend on the batch it is drawn in."""
    pipe, pe, pooled, neg, _ = tiny
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    gens = lambda: [model.seeded(0, i) for i in range(3)]
    out = sample(pipe.transformer, z, sd3_sigmas(6), pe, pooled, 4.5, neg, 0.7, [2, 3], gens())
    assert (out["log_probs"][:, [0, 1, 4, 5]] == 0).all() and (out["log_probs"][:, [2, 3]] != 0).all()
    one = sample(pipe.transformer, z[1:2], sd3_sigmas(6), pe[1:2], pooled[1:2], 4.5, neg, 0.7, [2, 3], gens()[1:2])
    torch.testing.assert_close(one["latents"], out["latents"][1:2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown SDE type"):
        sample(pipe.transformer, z, sd3_sigmas(6), pe, pooled, sde_type="ddim")


def test_advantages_closed_form():
    r = torch.tensor([[1.0, 2.0, 3.0, 10.0, 10.0, 13.0]])
    adv = grpo.advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]), [1.0], clip=5.0)
    g0 = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(adv[:3], (g0 - 2) / (g0.std(unbiased=False) + 1e-4))
    glob = grpo.advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]), [1.0], global_std=True)
    torch.testing.assert_close(glob[3:], (r[0, 3:] - 11) / (r.std(unbiased=False) + 1e-4))
    assert grpo.advantages(r * 1e6, torch.zeros(6, dtype=torch.long), [1.0], clip=0.5).abs().max() == 0.5
    loss, kl, ratio = model.grpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 1e-4)
    assert torch.equal(ratio, torch.ones(2)) and torch.equal(loss, torch.tensor([-1.0, 1.0])) and (kl == 0).all()


# ----------------------------------------------------------------------------- the stages on the tiny backbone

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny DiNa reward checkpoint (random head, the tiny backbone) and prompt files."""
    d = tmp_path_factory.mktemp("align")
    m = build_reward_model("tiny", "dina", lora_rank=0, seed=0)
    torch.manual_seed(1)
    for p in m.head.parameters():
        p.data.normal_(0, 0.3)  # a reward that varies with the latent
    state = trainable_state(m)
    args = dict(backbone="tiny", head="dina", backbone_path=None, blocks=None, taps=None, lora_rank=0, t_eval=0.1,
                max_text_len=8, seed=0)
    save_checkpoint(str(d / "reward/ckpt.safetensors"), {f"model.{n}": p for n, p in state.items()} |
                    {f"ema.{n}": p.clone() for n, p in state.items()}, dict(args=args, step=1))
    (d / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "heldout.txt").write_text(toy_prompt("purple", "square", "gray") + "\n")
    return d


def grpo_args(w, out, *extra):
    return grpo.parser.parse_args(["--backbone", "tiny", "--reward", str(w / "reward"), "--prompts", str(w / "train.txt"),
                                   "--heldout-prompts", str(w / "heldout.txt"), "--groups", "2", "--group-size", "2",
                                   "--batch", "2", "--steps", "4", "--eval-steps", "3", "--eval-seeds", "1",
                                   "--heldout-seeds", "1", "--iters", "2",
                                   "--eval-interval", "0", "--ckpt-interval", "1", "--lr", "1e-2", "--out", str(out), *extra])


def log(out):
    return [json.loads(line) for line in open(Path(out, "log.jsonl"))]


def test_grpo_first_ratio_is_one_kl_zero_and_lora_export(world, tmp_path, capsys):
    """First inner update: importance ratio exactly 1 at every trained step, KL 0 (B = 0). The exported LoRA loaded
    by diffusers' pipeline reproduces the policy's (EMA) samples. proxy_roundtrip.py's pipeline comparison: the LoRA
    moves the pipeline's own samples; unloaded, then with a zero LoRA loaded, it gives the base's exactly (golden +0)."""
    out = tmp_path / "g"
    grpo.main(grpo_args(world, out, "--beta", "0.04", "--ema", "0", "--sde-window", "0", "--no-same-noise"))
    first = log(out)[0]
    assert first["ratio_dev"] == 0.0 and first["kl"] == 0.0 and first["sde_steps"] == [0, 1, 2, 3]
    assert log(out)[1]["kl"] > 0  # the policy moved
    summary = json.loads((out / "summary.json").read_text())
    assert {"reward_before", "reward_after", "seconds", "iterations"} <= set(summary)
    assert [c["iter"] for c in summary["curve"]] == [2, 2]  # no evaluation between: the final one, per split
    assert summary["curve"][0]["reward_after_train"] == summary["reward_after_train"]
    assert "final (2 iterations" in capsys.readouterr().out
    for f in ("grid.png", "curves.png", "before.png", "lora/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f
    # the policy (the LoRA as trained) vs diffusers' pipeline with the exported LoRA loaded
    pipe = make_tiny_pipeline(0)
    pipe.load_lora_weights(str(out / "lora"))
    base = make_tiny_pipeline(0)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pe, _, pooled, _ = base.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False, max_sequence_length=8)
    got = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, latents=z.clone(), num_inference_steps=3,
               guidance_scale=1.0, output_type="latent", height=32, width=32).images
    policy = make_tiny_pipeline(0).transformer
    params = align.add_policy_lora(policy, 8, 16)  # the toy/tiny defaults
    tensors, _ = model.load_checkpoint(str(out / "ckpt.safetensors"))
    for n, p in params.items():
        p.data.copy_(tensors[f"ema.{n}"])
    want = sample(policy, z, sd3_sigmas(3), pe, pooled)["latents"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    untouched = sample(base.transformer, z, sd3_sigmas(3), pe, pooled)["latents"]
    assert (want - untouched).abs().max() > 1e-4  # the LoRA changed the generator
    # scripts/proxy_roundtrip.py --pipeline-seeds: the pipeline's own __call__ with CFG, the base vs the LoRA on paired seeds
    sys.path.insert(0, str(ROOT / "scripts"))
    import proxy_roundtrip
    import toy
    drawn, oracle = [], align.Oracle(toy.toy_golden_score, toy.match_stats)
    opts = proxy_roundtrip.parser.parse_args(["lora", "--pipeline-seeds", "2", "--eval-steps", "3"])

    def judged(pipeline):  # the split's verdict; a proxy of 0 that keeps the pipeline's latents
        return proxy_roundtrip.pipeline_eval(pipeline, {"train": PROMPTS}, oracle,
                                             lambda lat, _: drawn.append(lat) or torch.zeros(len(lat)), opts)["train"]
    verdicts = [judged(base), judged(pipe)]
    pipe.unload_lora_weights()
    verdicts.append(judged(pipe))
    for n, p in params.items():
        if "lora_B" in n:
            p.data.zero_()  # B = 0: a LoRA that adds exactly nothing
    align.save_policy_lora(str(tmp_path / "zero"), policy)
    pipe.load_lora_weights(str(tmp_path / "zero"))
    verdicts.append(judged(pipe))
    assert (drawn[1] - drawn[0]).abs().max() > 1e-4  # the LoRA moved the pipeline's samples
    assert torch.equal(drawn[2], drawn[0]) and torch.equal(drawn[3], drawn[0])  # unloaded, and with a zero LoRA: the base
    keys, line = align.compare("train", verdicts[0], verdicts[3])
    assert keys["golden_after_train"] == keys["golden_before_train"] and keys["golden_se_train"] == 0
    assert "golden" in line and " (+0.0000 +- 0.0000; " in line


def test_grpo_dina_recipe_cps_window(world, tmp_path):
    """--recipe dina: CPS noise 0.8 on a 3-step window only (Fast), no CFG; the first ratio is still exactly 1."""
    out = tmp_path / "d"
    grpo.main(grpo_args(world, out, "--recipe", "dina", "--sde-window-range", "0,2", "--iters", "1"))
    first = log(out)[0]
    assert len(first["sde_steps"]) == 3 and first["sde_steps"][0] in (0, 1) and first["ratio_dev"] == 0.0
    args = json.loads(json.dumps(model.load_checkpoint(str(out / "ckpt.safetensors"))[1]["args"]))
    assert (args["sde_type"], args["noise_level"], args["cfg"], args["group_size"]) == ("cps", 0.8, 1.0, 2)


def test_grpo_same_noise_shares_the_start_not_the_sde_noise(world, tmp_path):
    """--same-noise: the images of a group start from one initial noise (the groups from different ones) and still part
    through their own SDE noise, so a group's spread is the SDE noise's alone."""
    args, _, _ = grpo.resolve_args(grpo_args(world, tmp_path / "s", "--same-noise", "--group-size", "3", "--batch", "4"))
    run = grpo.build(args, "cpu")
    ro = grpo.rollout(args, run, 0, 0, 6, nullcontext())
    start, end = ro.traj[:, 0].flatten(1), ro.latents.flatten(1)
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2]) and torch.equal(start[3], start[5])
    assert not torch.equal(start[2], start[3])  # the batch of 4 crosses the groups' border
    assert (end[0] - end[1]).abs().max() > 1e-3 and (end[3] - end[4]).abs().max() > 1e-3
    plain = grpo.rollout(grpo.resolve_args(grpo_args(world, tmp_path / "p", "--no-same-noise"))[0], run, 0, 0, 4,
                         nullcontext())
    assert not torch.equal(plain.traj[0, 0], plain.traj[1, 0])  # without it every image has its own start


def test_load_rewards_reads_released_folders(world, tmp_path):
    """--reward DIR also takes a released DiNa-LRM folder (here the world's reward exported to that layout): it reads
    its noise level at the grid's nearest sigma, and --score-normalisation plus10 makes every reward (raw + 10) / 10."""
    import released
    ours, meta = model.load_reward_model(str(world / "reward"))
    released.export(ours, meta, str(tmp_path / "rel"))
    pipe = make_tiny_pipeline(0)
    rewards = align.load_rewards([str(tmp_path / "rel"), str(world / "reward")], [1.0, 1.0], pipe.transformer,
                                 normalisation="plus10")
    assert [r["t"] for r in rewards] == [0.1, 0.1] and [r["text_len"] for r in rewards] == [8, 8]
    table = align.encode_prompt_table(pipe, PROMPTS, 8)
    keys = [(0, i) for i in range(len(PROMPTS))]
    lat = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(4))
    eps = torch.stack([torch.randn(lat.shape[1:], generator=seeded(*k)) for k in keys])
    pe, pooled = align.embeds(table, PROMPTS)
    with torch.no_grad():
        r = align.score_rewards(rewards, lat, PROMPTS, table, keys)
        torch.testing.assert_close(r[0], (ours.score(lat, pe, pooled, t=0.1007462590932846, noise=eps) + 10) / 10)
        torch.testing.assert_close(r[1], (ours.score(lat, pe, pooled, t=0.1, noise=eps) + 10) / 10)
    assert (r[0] - r[1]).abs().max() > 0  # 0.1 is off the grid: the released reader moves it to 0.100746


def test_no_decode_or_text_encoding_in_the_loop(world, tmp_path, monkeypatch):
    """The VAE and the text encoders raise outside the one prompt encoding and the evaluations (GRPO, ReFL and DRaFT on
    the latents: --round-trip, the toy's ReFL preset, decodes by design); the evaluations do decode and re-encode (the
    round trip), so the guard is live."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection
    allowed, calls = {"on": False}, {"encode": 0, "decode": 0, "AutoencoderKL.encode": 0}

    def guard(real):
        def wrapped(*a, **k):
            if not allowed["on"]:
                raise AssertionError(f"{real.__qualname__} called in the training loop")
            calls[real.__qualname__] = calls.get(real.__qualname__, 0) + 1
            return real(*a, **k)
        return wrapped

    def allow(fn, count=None):
        def wrapped(*a, **k):
            allowed["on"] = True
            if count:
                calls[count] += 1
            try:
                return fn(*a, **k)
            finally:
                allowed["on"] = False
        return wrapped
    monkeypatch.setattr(AutoencoderKL, "decode", guard(AutoencoderKL.decode))
    monkeypatch.setattr(AutoencoderKL, "encode", guard(AutoencoderKL.encode))
    monkeypatch.setattr(CLIPTextModelWithProjection, "forward", guard(CLIPTextModelWithProjection.forward))
    monkeypatch.setattr(align, "evaluate_ema", allow(align.evaluate_ema))  # both stages call them through align
    monkeypatch.setattr(align, "encode_prompt_table", allow(align.encode_prompt_table, "encode"))
    grpo.main(grpo_args(world, tmp_path / "g"))
    refl.main(refl_args(world, tmp_path / "r"))
    refl.main(refl_args(world, tmp_path / "d", "--grad-steps", "4", "--grad-steps-random"))  # DRaFT / AlignProp
    assert calls["encode"] == 3  # once per run
    assert calls["AutoencoderKL.encode"] == calls["AutoencoderKL.decode"] == 3 * 2 * 2  # runs x evaluations x splits


def test_evaluation_round_trip_and_golden_terms(world, tmp_path, monkeypatch, capsys):
    """Every stage's evaluation (align.evaluate_ema), per split: the proxy of the VAE re-encodings of the decoded images,
    re-noised as the proxy of the latents (for the base policy it equals the reward of encode(decode(latents)) computed
    here by hand), and the oracle's weighted terms, which sum to the golden score; with the oracle as the reward there
    is no round trip to report, and the proxy is the golden score."""
    import toy
    oracle = align.Oracle(toy.toy_golden_score, toy.match_stats)
    real_build, built = grpo.build, {}

    def build_with_oracle(args, device):  # the tiny backbone has no oracle of its own: lend it the toy's
        built["run"] = real_build(args, device)._replace(oracle=oracle)
        return built["run"]
    monkeypatch.setattr(grpo, "build", build_with_oracle)
    args = grpo_args(world, tmp_path / "g", "--heldout-seeds", "2")
    grpo.main(args)
    summary = json.loads((tmp_path / "g/summary.json").read_text())
    printed = capsys.readouterr().out
    for s in ("train", "heldout"):
        for when in ("before", "after"):
            terms = [summary[f"golden_{t}_{when}_{s}"] for t in ("color", "shape", "background", "quality")]
            assert sum(terms) == pytest.approx(summary[f"golden_{when}_{s}"], abs=1e-6)
            assert abs(summary[f"reward_reencoded_{when}_{s}"] - summary[f"reward_{when}_{s}"]) > 1e-3
        line = re.search(rf"final \(2 iterations.*: {s}: proxy (\S+) -> (\S+) \(re-encoded (\S+) -> (\S+)\), golden .* "
                         r"\(\S+ \+- \S+; color (\S+) shape \S+ background \S+ quality \S+\), colour match", printed)
        assert line, printed
        assert float(line[3]) == pytest.approx(summary[f"reward_reencoded_before_{s}"], abs=1e-4)
        gain = summary[f"golden_color_after_{s}"] - summary[f"golden_color_before_{s}"]
        assert float(line[5]) == pytest.approx(gain, abs=1e-4)
    # the base policy's round trip by hand: ODE samples, 8-bit pixels, the VAE's posterior mean, the same noise
    pipe = make_tiny_pipeline(0)
    reward, _ = model.load_reward_model(str(world / "reward"))
    table = align.encode_prompt_table(pipe, PROMPTS, 8)
    pe, pooled = align.embeds(table, PROMPTS)
    noise = torch.stack([torch.randn(4, 8, 8, generator=seeded(align.EVAL_SEED, 0, i)) for i in range(3)])
    eps = torch.stack([torch.randn(4, 8, 8, generator=seeded(0, align.PROXY_NOISE, i)) for i in range(3)])
    vae, shift = pipe.vae, pipe.scheduler.config.get("shift", 3.0)
    with torch.no_grad():
        lat = sample(pipe.transformer, noise, sd3_sigmas(3, shift), pe, pooled, 4.5, align.embeds(table, [""]))["latents"]
        pixels = ((vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1) + 1)
                  * 127.5).round()
        again = (vae.encode(pixels / 127.5 - 1).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        want = reward.score(lat, pe, pooled, t=0.1, noise=eps).mean().item()
        want_again = reward.score(again, pe, pooled, t=0.1, noise=eps).mean().item()
    assert summary["reward_before_train"] == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert summary["reward_reencoded_before_train"] == pytest.approx(want_again, rel=1e-6, abs=1e-6)
    # the oracle as the reward: its proxy already reads the decoded images
    run = built["run"]._replace(rewards=align.load_rewards(["oracle"], [1.0], pipe.transformer, oracle=oracle))
    report, _ = align.evaluate_ema(run, args, lambda lat, prompts: grpo.proxy(args, run, lat, prompts), nullcontext())
    for s in ("train", "heldout"):
        assert "reward_reencoded" not in report[s]
        assert report[s]["reward"] == pytest.approx(report[s]["golden"], abs=1e-6)


def test_refl_control_still_reports_the_proxy(world, tmp_path):
    """--reward-weight 0 (flow matching only): the evaluation's proxy is the reward's own reading, not 0."""
    refl.main(refl_args(world, tmp_path / "w1", "--iters", "1", "--fm-weight", "1"))
    refl.main(refl_args(world, tmp_path / "w0", "--iters", "1", "--fm-weight", "1", "--reward-weight", "0"))
    w1, w0 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("w1", "w0"))
    assert w0["reward_before_train"] != 0
    assert w0["reward_before_train"] == pytest.approx(w1["reward_before_train"], rel=1e-6)
    assert w0["reward_before_heldout"] == pytest.approx(w1["reward_before_heldout"], rel=1e-6)
    assert w0["reward_reencoded_before_train"] == pytest.approx(w1["reward_reencoded_before_train"], rel=1e-6)


def test_refl_round_trip_is_the_evaluations_round_trip_with_gradient(world, tmp_path):
    """--round-trip: the reward reads encode(decode(z)), the evaluation's re-encoding before its clamp and rounding,
    with a gradient that reaches the latents; one step of the stage runs with it."""
    vae = make_tiny_pipeline(0).vae.requires_grad_(False)
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.3)
    z = torch.randn(2, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    got = refl.round_trip(vae, z)
    x = vae.decode(z.detach() / 1.3 + 0.1).sample
    assert torch.allclose(got, model.encode_images(vae, x), atol=1e-5)
    got.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, extra in (("plain", ()), ("rt", ("--round-trip",))):  # the same step's draws, the reward reads another z
        refl.main(refl_args(world, tmp_path / name, "--iters", "1", *extra))
    first = [json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0]) for name in ("plain", "rt")]
    assert first[0]["mid"] == first[1]["mid"] and first[0]["reward"] != pytest.approx(first[1]["reward"], abs=1e-4)


def refl_args(w, out, *extra):
    return refl.parser.parse_args(["--backbone", "tiny", "--reward", str(w / "reward"), "--prompts", str(w / "train.txt"),
                                   "--fm-weight", "0", "--no-round-trip",  # the latents alone (the toy's preset: on)
                                   "--heldout-prompts", str(w / "heldout.txt"), "--batch", "4", "--micro-batch", "2",
                                   "--steps", "4", "--mid-range", "2,4", "--eval-steps", "3", "--eval-seeds", "1",
                                   "--heldout-seeds", "1",
                                   "--iters", "3", "--eval-interval", "0", "--ckpt-interval", "1", "--lr", "1e-2",
                                   "--out", str(out), *extra])


def refl_by_hand(args, k):
    """The first step's LoRA gradient of refl.py written out for the whole batch at once: the step's seeded draws and
    noise, model.sample's no-gradient ODE to the first step with gradient, then by hand with autograd either ReFL's
    conditional step and x0_hat at mid (k = 0) or the last k Euler steps with CFG as two separate forwards; the reward
    of the result re-noised by the REWARD_NOISE stream -> ({name: gradient}, mean reward)."""
    args = refl.resolve_args(args)[0]
    run = refl.build(args, "cpu")
    draws = seeded(args.seed, 0, refl.STEP_DRAWS)
    mid = torch.randint(*args.mid_range, (1,), generator=draws).item()
    order = torch.randint(len(run.train_prompts), (args.batch,), generator=draws).tolist()
    pe, pooled = align.embeds(run.table, [run.train_prompts[o] for o in order])
    neg_pe, neg_pooled = (n.expand(args.batch, *n.shape[1:]) for n in run.neg)
    first = args.steps - k if k else mid
    z = torch.stack([torch.randn(4, *run.shape, generator=seeded(args.seed, 0, i)) for i in range(args.batch)])
    with torch.no_grad():
        x = sample(run.transformer, z, run.sigmas[:first + 1], pe, pooled, args.cfg, run.neg)["latents"] if first else z

    def v(x, sigma, embeds, pooled):
        t = torch.full((len(x),), 1000 * float(sigma))
        return run.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                               return_dict=False)[0]
    if k == 0:
        x = x - run.sigmas[mid] * v(x, run.sigmas[mid], pe, pooled)
    for i in range(first, args.steps if k else first):
        v_u, v_c = v(x, run.sigmas[i], neg_pe, neg_pooled), v(x, run.sigmas[i], pe, pooled)
        x = x + (run.sigmas[i + 1] - run.sigmas[i]) * (v_u + args.cfg * (v_c - v_u))
    if args.round_trip:  # the VAE's decoder, then its encoder's posterior mean, in the normalised latent space
        cfg = run.vae.config
        x = run.vae.decode(x / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample
        x = (run.vae.encode(x).latent_dist.mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    eps = torch.stack([torch.randn(4, *run.shape, generator=seeded(args.seed, 0, i, refl.REWARD_NOISE))
                       for i in range(args.batch)])
    r = run.rewards[0]["model"].score(x, pe, pooled, t=run.rewards[0]["t"], noise=eps)
    grads = torch.autograd.grad((args.target - r).mean(), list(run.params.values()))
    return dict(zip(run.params, grads)), r.mean().item()


def test_refl_gradient_is_autograd_through_the_last_k_steps(world, tmp_path, monkeypatch):
    """--grad-steps K (DRaFT-K; K = 4: all steps; AlignProp's random K): the first update's LoRA gradient, accumulated
    over two micro-batches with each step checkpointed when K > 1, equals autograd's through K hand-written Euler
    steps of the guided ODE, and the logged reward is that of the final latent; the default (ReFL) equals its
    conditional step at mid, and with --round-trip the reward read through the VAE's decoder and encoder. The
    gradients of K = 0, 1, 2 and 4 all differ."""
    real_step, grads = align.optimizer_step, []

    def capture(params, *a, **kw):
        grads.append({n: p.grad.clone() for n, p in params.items()})
        return real_step(params, *a, **kw)
    monkeypatch.setattr(align, "optimizer_step", capture)
    real_checkpoint, recomputed = refl.checkpoint, []
    monkeypatch.setattr(refl, "checkpoint", lambda *a, **kw: recomputed.append(1) or real_checkpoint(*a, **kw))
    cases = [[], ["--grad-steps", "1"], ["--grad-steps", "2"], ["--grad-steps", "4"],
             ["--grad-steps", "3", "--grad-steps-random"], ["--round-trip"]]
    for flags in cases:
        out = tmp_path / "_".join(["k", *flags])
        recomputed.clear()
        refl.main(refl_args(world, out, "--iters", "1", *flags))
        rec = log(out)[0]
        assert len(recomputed) == (2 * rec["k"] if rec["k"] > 1 else 0)  # each step checkpointed, per micro-batch
        want, reward = refl_by_hand(refl_args(world, out, *flags), rec["k"])
        assert rec["k"] == (int(flags[1]) if len(flags) == 2 else 0 if len(flags) < 2 else rec["k"])
        assert rec["mid"] == 4 - rec["k"] if rec["k"] else 2 <= rec["mid"] < 4
        assert rec["reward"] == pytest.approx(reward, rel=1e-5, abs=1e-6)
        assert sum(g.abs().sum() for g in want.values()) > 0
        for n in want:
            torch.testing.assert_close(grads[-1][n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    flat = [torch.cat([g.flatten() for g in step.values()]) for step in grads[:4]]
    for i in range(4):
        for j in range(i):
            assert (flat[i] - flat[j]).norm() > 0.05 * flat[i].norm(), (cases[i], cases[j])


def test_alignprop_k_is_drawn_per_step_seeded_and_in_range(world, tmp_path):
    """--grad-steps-random: K ~ U{1..K} is the step's own draw from (seed, step) (after mid and the prompts), logged
    with mid = N - K, and it varies over the steps; without it K is fixed; bad K stops with a message."""
    refl.main(refl_args(world, tmp_path / "a", "--grad-steps", "3", "--grad-steps-random", "--iters", "8",
                        "--ckpt-interval", "4"))
    ks = [rec["k"] for rec in log(tmp_path / "a")]
    for it, rec in enumerate(log(tmp_path / "a")):
        draws = seeded(0, it, refl.STEP_DRAWS)
        torch.randint(2, 4, (1,), generator=draws), torch.randint(3, (4,), generator=draws)  # mid, the prompts
        assert rec["k"] == torch.randint(1, 4, (1,), generator=draws).item() and rec["mid"] == 4 - rec["k"]
    assert set(ks) <= {1, 2, 3} and len(set(ks)) > 1, ks
    for bad in (["--grad-steps", "5"], ["--grad-steps", "0", "--grad-steps-random"], ["--grad-steps", "-1"]):
        with pytest.raises(ValueError, match="--grad-steps .* is not in 1..4"):
            refl.main(refl_args(world, tmp_path / "b", *bad))


STAGES = ["grpo", "refl", "refl-alignprop", "step_grpo"]  # refl-alignprop: refl.py with a random K (DRaFT / AlignProp)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_equals_uninterrupted(world, tmp_path, monkeypatch, stage):
    stages = dict(grpo=(grpo, grpo_args), refl=(refl, refl_args), step_grpo=(step_grpo, step_args))
    mod, make = stages[stage.split("-")[0]]
    extra = {"grpo": ["--iters", "3"], "refl": ["--fm-weight", "1"], "step_grpo": ["--iters", "3", "--k", "3"],
             "refl-alignprop": ["--fm-weight", "1", "--grad-steps", "3", "--grad-steps-random"]}[stage]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    mod.main(make(world, straight, *extra))
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):  # killed in its third optimizer step: iterations 1-2 are checkpointed
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        mod.main(make(world, killed, *extra))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    mod.main(make(world, killed, *extra, "--resume"))
    a, b = (model.load_checkpoint(str(o / "ckpt.safetensors"))[0] for o in (straight, killed))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert [l["iter"] for l in log(killed)] == [1, 2, 3]
    assert [l["loss"] for l in log(killed)] == [l["loss"] for l in log(straight)]
    assert [l.get("k") for l in log(killed)] == [l.get("k") for l in log(straight)]


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_equal_one(world, tmp_path, stage):
    """torchrun --nproc_per_node=2 (gloo): the same losses and LoRA weights as one process at the same global batch."""
    outs = {}
    common = ["--backbone", "tiny", "--reward", str(world / "reward"), "--prompts", str(world / "train.txt"),
              "--steps", "3", "--eval-steps", "2", "--eval-seeds", "1", "--heldout-seeds", "1", "--iters", "2",
              "--eval-interval", "0", "--lr", "1e-2"]
    refl_extra = ["--batch", "4", "--micro-batch", "2", "--mid-range", "1,3", "--fm-weight", "1"]
    extra = {"grpo": ["--groups", "2", "--group-size", "2", "--batch", "2", "--beta", "0.04"], "refl": refl_extra,
             "refl-alignprop": refl_extra + ["--grad-steps", "3", "--grad-steps-random"],
             "step_grpo": ["--trajectories", "4", "--batch", "2", "--k", "3", "--beta", "0.04"]}[stage]
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master-port",
               str(29610 + n + 10 * STAGES.index(stage)), str(ROOT / f"{stage.split('-')[0]}.py"), *common, *extra,
               "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = out
    l1, l2 = log(outs[1]), log(outs[2])
    assert len(l1) == len(l2) == 2
    assert [a.get("k") for a in l1] == [b.get("k") for b in l2]
    for a, b in zip(l1, l2):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        if not stage.startswith("refl"):
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-9)
    w1, w2 = (model.load_checkpoint(str(o / "ckpt.safetensors"))[0] for o in (outs[1], outs[2]))
    # atol: 0.5% of one Adam step at lr 1e-2 (a wrong average over ranks moves a weight by about lr). Adam divides
    # by the gradient's own scale, so a float-level difference of a small gradient element between 1 and 2
    # processes reaches the weight; on one AVX-512 machine a single element of 240 tensors was 1.09e-5 apart
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=5e-5, rtol=1e-4, msg=k)


def test_bad_input(world, tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: the prompts file is empty"):
        grpo.main(grpo_args(world, tmp_path / "a", "--prompts", str(empty)))
    with pytest.raises(FileNotFoundError, match="nope.txt: no such prompts file"):
        refl.main(refl_args(world, tmp_path / "a", "--prompts", str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="do not divide over"):
        grpo.main(grpo_args(world, tmp_path / "a", "--groups", "1", "--group-size", "3", "--updates", "2"))
    with pytest.raises(ValueError, match="unknown --recipe"):
        grpo.main(grpo_args(world, tmp_path / "a", "--recipe", "ppo"))
    with pytest.raises(ValueError, match="unknown --sde-type"):
        grpo.main(grpo_args(world, tmp_path / "a", "--sde-type", "ddim"))
    with pytest.raises(ValueError, match="--sde-window-range"):
        grpo.main(grpo_args(world, tmp_path / "a", "--sde-window", "2", "--sde-window-range", "0,4"))
    with pytest.raises(ValueError, match="--mid-range 2,9 is outside"):
        refl.main(refl_args(world, tmp_path / "a", "--mid-range", "2,9"))
    # a reward whose backbone does not read this generator's latents
    from diffusers import SD3Transformer2DModel
    other = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=32, out_channels=16)
    with pytest.raises(ValueError, match="in_channels=4 but the generator has 16"):
        align.load_rewards([str(world / "reward")], [1.0], other)
    # a non-finite reward stops with the iteration and the prompt
    monkeypatch.setattr(align, "score_rewards", lambda *a, **k: torch.full((1, len(a[1])), float("nan")))
    with pytest.raises(FloatingPointError, match="iteration 0: non-finite reward for prompt 'a "):
        grpo.main(grpo_args(world, tmp_path / "b"))


# ----------------------------------------------------------------------------- dense per-step rewards (DRM)

def step_args(w, out, *extra):
    return step_grpo.parser.parse_args(["--backbone", "tiny", "--reward", str(w / "reward"), "--prompts",
                                        str(w / "train.txt"), "--heldout-prompts", str(w / "heldout.txt"),
                                        "--trajectories", "4", "--batch", "2", "--steps", "4", "--eval-steps", "3",
                                        "--eval-seeds", "1", "--heldout-seeds", "1", "--iters", "2", "--eval-interval",
                                        "0", "--ckpt-interval", "1", "--lr", "1e-2", "--out", str(out), *extra])


def tiny_inputs(n=3, seed=5):
    pipe = make_tiny_pipeline(0)
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS[:n], PROMPTS[:n], PROMPTS[:n], do_classifier_free_guidance=False,
                                          max_sequence_length=8)
    neg = pipe.encode_prompt([""], [""], [""], do_classifier_free_guidance=False, max_sequence_length=8)
    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return pipe.transformer.requires_grad_(False), z, pe, pooled, (neg[0], neg[2])


def test_children_share_the_mean_and_k1_is_the_sde_step():
    s, x, v = sd3_sigmas(10), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    one, lp1, mu1, std1 = model.sde_children(sde_step, v, x, s[2], s[3], 0.7, 1, gens())
    ref, lp_ref, mu_ref, _ = sde_step(v, x, s[2], s[3], 0.7, generator=gens())
    assert torch.equal(one[:, 0], ref) and torch.equal(lp1[:, 0], lp_ref) and torch.equal(mu1, mu_ref)
    kids, lp, mu, std = model.sde_children(sde_step, v, x, s[2], s[3], 0.7, 4, gens())
    assert kids.shape == (3, 4, 4, 8, 8) and torch.equal(kids[:, 0], ref)  # child 0: the same first draw
    for j in range(4):  # each child's log-prob is the step's own, under the one shared mean
        torch.testing.assert_close(lp[:, j], sde_step(v, x, s[2], s[3], 0.7, prev_sample=kids[:, j])[1])
    ode = model.sde_children(sde_step, v, x, s[2], s[3], 0.0, 3)[0]
    assert torch.equal(ode[:, 1], x + (s[3] - s[2]).item() * v)


def test_stepwise_k1_is_the_sde_sampler_and_one_forward_per_step():
    """k = 1 reproduces model.sample's SDE samples bit for bit (with CFG); at k = 4 the generator runs once per step and
    the reward once per step on all k x B successors, and the kept successor is the argmax."""
    tr, z, pe, pooled, neg = tiny_inputs()
    s = sd3_sigmas(4)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]
    want = sample(tr, z, s, pe, pooled, 3.0, neg, 0.7, generator=gens())["latents"]
    got, _ = sample_stepwise.stepwise_sample(tr, z, s, pe, pooled, lambda x, i: -x.mean((1, 2, 3)), 1, 3.0, neg, 0.7,
                                             generators=gens())
    assert torch.equal(got, want)
    calls, scored = {"gen": 0}, []
    real = tr.forward

    def counting(*a, **k):
        calls["gen"] += 1
        return real(*a, **k)
    tr.forward = counting

    def score(x, i):
        r = -x.mean((1, 2, 3))
        scored.append((len(x), r.view(3, 4)))
        return r
    got, kept = sample_stepwise.stepwise_sample(tr, z, s, pe, pooled, score, 4, 3.0, neg, 0.7, generators=gens())
    assert calls["gen"] == 4 and [n for n, _ in scored] == [12] * 4
    assert torch.equal(kept, torch.stack([r.max(1).values for _, r in scored], 1))
    assert torch.equal(got.mean((1, 2, 3)), -scored[-1][1].max(1).values)  # the final latents: the last argmax


def test_sample_stepwise_stage_and_bad_input(world, tmp_path, monkeypatch):
    def run(*extra):
        return sample_stepwise.main(sample_stepwise.parser.parse_args([
            "--backbone", "tiny", "--reward", str(world / "reward"), "--prompts", str(world / "train.txt"),
            "--seeds", "2", "--steps", "3", "--out", str(tmp_path / "s"), *extra]))
    run("--k", "1", "2", "--ode")
    res = json.loads((tmp_path / "s/results.json").read_text())["results"]
    assert set(res) == {"ode", "1", "2"} and len(res["2"]["kept_reward_per_step"]) == 3
    assert res["2"]["proxy"] != res["1"]["proxy"] and "generator forward" in (tmp_path / "s/table.md").read_text()
    assert all(abs(r["proxy_reencoded"] - r["proxy"]) > 1e-3 for r in res.values())  # the VAE round trip moves them
    import toy  # with the toy's oracle lent to the tiny backbone: the golden gain over k = 1 by term sums to the gain
    real_build = sample_stepwise.build
    monkeypatch.setattr(sample_stepwise, "build", lambda a: real_build(a)._replace(
        oracle=align.Oracle(toy.toy_golden_score, toy.match_stats)))
    run("--k", "1", "2")
    monkeypatch.setattr(sample_stepwise, "build", real_build)
    res = json.loads((tmp_path / "s/results.json").read_text())["results"]
    assert sum(res["2"]["gain_terms"].values()) == pytest.approx(res["2"]["gain"], abs=1e-6)
    assert set(res["2"]["terms"]) == {"color", "shape", "background", "quality"}
    assert len(list((tmp_path / "s/images/k2").glob("*.png"))) == 6 and (tmp_path / "s/grid.png").is_file()
    with pytest.raises(ValueError, match="--k 0: every k must be >= 1"):
        run("--k", "0", "2")
    with pytest.raises(ValueError, match="--steps-window 1,5 is outside the 3-step schedule"):
        run("--steps-window", "1,5")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: the prompts file is empty"):
        run("--prompts", str(empty))
    # a reward trained at one noise level cannot score the successors at theirs
    tensors, meta = model.load_checkpoint(str(world / "reward/ckpt.safetensors"))
    meta["args"].update(t_sampling="fixed", t_eval=0.4)
    save_checkpoint(str(tmp_path / "fixed/ckpt.safetensors"), tensors, meta)
    with pytest.raises(ValueError, match=r"trained at t in \[0.4, 0.4\], it cannot score the noise level"):
        run("--reward", str(tmp_path / "fixed"))
    with pytest.raises(ValueError, match="oracle scores decoded images"):
        align.check_dense([dict(model=None)], [0.5])


def test_step_grpo_first_ratio_one_and_shared_forward(world, tmp_path, monkeypatch):
    """The importance ratio is exactly 1 for every child on the first update, the KL 0; the k children of a parent share
    one generator forward in rollouts and in training (the same count of forwards at k = 1 and k = 3)."""
    counts = {}
    for k in (1, 3):
        n = {"v": 0}
        real = step_grpo.velocity

        def counting(*a, **kw):
            n["v"] += 1
            return real(*a, **kw)
        monkeypatch.setattr(step_grpo, "velocity", counting)
        step_grpo.main(step_args(world, tmp_path / f"k{k}", "--k", str(k), "--ema", "0", "--iters", "1"))
        monkeypatch.setattr(step_grpo, "velocity", real)
        counts[k] = n["v"]
        first = log(tmp_path / f"k{k}")[0]
        assert first["ratio_dev"] == 0.0 and first["kl"] == 0.0
    # 2 chunks x (4 rollout steps + 3 trained steps x (policy + KL reference)) = 20 forwards, whatever k
    assert counts[1] == counts[3] == 2 * (4 + 3 * 2)
    step_grpo.main(step_args(world, tmp_path / "k3b", "--k", "3"))
    assert log(tmp_path / "k3b")[1]["kl"] > 0 and (tmp_path / "k3b/lora/pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((tmp_path / "k3b/summary.json").read_text())
    assert {"reward_before", "reward_after", "seconds", "iterations", "reward_reencoded_after_heldout"} <= set(summary)
    with pytest.raises(ValueError, match="--k 0"):
        step_grpo.main(step_args(world, tmp_path / "bad", "--k", "0"))
    with pytest.raises(ValueError, match="--train-steps 2,6 is outside the 4-step schedule"):
        step_grpo.main(step_args(world, tmp_path / "bad", "--train-steps", "2,6"))


def test_step_advantages_closed_form():
    r = torch.tensor([[1.0, 3.0], [2.0, 2.001], [0.0, 6.0]])
    adv = step_grpo.step_advantages(r, std_floor=0.0)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 1.0]) / (1 + 1e-4))  # k = 2: always +-1 without a floor
    assert adv[1].abs().max() > 0.8
    floored = step_grpo.step_advantages(r, std_floor=0.05)
    torch.testing.assert_close(floored[1], torch.tensor([-0.0005, 0.0005]) / (0.05 + 1e-4), atol=1e-4, rtol=1e-3)
    assert step_grpo.step_advantages(r, clip=2.0).abs().max() <= 2.0


def test_stage_figure_prints_the_changes_it_plots(tmp_path, capsys):
    """scripts/stage_figure.py on two hand-written summaries (a latent-reward run, an oracle run with no held-out split)
    and a Step-wise Sampling folder: each table row is after - before, computed here by hand."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import stage_figure
    latent = dict(golden_before_train=0.40, golden_after_train=0.38, golden_se_train=0.007, golden_before_heldout=0.33,
                  golden_after_heldout=0.335, golden_se_heldout=0.005, reward_before_train=0.0, reward_after_train=2.1,
                  reward_reencoded_before_train=0.35, reward_reencoded_after_train=0.45)
    oracle = dict(golden_before_train=0.40, golden_after_train=0.41, golden_se_train=0.005, reward_before_train=0.40,
                  reward_after_train=0.41)
    for name, summary in (("a", latent), ("b", oracle)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "sw").mkdir()
    sw = {k: dict(golden=0.33 + g, gain=g, gain_se=0.007) for k, g in (("1", 0.0), ("4", 0.002), ("ode", 0.001))}
    (tmp_path / "sw/results.json").write_text(json.dumps(dict(results=sw)))
    stage_figure.main(stage_figure.parser.parse_args([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B",
                                                      "--stepwise", str(tmp_path / "sw")]))
    lines = capsys.readouterr().out.splitlines()
    assert "| A | -0.0200 +- 0.0070 | +0.0050 +- 0.0050 | +2.1000 | +0.1000 |" in lines
    assert "| B | +0.0100 +- 0.0050 | +nan +- nan | (oracle reward) | - |" in lines
    assert "| 4 | 0.3320 | +0.0020 +- 0.0070 |" in lines
    assert (tmp_path / "a/stages.png").stat().st_size > 0
