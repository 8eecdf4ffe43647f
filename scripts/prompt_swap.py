"""
Does a toy reward model read the prompt? Every clean render of the toy test set is scored under its own
prompt and under the prompts that differ from it in one attribute (colour, shape or background); a model
that reads prompt fidelity scores its own prompt higher. Chance is 50%. (Pairwise accuracy cannot show
this alone: both images of a pair share the prompt, so a per-prompt offset cancels.)

  python scripts/prompt_swap.py out/reward-toy-dina              # [--world out/toy] [--t 0.08]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from model import add_noise, load_reward_model, prompt_noise  # noqa: E402
from toy import TOY_BACKGROUNDS, TOY_COLORS, TOY_HELDOUT, TOY_SHAPES, parse_toy_prompt, toy_prompt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("ckpt", help="checkpoint folder (or .safetensors) of a toy reward model")
parser.add_argument("--world", default="out/toy")
parser.add_argument("--t", type=float, default=None, help="noise level (default: the checkpoint's t_eval)")


@torch.no_grad()
def main(args):
    path = args.ckpt if args.ckpt.endswith(".safetensors") else os.path.join(args.ckpt, "ckpt.safetensors")
    model, meta = load_reward_model(path)
    t_eval = args.t if args.t is not None else meta["args"].get("t_eval", 0.4)
    cache = data.PairCache(os.path.join(args.world, "test.cache-toy"))
    test = json.load(open(os.path.join(args.world, "test.json")))
    text = {}  # prompt -> (prompt_embeds (L,D), pooled (P,)) from the cache: every test prompt is in it
    renders = {}  # image path -> (latent (C,h,w), prompt)
    for i, r in enumerate(test):
        p = cache.pair(i)
        text[r["prompt"]] = (p["prompt_embeds"], p["pooled"])
        for k, lat in (("1", p["lat_pos"]), ("2", p["lat_neg"])):
            if r["model" + k] == "render":
                renders[r["path" + k]] = (lat, r["prompt"])
    wins = {(a, h): [] for h in ("seen", "held-out") for a in ("color", "shape", "background")}
    for path, (lat, prompt) in renders.items():
        c, s, b = parse_toy_prompt(prompt)
        h = "held-out" if (c, s) in set(map(tuple, TOY_HELDOUT)) else "seen"
        swaps = [("color", toy_prompt(x, s, b)) for x in TOY_COLORS if x != c]
        swaps += [("shape", toy_prompt(c, x, b)) for x in TOY_SHAPES if x != s]
        swaps += [("background", toy_prompt(c, s, x)) for x in TOY_BACKGROUNDS if x != b]
        swaps = [(a, q) for a, q in swaps if q in text]
        prompts = [prompt] + [q for _, q in swaps]
        n = len(prompts)
        eps = prompt_noise(meta["args"].get("seed", 0), data.cache_key(prompt), 0, lat.shape)  # one noise per image
        t = torch.full((n,), float(t_eval))
        x = add_noise(lat.expand(n, -1, -1, -1), t, eps.expand(n, -1, -1, -1))
        r = model(x, t, torch.stack([text[q][0] for q in prompts]), torch.stack([text[q][1] for q in prompts]))
        for (a, _), rq in zip(swaps, r[1:]):
            wins[(a, h)].append(float(r[0] > rq))
    print(f"{len(renders)} clean test renders at t = {t_eval}: own prompt scored above a prompt with one attribute swapped")
    for (a, h), w in wins.items():
        print(f"  {h:<9} prompts, {a:<11} {100 * sum(w) / max(1, len(w)):6.2f}%  ({len(w)} comparisons; chance 50%)")


if __name__ == "__main__":
    main(parser.parse_args())
