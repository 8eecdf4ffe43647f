"""
How learnable is the toy world from its VAE latents alone? A small CNN (3 convs, FiLM from the pooled
prompt embedding, ~0.1M parameters, trained from scratch with Bradley-Terry on the cached training
pairs) is a yardstick for the reward models: no diffusion backbone, no noise, just clean latents.

  python dev/probe_latents.py                        # the toy caches that train_reward.py wrote
  python dev/probe_latents.py --steps 3000 --out probe_scores.jsonl

Prints held-out accuracy every 500 steps; --out writes per-pair scores in eval_reward's scores.jsonl
format (for scripts/pair_types.py).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import data  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--train-cache", default="out/toy/train.cache-toy")
parser.add_argument("--test-cache", default="out/toy/test.cache-toy")
parser.add_argument("--steps", type=int, default=3000)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--width", type=int, default=64)
parser.add_argument("--out", default=None)


class Probe(nn.Module):
    def __init__(self, channels, cond_dim, width):
        super().__init__()
        w = width
        self.c1, self.c2, self.c3 = nn.Conv2d(channels, w, 3, padding=1), nn.Conv2d(w, w, 3, 2, 1), nn.Conv2d(w, w, 3, 2, 1)
        self.film = nn.Linear(cond_dim, 2 * w)
        self.out = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 1))

    def forward(self, x, pooled):  # (B,C,H,W), (B,D) -> (B,)
        g, b = self.film(pooled)[..., None, None].chunk(2, 1)
        h = F.relu(self.c1(x)) * (1 + g) + b
        return self.out(F.relu(self.c3(F.relu(self.c2(h)))).mean((2, 3))).squeeze(-1)


def main(args):
    torch.manual_seed(0)
    tr, te = data.PairCache(args.train_cache), data.PairCache(args.test_cache)
    a, b = (c.batch(list(range(len(c)))) for c in (tr, te))  # the whole toy cache fits in memory
    net = Probe(a["lat_pos"].shape[1], a["pooled"].shape[1], args.width)
    opt = torch.optim.AdamW(net.parameters(), args.lr)
    g, t0 = torch.Generator().manual_seed(0), time.time()
    for step in range(1, args.steps + 1):
        i = torch.randint(len(tr), (args.batch,), generator=g)
        loss = -F.logsigmoid(net(a["lat_pos"][i], a["pooled"][i]) - net(a["lat_neg"][i], a["pooled"][i])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == args.steps:
            with torch.no_grad():
                rp, rn = net(b["lat_pos"], b["pooled"]), net(b["lat_neg"], b["pooled"])
            print(f"step {step} | loss {loss.item():.3f} | held-out accuracy {(rp > rn).float().mean().item():.2%} "
                  f"on {len(te)} pairs ({len(tr)} training pairs) | {time.time() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for k, (x, y) in enumerate(zip(rp.tolist(), rn.tolist())):
                f.write(json.dumps(dict(benchmark="hpdv3", run="main", t=[0.0], pair=k, r_chosen=x, r_rejected=y)) + "\n")


if __name__ == "__main__":
    main(parser.parse_args())
