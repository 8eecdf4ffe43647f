"""
Step-wise Sampling (DRM), training-free: at every denoising step one generator forward gives the mean of the SDE step,
k successors are drawn from that same mean, all k x B of them are scored in one call of the latent reward at their own
noise level (the reward was trained on noisy latents: no decode, no re-noising), and the best one carries on.
k = 1 is the plain SDE sampler with the same seed, bit for bit.

Toy world (after the quick start `python train_reward.py`):
    python sample_stepwise.py                        # k = 1, 2, 4 on the 39 training prompts, 18 seeds each
    python sample_stepwise.py --prompts out/toy/prompts_heldout.txt --out out/stepwise-heldout  # the 15 held-out combos
    python sample_stepwise.py --score x0hat --out out/stepwise-x0hat     # ablation: score the one-step prediction
    python sample_stepwise.py --prompt "a red circle on a blue background" --k 1 4
SD3.5-M with a reward trained here (DRM's setting: 512x512, 50 steps):
    python sample_stepwise.py --backbone sd35m --reward out/reward-sd35m-drm --prompts prompts.txt --k 1 2 4 6

In plain sight (main): for each k (and with --ode the ODE), sample every image (sample_all) -> judge the final latents
(the proxy reward, and on the toy the golden oracle) -> the FLOPs of one step -> the files (write_outputs).

Writes <out>/images/k<k>/<prompt>_<seed>.png (decoded once, at the end), <out>/grid.png (k = 1 above the largest k,
same prompts and seeds), <out>/table.md and <out>/results.json: per k, seconds per image, the proxy reward of the final
latents and of the VAE re-encodings of their decoded images (the same re-noising: a gain only on the latents is latent
hacking), on the toy the golden oracle (its paired gain over k = 1 with its standard error, and by weighted term) and
prompt-match rates, and the diversity (mean pairwise RMS pixel distance between the images of one prompt). With --ode
also a row "ode": the ODE sampler from the same starts.
The flags left alone take a preset's values (PRESETS below, printed at start): the toy's on the toy and tiny backbones,
else DRM's.

Notes: --select sample draws the successor from softmax(r / T) (seeded per image and step); --score x0hat re-scores
x0_hat = x - sigma v of each successor at the reward's t_eval (re-noised with seeded noise), which costs one more
generator forward over the k x B successors per step (an ablation, not DRM's method).
"""

import argparse
import json
import os
import time
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import align
import data
import toy
from model import SCORE_NORMALISATIONS, SDE_STEPS, load_pipeline, sample, sd3_sigmas, sde_children, seeded, velocity
from model import decode_latents, encode_images, to_tensor, x0_hat

# -----------------------------------------------------------------------------
# Presets: the values of the flags left at None, by backbone

PRESETS = {
    # DRM's Step-wise Sampling setting on SD3.5-M: 512x512, 50 steps, k = 1, 2, 4, 6
    "drm": dict(steps=50, resolution=512, seeds=4, k=(1, 2, 4, 6)),
    # the toy world's laptop sizing: its generator's 10 steps, 32 px; 18 seeds of the 39 training prompts and k up to 4
    # fit 5 minutes on 2 cores (without --ode's row) with a paired SE of about 0.0045 (docs/results.md §6)
    "toy": dict(steps=10, resolution=32, seeds=18, k=(1, 2, 4)),
}

parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[0],
                                 epilog="presets:\n" + "\n".join(f"  {n}: {v}" for n, v in PRESETS.items()))
parser.add_argument("--backbone", default="toy", help="the generator: tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--reward", nargs="+", default=None,
                    help="train_reward.py checkpoint(s) (toy: out/reward-toy-dina)")
parser.add_argument("--reward-weight", nargs="+", type=float, default=None, help="weight of each reward (1)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS), help="of the latent "
                    "rewards: raw | plus10 | plus12 (affine: the argmax, and so --select best, does not change)")
