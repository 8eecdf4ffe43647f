"""
Counterfactual colour pairs of the generator's own samples: under a training prompt P = (c, s, b), one of P's own
samples that the oracle reads as drawn in colour c against a sample of a sibling prompt (c', s, b) drawn in its own
colour c'. Both are the generator's latents (its blobs, not renders); under P they differ mainly in the colour, so the
annotators (labelling by the oracle under P, as the world's do) prefer the first. Written as train.json's records
plus these, into another HPDv3 file of the same world (its images and latents are the world's own).

Why: a reward trained on the world's pools reads the colour word on renders (prompt swap 95%) yet prefers one colour
on the generator's blobs under every prompt, and GRPO with it ends up drawing that colour everywhere
(dev/policy_colours.py). Wrong-colour renders do not teach the blobs' colour; these pairs are made of blobs.

    python dev/sibling_pairs.py                              # -> out/toy/train_sibling.json
    python train_reward.py --data out/toy/train_sibling.json --out out/reward-sibling
    python grpo.py --reward out/reward-sibling --out out/grpo-sibling
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import toy  # noqa: E402
from policy_colours import drawn_colour  # noqa: E402  (dev/ is on the path of a script run from it)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--world", default="out/toy", help="a built toy world: its train.json names the generator's samples")
parser.add_argument("--per-pool", type=int, default=12, help="sibling samples added to each pool with a faithful sample "
                    "of its prompt, each paired with every such sample (a sibling sits in one pool only, so pools stay apart)")
parser.add_argument("--raters", type=int, default=5, help="annotators per pair (the world's training pairs: 5)")
parser.add_argument("--rater-noise", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="default: <world>/train_sibling.json")


def pools(records):
    """-> [[paths]]: the connected groups of train.json's pair graph under one prompt (the world's candidate pools)."""
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x
    for r in records:
        parent[find((r["path1"], r["prompt"]))] = find((r["path2"], r["prompt"]))
    groups = defaultdict(list)
    for node in parent:
        groups[find(node)].append(node[0])
    return list(groups.values())


def main(a):
    with open(os.path.join(a.world, "train.json")) as f:
        records = json.load(f)
    own = {}  # path -> the prompt it was sampled for (a generator image sits in its own prompt's pools only)
    for r in records:
        for k in ("1", "2"):
            if r[f"model{k}"] == "generator":
                own[r[f"path{k}"]] = r["prompt"]
    paths = sorted(own)
    images = dict(zip(paths, (Image.open(os.path.join(a.world, p)).convert("RGB") for p in paths)))
    faithful = {p for p, got in zip(paths, drawn_colour(list(images.values())))
                if got == toy.parse_toy_prompt(own[p])[0]}
    rng = np.random.default_rng(a.seed)
    added, unused = [], {}  # unused: prompt -> its sibling samples not yet in one of its pools
    for pool in pools(records):
        good = sorted(p for p in pool if p in faithful)
        if not good:
            continue
        prompt = own[good[0]]
        c, s, b = toy.parse_toy_prompt(prompt)
        if prompt not in unused:
            sib = sorted(p for p in faithful if own[p] != prompt and toy.parse_toy_prompt(own[p])[1:] == (s, b))
            unused[prompt] = [sib[i] for i in rng.permutation(len(sib))]
        bad, unused[prompt] = unused[prompt][:a.per_pool], unused[prompt][a.per_pool:]  # each in one pool only
        pairs = [(g, x) if rng.random() < 0.5 else (x, g) for g in good for x in bad]  # random left / right
        if not pairs:
            continue
        left, right = zip(*pairs)
        sl = toy.toy_golden_score([images[p] for p in left], [prompt] * len(left))
        sr = toy.toy_golden_score([images[p] for p in right], [prompt] * len(right))
        votes = toy.toy_annotate(sl, sr, a.raters, rng, a.rater_noise)
        items = [toy.Item(path, "generator", prompt) for path in left + right]  # both judged under the pool's prompt
        added += toy.hpdv3_records(items, [(k, len(left) + k) for k in range(len(left))], votes, a.raters)
    own_first = np.mean([own[r["path1"]] == r["prompt"] for r in added])
    print(f"{len(paths)} generator samples, {len(faithful)} drawn in their prompt's colour; {len(added)} sibling "
          f"pairs over {len(unused)} prompts, the prompt's own sample preferred in {own_first:.1%}")
    out = a.out or os.path.join(a.world, "train_sibling.json")
    with open(out, "w") as f:
        json.dump(records + added, f, indent=1)
    print(f"{len(records)} + {len(added)} records -> {out}")


if __name__ == "__main__":
    main(parser.parse_args())
