"""
Does the latent reward rank one prompt's own samples as the oracle does? GRPO sees nothing else: its advantages are
the reward's order within a group. Draws grpo.py's rollouts of the base policy (its flags, its seeds), scores them with
the reward as grpo.py reads it, decodes them for the oracle, and prints per reward the Spearman correlation, within each
group, of the reward with the golden score and with each of its weighted terms (colour, shape, background, quality),
averaged over groups (+- the standard error over groups; a group whose term is constant is left out).

    python dev/within_prompt_rank.py --same-noise --sde-window 2 --sde-window-range 0,1 --groups 39 --group-size 16
    python dev/within_prompt_rank.py --reward out/reward-96 ...    # another reward on the same rollouts
    python dev/within_prompt_rank.py --policy out/grpo ...          # the rollouts of a run's policy (EMA weights)
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import grpo  # noqa: E402
import toy  # noqa: E402
from align import load_state, setup_distributed, swap_weights  # noqa: E402
from model import decode_latents  # noqa: E402

grpo.parser.add_argument("--probe-iters", type=int, default=2, help="iterations drawn (each: --groups x --group-size)")
grpo.parser.add_argument("--policy", default=None, help="a grpo.py run folder: draw its policy's rollouts (its EMA "
                         "weights, the policy it exports) instead of the base generator's")


def ranks(x):
    """(G,K) -> (G,K) rank of each value in its row, ties sharing their mean rank (0-based)."""
    below = (x[:, None, :] < x[:, :, None]).sum(2)
    equal = (x[:, None, :] == x[:, :, None]).sum(2)
    return below + (equal - 1) / 2


def spearman_rows(a, b):
    """(G,K), (G,K) -> (G',) Spearman correlation of each row pair; rows where either side is constant are dropped."""
    ra = ranks(a)
    rb = ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    ok = (np.ptp(a, 1) > 0) & (np.ptp(b, 1) > 0)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return (ra * rb).sum(1)[ok] / den[ok]


def main(args):
    args, _, _ = grpo.resolve_args(args)
    _, _, _, device, autocast = setup_distributed()
    run = grpo.build(args, device)
    if args.policy:
        load_state(os.path.join(args.policy, "ckpt.safetensors"), run.params, run.ema, run.opt, device)
        swap_weights(run.params, run.ema)
    n, k = args.groups * args.group_size, args.group_size
    names = ("score", "color", "shape", "background", "quality")
    rho = {(r, name): [] for r in range(len(args.reward)) for name in names}
    for it in range(args.probe_iters):
        ro = grpo.rollout(args, run, it, 0, n, autocast)
        r_all, _ = grpo.score(args, run, ro, it, 1, False, autocast)  # (R, N)
        parts = toy.toy_golden_score(decode_latents(run.vae, ro.latents), ro.prompts, parts=True)
        for r in range(len(args.reward)):
            for name in names:
                rho[r, name] += spearman_rows(r_all[r].numpy().reshape(-1, k), parts[name].reshape(-1, k)).tolist()
        print(f"iteration {it}: {n} rollouts, golden {parts['score'].mean():.4f}", flush=True)
    for r, path in enumerate(args.reward):
        cells = []
        for name in names:
            v = np.array(rho[r, name])
            cells.append(f"{'golden' if name == 'score' else name} {v.mean():+.3f} +- {v.std(ddof=1) / np.sqrt(len(v)):.3f}")
        print(f"{path}: within-prompt Spearman with the oracle ({len(rho[r, 'score'])} groups of {k}): " + ", ".join(cells))


if __name__ == "__main__":
    main(grpo.parser.parse_args())
