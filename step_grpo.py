"""
Step-GRPO (DRM) with the latent reward: dense credit per denoising step instead of one terminal reward broadcast over the
trajectory. At every trained step of a rollout, one generator forward gives the SDE mean, k children are drawn from it,
each is scored by the latent reward at its own noise level (DRM trains its reward on noisy latents: no re-noising, no
decode), the advantages are normalised within those k, and one child carries the trajectory on. Training takes a
PPO-clipped step on every child's log-probability; the k children of a parent share one generator forward.

Toy world (after the quick start `python train_reward.py`; about 7.5 minutes on 2 CPU cores):
    python step_grpo.py                              # k = 2, 12 iterations, the latent reward out/reward-toy-dina
    python step_grpo.py --iters 24 --eval-interval 8 --out out/step-grpo-24   # grpo.py's 24 iterations, its forwards
    python step_grpo.py --k 4 --iters 24 --eval-interval 8 --out out/step-grpo-k4
    python step_grpo.py --continue best --out out/step-grpo-best
    python scripts/compare_step_grpo.py out/grpo out/step-grpo-24 out/step-grpo-k4    # golden vs steps and wall time
SD3.5-M with a DRM reward trained here, 8 GPUs:
    torchrun --nproc_per_node=8 step_grpo.py --backbone sd35m --reward out/reward-sd35m-drm \
        --prompts prompts_train.txt --eval-prompts prompts_eval.txt --heldout-prompts prompts_heldout.txt --out out/step-grpo

What DRM leaves open, and our defaults (DESIGN.md section 10):
    --continue random  the child that carries the trajectory on is drawn uniformly (as LPO): the states stay samples of
                       the policy's own SDE, so later steps train on-policy; `best` follows the reward (greedy).
    --train-steps      all steps but the last (Flow-GRPO's 9 of 10: the last step's noise is tiny, so its log-probs are
                       sharp and its children nearly equal); --train-last adds it.
    --std-floor 0.05   advantages (R - mean_k R) / max(std_k R, floor): with k = 2 the normalised advantages are always
                       +-1 however small the difference, and at high noise the reward's differences between children
                       are mostly its own noise; the floor keeps near-equal children (the last steps, where the
                       noise is small) from getting +-1. On the toy the children's spread is about 0.4 (log.jsonl,
                       child_spread), so 0.05 binds only there.
    KL, clip, lr, LoRA as grpo.py (Flow-GRPO's recipe; the toy's laptop values).
The rollout and training forwards per iteration equal grpo.py's at the same number of trajectories (and images): 48 on
the toy, so the two compare at the same generator forwards per iteration; the k x (trained steps) reward calls are the
extra cost (printed each iteration).
"""

import argparse
import json
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import align
import toy
from model import SCORE_NORMALISATIONS, SDE_STEPS, children_log_prob, grpo_loss, load_pipeline, sd3_sigmas, sde_children
from model import seeded, velocity

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--backbone", default="toy", help="the generator: tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--reward", nargs="+", default=None, help="train_reward.py checkpoint(s) that score noisy latents "
                    "(default on the toy: out/reward-toy-dina)")
parser.add_argument("--reward-weight", nargs="+", type=float, default=None, help="weight of each reward (1)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS), help="of the latent "
                    "rewards: raw | plus10 | plus12 (both divide by 10: --std-floor is in the units chosen here)")
parser.add_argument("--prompts", default=None, help="training prompts, one per line (toy: out/toy/prompts_train.txt)")
parser.add_argument("--eval-prompts", default=None, help="fixed evaluation prompts seen in training (toy: the training ones)")
parser.add_argument("--heldout-prompts", default=None, help="fixed held-out evaluation prompts (toy: out/toy/prompts_heldout.txt)")
# Step-GRPO
parser.add_argument("--k", type=int, default=2, help="children per trained step (DRM: better than Flow-GRPO from k = 2)")
parser.add_argument("--continue", dest="cont", default="random", help="random (on-policy, LPO) | best: the child that "
                    "carries the trajectory on")
parser.add_argument("--train-steps", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="START,END: the trained steps [START, END) (default: all but the last)")
parser.add_argument("--train-last", action="store_true", help="also train the last step (default END = steps - 1)")
parser.add_argument("--std-floor", type=float, default=0.05, help="advantages divide by max(std_k, floor)")
# None = (SD3.5, toy) from DEFAULTS, as grpo.py
parser.add_argument("--iters", type=int, default=None, help="iterations: 1000 / 12 (toy: within 10 minutes, an iteration "
                    "costs 1.4x grpo.py's; grpo.py's 24: --iters 24)")
