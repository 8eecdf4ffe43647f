"""
ReFL with the latent reward (ImageReward's Reward Feedback Learning; DiNa-LRM's latent version): sample with the ODE and
no gradient down to a random late step, take one conditional generator step with gradient, predict the clean latent
x0_hat = x_t - sigma v, and let the frozen latent reward score x0_hat (re-noised to its noise level with seeded noise)
with its gradient flowing back into the LoRA policy. No text encoding, and on SD3.5 no VAE decode: the reward reads
latents (the toy's preset reads them through the VAE's round trip, cheap at 32 px; --no-round-trip: latents alone).
--grad-steps K >= 1 back-propagates through more than one step instead: DRaFT-K (Clark et al. 2023) samples the whole
ODE, the last K steps with gradient, and the reward scores the final latent; --grad-steps-random draws K from 1..K
every step (AlignProp's randomised truncation, Prabhudesai et al. 2023).

Toy world (after the quick start `python train_reward.py`):
    python refl.py                                            # 50 steps, the reward on the VAE round trip of x0_hat
    python refl.py --no-round-trip --out out/refl-latent      # the reward on the latents alone (SD3.5's preset)
    python refl.py --fm-weight 0 --out out/refl-nofm          # without the pretraining (flow-matching) loss
    python refl.py --grad-steps 1 --out out/draft-1           # DRaFT-1; --grad-steps 3 --grad-steps-random: AlignProp
SD3.5-M with a DiNa-LRM reward trained here, 8 GPUs (real latents: a train_reward.py --cache-only cache):
    torchrun --nproc_per_node=8 refl.py --backbone sd35m --reward out/reward-sd35m-dina --prompts prompts_train.txt \
        --eval-prompts prompts_eval.txt --heldout-prompts prompts_heldout.txt --fm-weight 1 \
        --fm-data /data/HPDv3/train.cache-sd35m --early-stop 3 --out out/refl-sd35m

The step, in plain sight (main): B prompts (each image's noise seeded by (seed, step, image)), per micro-batch a rollout
(an ODE with CFG down to step `mid`, drawn per step from --mid-range, seeded, under no_grad) -> losses (one conditional
forward with gradient, x0_hat, the rewards of x0_hat at their noise level, loss = mean(target - r) (or relu), optionally
(L + lam L_fm) / (1 + lam) with the flow-matching loss on real latents) -> backward; then AdamW, grad clip, an EMA that
is stepped (the released DiNa ReFL never steps its EMA, so its saved LoRA is the initial one) -> log, evaluate (EMA
weights), checkpoint. DiNa's README: ReFL hacks the reward; use the pretraining loss or stop early (--early-stop).
The sizes of the flags left alone come from a preset (PRESETS below, printed at start): the toy's on the toy and tiny
backbones, else SD3.5's.

DRaFT-K / AlignProp (--grad-steps K; docs/design.md §10): the rollout is the same no-gradient ODE, down to step
mid = N - K, whose state is detached; model.sample's own Euler steps mid..N-1 then run with gradient, and the reward
scores the final latent, re-noised like x0_hat (the Euler step to sigma 0 is x0_hat: DRaFT-1 is ReFL at mid = N - 1,
but guided). Choices and deviations: the gradient steps are guided by --cfg, as both papers differentiate through their
guided sampler and as the evaluation samples (ReFL's step stays conditional only); with K > 1 each transformer call is
checkpointed (torch.utils.checkpoint; both papers checkpoint): one step's activations at a time, one extra forward per
step. The random K is one draw per optimizer step, a contiguous window, as AlignProp's paper describes it; its released
code redraws the cut (from 0..50 on 50 steps) at every denoising step and detaches only the noise prediction, so a
random subset of steps keeps its gradient; K = 0 (no gradient) is left out here. A DRaFT step still draws mid from
--mid-range (unused) so that its prompts and noise are ReFL's at the same seed. Not implemented: DRaFT-LV.
"""

