"""
Flow-GRPO (and Flow-GRPO-Fast) with the latent reward: the generator samples groups of images per prompt with an SDE
(so every step has a log-probability), a frozen latent reward model scores the final latents (no VAE decode, no text
encoding: it reads the generator's own latents and prompt embeddings), rewards are normalised within each group, and
the LoRA policy takes a PPO-clipped step on every trained denoising step, with a KL to the adapter-disabled reference.

Toy world (after the quick start `python train_reward.py`):
    python grpo.py                                   # the latent reward out/reward-toy-dina
    python grpo.py --reward oracle --out out/grpo-oracle     # the ceiling: decode and score with the golden oracle
    python grpo.py --sde-window 0 --no-same-noise --groups 6 --lr 5e-3 --iters 24 --out out/grpo-full  # all steps SDE
SD3.5-M with a DiNa-LRM reward trained here, 8 GPUs (Flow-GRPO's recipe; --recipe dina for DiNa-LRM's):
    torchrun --nproc_per_node=8 grpo.py --backbone sd35m --reward out/reward-sd35m-dina \
        --prompts prompts_train.txt --eval-prompts prompts_eval.txt --heldout-prompts prompts_heldout.txt \
        --out out/grpo-sd35m

One iteration, in plain sight (main): G prompts x K images (spread over ranks, each image's noise seeded by (seed,
iteration, image), so results do not depend on the world size) -> rollout: SDE samples with old log-probs -> score:
rewards (all-gathered), advantages A = (r - mean_group) / (std_group + 1e-4) per reward, weighted, clipped -> update:
U optimizer steps, each on 1/U of the images over all trained steps: loss = max(-A ratio, -A clip(ratio, 1 - eps,
1 + eps)) + beta KL -> log, evaluate (EMA weights), checkpoint.

The flags left alone take the values of a preset (PRESETS below; the values used are printed at start): --recipe
flow-grpo or dina at SD3.5's sizes, or on the toy and tiny backbones the toy's laptop sizes (with dina's changes over
them for --recipe dina). Flags given on the command line always win.

Deviations (honest notes): log-probs are the true Gaussian log-density (docs/design.md §6), so --clip-range on CPS is
not on the scale of the released DiNa/Flow-GRPO CPS code; gradients are all-reduced by hand after each update's
backward passes (LoRA tensors are small) instead of DDP; the EMA is stepped after every optimizer step (Flow-GRPO:
every 8).
DiNa's reward normalisation (raw + 12) / 10 is affine, so group advantages barely change (only the 1e-4 added to the
std); it is applied with --score-normalisation plus12, and not by default.
"""

import argparse
import json
import os
import time
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import align
import toy
from model import (SCORE_NORMALISATIONS, SDE_STEPS, decode_latents, grpo_loss, load_pipeline, sample, sd3_sigmas, seeded,
                   velocity)

# -----------------------------------------------------------------------------
# Presets: the values of the flags left at None

PRESETS = {
    # Flow-GRPO on SD3.5-M: its config/grpo.py pickscore_sd3 (24 images per prompt, 48 groups per epoch, 2 updates,
    # 512 px, CFG 4.5, SDE noise 0.7, clip 1e-4, lr 3e-4, LoRA r 32 alpha 64, 40 evaluation steps) with train.beta of
    # its GenEval config
    "flow-grpo": dict(iters=1000, resolution=512, group_size=24, groups=48, updates=2, batch=8, eval_steps=40,
                      eval_seeds=2, heldout_seeds=2, cfg=4.5, sde_type="sde", noise_level=0.7, sde_window=0,
                      clip_range=1e-4, beta=0.04, lr=3e-4, lora_rank=32, lora_alpha=64, eval_interval=25,
                      ckpt_interval=25, same_noise=False),
    # the toy world's laptop sizing, chosen by the oracle's gain (docs/results.md §6): Flow-GRPO-Fast's 2-step window at
    # steps 0-1 with the group's images sharing their start (DanceGRPO), so a group's spread is the trained steps' noise
    # (the gradient's cosine across half-batches 0.02 -> 0.16); 24 prompts x 8 images, lr 2e-3 (5e-3 parts the run
    # seeds), KL 0; the evaluation 12 / 24 seeds per prompt, so the paired SE is about 0.005. 8 iterations: with the
    # quick start's reward the golden score peaks there on run seeds 0 and 1, and by 16 the policy has traded the
    # prompted colour for the reward's favourite (the oracle's gain holds to --iters 24)
    "toy": dict(iters=8, resolution=32, group_size=8, groups=24, updates=1, batch=48, eval_steps=10, eval_seeds=12,
                heldout_seeds=24, cfg=4.5, sde_type="sde", noise_level=0.7, sde_window=2, sde_window_range=(0, 1),
                same_noise=True, clip_range=1e-4, beta=0.0, lr=2e-3, lora_rank=8, lora_alpha=16, eval_interval=0,
                ckpt_interval=8),
}
# DiNa-LRM's GRPO recipe: Flow-GRPO-Fast with CPS noise 0.8 on a 3-step window starting in [0, 5), no CFG in training,
# groups of 18, clip 3e-6, beta 0.004, lr 5e-5 (docs/design.md §10): its changes over the sizes (SD3.5's or the toy's)
DINA = dict(sde_type="cps", noise_level=0.8, sde_window=3, sde_window_range=(0, 5), cfg=1.0, group_size=18,
            clip_range=3e-6, beta=0.004, lr=5e-5, same_noise=False)
