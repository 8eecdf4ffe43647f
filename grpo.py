"""
Flow-GRPO (and Flow-GRPO-Fast) with the latent reward: the generator samples groups of images per prompt with an SDE
(so every step has a log-probability), a frozen latent reward model scores the final latents (no VAE decode, no text
encoding: it reads the generator's own latents and prompt embeddings), rewards are normalised within each group, and
the LoRA policy takes a PPO-clipped step on every trained denoising step, with a KL to the adapter-disabled reference.

Toy world (after the quick start `python train_reward.py`; about 9 minutes on 2 CPU cores):
    python grpo.py                                   # the latent reward out/reward-toy-dina
    python grpo.py --reward oracle --out out/grpo-oracle     # the ceiling: decode and score with the golden oracle
    python grpo.py --sde-window 2 --iters 56 --eval-interval 14 --out out/grpo-fast   # Flow-GRPO-Fast, same time
SD3.5-M with a DiNa-LRM reward trained here, 8 GPUs (Flow-GRPO's recipe; --recipe dina for DiNa-LRM's):
    torchrun --nproc_per_node=8 grpo.py --backbone sd35m --reward out/reward-sd35m-dina \
        --prompts prompts_train.txt --eval-prompts prompts_eval.txt --heldout-prompts prompts_heldout.txt --out out/grpo-sd35m

One iteration, in plain sight: G prompts x K images (spread over ranks, each image's noise seeded by (seed, iteration,
image), so results do not depend on the world size) -> SDE rollouts with old log-probs -> rewards (all-gathered) ->
advantages A = (r - mean_group) / (std_group + 1e-4) per reward, weighted, clipped -> U optimizer updates, each on
1/U of the images over all trained steps: loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta KL.

The toy's flags left alone take laptop values (DEFAULTS below); lr 5e-3 because the ceiling (--reward oracle)
gained +0.006 +- 0.004 at lr 1e-3 in 24 iterations. README: past 24 iterations the latent reward is hacked.

Deviations (honest notes): log-probs are the true Gaussian log-density (DESIGN.md 6), so --clip-range on CPS is not on
the scale of the released DiNa/Flow-GRPO CPS code; gradients are all-reduced by hand after each update's backward
passes (LoRA tensors are small) instead of DDP; the EMA is stepped after every optimizer step (Flow-GRPO: every 8).
DiNa's reward normalisation (raw + 12) / 10 is affine, so group advantages barely change (only the 1e-4 added to the
std); it is applied with --score-normalisation plus12, and not by default.
"""

import argparse
import json
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import align
import toy
from model import SCORE_NORMALISATIONS, SDE_STEPS, grpo_loss, load_pipeline, sample, sd3_sigmas, seeded, velocity

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--backbone", default="toy", help="the generator: tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--reward", nargs="+", default=None, help="train_reward.py checkpoint folder(s) or released DiNa-LRM "
                    "folders; 'oracle' on the toy (decode + golden oracle: the ceiling). Default: out/reward-toy-dina on the toy")
parser.add_argument("--reward-weight", nargs="+", type=float, default=None, help="weight of each reward's advantages (1)")
parser.add_argument("--reward-t", type=float, default=None,
                    help="noise level the reward reads (default: its checkpoint's t_eval)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS),
                    help="of the latent rewards: raw | plus10 = (raw + 10) / 10 | plus12 = (raw + 12) / 10 (DiNa-LRM's GRPO)")
parser.add_argument("--prompts", default=None, help="training prompts, one per line (toy: out/toy/prompts_train.txt)")
parser.add_argument("--eval-prompts", default=None,
                    help="fixed evaluation prompts seen in training (toy: the training prompts)")
parser.add_argument("--heldout-prompts", default=None,
                    help="fixed held-out evaluation prompts (toy: out/toy/prompts_heldout.txt)")
parser.add_argument("--recipe", default="flow-grpo", help="flow-grpo | dina: the defaults of the flags left alone")
# None = the recipe's value (help: Flow-GRPO SD3.5 / toy), filled in by resolve_args
parser.add_argument("--iters", type=int, default=None, help="iterations (sample, score, update): 1000 / 24")
parser.add_argument("--group-size", type=int, default=None, help="K images per prompt: 24 / 8")
parser.add_argument("--groups", type=int, default=None, help="prompts per iteration (over all ranks): 48 / 6")
parser.add_argument("--updates", type=int, default=None, help="optimizer steps per iteration, each on 1/U of the images: 2 / 1")
parser.add_argument("--batch", type=int, default=None, help="images per forward on one rank, sampling and training alike "
                    "(equal batches make the first importance ratio exactly 1): 8 / 48")
