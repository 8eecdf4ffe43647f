"""
Where does an aligned policy's proxy gain live: in the picture, or only in the latent? The alignment stages' own fixed
evaluation (align.evaluate_ema: their prompts, seeds, ODE sampler and proxy) of the base generator and of an aligned
LoRA, and the final line a stage prints per split: the latent reward on the generator's own latents (what the stage
optimised) and on the VAE re-encodings of their decoded images (what survives a round trip through pixels), and the
golden oracle with its weighted terms (colour, shape, background, quality). A gain only on the latents is latent
hacking. A stage's summary.json holds all of it for runs made since the stages report it; this script serves any LoRA.
The defaults are grpo.py's toy evaluation (refl.py and step_grpo.py share them).

--pipeline-seeds N then asks whether the gain is the exported LoRA's in diffusers' hands: StableDiffusion3Pipeline's own
__call__ (its sampler and guidance, --eval-steps and --eval-cfg) samples N images per prompt of each split, once before
load_lora_weights (the base) and once after, from seeds no stage nor the toy's build draws (PIPELINE_SEED), and prints
per split the line above for base -> LoRA: the proxy of the pipeline's latents, the golden score with the standard
error of its paired (same prompt, same seed) difference and its terms, the colour and shape match rates.

    python scripts/proxy_roundtrip.py out/grpo/lora                 # toy world, reward out/reward-toy-dina
    python scripts/proxy_roundtrip.py out/grpo/lora --pipeline-seeds 8   # and 8 pipeline samples a prompt
"""
import argparse
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
from align import (PROXY_NOISE, Oracle, compare, encode_prompt_table, evaluate_ema, judge_images,  # noqa: E402
                   load_rewards, score_rewards)
from data import read_prompts  # noqa: E402
from model import load_pipeline, sd3_sigmas  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("lora", help="an alignment stage's <out>/lora folder")
parser.add_argument("--reward", default="out/reward-toy-dina", help="the run's latent reward")
parser.add_argument("--prompts", default="out/toy/prompts_train.txt", help="the training split's prompts")
parser.add_argument("--heldout-prompts", default="out/toy/prompts_heldout.txt", help="the held-out split's ('': none)")
parser.add_argument("--eval-seeds", type=int, default=4)
parser.add_argument("--heldout-seeds", type=int, default=12)
parser.add_argument("--eval-steps", type=int, default=10)
parser.add_argument("--eval-cfg", type=float, default=4.5)
parser.add_argument("--seed", type=int, default=0, help="the run's --seed: its proxy's re-noising stream")
parser.add_argument("--pipeline-seeds", type=int, default=0, help="pipeline samples per prompt of each split (0: none)")

# toy.draw_samples seeds the pipeline's batch k by this + k: apart from toy.py's sampling streams (its seed and
# + BENCH_SEED_OFFSET, each + k) and the stages' rollouts and evaluation (model.seeded, 3+ keys)
PIPELINE_SEED = 3_000_003


@torch.no_grad()
def pipeline_eval(pipe, splits, oracle, proxy, args):
    """The pipeline's own samples (toy.draw_samples: pipe.__call__) of --pipeline-seeds images per prompt of each split
    -> {split: dict(reward: the proxy of their latents, judge_images's verdict)}, for align.compare."""
    report = {}
    for split, names in splits.items():
        prompts = [p for p in names for _ in range(args.pipeline_seeds)]
        drawn = toy.draw_samples(pipe, prompts, PIPELINE_SEED, args.eval_cfg, args.eval_steps)
        report[split] = dict(reward=proxy(drawn.latents, prompts).mean().item(),
                             **judge_images(oracle, drawn.images, prompts))
    return report


@torch.no_grad()
def main(args):
    pipe = load_pipeline("toy")
    rewards = load_rewards([args.reward], [1.0], pipe.transformer)
    splits = {"train": read_prompts(args.prompts)}
    if args.heldout_prompts:
        splits["heldout"] = read_prompts(args.heldout_prompts)
    table = encode_prompt_table(pipe, [p for s in splits.values() for p in s], rewards[0]["text_len"])
    side = pipe.transformer.config.sample_size
    sigmas = sd3_sigmas(args.eval_steps, pipe.scheduler.config.get("shift", 3.0))
    oracle = Oracle(toy.toy_golden_score, toy.match_stats)
    run = SimpleNamespace(transformer=pipe.transformer, vae=pipe.vae, oracle=oracle, rewards=rewards, table=table,
                          splits=splits, shape=(side, side), eval_sigmas=sigmas, params={}, ema={},
                          device="cpu")  # no EMA to swap in: the LoRA is loaded whole

    def proxy(lat, prompts):  # the stages' evaluation proxy: re-noised by the stream (seed, PROXY_NOISE, image)
        keys = [(args.seed, PROXY_NOISE, i) for i in range(len(lat))]
        return score_rewards(rewards, lat, prompts, table, keys)[0]
    base, _ = evaluate_ema(run, args, proxy, nullcontext())
    base_pipe = pipeline_eval(pipe, splits, oracle, proxy, args) if args.pipeline_seeds else {}
    pipe.load_lora_weights(args.lora)
    aligned, _ = evaluate_ema(run, args, proxy, nullcontext())
    for split in splits:
        print(f"base -> aligned ({len(splits[split])} prompts): {compare(split, base[split], aligned[split])[1]}")
    if args.pipeline_seeds:
        lora_pipe = pipeline_eval(pipe, splits, oracle, proxy, args)
        for split in splits:
            print(f"pipeline base -> LoRA ({len(splits[split])} prompts x {args.pipeline_seeds} seeds): "
                  f"{compare(split, base_pipe[split], lora_pipe[split])[1]}")


if __name__ == "__main__":
    main(parser.parse_args())