import argparse
import json
import os
import time
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import align
import toy
import data
from model import SCORE_NORMALISATIONS, encode_images, load_pipeline, sample, sd3_sigmas, seeded, velocity, x0_hat

# -----------------------------------------------------------------------------
# Presets: the values of the flags left at None, by backbone

PRESETS = {
    # ImageReward's ReFL as DiNa-LRM runs it on SD3.5 (docs/design.md §10): 64 images per step, lr 1e-4, LoRA r 32, the
    # step with gradient in the last quarter of a 40-step ODE; 300 steps, evaluated every 25 (ReFL hacks the reward:
    # --early-stop), no pretraining loss unless --fm-data; the reward reads the latents (no decode in the loop)
    "dina": dict(iters=300, batch=64, resolution=512, steps=40, mid_range=(30, 40), eval_steps=40, eval_seeds=2,
                 heldout_seeds=2, lr=1e-4, fm_weight=0.0, lora_rank=32, lora_alpha=64, eval_interval=25,
                 ckpt_interval=25, round_trip=False),
    # the toy world's laptop sizing: 24 images per step, the same last quarter of 10 steps, and the flow-matching loss
    # on the toy's renders, without which the toy reward is hacked (measured: docs/log.md). 50 steps, the reward read
    # through the VAE round trip (cheap at 32 px): on the latents alone 3% of the proxy's gain reaches the pictures, and
    # by 50 steps the golden score has stopped rising on world 1; the evaluation grpo.py's, 12 / 24 seeds per prompt
    # (paired SE about 0.003), before and after only, so a run fits 5 minutes (docs/results.md §6)
    "toy": dict(iters=50, batch=24, resolution=32, steps=10, mid_range=(7, 10), eval_steps=10, eval_seeds=12,
                heldout_seeds=24, lr=1e-4, fm_weight=1.0, lora_rank=8, lora_alpha=16, eval_interval=0,
                ckpt_interval=25, round_trip=True),
}

STEP_DRAWS = 0  # seeded(seed, step, STEP_DRAWS): the step's mid, its prompts, then its random K (AlignProp)
REWARD_NOISE = 7  # seeded(seed, step, image, REWARD_NOISE): the reward's re-noising of the image's x0_hat
FM_PICK = 3  # seeded(seed, step, first image of the micro-batch, FM_PICK): the real latents of L_fm
FM_NOISE = 4  # seeded(seed, step, first image of the micro-batch, FM_NOISE): their t and noise

parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[0],
                                 epilog="presets:\n" + "\n".join(f"  {n}: {v}" for n, v in PRESETS.items()))
parser.add_argument("--backbone", default="toy", help="the generator: tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--reward", nargs="+", default=None, help="train_reward.py checkpoint folder(s) or released "
                    "DiNa-LRM folders (default on the toy: out/reward-toy-dina); 'oracle' is not differentiable and is "
                    "refused")
parser.add_argument("--reward-weight", nargs="+", type=float, default=None,
                    help="weight of each reward (1); all 0: the flow-matching-only control, its evaluation still "
                    "reports the rewards")
parser.add_argument("--reward-t", type=float, default=None,
                    help="noise level the reward reads (default: its checkpoint's t_eval)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS),
                    help="of the rewards: raw | plus10 = (raw + 10) / 10 | plus12 = (raw + 12) / 10 (scales the "
                    "reward's gradient)")
parser.add_argument("--prompts", default=None, help="training prompts, one per line (toy: out/toy/prompts_train.txt)")
parser.add_argument("--eval-prompts", default=None,
                    help="fixed evaluation prompts seen in training (toy: the training prompts)")
parser.add_argument("--heldout-prompts", default=None,
                    help="fixed held-out evaluation prompts (toy: out/toy/prompts_heldout.txt)")
