"""
How much signal is in one Flow-GRPO update? Draws grpo.py's rollouts of a few iterations (its flags, its seeds) for the
base policy, scores them, splits each group's images into two halves (the same prompts in both) and takes the policy
gradient of each half on its own (the gradient grpo.py's update would take, with no optimizer step). The cosine of the two halves' gradients
estimates the update's signal-to-noise: with per-image gradients of mean m and noise s, a half of n images has
cos = |m|^2 / (|m|^2 + s^2 / n), so the images per update at which the signal equals the noise is
n* = n (1 - cos) / cos. An update of fewer images than n* moves the policy mostly at random, whatever the lr.

    python dev/grpo_snr.py --reward oracle --groups 12          # toy world, after the quick start
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import grpo  # noqa: E402
from align import embeds, setup_distributed  # noqa: E402

grpo.parser.add_argument("--probe-iters", type=int, default=3, help="iterations drawn (each split in two halves)")


def half_gradient(args, run, ro, adv, rows, autocast):
    """The policy gradient of the images `rows` of one iteration's rollouts, over every trained step -> flat tensor."""
    for p in run.params.values():
        p.grad = None
    denom = len(rows) * len(ro.trained)
    for c in range(0, len(rows), args.batch):
        r = rows[c:c + args.batch]
        pe, pooled = embeds(run.table, [ro.prompts[i] for i in r], run.device)
        for j in ro.trained:
            loss, _, _ = grpo.policy_loss(args, run, ro.traj[r, j], ro.traj[r, j + 1], j, pe, pooled,
                                          ro.old_lp[r, j], adv[r], autocast)
            loss.sum().div(denom).backward()
    return torch.cat([p.grad.flatten() for p in run.params.values()])


def main(args):
    args, _, _ = grpo.resolve_args(args)
    ddp, rank, world, device, autocast = setup_distributed()
    run = grpo.build(args, device)
    n = args.groups * args.group_size
    k = args.group_size // 2
    half = [i for i in range(n) if i % args.group_size < k]  # the first k images of every group
    other = [i for i in range(n) if i % args.group_size >= k]  # the rest: the same prompts, other noise
    cosines, grads = [], []
    for it in range(args.probe_iters):
        ro = grpo.rollout(args, run, it, 0, n, autocast)
        r_all, adv = grpo.score(args, run, ro, it, 1, False, autocast)
        g1 = half_gradient(args, run, ro, adv, torch.tensor(half), autocast)
        g2 = half_gradient(args, run, ro, adv, torch.tensor(other), autocast)
        cos = torch.nn.functional.cosine_similarity(g1, g2, dim=0).item()
        cosines.append(cos)
        grads.append(g1 + g2)
        spread = r_all[0].view(-1, args.group_size).std(1, unbiased=False).mean()  # the first reward's, per group
        print(f"iteration {it}: reward {r_all.mean():.4f} (std within groups {spread:.4f}); halves of "
              f"{len(half)} images: cos {cos:+.4f}, |g| {g1.norm():.3g} / {g2.norm():.3g}", flush=True)
    across = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(grads, grads[1:])]
    c = float(np.mean(cosines))
    star = len(half) * (1 - c) / c if c > 0 else float("inf")
    print(f"mean cos of halves {c:+.4f} +- {np.std(cosines, ddof=1) / np.sqrt(len(cosines)):.4f} "
          f"({len(cosines)} iterations); of whole iterations' gradients {np.mean(across):+.4f}; "
          f"images per update for signal = noise: {star:.0f} (this update: {n})")


if __name__ == "__main__":
    main(grpo.parser.parse_args())
