"""
How learnable is the ordering of the generator's own samples from their latents? A yardstick for the reward's
on-policy figures (scripts/best_of_k.py): the small CNN of dev/probe_latents.py, told the prompt's colour, shape and
background exactly (one-hot FiLM, no text encoder), trained from scratch on the oracle's exact scores (MSE, plus
Bradley-Terry on the pairs of one prompt) of the training pools' generator samples, their own latents, no noise.
Then scored like the reward on bench/generated.json: 16 fresh-seed samples per training prompt and held-out combo.

  python dev/probe_onpolicy.py                         # every training sample of out/toy
  python dev/probe_onpolicy.py --per-prompt 32         # the first 32 per prompt (the on-policy pool of before)

Labels here are exact and the prompt is given, so this is the most a latent reader learns from that many samples.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))  # best_of_k
import toy  # noqa: E402
from best_of_k import summarise  # noqa: E402
from probe_latents import Probe  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--world", default="out/toy")
parser.add_argument("--per-prompt", type=int, default=0, help="training samples per prompt, the first N (0: all)")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--width", type=int, default=64)
parser.add_argument("--gap", type=float, default=0.05)


def attributes(prompts):
    """prompts -> (N,12) one-hot colour (6), shape (3), background (3)."""
    names = (list(toy.TOY_COLORS), list(toy.TOY_SHAPES), list(toy.TOY_BACKGROUNDS))
    out = torch.zeros(len(prompts), 12)
    for i, p in enumerate(prompts):
        offset = 0
        for word, vocab in zip(toy.parse_toy_prompt(p), names):
            out[i, offset + vocab.index(word)] = 1.0
            offset += len(vocab)
    return out


def main(args):
    torch.manual_seed(0)
    latents = load_file(os.path.join(args.world, "image_latents.safetensors"))
    with open(os.path.join(args.world, "train.json")) as f:
        prompt_of = {r[f"path{k}"]: r["prompt"] for r in json.load(f) for k in "12"}
    paths = sorted(p for p in latents if p.startswith("images/train/") and p in prompt_of)
    if args.per_prompt:
        kept, count = [], {}
        for p in paths:  # sorted paths: a prompt's samples in the order the build drew them
            count[prompt_of[p]] = count.get(prompt_of[p], 0) + 1
            if count[prompt_of[p]] <= args.per_prompt:
                kept.append(p)
        paths = kept
    prompts = [prompt_of[p] for p in paths]
    z = torch.stack([latents[p] for p in paths])  # (N,C,h,w)
    score = torch.tensor(toy.toy_golden_score([Image.open(os.path.join(args.world, p)) for p in paths], prompts)).float()
    attr, pid = attributes(prompts), torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
    print(f"{len(paths)} training samples of {len(set(prompts))} prompts")
    net = Probe(z.shape[1], attr.shape[1], args.width)
    opt = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=1e-4)
    g, t0 = torch.Generator().manual_seed(0), time.time()
    for step in range(1, args.steps + 1):
        i = torch.randint(len(z), (args.batch,), generator=g)
        r, s = net(z[i], attr[i]), score[i]
        better = (pid[i][:, None] == pid[i][None]) & (s[:, None] - s[None] > args.gap)  # (B,B): row beats column
        bt = -F.logsigmoid(10 * (r[:, None] - r[None]))[better].mean() if better.any() else r.sum() * 0
        loss = F.mse_loss(r, s) + 0.1 * bt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with open(os.path.join(args.world, "bench/generated.json")) as f:
        groups = json.load(f)
    with open(os.path.join(args.world, "bench/generated_oracle.json")) as f:
        oracle = json.load(f)
    for split in ("training prompts", "held-out combos"):
        rows = []
        for grp in groups:
            if toy.is_heldout(grp["prompt"]) != (split == "held-out combos"):
                continue
            zk = torch.stack([latents[p] for p in grp["image_path"]])
            with torch.no_grad():
                rk = net(zk, attributes([grp["prompt"]] * len(zk))).numpy()
            rows.append((rk, np.array([oracle[p] for p in grp["image_path"]])))
        s = summarise(rows, args.gap)
        print(f"probe, {split}: {s['acc']:.2%} +- {s['acc_se']:.2%} of {s['pairs']} pairs (gap > {args.gap}); best-of-K pick "
              f"{s['gain_reward']:+.3f} +- {s['gain_reward_se']:.3f} of the oracle's {s['gain_oracle']:+.3f} ({s['share']:.0%})")
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(parser.parse_args())