# None: the preset's value (PRESETS above)
parser.add_argument("--iters", type=int, default=None, help="optimizer steps (preset)")
parser.add_argument("--batch", type=int, default=None, help="images per step over all ranks (preset)")
parser.add_argument("--micro-batch", type=int, default=None,
                    help="images per forward on one rank (default: batch / world)")
parser.add_argument("--resolution", type=int, default=None, help="image side (preset)")
parser.add_argument("--steps", type=int, default=None, help="ODE steps of the rollout (preset)")
parser.add_argument("--mid-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="LO,HI: the step with gradient is drawn from [LO, HI) (preset)")
parser.add_argument("--cfg", type=float, default=4.5, help="guidance of the no-gradient ODE part (ReFL's gradient step "
                    "is conditional only, as ImageReward's; DRaFT's gradient steps use it too)")
# which steps carry the reward's gradient (docs/design.md §10)
parser.add_argument("--grad-steps", type=int, default=0, help="0: ReFL (one conditional step at mid, the reward on "
                    "x0_hat); K >= 1: DRaFT-K (the ODE to the end, its last K steps guided and with gradient, the "
                    "reward on the final latent)")
parser.add_argument("--grad-steps-random", action="store_true", help="AlignProp: K drawn from 1..--grad-steps every "
                    "step, seeded by (seed, step)")
parser.add_argument("--eval-steps", type=int, default=None, help="ODE steps of the evaluation samples (preset)")
parser.add_argument("--eval-seeds", type=int, default=None, help="images per evaluation prompt (fixed seeds) (preset)")
parser.add_argument("--heldout-seeds", type=int, default=None, help="images per held-out prompt (fixed seeds) (preset)")
parser.add_argument("--eval-cfg", type=float, default=4.5)
parser.add_argument("--loss", default="mean",
                    help="mean: mean(target - r) (DiNa) | relu: mean(relu(target - r)) (ImageReward)")
parser.add_argument("--target", type=float, default=2.0, help="the 2 of 2 - r")
parser.add_argument("--fm-weight", type=float, default=None,
                    help="lam of (L + lam L_fm) / (1 + lam), 0 = no pretraining loss (preset)")
parser.add_argument("--fm-data", default=None, help="real latents for L_fm: a train_reward.py cache folder (all its "
                    "images); toy default: fresh renders of the training prompts, VAE-encoded once")
parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (preset)")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--lora-rank", type=int, default=None, help="rank of the policy's LoRA (preset)")
parser.add_argument("--lora-alpha", type=int, default=None, help="its alpha (preset)")
parser.add_argument("--ema", type=float, default=0.9, help="EMA decay of the LoRA weights, stepped every step; 0 = off")
parser.add_argument("--round-trip", action=argparse.BooleanOptionalAction, default=None, help="the reward reads "
                    "E(D(x0_hat)), the VAE round trip of its latent, with the gradient through both: only what the "
                    "decoder shows is climbed (preset: on for the toy, off for SD3.5)")
parser.add_argument("--early-stop", type=int, default=0, help="stop when the held-out proxy has not risen for this "
                    "many evaluations, and export the best evaluation's weights (0 = off)")
parser.add_argument("--out", default="out/refl")
parser.add_argument("--eval-interval", type=int, default=None,
                    help="steps between evaluations (0: first and last only) (preset)")
parser.add_argument("--ckpt-interval", type=int, default=None, help="steps between checkpoints (preset)")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)


