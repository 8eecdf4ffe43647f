"""
How long must the toy generator train before it draws shapes? A study of a past world (docs/log.md). Trains a fresh
toy generator (toy.train_generator's recipe: rectified flow, logit-normal t, empty prompts at toy.py's --p-uncond, EMA
0.99) on a built world's renders, encoded by its VAE, and at the steps of --evals samples 4 images per training prompt
and 8 per held-out combination (10 steps, CFG 4) and prints the oracle's colour / shape match rates, its mean score
and the quality term.

  python dev/generator_steps.py                                  # lr 2e-3, cosine to 1,200 steps (toy.py's default)
  python dev/generator_steps.py --lr 1e-3 --constant --steps 1600 --evals 400,800,1200,1600
  python dev/generator_steps.py --width 64 --heads 2 --evals 400,800,1200   # a narrower transformer, same recipe

Its runtime: docs/log.md. The samples of the last evaluation go to --grid.
"""
import argparse
import copy
import os
import sys
import time

import torch
from diffusers import SD3Transformer2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/ -> the repository root
import data  # noqa: E402
from model import load_pipeline, make_tiny_pipeline  # noqa: E402
from toy import (all_prompts, generator_step, is_heldout, match_stats, sample_grid, to_tensor,  # noqa: E402
                 toy_golden_score, warmup_cosine)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--world", default="out/toy", help="a built world: its VAE and renders are used")
parser.add_argument("--steps", type=int, default=1200)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--constant", action="store_true", help="constant lr after the warmup (else cosine to 0 at --steps)")
parser.add_argument("--evals", default="400,800,1200", help="steps at which to sample and score")
parser.add_argument("--grid", default="out/generator_steps.png")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--width", type=int, default=128, help="the transformer's width (toy.py's: 128)")
parser.add_argument("--heads", type=int, default=4, help="its attention heads (toy.py's: 4)")
SAMPLE_SEED = 99  # the evaluation samples' stream: batch k seeded by SAMPLE_SEED + k, the same at every --evals step
P_UNCOND = 0.1  # toy.py's --p-uncond: the empty prompt, for CFG


@torch.no_grad()
def evaluate(pipe, train_prompts, heldout_prompts):
    """Samples of the pipeline's current transformer -> (images, prompts, figures per split)."""
    prompts = [p for p in train_prompts for _ in range(4)] + [p for p in heldout_prompts for _ in range(8)]
    vae, images = pipe.vae, []
    for k in range(0, len(prompts), 64):
        z = pipe(prompts[k:k + 64], height=32, width=32, num_inference_steps=10, guidance_scale=4.0, max_sequence_length=8,
                 output_type="latent", generator=torch.Generator().manual_seed(SAMPLE_SEED + k)).images
        x = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
        images += pipe.image_processor.postprocess(x, output_type="pil")
    n = 4 * len(train_prompts)
    quality = toy_golden_score(images, prompts, parts=True)["quality"] / 0.4
    return images, prompts, dict(train=match_stats(images[:n], prompts[:n]), heldout=match_stats(images[n:], prompts[n:]),
                                 quality=float(quality.mean()))


def main(args):
    torch.manual_seed(args.seed)
    pipe = load_pipeline("toy", os.path.join(args.world, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    train_prompts = [p for p in all_prompts() if not is_heldout(p)]
    heldout_prompts = [p for p in all_prompts() if is_heldout(p)]
    per_prompt = len(os.listdir(os.path.join(args.world, "images/render"))) // len(train_prompts)  # toy.py's order
    renders = [data.load_image(os.path.join(args.world, f"images/render/{i:05d}.png"))
               for i in range(per_prompt * len(train_prompts))]
    vae = pipe.vae
    with torch.no_grad():
        z = torch.cat([vae.encode(xb).latent_dist.mean for xb in to_tensor(renders).split(256)])
        pe, _, pooled, _ = pipe.encode_prompt(train_prompts + [""], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)
    latents = (z - vae.config.shift_factor) * vae.config.scaling_factor  # (N,4,16,16)
    pid = torch.arange(len(train_prompts)).repeat_interleave(per_prompt)
    net = make_tiny_pipeline(args.seed, size="toy").transformer
    if args.width != 128 or args.heads != 4:  # the toy's transformer at another width, all else equal
        config = dict(net.config, attention_head_dim=args.width // args.heads, num_attention_heads=args.heads,
                      caption_projection_dim=args.width)
        torch.manual_seed(args.seed)
        net = SD3Transformer2DModel.from_config(config)
    net.train()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    if args.constant:
        factor = lambda s: min(1.0, (s + 1) / args.warmup)  # noqa: E731
    else:
        factor = lambda s: warmup_cosine(s, args.warmup, args.steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(args.seed)
    evals = {int(e) for e in args.evals.split(",")} | {args.steps}  # the last step always: its samples make the grid
    t0 = time.time()
    for step in range(1, args.steps + 1):  # toy.py's generator step itself (its EMA warm-up counts from step 0)
        loss = generator_step(net, ema, opt, sched, latents, pid, pe, pooled, step - 1, args.batch, P_UNCOND, 0.99, g)
        if step in evals:
            pipe.transformer = ema.eval()
            images, prompts, fig = evaluate(pipe, train_prompts, heldout_prompts)
            tr, ho = fig["train"], fig["heldout"]
            print(f"step {step} ({time.time() - t0:.0f} s, loss {loss.item():.4f}): shape match {tr['shape']:.2f} / "
                  f"{ho['shape']:.2f}, colour {tr['color']:.2f} / {ho['color']:.2f}, oracle {tr['oracle']:.3f} / "
                  f"{ho['oracle']:.3f} (training / held-out), quality term {fig['quality']:.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
    sample_grid(images[::4][:36], prompts[::4][:36]).save(args.grid)
    print(f"wrote {args.grid}")


if __name__ == "__main__":
    main(parser.parse_args())