PRESETS["dina"] = PRESETS["flow-grpo"] | DINA

PROMPT_ORDER = 0  # seeded(seed, iteration, PROMPT_ORDER): the iteration's prompt order
WINDOW_START = 1  # seeded(seed, iteration, WINDOW_START): Flow-GRPO-Fast's window start
REWARD_NOISE = 7  # seeded(seed, iteration, image, REWARD_NOISE): the reward's re-noising of the image
GROUP_NOISE = 8  # seeded(seed, iteration, group, GROUP_NOISE): a group's shared initial noise (--same-noise)

parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[0],
                                 epilog="presets:\n" + "\n".join(f"  {n}: {v}" for n, v in PRESETS.items()) +
                                 f"\n  on toy or tiny with --recipe dina: toy's, changed by {DINA}")
parser.add_argument("--backbone", default="toy", help="the generator: tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--reward", nargs="+", default=None, help="train_reward.py checkpoint folder(s) or released "
                    "DiNa-LRM folders; 'oracle' on the toy (decode + golden oracle: the ceiling). Default on the toy: "
                    "out/reward-toy-dina")
parser.add_argument("--reward-weight", nargs="+", type=float, default=None,
                    help="weight of each reward's advantages (1)")
parser.add_argument("--reward-t", type=float, default=None,
                    help="noise level the reward reads (default: its checkpoint's t_eval)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS),
                    help="of the latent rewards: raw | plus10 = (raw + 10) / 10 | plus12 = (raw + 12) / 10 "
                    "(DiNa-LRM's GRPO)")
parser.add_argument("--prompts", default=None, help="training prompts, one per line (toy: out/toy/prompts_train.txt)")
parser.add_argument("--eval-prompts", default=None,
                    help="fixed evaluation prompts seen in training (toy: the training prompts)")
parser.add_argument("--heldout-prompts", default=None,
                    help="fixed held-out evaluation prompts (toy: out/toy/prompts_heldout.txt)")
parser.add_argument("--recipe", default="flow-grpo", help="flow-grpo | dina: the preset of the flags left alone")
# None: the preset's value (PRESETS above)
parser.add_argument("--iters", type=int, default=None, help="iterations (sample, score, update) (preset)")
parser.add_argument("--group-size", type=int, default=None, help="K images per prompt (preset)")
parser.add_argument("--groups", type=int, default=None, help="prompts per iteration (over all ranks) (preset)")
parser.add_argument("--updates", type=int, default=None,
                    help="optimizer steps per iteration, each on 1/U of the images (preset)")
parser.add_argument("--batch", type=int, default=None, help="images per forward on one rank, sampling and training "
                    "alike (equal batches make the first importance ratio exactly 1) (preset)")
parser.add_argument("--resolution", type=int, default=None, help="image side (preset)")
parser.add_argument("--steps", type=int, default=10, help="sampling steps of the rollouts (Flow-GRPO: 10)")
parser.add_argument("--eval-steps", type=int, default=None, help="ODE steps of the evaluation samples (preset)")
parser.add_argument("--eval-seeds", type=int, default=None, help="images per evaluation prompt (fixed seeds) (preset)")
parser.add_argument("--heldout-seeds", type=int, default=None, help="images per held-out prompt (fixed seeds) (preset)")
parser.add_argument("--cfg", type=float, default=None, help="guidance in rollouts and training, 1 = off (preset)")
parser.add_argument("--eval-cfg", type=float, default=4.5, help="guidance of the evaluation samples")
parser.add_argument("--sde-type", default=None, help="sde (Flow-GRPO) | cps (coefficients-preserving) (preset)")
parser.add_argument("--noise-level", type=float, default=None, help="SDE noise a (preset)")
parser.add_argument("--sde-window", type=int, default=None, help="Flow-GRPO-Fast: W stochastic, trained steps, ODE "
                    "elsewhere; 0 = all steps (Flow-GRPO) (preset)")