def resolve_args(args):
    """The preset's values (the toy's on toy and tiny, else SD3.5's) for the flags left at None (flags given on the
    command line win), checked -> (args, the preset's name, its keys)."""
    name = "toy" if args.backbone in ("toy", "tiny") else "dina"
    align.fill_preset(args, PRESETS[name])
    if args.backbone == "toy":
        args.reward = args.reward or ["out/reward-toy-dina"]
        args.prompts = args.prompts or "out/toy/prompts_train.txt"
        args.eval_prompts = args.eval_prompts or "out/toy/prompts_train.txt"
        args.heldout_prompts = args.heldout_prompts or "out/toy/prompts_heldout.txt"
    if not args.reward or "oracle" in args.reward:
        raise ValueError("--reward needs train_reward.py checkpoint folder(s): ReFL back-propagates through the reward")
    args.reward_weight = args.reward_weight or [1.0] * len(args.reward)
    if len(args.reward_weight) != len(args.reward):
        raise ValueError(f"--reward-weight has {len(args.reward_weight)} values for {len(args.reward)} rewards")
    lo, hi = args.mid_range
    if not 0 <= lo < hi or (hi > args.steps and not args.grad_steps):  # DRaFT draws mid too (unused, docstring)
        raise ValueError(f"--mid-range {lo},{hi} is outside the {args.steps}-step schedule")
    if not (0 <= args.grad_steps <= args.steps and (args.grad_steps or not args.grad_steps_random)):
        raise ValueError(f"--grad-steps {args.grad_steps} is not in 1..{args.steps} (0: ReFL, without "
                         "--grad-steps-random)")
    if args.loss not in ("mean", "relu"):
        raise ValueError(f"unknown --loss {args.loss!r}; choose mean or relu")
    return args, name, list(PRESETS[name])


def refl_loss(r, target=2.0, kind="mean"):
    """r (B,) rewards of x0_hat -> (B,) per-image loss: target - r (DiNa) or relu(target - r) (ImageReward)."""
    return torch.relu(target - r) if kind == "relu" else target - r


def flow_matching_loss(transformer, x0, prompt_embeds, pooled, generator):
    """The generator's own pretraining loss on real latents x0 (B,C,h,w): t ~ logit-normal(0, 1) (SD3), x_t = (1-t) x0 +
    t eps, MSE of v against eps - x0 (what toy.py trained the generator with)."""
    t = torch.sigmoid(torch.randn(len(x0), generator=generator)).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = transformer(hidden_states=xt, timestep=1000 * t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                    return_dict=False)[0].float()
    return ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))


def real_latents(args, pipe, table, prompts):
    """-> (latents (N,C,h,w), prompt embeds (N,L,D), pooled (N,P)) for L_fm: a reward cache's images (with its own
    prompt embeddings), or on the toy fresh renders of the training prompts encoded once by the VAE."""
    if args.fm_data:
        cache = data.PairCache(args.fm_data, latent_channels=pipe.transformer.config.in_channels)
        items = [it for group in cache.images().values() for it in group]
        lat, pe, pooled = cache.image_batch(items)
        if pe.shape[1:] != table[prompts[0]][0].shape:
            raise ValueError(f"{args.fm_data}: cached prompt embeddings {tuple(pe.shape[1:])} do not match the "
                             f"generator's {tuple(table[prompts[0]][0].shape)} (encode the cache at the reward's text "
                             "length)")
        return lat, pe, pooled
    rng = np.random.default_rng(args.seed)
    names = [p for p in prompts for _ in range(16)]
    images = [toy.render_toy(*toy.parse_toy_prompt(p), rng) for p in names]
    lat = encode_images(pipe.vae, toy.to_tensor(images))
    return (lat.cpu(), *align.embeds(table, names))


# -----------------------------------------------------------------------------
# Setup: the generator with its LoRA policy, the rewards, every prompt encoded once, the real latents of L_fm


