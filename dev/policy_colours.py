"""
Which colour does a grpo.py run's policy draw, whatever the prompt asks? Samples the training prompts as the stages'
evaluation does (ODE, its seeds, CFG 4.5) with the base generator and with the run's policy (its EMA weights), reads
each image's object colour as the oracle does (the nearest palette colour of toy_read's foreground) and prints, for
both, how often each colour is drawn, how often the prompted colour is drawn per prompted colour, and the oracle's
quality term by drawn colour. A reward with a colour it prefers under every prompt shows as one colour taking over.

    python dev/policy_colours.py out/grpo            # the run folder of python grpo.py (toy world)
"""
import argparse
import collections
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import grpo  # noqa: E402
import toy  # noqa: E402
from align import EVAL_SEED, embeds, load_state, swap_weights  # noqa: E402
from model import decode_latents, sample, seeded  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run", help="a grpo.py run folder (its ckpt.safetensors)")
parser.add_argument("--seeds", type=int, default=4, help="images per training prompt (the evaluation's first seeds)")


def drawn_colour(images):
    """The palette colour the oracle reads as each image's object colour (the nearest to toy_read's foreground)."""
    fg = toy.toy_read(images)["fg"]
    names = list(toy.TOY_COLORS)
    return [names[j] for j in toy._soft_pick(fg, toy._COL, 25.0).argmax(1)]


@torch.no_grad()
def drawn_colours(run, prompts, seeds, cfg):
    """-> the palette colour read off each image, image k of prompt i from the evaluation's seed (EVAL_SEED, k, i)."""
    items = [(p, i, k) for k in range(seeds) for i, p in enumerate(prompts)]
    noise = torch.stack([torch.randn(run.transformer.config.in_channels, *run.shape, generator=seeded(EVAL_SEED, k, i))
                         for _, i, k in items])
    pe, pooled = embeds(run.table, [p for p, _, _ in items], run.device)
    latents = sample(run.transformer, noise, run.eval_sigmas, pe, pooled, cfg, embeds(run.table, [""], run.device))["latents"]
    images = decode_latents(run.vae, latents)
    quality = toy.toy_golden_score(images, [p for p, _, _ in items], parts=True)["quality"]
    return drawn_colour(images), [toy.parse_toy_prompt(p)[0] for p, _, _ in items], quality


def main(a):
    with safe_open(os.path.join(a.run, "ckpt.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    args = argparse.Namespace(**(vars(grpo.parser.parse_args([])) | meta["args"]))
    run = grpo.build(args, "cpu")
    for name in ("base", "policy"):
        if name == "policy":
            load_state(os.path.join(a.run, "ckpt.safetensors"), run.params, run.ema, run.opt, "cpu")
            swap_weights(run.params, run.ema)  # the policy the run exports
        got, want, quality = drawn_colours(run, run.train_prompts, a.seeds, args.eval_cfg)
        match, clean = collections.defaultdict(list), collections.defaultdict(list)
        for w, g, q in zip(want, got, quality):
            match[w].append(w == g)
            clean[g].append(q)
        drawn = ", ".join(f"{c} {n}" for c, n in collections.Counter(got).most_common())
        right = ", ".join(f"{c} {np.mean(v):.2f}" for c, v in match.items())
        terms = ", ".join(f"{c} {np.mean(v):.3f}" for c, v in clean.items())
        print(f"{name}: {len(got)} images drawn {drawn}; prompted colour drawn, by prompted colour: {right}; "
              f"golden quality term (of 0.4), by drawn colour: {terms}")


if __name__ == "__main__":
    main(parser.parse_args())