parser.add_argument("--trajectories", type=int, default=None, help="rollouts per iteration over all ranks: 1152 / 48 "
                    "(grpo.py's images per iteration)")
parser.add_argument("--updates", type=int, default=None, help="optimizer steps per iteration: 2 / 1")
parser.add_argument("--batch", type=int, default=None, help="trajectories per forward on one rank (sampling and training "
                    "alike, so the first ratio is exactly 1): 8 / 48")
parser.add_argument("--resolution", type=int, default=None, help="image side: 512 / 32")
parser.add_argument("--steps", type=int, default=10, help="sampling steps of the rollouts (Flow-GRPO: 10)")
parser.add_argument("--eval-steps", type=int, default=None, help="ODE steps of the evaluation samples: 40 / 10")
parser.add_argument("--eval-seeds", type=int, default=None, help="images per evaluation prompt: 2 / 4")
parser.add_argument("--heldout-seeds", type=int, default=None, help="images per held-out prompt: 2 / 12")
parser.add_argument("--cfg", type=float, default=4.5, help="guidance in rollouts and training, 1 = off")
parser.add_argument("--eval-cfg", type=float, default=4.5, help="guidance of the evaluation samples")
parser.add_argument("--sde-type", default="sde", help="sde | cps")
parser.add_argument("--noise-level", type=float, default=0.7, help="SDE noise a")
parser.add_argument("--adv-clip", type=float, default=5.0)
parser.add_argument("--clip-range", type=float, default=1e-4, help="PPO ratio clip eps (Flow-GRPO)")
parser.add_argument("--beta", type=float, default=0.04, help="KL weight (Flow-GRPO GenEval)")
parser.add_argument("--lr", type=float, default=None, help="AdamW: 3e-4 / toy 5e-3 (as grpo.py)")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--lora-rank", type=int, default=None, help="32 / 8")
parser.add_argument("--lora-alpha", type=int, default=None, help="64 / 16")
parser.add_argument("--ema", type=float, default=0.9, help="EMA decay of the LoRA weights for evaluation and export")
parser.add_argument("--out", default="out/step-grpo")
parser.add_argument("--eval-interval", type=int, default=None, help="iterations between evaluations: 25 / 6")
parser.add_argument("--ckpt-interval", type=int, default=None, help="iterations between checkpoints: 25 / 6")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)

DEFAULTS = dict(iters=(1000, 12), trajectories=(1152, 48), updates=(2, 1), batch=(8, 48), resolution=(512, 32),
                eval_steps=(40, 10), eval_seeds=(2, 4), heldout_seeds=(2, 12), lr=(3e-4, 5e-3), lora_rank=(32, 8),
                lora_alpha=(64, 16), eval_interval=(25, 6), ckpt_interval=(25, 6))


def resolve_args(args):
    small = args.backbone in ("toy", "tiny")
    for k, (full, lap) in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, lap if small else full)
    if args.k < 1:
        raise ValueError(f"--k {args.k}: the number of children per step must be >= 1")
    if args.cont not in ("random", "best") or args.sde_type not in SDE_STEPS:
        raise ValueError(f"--continue {args.cont} / --sde-type {args.sde_type}: choose random|best, {'|'.join(SDE_STEPS)}")
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
    return args


def step_advantages(r, std_floor=0.0, clip=5.0):
    """r (P, k) rewards of the k children of P parents -> (P, k) (r - mean_k) / max(std_k, floor), population std
    (+1e-4, as Flow-GRPO), clipped to +-clip."""
    std = r.std(1, unbiased=False, keepdim=True)
    return ((r - r.mean(1, keepdim=True)) / (std.clamp_min(std_floor) + 1e-4)).clamp(-clip, clip)