class Run(NamedTuple):
    """What main sets up once (build)."""
    transformer: torch.nn.Module  # the generator's, the LoRA policy on it
    vae: torch.nn.Module  # decodes the evaluation images
    oracle: object  # align.Oracle: the toy's golden judge of the evaluation images; None elsewhere
    rewards: list  # align.load_rewards: differentiable latent rewards
    table: dict  # {prompt: (prompt_embeds, pooled)}, every prompt encoded once
    train_prompts: list
    splits: dict  # {train, heldout: fixed evaluation prompts}
    fm: tuple  # real_latents (latents, prompt embeds, pooled) for L_fm; None without it
    shape: tuple  # the latent's (h, w)
    sigmas: torch.Tensor  # the rollouts' schedule
    eval_sigmas: torch.Tensor  # the evaluation's
    neg: tuple  # the empty prompt's embeddings: CFG's negative
    params: dict  # the LoRA weights {name: parameter}
    ema: dict  # their EMA, the weights evaluated and exported
    opt: torch.optim.Optimizer
    device: str


def build(args, device):
    train_prompts, splits = align.read_splits(args)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.backbone, args.backbone_path, args.seed, dtype=dtype).to(device)
    transformer = pipe.transformer
    oracle = align.Oracle(toy.toy_golden_score, toy.match_stats) if args.backbone == "toy" else None
    rewards = align.load_rewards(args.reward, args.reward_weight, transformer, args.reward_t, device,
                                 normalisation=args.score_normalisation)
    text_len = next(r["text_len"] for r in rewards)
    table = align.encode_prompt_table(pipe, train_prompts + [p for s in splits.values() for p in s], text_len, device)
    fm = real_latents(args, pipe, table, train_prompts) if args.fm_weight > 0 else None
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # never called again
    shape = (args.resolution // pipe.vae_scale_factor,) * 2
    params = align.add_policy_lora(transformer, args.lora_rank, args.lora_alpha, seed=args.seed)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in params.items()}
    shift = pipe.scheduler.config.get("shift", 3.0)  # the generator's own schedule (SD3.5: 3)
    pipe.vae.requires_grad_(False)  # frozen; --round-trip back-propagates through it to the latents only
    return Run(transformer, pipe.vae, oracle, rewards, table, train_prompts, splits, fm, shape,
               sd3_sigmas(args.steps, shift), sd3_sigmas(args.eval_steps, shift), align.embeds(table, [""], device),
               params, ema, opt, device)


# -----------------------------------------------------------------------------
# The phases of a step: rollout -> losses (reward, L_fm) -> backward, per micro-batch; update; evaluate


def rollout(args, run, it, rows, prompts, mid, autocast):
    """Images `rows` (their global indices) from their seeded noise: the ODE with CFG down to step mid (the first step
    with gradient), no gradient -> x at sigma_mid (B,C,h,w)."""
    pe, pooled = align.embeds(run.table, prompts, run.device)
    z = torch.stack([torch.randn(run.transformer.config.in_channels, *run.shape, generator=seeded(args.seed, it, i))
                     for i in rows]).to(run.device)
    if mid == 0:  # DRaFT-K with K = N: every step has gradient
        return z
    with torch.no_grad(), autocast:
        return sample(run.transformer, z, run.sigmas[:mid + 1], pe, pooled, args.cfg, run.neg)["latents"]