parser.add_argument("--prompts", default=None, help="prompts file, one per line (toy: out/toy/prompts_train.txt)")
parser.add_argument("--prompt", default=None, help="one prompt instead of a file")
parser.add_argument("--seeds", type=int, default=None, help="images per prompt, fixed seeds (preset)")
parser.add_argument("--k", nargs="+", type=int, default=None, help="successors per step (preset; DRM: 1, 2, 4, 6)")
parser.add_argument("--steps", type=int, default=None, help="denoising steps (preset)")
parser.add_argument("--steps-window", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="START,END: choose among k only at steps in [START, END) (default: every step)")
parser.add_argument("--resolution", type=int, default=None, help="image side (preset)")
parser.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance (1 = off)")
parser.add_argument("--sde-type", default="sde", help="sde (Flow-GRPO's) | cps")
parser.add_argument("--noise-level", type=float, default=0.7, help="SDE noise a (the plain sampler of k = 1)")
parser.add_argument("--select", default="best", help="best (argmax, DRM) | sample (softmax(r / T) draw)")
parser.add_argument("--temperature", type=float, default=1.0, help="T of --select sample")
parser.add_argument("--score", default="noisy", help="noisy (DRM: the successor at its noise level) | x0hat (ablation)")
parser.add_argument("--ode", action="store_true", help="also sample every image with the ODE (the row \"ode\": the "
                    "deterministic sampler's reference)")
parser.add_argument("--batch", type=int, default=64, help="images per generator forward (their k x B successors: one "
                    "reward call)")
parser.add_argument("--out", default="out/stepwise")
parser.add_argument("--seed", type=int, default=0)


def resolve_args(args):
    """The preset's values (the toy's on toy and tiny, else DRM's) for the flags left at None (flags given on the
    command line win), checked -> (args, the preset's name, its keys)."""
    name = "toy" if args.backbone in ("toy", "tiny") else "drm"
    align.fill_preset(args, PRESETS[name])
    if min(args.k) < 1:
        raise ValueError(f"--k {min(args.k)}: every k must be >= 1 (k = 1 is the plain SDE sampler)")
    if args.select not in ("best", "sample") or args.score not in ("noisy", "x0hat") or args.sde_type not in SDE_STEPS:
        raise ValueError(f"--select {args.select} / --score {args.score} / --sde-type {args.sde_type}: choose "
                         f"best|sample, noisy|x0hat, {'|'.join(SDE_STEPS)}")
    lo, hi = args.steps_window or (0, args.steps)
    if not 0 <= lo < hi <= args.steps:
        raise ValueError(f"--steps-window {lo},{hi} is outside the {args.steps}-step schedule [0, {args.steps})")
    args.steps_window = (lo, hi)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: at least one image per prompt")
    return args, name, list(PRESETS[name])


@torch.no_grad()
def stepwise_sample(transformer, z, sigmas, pe, pooled, score, k, cfg=1.0, negative=None, noise_level=0.7, window=None,
                    generators=None, sde_type="sde", select="best", temperature=1.0, keys=None):
    """Step-wise Sampling from initial noise z (B,C,H,W). At a step i in window: one generator forward, k successors of
    the same mean (model.sde_children; image b's noise from generators[b]), score(successors (B*k,C,H,W), i) -> (B*k,)
    rewards in one call, keep the argmax (or a softmax(r / T) draw, seeded by keys[b] and i). Elsewhere the plain step.
    -> (final latents (B,C,H,W), the kept successors' rewards (B, N), nan where nothing was chosen)."""
    step_fn, n = SDE_STEPS[sde_type], len(sigmas) - 1
    lo, hi = window or (0, n)
    x, kept = z.float(), torch.full((len(z), n), float("nan"))
    for i in range(n):
        v = velocity(transformer, x, sigmas[i], pe, pooled, cfg, negative)
        kk = k if lo <= i < hi else 1
        kids = sde_children(step_fn, v, x, sigmas[i], sigmas[i + 1], noise_level, kk, generators, float(sigmas[1]))[0]
        if kk == 1:
            x = kids[:, 0]
            continue
        r = score(kids.flatten(0, 1), i).view(len(x), kk).float().cpu()  # (B, k): all successors, one reward call
        if select == "best":
            choice = r.argmax(1)
        else:
            p = torch.softmax(r / temperature, 1)
            choice = torch.cat([torch.multinomial(p[b], 1, generator=seeded(*keys[b], i)) for b in range(len(x))])
        x = kids[torch.arange(len(x)), choice.to(kids.device)]
        kept[:, i] = r[torch.arange(len(x)), choice]
    return x, kept