def main(args):
    args = resolve_args(args)
    ddp, rank, world, device, autocast = align.setup_distributed()
    if args.trajectories % (world * args.updates):
        raise ValueError(f"--trajectories {args.trajectories} do not divide over {world} rank(s) x --updates {args.updates}")
    n_local = args.trajectories // world
    train_prompts = align.read_prompts(args.prompts, "--prompts")
    splits = {"train": align.read_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else train_prompts[:32]}
    if args.heldout_prompts:
        splits["heldout"] = align.read_prompts(args.heldout_prompts, "--heldout-prompts")

    # ---------------------------------------------------------------------------- generator, rewards, prompts once
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.backbone, args.backbone_path, args.seed, dtype=dtype).to(device)
    transformer, vae = pipe.transformer, pipe.vae
    oracle = align.Oracle(toy.toy_golden_score, toy.match_stats) if args.backbone == "toy" else None  # golden judge of decoded images
    rewards = align.load_rewards(args.reward, args.reward_weight, transformer, None, device,
                                 normalisation=args.score_normalisation)
    shift = pipe.scheduler.config.get("shift", 3.0)
    sigmas, eval_sigmas = sd3_sigmas(args.steps, shift), sd3_sigmas(args.eval_steps, shift)
    trained = list(range(*args.train_steps))
    align.check_dense(rewards, [float(sigmas[j + 1]) for j in trained])  # children of step j are at sigma_{j+1}
    text_len = rewards[0]["text_len"] or 77
    table = align.encode_prompt_table(pipe, train_prompts + [p for s in splits.values() for p in s], text_len, device)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # never called again
    shape = (args.resolution // pipe.vae_scale_factor,) * 2
    params = align.add_policy_lora(transformer, args.lora_rank, args.lora_alpha, seed=args.seed)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in params.items()}
    neg = align.embeds(table, [""], device)
    step_fn, s1 = SDE_STEPS[args.sde_type], float(sigmas[1])
    weights = torch.tensor(args.reward_weight, device=device)[:, None]
    seeds = dict(train=args.eval_seeds, heldout=args.heldout_seeds)

    def proxy(lat, prompts):  # the evaluation's proxy: the final latents at the reward's t_eval (fixed reward noise)
        keys = [(args.seed, 10 ** 9, i) for i in range(len(lat))]
        return (weights * align.score_rewards(rewards, lat, prompts, table, keys)).sum(0)

    def evaluate():
        align.swap_weights(params, ema)
        with autocast:
            rep, imgs = align.evaluate_policy(transformer, table, splits, seeds, eval_sigmas, args.eval_cfg, proxy,
                                              shape, vae, oracle)
        align.swap_weights(params, ema)
        return rep, imgs

    it, history, ckpt_path, log_path = align.start_run(args.out, args.resume, params, ema, opt, evaluate, rank, device)
    align.print0(f"world {world}: {args.trajectories} trajectories per iteration, {n_local} per rank, k {args.k} children at "
                 f"steps {trained}; {sum(p.numel() for p in params.values()) / 1e6:.3f}M LoRA parameters")
    align.print0("before: " + align.describe_eval(history[0]))

    # ---------------------------------------------------------------------------- the loop
    after_images = None
    bar = tqdm(total=args.iters, initial=it, disable=rank != 0, desc="step-grpo")
    while it < args.iters:
        t0 = time.time()
        order = torch.randperm(len(train_prompts), generator=seeded(args.seed, it, 0)).tolist()
        mine = list(range(rank * n_local, (rank + 1) * n_local))  # this rank's trajectories of the global batch
        prompts = [train_prompts[order[i % len(order)]] for i in mine]
        # rollouts: at a trained step, k children of one forward, all scored in one reward call, one carries on
        parents, kids, old_lp, r_kids, t_reward = [], [], [], [], 0.0
        with torch.no_grad(), autocast:
            for c in range(0, n_local, args.batch):
                gens = [seeded(args.seed, it, i) for i in mine[c:c + args.batch]]
                x = torch.stack([torch.randn(transformer.config.in_channels, *shape, generator=g) for g in gens]).to(device)
                pe, pooled = align.embeds(table, prompts[c:c + args.batch], device)
                rep = [p for p in prompts[c:c + args.batch] for _ in range(args.k)]
                par, kid, lps, rs = [], [], [], []
                for j in range(args.steps):
                    v = velocity(transformer, x, sigmas[j], pe, pooled, args.cfg, neg)
                    if j not in trained:  # a plain SDE step
                        x = sde_children(step_fn, v, x, sigmas[j], sigmas[j + 1], args.noise_level, 1, gens, s1)[0][:, 0]
                        continue
                    ch, lp, _, _ = sde_children(step_fn, v, x, sigmas[j], sigmas[j + 1], args.noise_level, args.k, gens, s1)
                    tr = time.time()
                    r = (weights * align.score_noisy(rewards, ch.flatten(0, 1), float(sigmas[j + 1]), rep, table)).sum(0)
                    r = r.view(len(x), args.k).cpu()
                    t_reward += time.time() - tr
                    if args.cont == "best":
                        pick = r.argmax(1)
                    else:
                        pick = torch.cat([torch.randint(args.k, (1,), generator=seeded(args.seed, it, i, j))
                                          for i in mine[c:c + args.batch]])
                    par.append(x)
                    kid.append(ch)
                    lps.append(lp)
                    rs.append(r)
                    x = ch[torch.arange(len(x)), pick.to(ch.device)]
                parents.append(torch.stack(par, 1))  # (B, T, C, H, W): the states at the T trained steps
                kids.append(torch.stack(kid, 1))  # (B, T, k, C, H, W)
                old_lp.append(torch.stack(lps, 1))  # (B, T, k)
                r_kids.append(torch.stack(rs, 1))  # (B, T, k)
        parents, kids, old_lp, r_kids = torch.cat(parents), torch.cat(kids), torch.cat(old_lp), torch.cat(r_kids)
        if not torch.isfinite(r_kids).all():
            bad = (~torch.isfinite(r_kids)).nonzero()[0, 0].item()
            raise FloatingPointError(f"iteration {it}: non-finite reward for prompt {prompts[bad]!r}")
        adv = step_advantages(r_kids.flatten(0, 1), args.std_floor, args.adv_clip).view_as(r_kids).to(device)
        t1 = time.time()
        # training: one forward per parent (its k children share the mean), PPO-clipped on each child's log-prob
        stats = dict(loss=0.0, kl=0.0, ratio_dev=0.0, clipfrac=0.0)
        per_update = n_local // args.updates
        denom = args.trajectories // args.updates * len(trained) * args.k  # mean over the update's children, globally
        for u in range(args.updates):
            for c in range(u * per_update, (u + 1) * per_update, args.batch):
                rows = slice(c, min(c + args.batch, (u + 1) * per_update))
                pe, pooled = align.embeds(table, prompts[rows], device)
                for jj, j in enumerate(trained):
                    x = parents[rows, jj]
                    with autocast:
                        v = velocity(transformer, x, sigmas[j], pe, pooled, args.cfg, neg)
                    mu, std = step_fn(v, x, sigmas[j], sigmas[j + 1], args.noise_level, x, sigma1=s1)[2:]
                    lp = children_log_prob(kids[rows, jj], mu, std)
                    mu_ref = None
                    if args.beta > 0:
                        with torch.no_grad(), autocast:
                            transformer.disable_adapters()
                            v_ref = velocity(transformer, x, sigmas[j], pe, pooled, args.cfg, neg)
                            transformer.enable_adapters()
                        mu_ref = step_fn(v_ref, x, sigmas[j], sigmas[j + 1], args.noise_level, x, sigma1=s1)[2]
                    loss, kl, ratio = grpo_loss(lp, old_lp[rows, jj], adv[rows, jj], args.clip_range, mu, mu_ref, std,
                                                args.beta)
                    loss.sum().div(denom).backward()
                    stats["loss"] += loss.sum().item() / denom
                    stats["kl"] += kl.sum().item() / denom
                    stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
                    stats["clipfrac"] += ((ratio - 1).abs() > args.clip_range).float().sum().item() / denom
            align.optimizer_step(params, opt, ema, args.ema, args.grad_clip, ddp, f"iteration {it} (prompts {prompts[:3]}...)")
        r_final = r_kids[:, -1].mean(1)  # the last trained step's children: the closest to the final reward
        if ddp:
            parts = [None] * world
            dist.all_gather_object(parts, dict(stats, r=r_final.sum().item(), rspread=r_kids.std(2, unbiased=False).mean().item()))
            stats = {k: max(s[k] for s in parts) if k == "ratio_dev" else sum(s[k] for s in parts) for k in stats}
            r_mean = sum(s["r"] for s in parts) / args.trajectories
            r_spread = sum(s["rspread"] for s in parts) / world
        else:
            r_mean, r_spread = r_final.mean().item(), r_kids.std(2, unbiased=False).mean().item()
        it += 1
        t2 = time.time()
        rec = dict(iter=it, reward=r_mean, child_spread=r_spread, **stats,
                   seconds=dict(sampling=t1 - t0 - t_reward, reward=t_reward, training=t2 - t1))
        if (args.eval_interval and it % args.eval_interval == 0) or it == args.iters:
            rep, after_images = evaluate()
            history.append(dict(iter=it, **rep))
            rec["eval"] = {s: {k: v for k, v in r.items() if k != "golden_all"} for s, r in rep.items()}
            bar.write(f"iter {it}: " + align.describe_eval(history[-1]))
        if rank == 0:
            bar.write(f"iter {it} | reward {r_mean:.4f} | child spread {r_spread:.4f} | kl {stats['kl']:.3g} | "
                      f"s: sample {t1 - t0 - t_reward:.1f} reward {t_reward:.2f} train {t2 - t1:.1f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if it % args.ckpt_interval == 0 or it == args.iters:
                meta = dict(args=vars(args), iteration=it, history=history, world_size=world)
                align.save_policy_state(ckpt_path, params, ema, opt, meta)
        bar.update(1)
    bar.close()
    if rank == 0:
        align.finish(args.out, history, after_images, params, ema, transformer, "iterations")
    if ddp:
        dist.barrier()  # a normal exit after a barrier (destroy_process_group can abort under gloo)


if __name__ == "__main__":
    main(parser.parse_args())
