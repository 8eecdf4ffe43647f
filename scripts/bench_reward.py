"""
Speed and memory of reward-model training and scoring at real SD3.5 shapes, with random weights
(no download: the architecture comes from model.SD35_CONFIGS). Prints figures; asserts nothing.

    python scripts/bench_reward.py --backbone sd35m --head dina --batch 4          # 1 GPU, bf16, 1024x1024
    python scripts/bench_reward.py --backbone sd35m --head drm --full-finetune --grad-ckpt --batch 4
    python scripts/bench_reward.py --backbone tiny --resolution 64 --steps 2       # CPU smoke test (tests run it)

train: train_reward.py's optimizer step, op for op, on `--batch` pairs (2 x batch images in one forward): noise at the
recipe's t, the tap + head in bf16 autocast with the frozen weights stored in bf16 and the trainable ones in float32
(train_reward.py on CUDA; `--frozen-dtype fp32` to compare), the head's loss, backward, grad clipping, AdamW on the
trainable weights (LoRA + head by default). score: a forward of `--score-batch` images without gradients, as
eval_reward.py and the RL stages score. FLOPs are counted by torch's FlopCounterMode (matmuls and attention) on
one pair / one image without activation checkpointing and scaled by the batch, so MFU counts model FLOPs only
(no recomputation): MFU = achieved model FLOP/s / --peak-tflops. Peak memory: torch.cuda.max_memory_allocated.
"""

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_reward  # noqa: E402
from model import add_noise, build_reward_model, cast_frozen, sample_t, trainable_state  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--backbone", default="sd35m")
p.add_argument("--head", default="dina")
p.add_argument("--resolution", type=int, default=1024, help="image side in pixels; latents are side/8")
p.add_argument("--batch", type=int, default=4, help="pairs per training step (one GPU, no accumulation)")
p.add_argument("--score-batch", type=int, default=8, help="images per scoring forward")
p.add_argument("--text-len", type=int, default=154, help="prompt tokens: 77 CLIP + 77 T5 (train_reward's default)")
p.add_argument("--lora-rank", type=int, default=16)
p.add_argument("--full-finetune", action="store_true")
p.add_argument("--grad-ckpt", action="store_true")
p.add_argument("--frozen-dtype", default="bf16", help="bf16 | fp32 (CUDA only, as train_reward.py)")
p.add_argument("--compile", action="store_true", help="torch.compile each kept block (as train_reward.py --compile)")
p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
t0 = time.time()
with torch.device(device):  # random weights initialised on the GPU (seconds, where the CPU takes minutes)
    model = build_reward_model(args.backbone, args.head, lora_rank=args.lora_rank, full_finetune=args.full_finetune,
                               random_init=args.backbone != "tiny").to(device)
if device == "cuda" and args.frozen_dtype == "bf16":
    cast_frozen(model, torch.bfloat16)
params = trainable_state(model)
opt = torch.optim.AdamW(params.values(), lr=1e-5)
cfg = model.tap.config
n_all, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params.values())
h = args.resolution // 8  # the SD3 VAE downsamples 8x
print(f"{args.head} on {args.backbone} (random weights), {len(model.tap.blocks)} blocks, taps {model.tap.taps}: "
      f"{n_all / 1e9:.3f}B parameters, {n_train / 1e6:.2f}M trainable; built in {time.time() - t0:.0f} s; device {device}"
      + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
print(f"latents ({cfg.in_channels},{h},{h}) = {(h // cfg.patch_size) ** 2} image tokens, {args.text_len} text tokens; "
      f"frozen weights {args.frozen_dtype if device == 'cuda' else 'fp32'}, grad ckpt {args.grad_ckpt}")

recipe = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", args.backbone, "--head", args.head]))
g = torch.Generator(device).manual_seed(0)
B, S = args.batch, args.score_batch
lat_pos, lat_neg = (torch.randn(B, cfg.in_channels, h, h, device=device, generator=g) for _ in range(2))
ctx = torch.randn(B, args.text_len, cfg.joint_attention_dim, device=device, generator=g)
pooled = torch.randn(B, cfg.pooled_projection_dim, device=device, generator=g)
s_lat = torch.randn(S, cfg.in_channels, h, h, device=device, generator=g)


def train_step(n=B):  # n pairs
    t = sample_t(n, recipe.t_sampling, shift=recipe.t_shift).to(device)
    e_pos = torch.randn_like(lat_pos[:n])
    e_neg = e_pos if recipe.same_noise else torch.randn_like(lat_neg[:n])
    with autocast:
        lat = torch.cat([add_noise(lat_pos[:n], t, e_pos), add_noise(lat_neg[:n], t, e_neg)])
        r_pos, r_neg = model(lat, t.repeat(2), ctx[:n].repeat(2, 1, 1), pooled[:n].repeat(2, 1)).float().chunk(2)
        loss = train_reward.pair_loss(recipe, r_pos, r_neg, t, torch.ones_like(t))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def score_forward(n=S):  # n images
    with autocast:
        return model(s_lat[:n], torch.full((n,), 0.4, device=device), ctx[:1].expand(n, -1, -1), pooled[:1].expand(n, -1))


def count_flops(fn):  # model FLOPs of fn(1), eager, no recomputation (FlopCounterMode fails under no_grad)
    with FlopCounterMode(display=False) as fc:
        fn(1)
    return fc.get_total_flops()


flops_pair, flops_image = count_flops(train_step), count_flops(score_forward)
model.tap.grad_ckpt = args.grad_ckpt
if args.compile:
    model.tap.compile_blocks()


def bench(name, fn, items, unit, flops):
    t = time.perf_counter()
    for _ in range(2):
        fn()
    sync()
    print(f"{name}: warm-up (2 steps{', compilation' if args.compile else ''}) {time.perf_counter() - t:.0f} s")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        fn()
    sync()
    dt = (time.perf_counter() - t) / args.steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    tf = flops / dt / 1e12
    print(f"{name:<6} batch {items:>3} {unit}: {dt * 1e3:8.1f} ms/step  {items / dt:7.2f} {unit}/s  "
          f"{flops / items / 1e12:7.2f} TFLOP/{unit[:-1]}  {tf:6.1f} TFLOP/s  MFU {100 * tf / args.peak_tflops:5.1f}%  "
          f"peak memory {mem:6.2f} GiB")


bench("train", train_step, B, "pairs", flops_pair * B)
bench("score", torch.no_grad()(score_forward), S, "images", flops_image * S)