parser.add_argument("--sde-window-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="START,END: the window's first step is drawn from [START, END) (the preset's; "
                    "without one 0,steps-W+1)")
parser.add_argument("--timestep-fraction", type=float, default=0.99, help="Flow-GRPO: share of the steps trained, "
                    "from the first: 0.99 trains 9 of 10 (the last is stochastic but untrained); Fast trains its whole "
                    "window")
parser.add_argument("--same-noise", action=argparse.BooleanOptionalAction, default=None, help="every image of a group "
                    "starts from the same initial noise, so the group's spread comes from the SDE noise alone, which the "
                    "policy gradient can credit (preset)")
parser.add_argument("--adv-clip", type=float, default=5.0, help="advantages clipped to +-this")
parser.add_argument("--global-std", action="store_true",
                    help="normalise by the std of the whole batch, not of the group")
parser.add_argument("--clip-range", type=float, default=None, help="PPO ratio clip eps (preset)")
parser.add_argument("--beta", type=float, default=None, help="KL weight (preset)")
parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (preset)")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--lora-rank", type=int, default=None, help="rank of the policy's LoRA (preset)")
parser.add_argument("--lora-alpha", type=int, default=None, help="its alpha (preset)")
parser.add_argument("--ema", type=float, default=0.9,
                    help="EMA decay of the LoRA weights used for evaluation and export; 0 = off")
parser.add_argument("--out", default="out/grpo")
parser.add_argument("--eval-interval", type=int, default=None,
                    help="iterations between evaluations (0: first and last only) (preset)")
parser.add_argument("--ckpt-interval", type=int, default=None, help="iterations between checkpoints (preset)")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)


def preset(args):
    """-> (name, values) of the flags left alone: on toy and tiny the toy's sizes (with --recipe dina's changes over
    them), else the recipe's preset."""
    if args.recipe not in ("flow-grpo", "dina"):
        raise ValueError(f"unknown --recipe {args.recipe!r}; choose flow-grpo or dina")
    if args.backbone not in ("toy", "tiny"):
        return args.recipe, PRESETS[args.recipe]
    if args.recipe == "dina":
        return "toy with dina's changes", PRESETS["toy"] | DINA
    return "toy", PRESETS["toy"]


def resolve_args(args):
    """The preset's values for the flags left at None (flags given on the command line win), checked -> (args, the
    preset's name, its keys)."""
    name, values = preset(args)
    align.fill_preset(args, values)
    if args.sde_type not in SDE_STEPS:
        raise ValueError(f"unknown --sde-type {args.sde_type!r}; choose {' or '.join(SDE_STEPS)}")
    if args.backbone == "toy":
        args.reward = args.reward or ["out/reward-toy-dina"]
        args.prompts = args.prompts or "out/toy/prompts_train.txt"
        args.eval_prompts = args.eval_prompts or "out/toy/prompts_train.txt"
        args.heldout_prompts = args.heldout_prompts or "out/toy/prompts_heldout.txt"
    if not args.reward:
        raise ValueError("--reward is required: a train_reward.py checkpoint folder (or 'oracle' on the toy)")
    args.reward_weight = args.reward_weight or [1.0] * len(args.reward)
    if len(args.reward_weight) != len(args.reward):
        raise ValueError(f"--reward-weight has {len(args.reward_weight)} values for {len(args.reward)} rewards")
    if not 0 <= args.sde_window <= args.steps:
        raise ValueError(f"--sde-window {args.sde_window} is outside the {args.steps}-step schedule")
    window = args.sde_window or args.steps
    args.sde_window_range = args.sde_window_range or (0, args.steps - window + 1)
    lo, hi = args.sde_window_range
    if not (0 <= lo < hi and hi + window - 1 <= args.steps):
        raise ValueError(f"--sde-window-range {lo},{hi} with window {window} does not fit the {args.steps}-step "
                         "schedule")
    return args, name, list(values)