parser.add_argument("--resolution", type=int, default=None, help="image side: 512 (Flow-GRPO) / 32")
parser.add_argument("--steps", type=int, default=10, help="sampling steps of the rollouts (Flow-GRPO: 10)")
parser.add_argument("--eval-steps", type=int, default=None, help="ODE steps of the evaluation samples: 40 / 10")
parser.add_argument("--eval-seeds", type=int, default=None, help="images per evaluation prompt (fixed seeds): 2 / 4")
parser.add_argument("--heldout-seeds", type=int, default=None, help="images per held-out prompt: 2 / 12 (the toy has 15)")
parser.add_argument("--cfg", type=float, default=None, help="guidance in rollouts and training, 1 = off: 4.5 (dina: 1)")
parser.add_argument("--eval-cfg", type=float, default=4.5, help="guidance of the evaluation samples")
parser.add_argument("--sde-type", default=None, help="sde (Flow-GRPO) | cps (coefficients-preserving; dina)")
parser.add_argument("--noise-level", type=float, default=None, help="SDE noise a: 0.7 (cps: 0.8)")
parser.add_argument("--sde-window", type=int, default=None, help="Flow-GRPO-Fast: W stochastic, trained steps, ODE elsewhere; "
                    "0 = all steps (Flow-GRPO): 0 (dina: 3)")
parser.add_argument("--sde-window-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="START,END: the window's first step is drawn from [START, END) (default 0,steps-W+1; dina 0,5)")
parser.add_argument("--timestep-fraction", type=float, default=0.99, help="Flow-GRPO: share of the steps trained, from the "
                    "first: 0.99 trains 9 of 10 (the last is stochastic but untrained); Fast trains its whole window")
parser.add_argument("--adv-clip", type=float, default=5.0, help="advantages clipped to +-this")
parser.add_argument("--global-std", action="store_true", help="normalise by the std of the whole batch, not of the group")
parser.add_argument("--clip-range", type=float, default=None, help="PPO ratio clip eps: 1e-4 (dina 3e-6)")
parser.add_argument("--beta", type=float, default=None, help="KL weight: 0.04 (Flow-GRPO GenEval; dina 0.004)")
parser.add_argument("--lr", type=float, default=None, help="AdamW: 3e-4 (dina 5e-5) / toy 5e-3")
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--lora-rank", type=int, default=None, help="32 / 8")
parser.add_argument("--lora-alpha", type=int, default=None, help="64 / 16 (2 x rank)")
parser.add_argument("--ema", type=float, default=0.9,
                    help="EMA decay of the LoRA weights used for evaluation and export; 0 = off")
parser.add_argument("--out", default="out/grpo")
parser.add_argument("--eval-interval", type=int, default=None,
                    help="iterations between evaluations: 25 / 8 (0: first and last only)")
parser.add_argument("--ckpt-interval", type=int, default=None, help="iterations between checkpoints: 25 / 8")
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)

# (SD3.5, toy) values of the flags left at None. Flow-GRPO: config/grpo.py pickscore_sd3 (24 images per prompt, 48 groups
# per epoch, 2 updates), train.beta of its GenEval config; the toy's fit a 10-minute CPU run (README: measured)
DEFAULTS = dict(iters=(1000, 24), resolution=(512, 32), group_size=(24, 8), groups=(48, 6), updates=(2, 1), batch=(8, 48),
                eval_steps=(40, 10), eval_seeds=(2, 4), heldout_seeds=(2, 12), cfg=(4.5, 4.5), sde_type=("sde", "sde"),
                noise_level=(0.7, 0.7), sde_window=(0, 0), clip_range=(1e-4, 1e-4), beta=(0.04, 0.04), lr=(3e-4, 5e-3),
                lora_rank=(32, 8), lora_alpha=(64, 16), eval_interval=(25, 8), ckpt_interval=(25, 8))
# DiNa-LRM's GRPO recipe with its latent reward (Fast, CPS 0.8, a 3-step window starting in [0, 5), no CFG, groups of 18)
DINA = dict(sde_type="cps", noise_level=0.8, sde_window=3, sde_window_range=(0, 5), cfg=1.0, group_size=18,
            clip_range=3e-6, beta=0.004, lr=5e-5)


