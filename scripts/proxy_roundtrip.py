"""
Where does an aligned policy's proxy gain live: in the picture, or only in the latent? Scores the fixed evaluation
samples (the alignment stages' seeds, ODE, CFG 4.5) of the base generator and of the aligned LoRA two ways: the latent
reward on the generator's own latents (what the stage optimised), and on the VAE re-encodings of their decoded images
(what survives a round trip through pixels); and the golden oracle, with its weighted terms (what a golden gain is
made of: colour, shape, background, quality). A gain only in the first column is latent hacking.

    python scripts/proxy_roundtrip.py out/grpo/lora                 # toy world, reward out/reward-toy-dina
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
from align import (EVAL_SEED, PROXY_NOISE, decode_latents, embeds, encode_prompt_table, load_rewards,  # noqa: E402
                   score_rewards)
from data import read_prompts  # noqa: E402
from model import load_pipeline, make_encoders, sample, sd3_sigmas, seeded  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("lora", help="an alignment stage's <out>/lora folder")
parser.add_argument("--reward", default="out/reward-toy-dina")
parser.add_argument("--prompts", default="out/toy/prompts_train.txt")
parser.add_argument("--seeds", type=int, default=4)
parser.add_argument("--steps", type=int, default=10)
STAGE_SEED = 0  # the alignment stages' default --seed: their proxy re-noises image j with seeded(0, PROXY_NOISE, j)


@torch.no_grad()
def main(args):
    pipe = load_pipeline("toy")
    prompts = read_prompts(args.prompts)
    rewards = load_rewards([args.reward], [1.0], pipe.transformer)
    table = encode_prompt_table(pipe, prompts, rewards[0]["text_len"])
    encode, _ = make_encoders(pipe, "cpu", rewards[0]["text_len"])
    items = [(p, i, k) for k in range(args.seeds) for i, p in enumerate(prompts)]
    names = [p for p, _, _ in items]
    h = pipe.transformer.config.sample_size
    noise = torch.stack([torch.randn(4, h, h, generator=seeded(EVAL_SEED, k, i)) for _, i, k in items])
    keys = [(STAGE_SEED, PROXY_NOISE, j) for j in range(len(items))]
    rows = {}
    for tag in ("base", "aligned"):
        if tag == "aligned":
            pipe.load_lora_weights(args.lora)
        pe, pooled = embeds(table, names)
        z = sample(pipe.transformer, noise, sd3_sigmas(args.steps), pe, pooled, 4.5, embeds(table, [""]))["latents"]
        images = decode_latents(pipe.vae, z)
        again = encode(toy.to_tensor(images))
        rows[tag] = (score_rewards(rewards, z, names, table, keys)[0].mean().item(),
                     score_rewards(rewards, again, names, table, keys)[0].mean().item(),
                     float(toy.toy_golden_score(images, names).mean()))
        terms = toy.toy_golden_score(images, names, parts=True)
        print(f"{tag:8s} reward of its latents {rows[tag][0]:+.4f} | of the re-encoded images {rows[tag][1]:+.4f} | "
              f"golden {rows[tag][2]:.4f} = " + " + ".join(f"{k} {terms[k].mean():.4f}" for k in
                                                          ("color", "shape", "background", "quality")) +
              f"  ({len(items)} samples)")
    d = [a - b for a, b in zip(rows["aligned"], rows["base"])]
    print(f"gain     latents {d[0]:+.4f} | re-encoded images {d[1]:+.4f} | golden {d[2]:+.4f}")


if __name__ == "__main__":
    main(parser.parse_args())
