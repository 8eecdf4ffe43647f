"""
Where the golden score has headroom: the oracle's weighted terms (colour, shape, background, quality) of the toy's
clean renders, of their VAE round trips (the best a latent can decode to) and of the generator's samples (the
alignment stages' evaluation noise of the first seed, 10 ODE steps, CFG 4.5), on the training prompts.

    python dev/golden_headroom.py                     # toy world after the quick start
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
from model import decode_latents, load_pipeline, sample, sd3_sigmas, seeded  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--prompts", default="out/toy/prompts_train.txt")
parser.add_argument("--per-prompt", type=int, default=4)
parser.add_argument("--seed", type=int, default=1, help="of the renders")
parser.add_argument("--reward", default="out/reward-toy-dina", help="its prompt length is the one the stages encode at")


def show(tag, images, names):
    terms = toy.toy_golden_score(images, names, parts=True)
    print(f"{tag:22s} golden {terms['score'].mean():.4f} = " +
          " + ".join(f"{k} {terms[k].mean():.4f}" for k in ("color", "shape", "background", "quality")) +
          f"  ({len(images)} images)")


@torch.no_grad()
def main(args):
    pipe = load_pipeline("toy")
    vae = pipe.vae
    prompts = read_prompts(args.prompts)
    names = [p for p in prompts for _ in range(args.per_prompt)]
    rng = np.random.default_rng(args.seed)
    renders = [toy.render_toy(*toy.parse_toy_prompt(p), rng) for p in names]
    show("renders", renders, names)
    z = vae.encode(toy.to_tensor(renders)).latent_dist.mean
    show("VAE round trips", decode_latents(vae, (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor), names)
    with open(os.path.join(args.reward, "args.json")) as f:
        text_len = json.load(f)["max_text_len"]
    table = encode_prompt_table(pipe, prompts, text_len)
    pe, pooled = embeds(table, names)
    h = pipe.transformer.config.sample_size
    noise = torch.stack([torch.randn(4, h, h, generator=seeded(EVAL_SEED, 0, i)) for i in range(len(names))])
    lat = sample(pipe.transformer, noise, sd3_sigmas(10), pe, pooled, 4.5, embeds(table, [""]))["latents"]
    show("generator samples", decode_latents(vae, lat), names)


if __name__ == "__main__":
    main(parser.parse_args())