def resolve_args(args):
    if args.recipe not in ("flow-grpo", "dina"):
        raise ValueError(f"unknown --recipe {args.recipe!r}; choose flow-grpo or dina")
    small = args.backbone in ("toy", "tiny")
    for k, v in (DINA if args.recipe == "dina" else {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, (full, lap) in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, lap if small else full)
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
    w = args.sde_window or args.steps
    args.sde_window_range = args.sde_window_range or (0, args.steps - w + 1)
    lo, hi = args.sde_window_range
    if not (0 <= lo < hi and hi + w - 1 <= args.steps):
        raise ValueError(f"--sde-window-range {lo},{hi} with window {w} does not fit the {args.steps}-step schedule")
    return args


def schedule(args, it):
    """-> (stochastic steps, trained steps) of iteration `it`. Flow-GRPO: all steps stochastic, the first
    int(N x timestep fraction) trained (9 of 10: the last is stochastic but untrained). Fast: a window of W steps whose
    start is seeded by the iteration, all of it trained, ODE elsewhere."""
    if args.sde_window:
        start = torch.randint(*args.sde_window_range, (1,), generator=seeded(args.seed, it, 1)).item()
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


def main(args):
    args = resolve_args(args)
    ddp, rank, world, device, autocast = align.setup_distributed()
    n_img = args.groups * args.group_size
    if n_img % (world * args.updates):
        raise ValueError(f"--groups {args.groups} x --group-size {args.group_size} = {n_img} images do not divide over "
                         f"{world} rank(s) x --updates {args.updates}")
    n_local = n_img // world
    train_prompts = align.read_prompts(args.prompts, "--prompts")
    splits = {"train": align.read_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else train_prompts[:32]}
    if args.heldout_prompts:
        splits["heldout"] = align.read_prompts(args.heldout_prompts, "--heldout-prompts")

    # ---------------------------------------------------------------------------- generator, rewards, prompts once
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.backbone, args.backbone_path, args.seed, dtype=dtype).to(device)
    transformer, vae = pipe.transformer, pipe.vae
    oracle = align.Oracle(toy.toy_golden_score, toy.match_stats) if args.backbone == "toy" else None  # golden judge of decoded images
    rewards = align.load_rewards(args.reward, args.reward_weight, transformer, args.reward_t, device, oracle,
                                 args.score_normalisation)
    text_len = next((r["text_len"] for r in rewards if r["text_len"]), 8 if args.backbone in ("toy", "tiny") else 77)
    table = align.encode_prompt_table(pipe, train_prompts + [p for s in splits.values() for p in s], text_len, device)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # never called again
    shape = (args.resolution // pipe.vae_scale_factor,) * 2  # the latent's (h, w)
    params = align.add_policy_lora(transformer, args.lora_rank, args.lora_alpha, seed=args.seed)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    ema = {n: p.detach().clone() for n, p in params.items()}
    shift = pipe.scheduler.config.get("shift", 3.0)  # the generator's own schedule (SD3.5: 3)
    sigmas, eval_sigmas = sd3_sigmas(args.steps, shift), sd3_sigmas(args.eval_steps, shift)
    neg = align.embeds(table, [""], device)
    seeds = dict(train=args.eval_seeds, heldout=args.heldout_seeds)
    step_fn = SDE_STEPS[args.sde_type]

    decode = lambda lat: align.decode_latents(vae, lat)
    weights = torch.tensor(args.reward_weight)[:, None]

    def proxy(lat, prompts):  # the evaluation's proxy: the weighted sum of the raw rewards (fixed reward noise)
        keys = [(args.seed, 10 ** 9, i) for i in range(len(lat))]
        return (weights * align.score_rewards(rewards, lat, prompts, table, keys, decode).cpu()).sum(0)

    def evaluate():
        align.swap_weights(params, ema)
        with autocast:
            rep, imgs = align.evaluate_policy(transformer, table, splits, seeds, eval_sigmas, args.eval_cfg, proxy,
                                              shape, vae, oracle)
        align.swap_weights(params, ema)
        return rep, imgs

    # ---------------------------------------------------------------------------- resume, or the evaluation before
    it, history, ckpt_path, log_path = align.start_run(args.out, args.resume, params, ema, opt, evaluate, rank, device)
    align.print0(f"world {world}: {args.groups} prompts x {args.group_size} images = {n_img} per iteration, {n_local} per rank, "
                 f"{args.updates} update(s); {sum(p.numel() for p in params.values()) / 1e6:.3f}M LoRA parameters")
    align.print0("before: " + align.describe_eval(history[0]))

    # ---------------------------------------------------------------------------- the loop
    after_images = None
    bar = tqdm(total=args.iters, initial=it, disable=rank != 0, desc="grpo")
    while it < args.iters:
        t0 = time.time()
        order = torch.randperm(len(train_prompts), generator=seeded(args.seed, it, 0)).tolist()
        group_prompts = [train_prompts[order[g % len(order)]] for g in range(args.groups)]
        mine = list(range(rank * n_local, (rank + 1) * n_local))  # this rank's images of the global batch
        prompts = [group_prompts[i // args.group_size] for i in mine]
        sde, trained = schedule(args, it)
        # rollouts: initial and SDE noise from one generator per image
        traj, old_lp, lat = [], [], []
        with torch.no_grad(), autocast:
            for c in range(0, n_local, args.batch):
                gens = [seeded(args.seed, it, i) for i in mine[c:c + args.batch]]
                z = torch.stack([torch.randn(transformer.config.in_channels, *shape, generator=g) for g in gens]).to(device)
                pe, pooled = align.embeds(table, prompts[c:c + args.batch], device)
                out = sample(transformer, z, sigmas, pe, pooled, args.cfg, neg, args.noise_level, sde, gens, args.sde_type)
                traj.append(out["trajectory"])
                old_lp.append(out["log_probs"])
                lat.append(out["latents"])
        traj, old_lp, lat = torch.cat(traj), torch.cat(old_lp), torch.cat(lat)
        t1 = time.time()
        with torch.no_grad():
            with autocast:
                r_local = align.score_rewards(rewards, lat, prompts, table, [(args.seed, it, i, 7) for i in mine], decode).cpu()
        if ddp:
            parts = [torch.empty_like(r_local) for _ in range(world)]
            dist.all_gather(parts, r_local.contiguous())
            r_all = torch.cat(parts, 1)
        else:
            r_all = r_local
        if not torch.isfinite(r_all).all():
            bad = (~torch.isfinite(r_all)).nonzero()[0, 1].item()
            raise FloatingPointError(f"iteration {it}: non-finite reward for prompt {group_prompts[bad // args.group_size]!r}")
        adv_all = advantages(r_all, torch.arange(n_img) // args.group_size, args.reward_weight, args.global_std, args.adv_clip)
        adv = adv_all[mine].to(device)
        t2 = time.time()
        # training: U updates, each over its share of this rank's images and every trained step
        stats = dict(loss=0.0, kl=0.0, ratio_dev=0.0, clipfrac=0.0)
        per_update = n_local // args.updates
        denom = n_img // args.updates * len(trained)  # the loss is the mean over the update's global images and steps
        for u in range(args.updates):
            for c in range(u * per_update, (u + 1) * per_update, args.batch):
                rows = slice(c, min(c + args.batch, (u + 1) * per_update))
                pe, pooled = align.embeds(table, prompts[rows], device)
                for j in trained:
                    x, x_next = traj[rows, j], traj[rows, j + 1]
                    with autocast:
                        v = velocity(transformer, x, sigmas[j], pe, pooled, args.cfg, neg)
                    _, lp, mu, std = step_fn(v, x, sigmas[j], sigmas[j + 1], args.noise_level, x_next, sigma1=float(sigmas[1]))
                    mu_ref = None
                    if args.beta > 0:
                        with torch.no_grad(), autocast:
                            transformer.disable_adapters()
                            v_ref = velocity(transformer, x, sigmas[j], pe, pooled, args.cfg, neg)
                            transformer.enable_adapters()
                        mu_ref = step_fn(v_ref, x, sigmas[j], sigmas[j + 1], args.noise_level, x_next,
                                         sigma1=float(sigmas[1]))[2]
                    loss, kl, ratio = grpo_loss(lp, old_lp[rows, j], adv[rows], args.clip_range, mu, mu_ref, std, args.beta)
                    loss.sum().div(denom).backward()
                    stats["loss"] += loss.sum().item() / denom
                    stats["kl"] += kl.sum().item() / denom
                    stats["ratio_dev"] = max(stats["ratio_dev"], (ratio - 1).abs().max().item())
                    stats["clipfrac"] += ((ratio - 1).abs() > args.clip_range).float().sum().item() / denom
            align.optimizer_step(params, opt, ema, args.ema, args.grad_clip, ddp, f"iteration {it} (prompts {group_prompts[:3]}...)")
        if ddp:
            parts = [None] * world
            dist.all_gather_object(parts, stats)
            stats = {k: max(s[k] for s in parts) if k == "ratio_dev" else sum(s[k] for s in parts) for k in stats}
        it += 1
        t3 = time.time()
        rec = dict(iter=it, reward=r_all.mean(1).tolist(), reward_std=r_all.std(1).tolist(), **stats,
                   sde_steps=sde, seconds=dict(sampling=t1 - t0, reward=t2 - t1, training=t3 - t2))
        if (args.eval_interval and it % args.eval_interval == 0) or it == args.iters:
            rep, after_images = evaluate()
            history.append(dict(iter=it, **rep))
            rec["eval"] = {s: {k: v for k, v in r.items() if k != "golden_all"} for s, r in rep.items()}
            bar.write(f"iter {it}: " + align.describe_eval(history[-1]))
        if rank == 0:
            bar.write(f"iter {it} | reward {rec['reward'][0]:.4f} | kl {stats['kl']:.3g} | clipfrac {stats['clipfrac']:.3f} | "
                      f"s: sample {t1 - t0:.1f} reward {t2 - t1:.2f} train {t3 - t2:.1f}")
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