def schedule(args, it):
    """-> (stochastic steps, trained steps) of iteration `it`. Flow-GRPO: all steps stochastic, the first
    int(N x timestep fraction) trained (9 of 10: the last is stochastic but untrained). Fast: a window of W steps whose
    start is seeded by the iteration, all of it trained, ODE elsewhere."""
    if args.sde_window:
        start = torch.randint(*args.sde_window_range, (1,), generator=seeded(args.seed, it, WINDOW_START)).item()
        sde = list(range(start, start + args.sde_window))
        return sde, sde
    sde = list(range(args.steps))
    return sde, sde[:max(1, int(args.steps * args.timestep_fraction))]


def advantages(rewards, groups, weights, global_std=False, clip=5.0):
    """rewards (R, N) of R reward models, groups (N,) group ids -> (N,) sum over rewards of weight x
    (r - mean of its group) / (std + 1e-4), std of the group (population std, as numpy) or of the whole batch."""
    adv = torch.zeros(rewards.shape[1])
    for r, w in zip(rewards, weights):
        for g in groups.unique():
            m = groups == g
            std = r.std(unbiased=False) if global_std else r[m].std(unbiased=False)
            adv[m] += w * (r[m] - r[m].mean()) / (std + 1e-4)
    return adv.clamp(-clip, clip)


# -----------------------------------------------------------------------------
# Setup: the generator with its LoRA policy, the rewards, every prompt encoded once


class Run(NamedTuple):
    """What main sets up once (build)."""
    transformer: torch.nn.Module  # the generator's, the LoRA policy on it
    vae: torch.nn.Module  # decodes the evaluation images (and the oracle's)
    oracle: object  # align.Oracle: the toy's golden judge of decoded images; None elsewhere
    rewards: list  # align.load_rewards
    table: dict  # {prompt: (prompt_embeds, pooled)}, every prompt encoded once
    train_prompts: list
    splits: dict  # {train, heldout: fixed evaluation prompts}
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
    rewards = align.load_rewards(args.reward, args.reward_weight, transformer, args.reward_t, device, oracle,
                                 args.score_normalisation)
    text_len = next((r["text_len"] for r in rewards if r["text_len"]), 8 if args.backbone in ("toy", "tiny") else 77)
    table = align.encode_prompt_table(pipe, train_prompts + [p for s in splits.values() for p in s], text_len, device)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # never called again
    shape = (args.resolution // pipe.vae_scale_factor,) * 2
    params = align.add_policy_lora(transformer, args.lora_rank, args.lora_alpha, seed=args.seed)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in params.items()}
    shift = pipe.scheduler.config.get("shift", 3.0)  # the generator's own schedule (SD3.5: 3)
    return Run(transformer, pipe.vae, oracle, rewards, table, train_prompts, splits, shape,
               sd3_sigmas(args.steps, shift), sd3_sigmas(args.eval_steps, shift), align.embeds(table, [""], device),
               params, ema, opt, device)


# -----------------------------------------------------------------------------
# The phases of an iteration: rollout -> score -> update; evaluate


class Rollouts(NamedTuple):
    """One iteration's samples on this rank."""
    group_prompts: list  # the iteration's G prompts (all ranks)
    mine: list  # this rank's images: their indices in the global batch
    prompts: list  # the prompt of each of this rank's images
    sde: list  # the stochastic steps
    trained: list  # the trained steps
    traj: torch.Tensor  # (B, steps + 1, C, h, w): the states
    old_lp: torch.Tensor  # (B, steps): each step's log-prob under the sampling policy
    latents: torch.Tensor  # (B, C, h, w): the final latents