def diversity(images, groups):
    """Mean pairwise RMS distance (pixels in [0, 1]) between the images of one prompt, averaged over prompts."""
    x = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    d = []
    for g in sorted(set(groups)):
        m = x[np.array(groups) == g]
        d += [np.sqrt(((m[a] - m[b]) ** 2).mean()) for a in range(len(m)) for b in range(a + 1, len(m))]
    return float(np.mean(d))


def flops(fn):
    """The FLOPs torch counts in one call of fn()."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# Setup, the successors' scores, sampling every image, judging the final latents


class Run(NamedTuple):
    """What main sets up once (build)."""
    transformer: torch.nn.Module  # the generator's
    vae: torch.nn.Module  # decodes the final latents
    oracle: object  # align.Oracle: the toy's golden judge of the images; None elsewhere
    rewards: list  # align.load_rewards: latent rewards
    weights: torch.Tensor  # (R, 1): each reward's weight
    table: dict  # {prompt: (prompt_embeds, pooled)}, every prompt encoded once
    prompts: list
    items: list  # every image: (prompt, its index, seed)
    shape: tuple  # the latent's (C, h, w)
    sigmas: torch.Tensor
    neg: tuple  # the empty prompt's embeddings: CFG's negative
    device: str


def build(args):
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        default = "out/toy/prompts_train.txt" if args.backbone == "toy" else None
        prompts = data.read_prompts(args.prompts or default)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = load_pipeline(args.backbone, args.backbone_path, args.seed, dtype=dtype).to(device)
    transformer = pipe.transformer.requires_grad_(False)
    paths = args.reward or (["out/reward-toy-dina"] if args.backbone == "toy" else None)
    if not paths:
        raise ValueError("--reward is required: a train_reward.py checkpoint folder")
    weights = args.reward_weight or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(f"--reward-weight has {len(weights)} values for {len(paths)} rewards")
    oracle = align.Oracle(toy.toy_golden_score, toy.match_stats) if args.backbone == "toy" else None
    rewards = align.load_rewards(paths, weights, transformer, None, device, normalisation=args.score_normalisation)
    sigmas = sd3_sigmas(args.steps, pipe.scheduler.config.get("shift", 3.0))
    lo, hi = args.steps_window
    if args.score == "noisy":
        align.check_dense(rewards, sigmas[lo + 1:hi + 1].tolist())
    table = align.encode_prompt_table(pipe, prompts, rewards[0]["text_len"] or 77, device)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # never called again
    side = args.resolution // pipe.vae_scale_factor
    items = [(p, i, s) for i, p in enumerate(prompts) for s in range(args.seeds)]
    return Run(transformer, pipe.vae, oracle, rewards, torch.tensor(weights, device=device)[:, None], table, prompts,
               items, (transformer.config.in_channels, side, side), sigmas, align.embeds(table, [""], device), device)


def successor_score(args, run, prompts, keys, k, kids, i):
    """The weighted rewards (B*k,) of the k successors of B images at step i (successor j of image b is row b*k + j):
    at their noise level (DRM), or --score x0hat: their one-step prediction re-noised with seeded noise."""
    rep = [p for p in prompts for _ in range(k)]
    t = float(run.sigmas[i + 1])
    if args.score == "noisy":
        return (run.weights * align.score_noisy(run.rewards, kids, t, rep, run.table)).sum(0)
    pe, pooled = align.embeds(run.table, rep, run.device)
    x0 = x0_hat(kids, t, velocity(run.transformer, kids, t, pe, pooled, args.cfg, run.neg)) if t > 0 else kids
    noise_keys = [(*key, i, j) for key in keys for j in range(k)]
    decode = partial(decode_latents, run.vae)
    return (run.weights * align.score_rewards(run.rewards, x0, rep, run.table, noise_keys, decode)).sum(0)


def sample_all(args, run, k):
    """Every image with the ODE (k = "ode") or Step-wise Sampling with k successors, --batch at a time; image (prompt i,
    seed s) starts from, and draws its SDE noise from, seeded(seed, s, i) -> (final latents (N,C,h,w), the kept
    successors' rewards (N, steps))."""
    lat, kept = [], []
    for c in range(0, len(run.items), args.batch):
        chunk = run.items[c:c + args.batch]
        prompts = [p for p, _, _ in chunk]
        keys = [(args.seed, s, i) for _, i, s in chunk]
        gens = [seeded(*key) for key in keys]  # initial noise, then the SDE draws: one generator per image
        z = torch.stack([torch.randn(run.shape, generator=g) for g in gens]).to(run.device)
        pe, pooled = align.embeds(run.table, prompts, run.device)
        if k == "ode":
            out = sample(run.transformer, z, run.sigmas, pe, pooled, args.cfg, run.neg)["latents"]
            r = torch.zeros(len(z), 0)
        else:
            score = partial(successor_score, args, run, prompts, keys, k)
            out, r = stepwise_sample(run.transformer, z, run.sigmas, pe, pooled, score, k, args.cfg, run.neg,
                                     args.noise_level, args.steps_window, gens, args.sde_type, args.select,
                                     args.temperature, keys)
        lat.append(out)
        kept.append(r)
    return torch.cat(lat), torch.cat(kept)


def judge(args, run, lat, kept):
    """The final latents (N,C,h,w): the proxy (the rewards at their t_eval, re-noised by the stream align.PROXY_NOISE)
    of the latents and, with the same noise, of the VAE re-encodings of their decoded images (a gain only in the first
    is latent hacking); the images' diversity, the kept rewards per step, on the toy the golden oracle's verdict with
    its terms (align.judge_images) -> (metrics, images)."""
    prompts = [p for p, _, _ in run.items]
    proxy, again, pil = [], [], []
    for c in range(0, len(lat), args.batch):
        chunk, names = lat[c:c + args.batch], prompts[c:c + args.batch]
        keys = [(args.seed, align.PROXY_NOISE, c + j) for j in range(len(chunk))]
        r = align.score_rewards(run.rewards, chunk, names, run.table, keys)
        proxy.append((run.weights * r).sum(0).cpu())
        decoded = decode_latents(run.vae, chunk)
        r = align.score_rewards(run.rewards, encode_images(run.vae, to_tensor(decoded)), names, run.table, keys)
        again.append((run.weights * r).sum(0).cpu())
        pil += decoded
    res = dict(proxy=torch.cat(proxy).mean().item(), proxy_reencoded=torch.cat(again).mean().item(),
               diversity=diversity(pil, [i for _, i, _ in run.items]))
    if kept.numel():
        res["kept_reward_per_step"] = kept.nanmean(0).tolist()
    if run.oracle:
        res.update(align.judge_images(run.oracle, pil, prompts))
    return res, pil


@torch.no_grad()
def main(args):
    args, recipe, keys = resolve_args(args)
    align.print_recipe(recipe, keys, args)
    run = build(args)

    # ---------------------------------------------------------------------------- sample every k (and the ODE), judge
    results, images = {}, {}
    for k in (["ode"] if args.ode else []) + list(args.k):
        t0 = time.time()
        lat, kept = sample_all(args, run, k)
        seconds = (time.time() - t0) / len(run.items)
        res, pil = judge(args, run, lat, kept)
        results[str(k)], images[str(k)] = dict(seconds_per_image=seconds, **res), pil
        print(f"k {k}: {seconds:.3f} s/image, proxy {res['proxy']:.4f} (re-encoded {res['proxy_reencoded']:.4f})" +
              (f", golden {res['golden']:.4f}" if run.oracle else ""), flush=True)

    # ---------------------------------------------------------------------------- FLOPs of one step, the files
    x1 = torch.zeros(1, *run.shape, device=run.device)
    pe1, pooled1 = align.embeds(run.table, run.prompts[:1], run.device)
    gen_flops = flops(lambda: velocity(run.transformer, x1, run.sigmas[1], pe1, pooled1, args.cfg, run.neg))
    rew_flops = flops(lambda: align.score_noisy(run.rewards, x1, float(run.sigmas[1]), run.prompts[:1], run.table))
    write_outputs(args, run.items, results, images, gen_flops, rew_flops, run.oracle)


def write_outputs(args, items, results, images, gen_flops, rew_flops, oracle):
    """<out>/images/k<k>/, grid.png, table.md (with each k's cost in FLOPs against k = 1) and results.json."""
    os.makedirs(args.out, exist_ok=True)
    for k, pil in images.items():
        os.makedirs(os.path.join(args.out, "images", f"k{k}"), exist_ok=True)
        for (p, i, s), im in zip(items, pil):
            im.save(os.path.join(args.out, "images", f"k{k}", f"{i:03d}_{p[:40].replace(' ', '_')}_{s}.png"))
    first = [j for j, (_, _, s) in enumerate(items) if s == 0][:12]  # seed 0 of the first prompts
    big = str(max(args.k))
    align.image_grid([[images["1" if "1" in images else str(min(args.k))][j] for j in first],
                      [images[big][j] for j in first]], labels=(f"k={min(args.k)}", f"k={big}")).save(
        os.path.join(args.out, "grid.png"))
    base = results.get("1")
    lines = ["| k | s / image | cost vs k=1 (FLOPs) | proxy | proxy re-encoded | golden | gain over k=1 (by term) | "
             "colour | shape | background | diversity |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        cost = ""  # a step of k successors: one generator forward and k reward forwards (k = 1: no reward call)
        if k != "ode":
            share = (args.steps_window[1] - args.steps_window[0]) / args.steps  # the steps that choose among k
            cost = f"{(gen_flops + (int(k) > 1) * int(k) * rew_flops * share) / gen_flops:.2f}x"
        gain = ""
        if oracle and base is not None:
            d = np.array(r["golden_all"]) - np.array(base["golden_all"])
            r["gain"], r["gain_se"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
            r["gain_terms"] = {t: v - base["terms"][t] for t, v in r["terms"].items()}
            terms = " ".join(f"{t} {v:+.4f}" for t, v in r["gain_terms"].items())
            gain = f"{r['gain']:+.4f} +- {r['gain_se']:.4f} ({terms})"
        g = (f"{r['golden']:.4f} | {gain} | {r['color']:.2f} | {r['shape']:.2f} | {r['background']:.2f}" if oracle
             else " | | | | ")
        lines.append(f"| {k} | {r['seconds_per_image']:.3f} | {cost} | {r['proxy']:.4f} | {r['proxy_reencoded']:.4f} | "
                     f"{g} | {r['diversity']:.4f} |")
    lines.append(f"\nFLOPs per image and step: generator forward {gen_flops / 1e6:.1f} M (CFG {args.cfg}), "
                 f"reward forward {rew_flops / 1e6:.1f} M per successor; {len(items)} images, {args.steps} steps, "
                 f"window {args.steps_window}, --select {args.select}, --score {args.score}, seed {args.seed}")
    open(os.path.join(args.out, "table.md"), "w").write("\n".join(lines) + "\n")
    summary = dict(args=vars(args), generator_flops=gen_flops, reward_flops=rew_flops,
                   results={k: {m: v for m, v in r.items() if m != "golden_all"} for k, r in results.items()})
    with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    print("\n".join(lines), flush=True)
    print(f"images {args.out}/images, grid {args.out}/grid.png, {args.out}/results.json", flush=True)


if __name__ == "__main__":
    main(parser.parse_args())
