"""
One round of the online reward refresh of RLHF loops: the policy a grpo.py run made draws fresh rollouts, the world's
simulated annotators label every pair within each prompt's group, and those pairs join the reward's training data.
The policy is the run's EMA weights (what grpo.py evaluates and exports as its LoRA); its rollouts are grpo.rollout's
with the run's own flags (same noise, SDE window, CFG, steps: the distribution GRPO trained on) at iterations the run
never drew, each draw one group of --per-prompt images per training prompt. Each group is decoded, scored by the
oracle, every pair in it labelled by toy.toy_annotate with the world's rater count and noise (its summary.json), and
written as HPDv3 records; <out>/train.json holds the world's training pairs and these, <out>/image_latents.safetensors
the world's latents and the policy's own (as the world's on-policy pools), so the reward trains on the latents it will
judge. The world's images are not copied: their paths are rewritten relative to <out> (train_reward.py joins a
record's path to its data file's folder and takes the latents of data.given_latents there instead of encoding a PNG).

    python dev/reward_refresh.py --run out/grpo --world out/toy --per-prompt 16 --iterations 1 --out out/toy-refresh
    python train_reward.py --backbone-path out/toy/pipeline --data out/toy-refresh/train.json \
        --eval-data out/toy/test.json --out out/reward-refresh
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import grpo  # noqa: E402
import toy  # noqa: E402
from align import load_state, setup_distributed, swap_weights  # noqa: E402
from model import decode_latents  # noqa: E402

FRESH = 10_000  # the draws are grpo.rollout's iterations FRESH + n: seeds (prompt order, window, noise) no run drew

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--run", required=True, help="a grpo.py run folder: its ckpt.safetensors (LoRA, EMA, args)")
parser.add_argument("--world", default="out/toy", help="the toy world: train.json, image_latents, summary.json")
parser.add_argument("--per-prompt", type=int, default=16, help="K rollouts per training prompt in a draw: a group")
parser.add_argument("--iterations", type=int, default=1, help="draws of grpo.rollout, each a group per training prompt")
parser.add_argument("--out", default="out/toy-refresh")


def load_policy(run_dir, per_prompt, device):
    """The run rebuilt from its checkpoint's args with its EMA weights swapped in -> (args, grpo.Run); the args' groups
    resized so a draw is one group of per_prompt images for every training prompt."""
    with safe_open(os.path.join(run_dir, "ckpt.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    args = argparse.Namespace(**(vars(grpo.parser.parse_args([])) | meta["args"]))  # a flag newer than the run: default
    run = grpo.build(args, device)
    load_state(os.path.join(run_dir, "ckpt.safetensors"), run.params, run.ema, run.opt, device)
    swap_weights(run.params, run.ema)  # the live LoRA takes the EMA weights: the policy grpo.py exports
    args.group_size = per_prompt
    args.groups = len(run.train_prompts)
    return args, run


def main(a):
    if os.path.exists(a.out):  # a train.cache-* left there would be read as the new train.json's cache
        raise SystemExit(f"{a.out} exists: remove it or choose another --out")
    _, _, _, device, autocast = setup_distributed()
    args, run = load_policy(a.run, a.per_prompt, device)
    with open(os.path.join(a.world, "summary.json")) as f:
        world = vars(toy.parser.parse_args([])) | json.load(f).get("args", {})  # toy.py's defaults where not stored

    # ---------------------------------------------------------------------------- draw, decode, score
    images, latents, prompts = [], [], []
    for n in range(a.iterations):
        ro = grpo.rollout(args, run, FRESH + n, 0, args.groups * args.group_size, autocast)
        with torch.no_grad():
            for c in range(0, len(ro.latents), args.batch):
                images += decode_latents(run.vae, ro.latents[c:c + args.batch])
        latents.append(ro.latents.float().cpu())  # (G*K, C, h, w): what the latent reward reads in GRPO
        prompts += ro.prompts
        print(f"draw {n + 1}/{a.iterations}: {args.groups} prompts x {args.group_size} images, SDE steps {ro.sde}")
    scores = toy.toy_golden_score(images, prompts)
    groups = [list(range(g, g + args.group_size)) for g in range(0, len(images), args.group_size)]

    # ---------------------------------------------------------------------------- label every pair within a group
    rng = np.random.default_rng([args.seed, FRESH])
    pairs = toy.within_prompt_pairs(groups, 0, rng)  # n_pairs 0: all of them, left / right at random
    a_score, b_score = scores[pairs[:, 0]], scores[pairs[:, 1]]
    votes = toy.toy_annotate(a_score, b_score, world["train_raters"], rng, world["rater_noise"])
    paths = toy.save_images("images/refresh", images, a.out)
    items = [toy.Item(path, "policy", prompt) for path, prompt in zip(paths, prompts)]
    records = toy.hpdv3_records(items, pairs, votes, world["train_raters"])

    # ---------------------------------------------------------------------------- the world's pairs and latents beside
    moved = lambda p: os.path.relpath(os.path.join(a.world, p), a.out)  # noqa: E731  a world path as seen from <out>
    with open(os.path.join(a.world, "train.json")) as f:
        old = json.load(f)
    for r in old:
        r["path1"] = moved(r["path1"])
        r["path2"] = moved(r["path2"])
    toy.write_json(os.path.join(a.out, "train.json"), old + records)
    with safe_open(os.path.join(a.world, "image_latents.safetensors"), "pt") as f:
        given = {moved(key): f.get_tensor(key) for key in f.keys()}
    given.update(zip(paths, torch.cat(latents)))
    save_file({key: z.clone() for key, z in given.items()}, os.path.join(a.out, "image_latents.safetensors"))

    # ---------------------------------------------------------------------------- report
    ties = np.abs(a_score - b_score) < world["tie_margin"]
    agree = (a_score > b_score) == (2 * votes > world["train_raters"])
    print(f"{len(groups)} groups of {args.group_size} ({a.iterations} draw(s) x {args.groups} prompts), golden "
          f"{scores.mean():.4f}; {len(records)} pairs, {ties.mean():.1%} oracle near-ties (gap < "
          f"{world['tie_margin']}), labels agree with the oracle on {agree[~ties].mean():.1%} of the others "
          f"({world['train_raters']} raters, noise {world['rater_noise']})")
    print(f"{a.out}/train.json: {len(old)} world pairs + {len(records)} new; {len(given)} latents")
    print(f"train: python train_reward.py --backbone-path {os.path.join(a.world, 'pipeline')} --data "
          f"{os.path.join(a.out, 'train.json')} --eval-data {os.path.join(a.world, 'test.json')} --out out/reward-refresh")


if __name__ == "__main__":
    main(parser.parse_args())