def round_trip(vae, z):
    """Normalised latents (B,C,h,w) -> the normalised posterior means of their decoded images, differentiable (the
    inverse pair model.decode_latents / encode_images, without their no_grad, rounding and clamp). At SD3.5's 1024 px
    it adds a VAE decoder and encoder, forward and backward, per image, their activations at full resolution."""
    shift = vae.config.shift_factor or 0.0
    x = vae.decode(z / vae.config.scaling_factor + shift).sample
    return (vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor


def losses(args, run, x, it, rows, prompts, mid, autocast):
    """From x at step mid with gradient: ReFL's one conditional step and x0_hat, or DRaFT's guided Euler steps mid..N-1
    and the final latent; their weighted rewards (re-noised by the stream REWARD_NOISE), ReFL's loss, with L_fm on real
    latents -> (loss (B,), rewards (B,), L_fm (B,) or None)."""
    weights = torch.tensor(args.reward_weight, device=run.device)[:, None]
    pe, pooled = align.embeds(run.table, prompts, run.device)
    keys = [(args.seed, it, i, REWARD_NOISE) for i in rows]
    l_fm = None
    with autocast:
        if args.grad_steps:  # DRaFT-K: model.sample's last K steps; K > 1 recomputes each step's activations
            k = len(run.sigmas) - 1 - mid
            net = partial(checkpoint, run.transformer, use_reentrant=False) if k > 1 else run.transformer
            lat = sample(net, x, run.sigmas[mid:], pe, pooled, args.cfg, run.neg)["latents"]  # (B,C,h,w) at sigma 0
        else:  # ReFL: one conditional step, then the one-step prediction of the clean latent
            v = velocity(run.transformer, x, run.sigmas[mid], pe, pooled)
            lat = x0_hat(x, float(run.sigmas[mid]), v)
        if args.round_trip:
            lat = round_trip(run.vae, lat)
        r = (weights * align.score_rewards(run.rewards, lat, prompts, run.table, keys)).sum(0)
        loss = refl_loss(r, args.target, args.loss)
        if run.fm is not None:
            pick = torch.randint(len(run.fm[0]), (len(rows),), generator=seeded(args.seed, it, rows[0], FM_PICK))
            real = (t[pick].to(run.device) for t in run.fm)
            l_fm = flow_matching_loss(run.transformer, *real, seeded(args.seed, it, rows[0], FM_NOISE))
            loss = (loss + args.fm_weight * l_fm) / (1 + args.fm_weight)
    return loss, r, l_fm


def proxy(args, run, lat, prompts):
    """The evaluation's proxy: the weighted sum of the rewards, re-noised by the fixed stream align.PROXY_NOISE; with
    every weight 0 (the flow-matching-only control, --reward-weight 0) their plain sum, so the control still shows
    what the reward reads."""
    weights = torch.tensor(args.reward_weight, device=run.device)[:, None]
    proxy_weights = weights if weights.abs().sum() > 0 else torch.ones_like(weights)
    keys = [(args.seed, align.PROXY_NOISE, i) for i in range(len(lat))]
    return (proxy_weights * align.score_rewards(run.rewards, lat, prompts, run.table, keys)).sum(0)


class Best(NamedTuple):
    """--early-stop: the evaluation with the highest held-out proxy so far."""
    score: float  # its held-out proxy (the training one without held-out prompts)
    ema: dict  # a copy of the EMA weights it evaluated
    images: dict  # its first-seed images
    evaluations: int  # len(history) at it


def main(args):
    args, recipe, keys = resolve_args(args)
    ddp, rank, world, device, autocast = align.setup_distributed()
    align.print_recipe(recipe, keys, args)
    micro = args.micro_batch or args.batch // world
    if args.batch % (micro * world):
        raise ValueError(f"--batch {args.batch} is not a multiple of --micro-batch {micro} x {world} rank(s)")
    n_local = args.batch // world
    run = build(args, device)

    # ---------------------------------------------------------------------------- resume, or the evaluation before
    it, history, ckpt_path, log_path = align.start_run(args.out, args.resume, run.params, run.ema, run.opt,
                                                       rank, device)
    if not history:
        report, before_images = align.evaluate_ema(run, args, partial(proxy, args, run), autocast)
        history = [dict(iter=0, **report)]
        if rank == 0:
            align.image_grid([im[:12] for im in before_images.values()]).save(os.path.join(args.out, "before.png"))
    align.print0(f"world {world}: {args.batch} images per step = micro {micro} x {n_local // micro} x {world} rank(s); "
                 f"{sum(p.numel() for p in run.params.values()) / 1e6:.3f}M LoRA parameters")
    align.print0("before: " + align.describe_eval(history[0]))

    # ---------------------------------------------------------------------------- the loop
    best, ema, after_images, stale = None, run.ema, None, 0
    bar = tqdm(total=args.iters, initial=it, disable=rank != 0, desc="refl")
    while it < args.iters:
        t0 = time.time()
        draws = seeded(args.seed, it, STEP_DRAWS)
        mid = torch.randint(*args.mid_range, (1,), generator=draws).item()  # ReFL's step with gradient
        order = torch.randint(len(run.train_prompts), (args.batch,), generator=draws).tolist()
        k = args.grad_steps  # 0: ReFL; DRaFT-K: gradient through the last K steps, AlignProp's K drawn from 1..K
        if args.grad_steps_random:
            k = torch.randint(1, k + 1, (1,), generator=draws).item()
        mid = args.steps - k if k else mid  # DRaFT-K: the first of the last K steps
        mine = list(range(rank * n_local, (rank + 1) * n_local))
        stats = dict(loss=0.0, reward=0.0, fm=0.0)
        for c in range(0, n_local, micro):
            rows = mine[c:c + micro]
            prompts = [run.train_prompts[order[i]] for i in rows]
            x = rollout(args, run, it, rows, prompts, mid, autocast)  # the ODE down to step mid, no gradient
            loss, r, l_fm = losses(args, run, x, it, rows, prompts, mid, autocast)  # the steps with gradient: loss
            loss.sum().div(args.batch).backward()
            stats["loss"] += loss.sum().item() / args.batch
            stats["reward"] += r.sum().item() / args.batch
            if l_fm is not None:
                stats["fm"] += l_fm.sum().item() / args.batch
        if ddp:
            parts = [None] * world
            dist.all_gather_object(parts, stats)
            stats = {k: sum(s[k] for s in parts) for k in stats}
        gnorm = align.optimizer_step(run.params, run.opt, run.ema, args.ema, args.grad_clip, ddp,
                                     f"step {it} (prompts {prompts[:3]}...)")
        it += 1
        rec = dict(iter=it, mid=mid, k=k, gnorm=gnorm, **stats, seconds=dict(training=time.time() - t0))
        if (args.eval_interval and it % args.eval_interval == 0) or it == args.iters:
            report, after_images = align.evaluate_ema(run, args, partial(proxy, args, run), autocast)
            history.append(dict(iter=it, **report))
            rec["eval"] = {s: {k: v for k, v in r.items() if k != "golden_all"} for s, r in report.items()}
            bar.write(f"step {it}: " + align.describe_eval(history[-1]))
            score = report.get("heldout", report["train"])["reward"]
            if best is None or score > best.score:
                best, stale = Best(score, {n: e.clone() for n, e in run.ema.items()}, after_images, len(history)), 0
            else:
                stale += 1
        if rank == 0:
            bar.write(f"step {it} | mid {mid} | k {k} | loss {stats['loss']:.4f} | reward {stats['reward']:.4f} | "
                      f"fm {stats['fm']:.4f} | gnorm {gnorm:.3f} | {rec['seconds']['training']:.1f} s")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if it % args.ckpt_interval == 0 or it == args.iters:
                meta = dict(args=vars(args), iteration=it, history=history)
                align.save_state(ckpt_path, run.params, run.ema, run.opt, meta)
        bar.update(1)
        if args.early_stop and stale >= args.early_stop:
            align.print0(f"early stop at step {it}: the held-out proxy has not risen for {stale} evaluations; "
                         f"exporting the weights of step {history[best.evaluations - 1]['iter']}")
            ema, after_images, history = best.ema, best.images, history[:best.evaluations]
            break
    bar.close()

    # ---------------------------------------------------------------------------- export the EMA weights, the report
    if rank == 0:
        align.swap_weights(run.params, ema)  # the policy takes the EMA weights evaluated (early stop: the best ones)
        align.save_policy_lora(os.path.join(args.out, "lora"), run.transformer)
        align.finish(args.out, history, after_images, "steps")
    align.barrier()  # a normal exit after a barrier (destroy_process_group can abort under gloo)


if __name__ == "__main__":
    main(parser.parse_args())
