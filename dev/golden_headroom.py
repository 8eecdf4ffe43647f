"""
Where the golden score has headroom, on a toy world's training prompts and held-out combinations: the golden score
and its weighted terms (colour, shape, background: 0.2 each at best; quality 0.4), the share of images with the colour
and the shape right, and the oracle's spread within one prompt's images (the mean over prompts of the std of their
golden scores), for clean renders, their VAE round trips (the best a latent can decode to) and the generator's samples
with guidance on (--cfg, the alignment stages' evaluation's) and off (1.0). The samples are the ones a stage's
evaluation draws: model.sample's ODE, image k of prompt i from the noise seeded(EVAL_SEED, k, i). This report was the
toy build's summary.json "headroom" until it left toy.py (docs/results.md §9).

    python dev/golden_headroom.py                                     # out/toy after the quick start
    python dev/golden_headroom.py --world W --per-prompt 8 --json headroom.json
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import toy  # noqa: E402
from align import EVAL_SEED, embeds, encode_prompt_table  # noqa: E402
from data import read_prompts  # noqa: E402
from model import decode_latents, encode_images, load_pipeline, sample, sd3_sigmas, seeded, to_tensor  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--world", default="out/toy", help="a built toy world: its pipeline/ and prompts_*.txt")
parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt of each kind")
parser.add_argument("--cfg", type=float, default=4.5, help="the guidance of the samples with guidance on")
parser.add_argument("--steps", type=int, default=10, help="ODE steps of the samples (the stages' evaluation's)")
parser.add_argument("--seed", type=int, default=1, help="of the renders")
parser.add_argument("--reward", default=None, help="a reward's folder: encode the prompts at its args.json's "
                    "max_text_len, as a stage with it does (default: the toy's 8)")
parser.add_argument("--json", default=None, help="also write the report here")

TERMS = ("color", "shape", "background", "quality")  # the oracle's weighted terms


def judge(images, names, per_prompt):
    """The oracle on images of names (per_prompt of each prompt in a row) -> one entry of the report."""
    terms = toy.toy_golden_score(images, names, parts=True)
    reads = toy.match_stats(images, names)
    spread = terms["score"].reshape(-1, per_prompt).std(1).mean()
    entry = dict(golden=float(terms["score"].mean()), spread=float(spread), color_right=reads["color"],
                 shape_right=reads["shape"])
    for t in TERMS:
        entry[t] = float(terms[t].mean())
    return entry


@torch.no_grad()
def generator_samples(pipe, table, prompts, per_prompt, cfg, steps):
    """The generator's ODE samples, per_prompt of each prompt in a row, from the stages' evaluation noise."""
    size = pipe.transformer.config.sample_size
    channels = pipe.transformer.config.in_channels
    noise = [torch.randn(channels, size, size, generator=seeded(EVAL_SEED, k, i))
             for i in range(len(prompts)) for k in range(per_prompt)]
    pe, pooled = embeds(table, [p for p in prompts for _ in range(per_prompt)])
    lat = sample(pipe.transformer, torch.stack(noise), sd3_sigmas(steps), pe, pooled, cfg, embeds(table, [""]))
    return decode_latents(pipe.vae, lat["latents"])


@torch.no_grad()
def headroom(world, per_prompt=4, cfg=4.5, steps=10, seed=1, text_len=8):
    """-> {f"{split}_{kind}": judge's entry}: the splits train and heldout, the kinds renders, vae, cfg{cfg:g}, cfg1."""
    pipe = load_pipeline("toy", os.path.join(world, "pipeline"))
    rng = np.random.default_rng(seed)
    report = {}
    for split in ("train", "heldout"):
        prompts = read_prompts(os.path.join(world, f"prompts_{split}.txt"))
        names = [p for p in prompts for _ in range(per_prompt)]
        renders = [toy.render_toy(*toy.parse_toy_prompt(p), rng) for p in names]
        report[f"{split}_renders"] = judge(renders, names, per_prompt)
        round_trips = decode_latents(pipe.vae, encode_images(pipe.vae, to_tensor(renders)))
        report[f"{split}_vae"] = judge(round_trips, names, per_prompt)
        table = encode_prompt_table(pipe, prompts, text_len)
        for g in (cfg, 1.0):
            images = generator_samples(pipe, table, prompts, per_prompt, g, steps)
            report[f"{split}_cfg{g:g}"] = judge(images, names, per_prompt)
    return report


def main(args):
    text_len = 8
    if args.reward:
        with open(os.path.join(args.reward, "args.json")) as f:
            text_len = json.load(f)["max_text_len"]
    report = headroom(args.world, args.per_prompt, args.cfg, args.steps, args.seed, text_len)
    for name, r in report.items():
        terms = " + ".join(f"{t} {r[t]:.4f}" for t in TERMS)
        print(f"{name:16s} golden {r['golden']:.4f} = {terms}; colour right {r['color_right']:.2f}, "
              f"shape right {r['shape_right']:.2f}, spread {r['spread']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(parser.parse_args())