def rollout(args, run, it, rank, n_local, autocast):
    """The iteration's prompts (G groups of K images over all ranks) and this rank's SDE samples: image i's initial and
    SDE noise from one generator seeded by (seed, iteration, i)."""
    order = torch.randperm(len(run.train_prompts), generator=seeded(args.seed, it, PROMPT_ORDER)).tolist()
    group_prompts = [run.train_prompts[order[g % len(order)]] for g in range(args.groups)]
    mine = list(range(rank * n_local, (rank + 1) * n_local))
    prompts = [group_prompts[i // args.group_size] for i in mine]
    sde, trained = schedule(args, it)
    traj, old_lp, lat = [], [], []
    with torch.no_grad(), autocast:
        for c in range(0, n_local, args.batch):
            gens = [seeded(args.seed, it, i) for i in mine[c:c + args.batch]]
            if args.same_noise:
                gens0 = [seeded(args.seed, it, i // args.group_size, GROUP_NOISE) for i in mine[c:c + args.batch]]
            else:
                gens0 = gens  # image i's initial noise, then its SDE noise, from one stream
            z = torch.stack([torch.randn(run.transformer.config.in_channels, *run.shape, generator=g) for g in gens0])
            pe, pooled = align.embeds(run.table, prompts[c:c + args.batch], run.device)
            out = sample(run.transformer, z.to(run.device), run.sigmas, pe, pooled, args.cfg, run.neg, args.noise_level,
                         sde, gens, args.sde_type)
            traj.append(out["trajectory"])
            old_lp.append(out["log_probs"])
            lat.append(out["latents"])
    return Rollouts(group_prompts, mine, prompts, sde, trained, torch.cat(traj), torch.cat(old_lp), torch.cat(lat))


def score(args, run, ro, it, world, ddp, autocast):
    """-> (rewards (R, N) of all N images of the iteration (all-gathered), this rank's advantages (B,))."""
    keys = [(args.seed, it, i, REWARD_NOISE) for i in ro.mine]
    decode = partial(decode_latents, run.vae)  # the oracle's only: latent rewards read the latents
    with torch.no_grad():
        with autocast:
            r_local = align.score_rewards(run.rewards, ro.latents, ro.prompts, run.table, keys, decode).cpu()
    r_all = r_local
    if ddp:
        parts = [torch.empty_like(r_local) for _ in range(world)]
        dist.all_gather(parts, r_local.contiguous())
        r_all = torch.cat(parts, 1)
    if not torch.isfinite(r_all).all():
        bad = (~torch.isfinite(r_all)).nonzero()[0, 1].item()
        prompt = ro.group_prompts[bad // args.group_size]
        raise FloatingPointError(f"iteration {it}: non-finite reward for prompt {prompt!r}")
    groups = torch.arange(r_all.shape[1]) // args.group_size
    adv_all = advantages(r_all, groups, args.reward_weight, args.global_std, args.adv_clip)
    return r_all, adv_all[ro.mine]


def policy_loss(args, run, x, x_next, j, pe, pooled, old_lp, adv, autocast):
    """Flow-GRPO's loss at step j of states x (B,C,h,w) that went to x_next: the policy's log-prob of x_next, clipped
    ratio, KL of its mean to the adapter-disabled reference's -> (loss, kl, ratio), each (B,)."""
    step_fn, s = SDE_STEPS[args.sde_type], run.sigmas
    with autocast:
        v = velocity(run.transformer, x, s[j], pe, pooled, args.cfg, run.neg)
    _, lp, mu, std = step_fn(v, x, s[j], s[j + 1], args.noise_level, x_next, sigma1=float(s[1]))
    mu_ref = None
    if args.beta > 0:
        with torch.no_grad(), autocast:
            run.transformer.disable_adapters()
            v_ref = velocity(run.transformer, x, s[j], pe, pooled, args.cfg, run.neg)
            run.transformer.enable_adapters()
        mu_ref = step_fn(v_ref, x, s[j], s[j + 1], args.noise_level, x_next, sigma1=float(s[1]))[2]
    return grpo_loss(lp, old_lp, adv, args.clip_range, mu, mu_ref, std, args.beta)


def update(args, run, ro, adv, it, world, ddp, autocast):
    """U optimizer steps, each on its share of this rank's images and every trained step; the loss is the mean over the
    update's global images and steps -> stats summed over ranks (ratio_dev: the largest |ratio - 1|)."""
    stats = dict(loss=0.0, kl=0.0, ratio_dev=0.0, clipfrac=0.0)
    per_update = len(ro.mine) // args.updates
    denom = args.groups * args.group_size // args.updates * len(ro.trained)
    adv = adv.to(run.device)
    for u in range(args.updates):
        for c in range(u * per_update, (u + 1) * per_update, args.batch):
            rows = slice(c, min(c + args.batch, (u + 1) * per_update))
            pe, pooled = align.embeds(run.table, ro.prompts[rows], run.device)
            for j in ro.trained:
                loss, kl, ratio = policy_loss(args, run, ro.traj[rows, j], ro.traj[rows, j + 1], j, pe, pooled,
                                              ro.old_lp[rows, j], adv[rows], autocast)
                loss.sum().div(denom).backward()
                stats["loss"] += loss.sum().item() / denom
                stats["kl"] += kl.sum().item() / denom
                stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
                stats["clipfrac"] += ((ratio - 1).abs() > args.clip_range).float().sum().item() / denom
        align.optimizer_step(run.params, run.opt, run.ema, args.ema, args.grad_clip, ddp,
                             f"iteration {it} (prompts {ro.group_prompts[:3]}...)")
    if ddp:
        parts = [None] * world
        dist.all_gather_object(parts, stats)
        stats = {k: max(s[k] for s in parts) if k == "ratio_dev" else sum(s[k] for s in parts) for k in stats}
    return stats


def proxy(args, run, lat, prompts):
    """The evaluation's proxy: the weighted sum of the rewards, re-noised by the fixed stream align.PROXY_NOISE."""
    keys = [(args.seed, align.PROXY_NOISE, i) for i in range(len(lat))]
    weights = torch.tensor(args.reward_weight)[:, None]
    decode = partial(decode_latents, run.vae)
    return (weights * align.score_rewards(run.rewards, lat, prompts, run.table, keys, decode).cpu()).sum(0)


def main(args):
    args, recipe, keys = resolve_args(args)
    ddp, rank, world, device, autocast = align.setup_distributed()
    align.print_recipe(recipe, keys, args)
    n_img = args.groups * args.group_size
    if n_img % (world * args.updates):
        raise ValueError(f"--groups {args.groups} x --group-size {args.group_size} = {n_img} images do not divide over "
                         f"{world} rank(s) x --updates {args.updates}")
    n_local = n_img // world
    run = build(args, device)

    # ---------------------------------------------------------------------------- resume, or the evaluation before
    it, history, ckpt_path, log_path = align.start_run(args.out, args.resume, run.params, run.ema, run.opt,
                                                       rank, device)
    if not history:
        report, before_images = align.evaluate_ema(run, args, partial(proxy, args, run), autocast)
        history = [dict(iter=0, **report)]
        if rank == 0:
            align.image_grid([im[:12] for im in before_images.values()]).save(os.path.join(args.out, "before.png"))
    n_lora = sum(p.numel() for p in run.params.values())
    align.print0(f"world {world}: {args.groups} prompts x {args.group_size} images = {n_img} per iteration, "
                 f"{n_local} per rank, {args.updates} update(s); {n_lora / 1e6:.3f}M LoRA parameters")
    align.print0("before: " + align.describe_eval(history[0]))

    # ---------------------------------------------------------------------------- the loop
    after_images = None
    bar = tqdm(total=args.iters, initial=it, disable=rank != 0, desc="grpo")
    while it < args.iters:
        t0 = time.time()
        ro = rollout(args, run, it, rank, n_local, autocast)  # this rank's SDE samples and their log-probs
        t1 = time.time()
        r_all, adv = score(args, run, ro, it, world, ddp, autocast)  # every image's rewards, this rank's advantages
        t2 = time.time()
        stats = update(args, run, ro, adv, it, world, ddp, autocast)  # U PPO-clipped optimizer steps
        it += 1
        t3 = time.time()
        rec = dict(iter=it, reward=r_all.mean(1).tolist(), reward_std=r_all.std(1).tolist(), **stats,
                   sde_steps=ro.sde, seconds=dict(sampling=t1 - t0, reward=t2 - t1, training=t3 - t2))
        if (args.eval_interval and it % args.eval_interval == 0) or it == args.iters:
            report, after_images = align.evaluate_ema(run, args, partial(proxy, args, run), autocast)
            history.append(dict(iter=it, **report))
            rec["eval"] = {s: {k: v for k, v in r.items() if k != "golden_all"} for s, r in report.items()}
            bar.write(f"iter {it}: " + align.describe_eval(history[-1]))
        if rank == 0:
            bar.write(f"iter {it} | reward {rec['reward'][0]:.4f} | kl {stats['kl']:.3g} | "
                      f"clipfrac {stats['clipfrac']:.3f} | "
                      f"s: sample {t1 - t0:.1f} reward {t2 - t1:.2f} train {t3 - t2:.1f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if it % args.ckpt_interval == 0 or it == args.iters:
                meta = dict(args=vars(args), iteration=it, history=history, world_size=world)
                align.save_state(ckpt_path, run.params, run.ema, run.opt, meta)
        bar.update(1)
    bar.close()

    # ---------------------------------------------------------------------------- export the EMA weights, the report
    if rank == 0:
        align.swap_weights(run.params, run.ema)  # the policy takes its EMA weights, the ones evaluated
        align.save_policy_lora(os.path.join(args.out, "lora"), run.transformer)
        align.finish(args.out, history, after_images, "iterations")
    align.barrier()  # a normal exit after a barrier (destroy_process_group can abort under gloo)


if __name__ == "__main__":
    main(parser.parse_args())
