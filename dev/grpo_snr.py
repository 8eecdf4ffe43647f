"""
How much signal one Flow-GRPO iteration's gradient holds: the cosine between the policy gradients of independent
batches (same policy, fresh prompts and noise), and from it the number of images a gradient needs before its signal
equals its noise. If g_b = g + noise_b with E|noise_b|^2 = s^2 / n for batches of n images, then
E cos(g_1, g_2) ~ |g|^2 / (|g|^2 + s^2 / n), so n* = n (1 / cos - 1) images give signal = noise. It also prints each
trained step's share of the gradient's norm (late steps have a small SDE std, so 1/std weighs them up).

    python dev/grpo_snr.py                                      # the oracle and the latent reward, three schedules
    python dev/grpo_snr.py --reward oracle --batches 8

The gradient is grpo.py's (grpo_loss at ratio 1, group advantages, CFG 4.5, SDE noise 0.7) at the LoRA's
initialisation (B = 0: only the B matrices get a gradient), on the toy world after the quick start.
"""
import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import align  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import toy  # noqa: E402
from model import grpo_loss, load_pipeline, sample, sd3_sigmas, sde_step, seeded, velocity  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--reward", nargs="+", default=["oracle", "out/reward-toy-dina"])
parser.add_argument("--prompts", default="out/toy/prompts_train.txt")
parser.add_argument("--groups", type=int, default=6, help="prompts per batch (grpo.py's toy default)")
parser.add_argument("--group-size", type=int, default=8)
parser.add_argument("--batches", type=int, default=6, help="independent batches; cosines over all their pairs")
parser.add_argument("--cfg", type=float, default=4.5)
parser.add_argument("--noise-level", type=float, default=0.7)
parser.add_argument("--seed", type=int, default=5)
REWARD_NOISE = 7  # the rewards' re-noising stream of batch b: seeded(seed, b, image, REWARD_NOISE)
# name: (stochastic steps, trained steps) of the 10-step schedule
SCHEDULES = {"flow-grpo (SDE 0-9, train 0-8)": (list(range(10)), list(range(9))),
             "window 0-2 (ODE elsewhere)": ([0, 1, 2], [0, 1, 2]),
             "window 6-8 (ODE elsewhere)": ([6, 7, 8], [6, 7, 8])}


def batch_gradient(tr, vae, params, table, neg, sigmas, reward, prompts, b, args, sde, trained):
    """One batch's policy gradient (flattened LoRA grads, per trained step) and its rewards' within-group std."""
    n = args.groups * args.group_size
    order = torch.randperm(len(prompts), generator=seeded(args.seed, b, 0)).tolist()
    ps = [prompts[order[i // args.group_size % len(order)]] for i in range(n)]
    gens = [seeded(args.seed, b, i) for i in range(n)]
    side = tr.config.sample_size  # the latent's side
    z = torch.stack([torch.randn(tr.config.in_channels, side, side, generator=g) for g in gens])
    pe, pooled = align.embeds(table, ps)
    with torch.no_grad():
        out = sample(tr, z, sigmas, pe, pooled, args.cfg, neg, args.noise_level, sde, gens)
        r = align.score_rewards(reward, out["latents"], ps, table, [(args.seed, b, i, REWARD_NOISE) for i in range(n)],
                                lambda lat: align.decode_latents(vae, lat))
    groups = torch.arange(n) // args.group_size
    adv = grpo.advantages(r, groups, [1.0])
    per_step = []
    for j in trained:
        for p in params.values():
            p.grad = None
        x, x_next = out["trajectory"][:, j], out["trajectory"][:, j + 1]
        v = velocity(tr, x, sigmas[j], pe, pooled, args.cfg, neg)
        _, lp, _, _ = sde_step(v, x, sigmas[j], sigmas[j + 1], args.noise_level, x_next, sigma1=float(sigmas[1]))
        loss, _, _ = grpo_loss(lp, out["log_probs"][:, j], adv, 1e-4)
        loss.mean().backward()
        per_step.append(torch.cat([p.grad.flatten() for p in params.values()]))
    spread = torch.stack([r[0][groups == g].std(unbiased=False) for g in groups.unique()]).mean().item()
    return torch.stack(per_step), spread


def main(args):
    if args.batches < 3:
        raise ValueError(f"--batches {args.batches}: at least 3, for the spread of the pairs' cosines")
    pipe = load_pipeline("toy", None, 0)
    tr = pipe.transformer
    prompts = data.read_prompts(args.prompts)
    table = align.encode_prompt_table(pipe, prompts + [""], 8)
    neg = align.embeds(table, [""])
    params = align.add_policy_lora(tr, 8, 16)
    sigmas = sd3_sigmas(10, pipe.scheduler.config.get("shift", 3.0))
    n = args.groups * args.group_size
    for name in args.reward:
        reward = align.load_rewards([name], [1.0], tr, None, "cpu", align.Oracle(toy.toy_golden_score, toy.match_stats))
        for label, (sde, trained) in SCHEDULES.items():
            t0 = time.time()
            runs = [batch_gradient(tr, pipe.vae, params, table, neg, sigmas, reward, prompts, b, args, sde, trained)
                    for b in range(args.batches)]
            grads = [g.sum(0) for g, _ in runs]
            cos = torch.tensor([torch.nn.functional.cosine_similarity(grads[i], grads[j], 0).item()
                                for i, j in itertools.combinations(range(args.batches), 2)])
            c = cos.mean().item()
            n_star = f"{n * (1 / c - 1):,.0f}" if c > 0 else "no signal seen"
            share = torch.stack([g.norm(dim=1) for g, _ in runs]).mean(0)
            share = share / share.sum()
            spread = sum(s for _, s in runs) / len(runs)
            print(f"{name} | {label}: cos {c:+.4f} (pairs: min {cos.min():+.3f}, max {cos.max():+.3f}, "
                  f"SE {cos.std().item() / len(cos) ** 0.5:.4f}, pairs share batches) | images for signal = noise: {n_star} | "
                  f"within-group reward std {spread:.4f} | norm share of steps {trained}: "
                  f"{' '.join(f'{s:.2f}' for s in share.tolist())} | {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(parser.parse_args())
