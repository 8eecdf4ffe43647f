"""
Step-GRPO (DRM) with the latent reward: dense credit per denoising step instead of one terminal reward broadcast over
the trajectory. At every trained step of a rollout, one generator forward gives the SDE mean, k children are drawn from
it, each is scored by the latent reward at its own noise level (DRM trains its reward on noisy latents: no re-noising,
no decode), the advantages are normalised within those k, and one child carries the trajectory on. Training takes a
PPO-clipped step on every child's log-probability; the k children of a parent share one generator forward.

Toy world (after the quick start `python train_reward.py`):
    python step_grpo.py                              # k = 2, 12 iterations, the latent reward out/reward-toy-dina
    python step_grpo.py --trajectories 192 --train-steps 0,1 --lr 2e-3 --beta 0 --iters 8 --eval-seeds 12 \
        --heldout-seeds 24 --out out/step-grpo-eq          # the generator forwards of `python grpo.py --out out/grpo`
    python step_grpo.py --k 4 --iters 24 --eval-interval 8 --out out/step-grpo-k4
    python step_grpo.py --continue best --out out/step-grpo-best
    python scripts/compare_step_grpo.py out/grpo out/step-grpo-eq   # golden vs iterations and wall time
SD3.5-M with a DRM reward trained here, 8 GPUs:
    torchrun --nproc_per_node=8 step_grpo.py --backbone sd35m --reward out/reward-sd35m-drm \
        --prompts prompts_train.txt --eval-prompts prompts_eval.txt --heldout-prompts prompts_heldout.txt \
        --out out/step-grpo

One iteration, in plain sight (main): rollout (the trajectories, their children and the children's dense rewards) ->
advantages within each step's k children -> update (U PPO-clipped optimizer steps) -> log, evaluate (EMA weights),
checkpoint.

What DRM leaves open, and our defaults (docs/design.md §10):
    --continue random  the child that carries the trajectory on is drawn uniformly (as LPO): the states stay samples of
                       the policy's own SDE, so later steps train on-policy; `best` follows the reward (greedy).
    --train-steps      all steps but the last (Flow-GRPO's 9 of 10: the last step's noise is tiny, so its log-probs are
                       sharp and its children nearly equal); --train-last adds it.
    --std-floor 0.05   advantages (R - mean_k R) / max(std_k R, floor): with k = 2 the normalised advantages are always
                       +-1 however small the difference, and at high noise the reward's differences between children
                       are mostly its own noise; the floor keeps near-equal children (the last steps, where the
                       noise is small) from getting +-1. log.jsonl's child_spread (the children's mean spread) shows
                       where it binds.
    KL, clip, lr, LoRA as grpo.py (Flow-GRPO's recipe; the toy's laptop values).
The sizes of the flags left alone come from a preset (PRESETS below, printed at start): the toy's on the toy and tiny
backbones, else SD3.5's. The rollout and training forwards per iteration equal grpo.py's at the same number of
trajectories (and images) and trained steps (its --sde-window), so the two compare at the same generator forwards per
iteration; the k x (trained steps) reward calls are the extra cost (printed each iteration).
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
from model import SCORE_NORMALISATIONS, SDE_STEPS, children_log_prob, grpo_loss, load_pipeline, sd3_sigmas, sde_children
from model import seeded, velocity

# -----------------------------------------------------------------------------
# Presets: the values of the flags left at None, by backbone (DRM gives no sizes: grpo.py's)

PRESETS = {
    # SD3.5: grpo.py's flow-grpo sizes (Flow-GRPO's config/grpo.py pickscore_sd3): 1152 trajectories = its 48 prompts x
    # 24 images per iteration, 2 updates, lr 3e-4, LoRA r 32 alpha 64
    "flow-grpo": dict(iters=1000, trajectories=1152, updates=2, batch=8, resolution=512, eval_steps=40, eval_seeds=2,
                      heldout_seeds=2, lr=3e-4, lora_rank=32, lora_alpha=64, eval_interval=25, ckpt_interval=25),
    # the toy world's laptop sizing: grpo.py's toy images per iteration and lr before its defaults moved to a 2-step
    # window (48, 5e-3); 12 iterations, since an iteration adds the children's reward calls (measured: docs/log.md).
    # At grpo.py's present operating point (the docstring's out/step-grpo-eq) it gains no more (docs/results.md §6)
    "toy": dict(iters=12, trajectories=48, updates=1, batch=48, resolution=32, eval_steps=10, eval_seeds=4,
                heldout_seeds=12, lr=5e-3, lora_rank=8, lora_alpha=16, eval_interval=6, ckpt_interval=6),
}

PROMPT_ORDER = 0  # seeded(seed, iteration, PROMPT_ORDER): the iteration's prompt order
# (the child that carries trajectory i on after step j, --continue random: seeded(seed, iteration, i, j))

parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[0],
                                 epilog="presets:\n" + "\n".join(f"  {n}: {v}" for n, v in PRESETS.items()))
parser.add_argument("--backbone", default="toy", help="the generator: tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--reward", nargs="+", default=None, help="train_reward.py checkpoint(s) that score noisy latents "
                    "(default on the toy: out/reward-toy-dina)")
parser.add_argument("--reward-weight", nargs="+", type=float, default=None, help="weight of each reward (1)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS), help="of the latent "
                    "rewards: raw | plus10 | plus12 (both divide by 10: --std-floor is in the units chosen here)")
parser.add_argument("--prompts", default=None, help="training prompts, one per line (toy: out/toy/prompts_train.txt)")
parser.add_argument("--eval-prompts", default=None,
                    help="fixed evaluation prompts seen in training (toy: the training ones)")
parser.add_argument("--heldout-prompts", default=None,
                    help="fixed held-out evaluation prompts (toy: out/toy/prompts_heldout.txt)")
# Step-GRPO
parser.add_argument("--k", type=int, default=2,
                    help="children per trained step (DRM: better than Flow-GRPO from k = 2)")
parser.add_argument("--continue", dest="cont", default="random", help="random (on-policy, LPO) | best: the child that "
                    "carries the trajectory on")
parser.add_argument("--train-steps", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="START,END: the trained steps [START, END) (default: all but the last)")
parser.add_argument("--train-last", action="store_true", help="also train the last step (default END = steps - 1)")
parser.add_argument("--std-floor", type=float, default=0.05, help="advantages divide by max(std_k, floor)")
# None: the preset's value (PRESETS above)
parser.add_argument("--iters", type=int, default=None, help="iterations (grpo.py's 24 on the toy: --iters 24) (preset)")
parser.add_argument("--trajectories", type=int, default=None, help="rollouts per iteration over all ranks (grpo.py's "
                    "images per iteration) (preset)")
parser.add_argument("--updates", type=int, default=None, help="optimizer steps per iteration (preset)")
parser.add_argument("--batch", type=int, default=None, help="trajectories per forward on one rank (sampling and "
                    "training alike, so the first ratio is exactly 1) (preset)")
parser.add_argument("--resolution", type=int, default=None, help="image side (preset)")
parser.add_argument("--steps", type=int, default=10, help="sampling steps of the rollouts (Flow-GRPO: 10)")
parser.add_argument("--eval-steps", type=int, default=None, help="ODE steps of the evaluation samples (preset)")
parser.add_argument("--eval-seeds", type=int, default=None, help="images per evaluation prompt (fixed seeds) (preset)")
parser.add_argument("--heldout-seeds", type=int, default=None, help="images per held-out prompt (fixed seeds) (preset)")
parser.add_argument("--cfg", type=float, default=4.5, help="guidance in rollouts and training, 1 = off (Flow-GRPO)")
parser.add_argument("--eval-cfg", type=float, default=4.5, help="guidance of the evaluation samples")
parser.add_argument("--sde-type", default="sde", help="sde | cps")
parser.add_argument("--noise-level", type=float, default=0.7, help="SDE noise a (Flow-GRPO)")
parser.add_argument("--adv-clip", type=float, default=5.0)
parser.add_argument("--clip-range", type=float, default=1e-4, help="PPO ratio clip eps (Flow-GRPO)")
parser.add_argument("--beta", type=float, default=0.04, help="KL weight (Flow-GRPO GenEval)")
parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (as grpo.py) (preset)")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--lora-rank", type=int, default=None, help="rank of the policy's LoRA (preset)")
parser.add_argument("--lora-alpha", type=int, default=None, help="its alpha (preset)")
parser.add_argument("--ema", type=float, default=0.9, help="EMA decay of the LoRA weights for evaluation and export")
parser.add_argument("--out", default="out/step-grpo")
parser.add_argument("--eval-interval", type=int, default=None,
                    help="iterations between evaluations (0: first and last only) (preset)")
parser.add_argument("--ckpt-interval", type=int, default=None, help="iterations between checkpoints (preset)")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)


def resolve_args(args):
    """The preset's values (the toy's on toy and tiny, else SD3.5's) for the flags left at None (flags given on the
    command line win), checked -> (args, the preset's name, its keys)."""
    name = "toy" if args.backbone in ("toy", "tiny") else "flow-grpo"
    align.fill_preset(args, PRESETS[name])
    if args.k < 1:
        raise ValueError(f"--k {args.k}: the number of children per step must be >= 1")
    if args.cont not in ("random", "best") or args.sde_type not in SDE_STEPS:
        raise ValueError(f"--continue {args.cont} / --sde-type {args.sde_type}: choose random|best, "
                         f"{'|'.join(SDE_STEPS)}")
    lo, hi = args.train_steps or (0, args.steps if args.train_last else args.steps - 1)
    if not 0 <= lo < hi <= args.steps:
        raise ValueError(f"--train-steps {lo},{hi} is outside the {args.steps}-step schedule [0, {args.steps})")
    args.train_steps = (lo, hi)
    if args.sde_type == "cps" and hi == args.steps:
        raise ValueError("--train-last / --train-steps with --sde-type cps: CPS's last step has no noise (its children "
                         "are equal), so it has no log-probability to train")
    if args.backbone == "toy":
        args.reward = args.reward or ["out/reward-toy-dina"]
        args.prompts = args.prompts or "out/toy/prompts_train.txt"
        args.eval_prompts = args.eval_prompts or "out/toy/prompts_train.txt"
        args.heldout_prompts = args.heldout_prompts or "out/toy/prompts_heldout.txt"
    if not args.reward:
        raise ValueError("--reward is required: a train_reward.py checkpoint folder that scores noisy latents")
    args.reward_weight = args.reward_weight or [1.0] * len(args.reward)
    if len(args.reward_weight) != len(args.reward):
        raise ValueError(f"--reward-weight has {len(args.reward_weight)} values for {len(args.reward)} rewards")
    return args, name, list(PRESETS[name])


def step_advantages(r, std_floor=0.0, clip=5.0):
    """r (P, k) rewards of the k children of P parents -> (P, k) (r - mean_k) / max(std_k, floor), population std
    (+1e-4, as Flow-GRPO), clipped to +-clip."""
    std = r.std(1, unbiased=False, keepdim=True)
    return ((r - r.mean(1, keepdim=True)) / (std.clamp_min(std_floor) + 1e-4)).clamp(-clip, clip)


# -----------------------------------------------------------------------------
# Setup: the generator with its LoRA policy, the dense rewards, every prompt encoded once


class Run(NamedTuple):
    """What main sets up once (build)."""
    transformer: torch.nn.Module  # the generator's, the LoRA policy on it
    vae: torch.nn.Module  # decodes the evaluation images
    oracle: object  # align.Oracle: the toy's golden judge of the evaluation images; None elsewhere
    rewards: list  # align.load_rewards: latent rewards that score noisy latents
    table: dict  # {prompt: (prompt_embeds, pooled)}, every prompt encoded once
    train_prompts: list
    splits: dict  # {train, heldout: fixed evaluation prompts}
    shape: tuple  # the latent's (h, w)
    sigmas: torch.Tensor  # the rollouts' schedule
    eval_sigmas: torch.Tensor  # the evaluation's
    trained: list  # the trained steps
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
    rewards = align.load_rewards(args.reward, args.reward_weight, transformer, None, device,
                                 normalisation=args.score_normalisation)
    shift = pipe.scheduler.config.get("shift", 3.0)  # the generator's own schedule (SD3.5: 3)
    sigmas = sd3_sigmas(args.steps, shift)
    trained = list(range(*args.train_steps))
    align.check_dense(rewards, [float(sigmas[j + 1]) for j in trained])  # children of step j are at sigma_{j+1}
    text_len = rewards[0]["text_len"] or 77
    table = align.encode_prompt_table(pipe, train_prompts + [p for s in splits.values() for p in s], text_len, device)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # never called again
    shape = (args.resolution // pipe.vae_scale_factor,) * 2
    params = align.add_policy_lora(transformer, args.lora_rank, args.lora_alpha, seed=args.seed)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in params.items()}
    return Run(transformer, pipe.vae, oracle, rewards, table, train_prompts, splits, shape, sigmas,
               sd3_sigmas(args.eval_steps, shift), trained, align.embeds(table, [""], device), params, ema, opt, device)


# -----------------------------------------------------------------------------
# The phases of an iteration: rollout (with the dense rewards) -> advantages -> update; evaluate


class Rollouts(NamedTuple):
    """One iteration's trajectories on this rank, T trained steps, k children each."""
    mine: list  # this rank's trajectories: their indices in the global batch
    prompts: list  # the prompt of each
    parents: torch.Tensor  # (B, T, C, h, w): the states at the trained steps
    kids: torch.Tensor  # (B, T, k, C, h, w): their children
    old_lp: torch.Tensor  # (B, T, k): the children's log-probs under the sampling policy
    rewards: torch.Tensor  # (B, T, k): the children's rewards at their noise level
    reward_seconds: float  # the time spent in the reward calls


def rollout_batch(args, run, it, rows, prompts):
    """Trajectories `rows` (their global indices) from their seeded noise: at a trained step, k children of one forward,
    all scored in one reward call, one carries on; elsewhere a plain SDE step -> ((parents, kids, old_lp, rewards) of
    the trained steps, the seconds of the reward calls)."""
    step_fn, s, s1 = SDE_STEPS[args.sde_type], run.sigmas, float(run.sigmas[1])
    weights = torch.tensor(args.reward_weight, device=run.device)[:, None]
    gens = [seeded(args.seed, it, i) for i in rows]
    x = torch.stack([torch.randn(run.transformer.config.in_channels, *run.shape, generator=g) for g in gens])
    x = x.to(run.device)
    pe, pooled = align.embeds(run.table, prompts, run.device)
    rep = [p for p in prompts for _ in range(args.k)]  # child c of trajectory b is row b*k + c
    par, kid, lps, rs, t_reward = [], [], [], [], 0.0
    for j in range(args.steps):
        v = velocity(run.transformer, x, s[j], pe, pooled, args.cfg, run.neg)
        if j not in run.trained:  # a plain SDE step
            x = sde_children(step_fn, v, x, s[j], s[j + 1], args.noise_level, 1, gens, s1)[0][:, 0]
            continue
        ch, lp, _, _ = sde_children(step_fn, v, x, s[j], s[j + 1], args.noise_level, args.k, gens, s1)
        tr = time.time()
        r = (weights * align.score_noisy(run.rewards, ch.flatten(0, 1), float(s[j + 1]), rep, run.table)).sum(0)
        r = r.view(len(x), args.k).cpu()
        t_reward += time.time() - tr
        if args.cont == "best":
            pick = r.argmax(1)
        else:
            pick = torch.cat([torch.randint(args.k, (1,), generator=seeded(args.seed, it, i, j)) for i in rows])
        par.append(x)
        kid.append(ch)
        lps.append(lp)
        rs.append(r)
        x = ch[torch.arange(len(x)), pick.to(ch.device)]
    return (torch.stack(par, 1), torch.stack(kid, 1), torch.stack(lps, 1), torch.stack(rs, 1)), t_reward


def rollout(args, run, it, rank, n_local, autocast):
    """The iteration's prompts and this rank's trajectories, `--batch` at a time."""
    order = torch.randperm(len(run.train_prompts), generator=seeded(args.seed, it, PROMPT_ORDER)).tolist()
    mine = list(range(rank * n_local, (rank + 1) * n_local))
    prompts = [run.train_prompts[order[i % len(order)]] for i in mine]
    parts, t_reward = [], 0.0
    with torch.no_grad(), autocast:
        for c in range(0, n_local, args.batch):
            part, seconds = rollout_batch(args, run, it, mine[c:c + args.batch], prompts[c:c + args.batch])
            parts.append(part)
            t_reward += seconds
    parents, kids, old_lp, rewards = (torch.cat([p[m] for p in parts]) for m in range(4))
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero()[0, 0].item()
        raise FloatingPointError(f"iteration {it}: non-finite reward for prompt {prompts[bad]!r}")
    return Rollouts(mine, prompts, parents, kids, old_lp, rewards, t_reward)


def policy_loss(args, run, x, kids, j, pe, pooled, old_lp, adv, autocast):
    """The loss at trained step j of parents x (B,C,h,w): one forward gives the mean all k children share; each child's
    log-prob, clipped ratio, KL of the mean to the adapter-disabled reference's -> (loss, kl, ratio), each (B, k)."""
    step_fn, s, s1 = SDE_STEPS[args.sde_type], run.sigmas, float(run.sigmas[1])
    with autocast:
        v = velocity(run.transformer, x, s[j], pe, pooled, args.cfg, run.neg)
    mu, std = step_fn(v, x, s[j], s[j + 1], args.noise_level, x, sigma1=s1)[2:]
    lp = children_log_prob(kids, mu, std)
    mu_ref = None
    if args.beta > 0:
        with torch.no_grad(), autocast:
            run.transformer.disable_adapters()
            v_ref = velocity(run.transformer, x, s[j], pe, pooled, args.cfg, run.neg)
            run.transformer.enable_adapters()
        mu_ref = step_fn(v_ref, x, s[j], s[j + 1], args.noise_level, x, sigma1=s1)[2]
    return grpo_loss(lp, old_lp, adv, args.clip_range, mu, mu_ref, std, args.beta)


def update(args, run, ro, adv, it, ddp, autocast):
    """U optimizer steps, each on its share of this rank's trajectories at every trained step; the loss is the mean
    over the update's children, globally -> this rank's stats."""
    stats = dict(loss=0.0, kl=0.0, ratio_dev=0.0, clipfrac=0.0)
    per_update = len(ro.mine) // args.updates
    denom = args.trajectories // args.updates * len(run.trained) * args.k
    for u in range(args.updates):
        for c in range(u * per_update, (u + 1) * per_update, args.batch):
            rows = slice(c, min(c + args.batch, (u + 1) * per_update))
            pe, pooled = align.embeds(run.table, ro.prompts[rows], run.device)
            for jj, j in enumerate(run.trained):
                loss, kl, ratio = policy_loss(args, run, ro.parents[rows, jj], ro.kids[rows, jj], j, pe, pooled,
                                              ro.old_lp[rows, jj], adv[rows, jj], autocast)
                loss.sum().div(denom).backward()
                stats["loss"] += loss.sum().item() / denom
                stats["kl"] += kl.sum().item() / denom
                stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
                stats["clipfrac"] += ((ratio - 1).abs() > args.clip_range).float().sum().item() / denom
        align.optimizer_step(run.params, run.opt, run.ema, args.ema, args.grad_clip, ddp,
                             f"iteration {it} (prompts {ro.prompts[:3]}...)")
    return stats


def gather(args, ro, stats, world, ddp):
    """Over all ranks -> (stats, the mean reward of the last trained step's children (the closest to the final reward),
    the children's mean spread)."""
    r_final = ro.rewards[:, -1].mean(1)
    if not ddp:
        return stats, r_final.mean().item(), ro.rewards.std(2, unbiased=False).mean().item()
    parts = [None] * world
    mine = dict(stats, r=r_final.sum().item(), rspread=ro.rewards.std(2, unbiased=False).mean().item())
    dist.all_gather_object(parts, mine)
    stats = {k: max(s[k] for s in parts) if k == "ratio_dev" else sum(s[k] for s in parts) for k in stats}
    return stats, sum(s["r"] for s in parts) / args.trajectories, sum(s["rspread"] for s in parts) / world


def proxy(args, run, lat, prompts):
    """The evaluation's proxy: the final latents at the reward's t_eval, re-noised by the fixed stream
    align.PROXY_NOISE."""
    keys = [(args.seed, align.PROXY_NOISE, i) for i in range(len(lat))]
    weights = torch.tensor(args.reward_weight, device=run.device)[:, None]
    return (weights * align.score_rewards(run.rewards, lat, prompts, run.table, keys)).sum(0)


def main(args):
    args, recipe, keys = resolve_args(args)
    ddp, rank, world, device, autocast = align.setup_distributed()
    align.print_recipe(recipe, keys, args)
    if args.trajectories % (world * args.updates):
        raise ValueError(f"--trajectories {args.trajectories} do not divide over {world} rank(s) x "
                         f"--updates {args.updates}")
    n_local = args.trajectories // world
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
    align.print0(f"world {world}: {args.trajectories} trajectories per iteration, {n_local} per rank, "
                 f"k {args.k} children at steps {run.trained}; {n_lora / 1e6:.3f}M LoRA parameters")
    align.print0("before: " + align.describe_eval(history[0]))

    # ---------------------------------------------------------------------------- the loop
    after_images = None
    bar = tqdm(total=args.iters, initial=it, disable=rank != 0, desc="step-grpo")
    while it < args.iters:
        t0 = time.time()
        ro = rollout(args, run, it, rank, n_local, autocast)  # trajectories, children and the children's rewards
        adv = step_advantages(ro.rewards.flatten(0, 1), args.std_floor, args.adv_clip).view_as(ro.rewards).to(device)
        t1 = time.time()
        stats = update(args, run, ro, adv, it, ddp, autocast)  # U PPO-clipped optimizer steps
        stats, r_mean, r_spread = gather(args, ro, stats, world, ddp)
        it += 1
        t2 = time.time()
        t_sample = t1 - t0 - ro.reward_seconds
        rec = dict(iter=it, reward=r_mean, child_spread=r_spread, **stats,
                   seconds=dict(sampling=t_sample, reward=ro.reward_seconds, training=t2 - t1))
        if (args.eval_interval and it % args.eval_interval == 0) or it == args.iters:
            report, after_images = align.evaluate_ema(run, args, partial(proxy, args, run), autocast)
            history.append(dict(iter=it, **report))
            rec["eval"] = {s: {k: v for k, v in r.items() if k != "golden_all"} for s, r in report.items()}
            bar.write(f"iter {it}: " + align.describe_eval(history[-1]))
        if rank == 0:
            bar.write(f"iter {it} | reward {r_mean:.4f} | child spread {r_spread:.4f} | kl {stats['kl']:.3g} | "
                      f"s: sample {t_sample:.1f} reward {ro.reward_seconds:.2f} train {t2 - t1:.1f}")
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
