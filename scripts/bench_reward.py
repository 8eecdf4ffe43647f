"""
Speed and memory of reward-model training and scoring at real SD3.5 shapes, with random weights
(no download: the architecture comes from model.SD35_CONFIGS). Prints figures; asserts nothing.

    python scripts/bench_reward.py --backbone sd35m --head dina --batch 4          # 1 GPU, bf16, 1024x1024
    python scripts/bench_reward.py --backbone sd35m --head drm --full-finetune --grad-ckpt --batch 4
    python scripts/bench_reward.py --backbone tiny --resolution 64 --steps 2       # CPU smoke test (tests run it)
    python scripts/bench_reward.py --route pixel --score-batch 8                   # the latent route against the pixel one
    python scripts/bench_reward.py --grpo-step                                     # the reward's share of a GRPO iteration
    python scripts/bench_reward.py --memory --backbone sd35l --head drm --full-finetune --grad-ckpt --batch 2 --world 8

train: train_reward.py's optimizer step, op for op, on `--batch` pairs (2 x batch images in one forward): noise at the
recipe's t, the tap + head in bf16 autocast with the frozen weights stored in bf16 and the trainable ones in float32
(train_reward.py on CUDA; `--frozen-dtype fp32` to compare), the head's loss, backward, grad clipping, AdamW on the
trainable weights (LoRA + head by default). score: a forward of `--score-batch` images without gradients, as
eval_reward.py and the RL stages score. FLOPs are counted by torch's FlopCounterMode (matmuls and attention) on
one pair / one image without activation checkpointing and scaled by the batch, so MFU counts model FLOPs only
(no recomputation): MFU = achieved model FLOP/s / --peak-tflops. Peak memory: torch.cuda.max_memory_allocated.

--route pixel: scoring one generated latent, two ways (docs/design.md §11). Latent: the recipe's tap and head read the
latent with `--text-len` prompt tokens (333 by default: SD3's 77 CLIP + 256 T5, the embeddings the generator already
has), LoRA merged (rank 0). Pixel, an HPSv3-shaped scorer: the SD3 VAE decodes the latent (AutoencoderKL with SD3's
config: 16 latent channels, blocks of 128/256/512/512 channels, 2 layers each), the image is resized to HPSv3's 448x448
(its 256 x 28 x 28 pixels) and Qwen2-VL-7B (its config from transformers, random weights, bf16) reads it: the vision
tower's 1024 patches merge to 256 tokens, followed by `--vlm-text-len` text tokens (HPSv3's instruction, 368 words, with
the prompt in Qwen2-VL's chat template: about 560 tokens, our estimate; nothing is tokenized here), and HPSv3's MLP
reads the last hidden state. FLOPs per image on the meta device (no memory, so it runs on a CPU); on a GPU each route is
then built alone and timed at `--score-batch` images, its peak memory read, `--compile` compiling the latent route's
blocks. --grpo-step: FLOPs per image of one iteration of grpo.py's flow-grpo preset on SD3.5-M at 512x512 (SDE
sampling with CFG, the trained steps' forward and backward through the policy LoRA, the KL reference's forward) against
the reward's forward, latent or pixel. --memory: train_reward.py's estimate of the memory per GPU of the recipe under
DDP and under FSDP over `--world` ranks (parallel.memory_estimate; `--batch` pairs a micro-batch), on the meta device.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import align  # noqa: E402
import grpo  # noqa: E402
import train_reward  # noqa: E402
from model import add_noise, build_reward_model, cast_frozen, load_transformer, sample_t, trainable_state  # noqa: E402
from parallel import describe_memory, memory_estimate  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--backbone", default="sd35m")
p.add_argument("--head", default="dina")
p.add_argument("--resolution", type=int, default=1024, help="image side in pixels; latents are side/8")
p.add_argument("--batch", type=int, default=4, help="pairs per training step (one GPU, no accumulation)")
p.add_argument("--score-batch", type=int, default=8, help="images per scoring forward")
p.add_argument("--text-len", type=int, default=None, help="prompt tokens: 154 = 77 CLIP + 77 T5 (train_reward's "
               "default); --route and --grpo-step: 333 = 77 + 256 (the generator's)")
p.add_argument("--lora-rank", type=int, default=16)
p.add_argument("--full-finetune", action="store_true")
p.add_argument("--grad-ckpt", action="store_true")
p.add_argument("--frozen-dtype", default="bf16", help="bf16 | fp32 (CUDA only, as train_reward.py)")
p.add_argument("--compile", action="store_true", help="torch.compile each kept block (as train_reward.py --compile)")
p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
p.add_argument("--route", default=None, choices=("pixel",), help="compare the latent route with the pixel route")
p.add_argument("--vlm-side", type=int, default=448, help="the pixel route's image side (HPSv3: 448 = sqrt(256 x 28 x 28))")
p.add_argument("--vlm-text-len", type=int, default=560, help="the pixel route's text tokens (HPSv3's prompt, estimated)")
p.add_argument("--grpo-step", action="store_true", help="FLOPs of one Flow-GRPO iteration at SD3.5-M 512x512")
p.add_argument("--memory", action="store_true", help="the memory estimate per GPU of the recipe, DDP and FSDP")
p.add_argument("--world", type=int, default=8, help="--memory: GPUs that FSDP shards over")

device = "cuda" if torch.cuda.is_available() else "cpu"
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)


def count_flops(fn, *a):  # model FLOPs of fn(*a), eager, no recomputation (FlopCounterMode fails under no_grad)
    with FlopCounterMode(display=False) as fc:
        fn(*a)
    return fc.get_total_flops()


def bench(name, fn, items, unit, flops, args):
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
    return items / dt, mem


def train_and_score(args):
    """train_reward.py's step and the scoring forward of one recipe, timed (see the docstring)."""
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
    h, text_len = args.resolution // 8, args.text_len or 154  # the SD3 VAE downsamples 8x
    print(f"{args.head} on {args.backbone} (random weights), {len(model.tap.blocks)} blocks, taps {model.tap.taps}: "
          f"{n_all / 1e9:.3f}B parameters, {n_train / 1e6:.2f}M trainable; built in {time.time() - t0:.0f} s; device "
          f"{device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"latents ({cfg.in_channels},{h},{h}) = {(h // cfg.patch_size) ** 2} image tokens, {text_len} text tokens; "
          f"frozen weights {args.frozen_dtype if device == 'cuda' else 'fp32'}, grad ckpt {args.grad_ckpt}")
    recipe = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", args.backbone, "--head", args.head]))
    g = torch.Generator(device).manual_seed(0)
    B, S = args.batch, args.score_batch
    lat_pos, lat_neg = (torch.randn(B, cfg.in_channels, h, h, device=device, generator=g) for _ in range(2))
    ctx = torch.randn(B, text_len, cfg.joint_attention_dim, device=device, generator=g)
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

    flops_pair, flops_image = count_flops(train_step, 1), count_flops(score_forward, 1)
    model.tap.grad_ckpt = args.grad_ckpt
    if args.compile:
        model.tap.compile_blocks()
    bench("train", train_step, B, "pairs", flops_pair * B, args)
    bench("score", torch.no_grad()(score_forward), S, "images", flops_image * S, args)


# -----------------------------------------------------------------------------
# Two routes to a reward of one generated latent (--route pixel), and the reward inside a GRPO iteration (--grpo-step)


def built(make, where, dtype=torch.bfloat16):
    """make() with its weights on `where` (meta: shapes only, no memory), cast to dtype, frozen."""
    with torch.device(where):
        module = make()
    return module.to(where, dtype).requires_grad_(False)  # .to: buffers made from numpy at init come along


def latent_route(args, where, side):
    """The recipe's tap + head scoring latents of an image side x side -> (score(n), {part: FLOPs per image})."""
    model = built(lambda: build_reward_model(args.backbone, args.head, random_init=True), where)
    cfg, h, n, text_len = model.tap.config, side // 8, args.score_batch, args.text_len or 333
    lat = torch.randn(n, cfg.in_channels, h, h, device=where, dtype=torch.bfloat16)
    ctx = torch.randn(n, text_len, cfg.joint_attention_dim, device=where, dtype=torch.bfloat16)
    pooled = torch.randn(n, cfg.pooled_projection_dim, device=where, dtype=torch.bfloat16)
    t = torch.full((n,), 0.4, device=where, dtype=torch.bfloat16)
    tap = count_flops(model.tap, lat, t, ctx, pooled) / n
    name = f"{args.backbone} tap, {len(model.tap.blocks)} blocks ({(h // 2) ** 2} image + {text_len} text tokens)"
    parts = {name: tap, f"{args.head} head": count_flops(model, lat, t, ctx, pooled) / n - tap}
    if args.compile and where != "meta":
        model.tap.compile_blocks()
    return lambda: model(lat, t, ctx, pooled), parts


def sd3_vae():
    """SD3's AutoencoderKL (its published config), random weights."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                         scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def qwen2_vl_7b():
    """Qwen2-VL-7B (its published sizes: 28 layers of width 3584, MLP 18944, 28 heads over 4 KV heads; a vision tower
    of 32 blocks of width 1280) with HPSv3's reward MLP on the last hidden state, random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, attn_implementation="sdpa", **text)
    vlm = Qwen2VLForConditionalGeneration(config)
    vlm.rm_head = torch.nn.Sequential(torch.nn.Linear(3584, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 16),
                                      torch.nn.ReLU(), torch.nn.Linear(16, 2))  # HPSv3's head: (mu, sigma)
    return vlm


def pixel_route(args, where, side):
    """VAE decode of latents of an image side x side, resize, Qwen2-VL-7B and HPSv3's head -> (score(n), {part: FLOPs
    per image}; a part FlopCounterMode cannot count on the meta device is reported as None)."""
    vae, vlm = built(sd3_vae, where), built(qwen2_vl_7b, where)
    inner = vlm.model
    visual, lm = getattr(inner, "visual", None) or vlm.visual, getattr(inner, "language_model", inner)
    n, s, g, text_len = args.score_batch, args.vlm_side, args.vlm_side // 14, args.vlm_text_len  # g x g patches of 14 px
    z = torch.randn(n, 16, side // 8, side // 8, device=where, dtype=torch.bfloat16)
    grid = torch.tensor([[1, g, g]] * n, device="cpu" if where == "meta" else where)  # (t, h, w) patches per image
    extra = {}
    if where == "meta":  # the vision rotary's positions come from the grid's values: computed on the CPU, passed in
        from transformers.vision_utils import get_vision_position_ids
        extra = dict(position_ids=get_vision_position_ids(grid, 2).to(where))
    text = torch.randn(n, text_len, 3584, device=where, dtype=torch.bfloat16)  # the embedded prompt tokens

    def decode():  # (n,16,h,w) -> (n,3,side,side) in [-1, 1]
        return vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)

    def see(img):  # Qwen2-VL's patches: the image twice in time (temporal patch 2), 14x14 -> (n g g, 3 x 2 x 14 x 14)
        x = F.interpolate(img.float(), size=(s, s), mode="bicubic", antialias=True).to(torch.bfloat16)
        x = x[:, None].expand(-1, 2, -1, -1, -1).reshape(n, 2, 3, g, 14, g, 14).permute(0, 3, 5, 2, 1, 4, 6)
        return visual(x.reshape(n * g * g, 3 * 2 * 14 * 14), grid_thw=grid, **extra)

    def read(tokens):  # (n (g/2)^2, 3584) image tokens, then the text -> (n, 2) HPSv3's (mu, sigma)
        tokens = getattr(tokens, "pooler_output", tokens)  # the merged tokens (transformers 5 returns an output object)
        x = torch.cat([tokens.reshape(n, -1, 3584), text], 1)  # (n, L, 3584)
        pos = torch.arange(x.shape[1], device=where).view(1, 1, -1).expand(3, n, -1)  # M-RoPE's 3 position rows
        return vlm.rm_head(lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state[:, -1])

    img, tok = decode(), None
    parts = {f"SD3 VAE decode, 16x{side // 8}x{side // 8} -> 3x{side}x{side}": count_flops(decode) / n}
    try:
        tok = see(img)
        parts[f"Qwen2-VL-7B vision tower, {s}x{s} ({g * g} patches)"] = count_flops(see, img) / n
    except Exception as e:  # a transformers version whose vision tower needs real tensors here
        parts[f"Qwen2-VL-7B vision tower, not counted ({type(e).__name__})"] = None
    tokens = tok if tok is not None else torch.zeros(n * (g // 2) ** 2, 3584, device=where, dtype=torch.bfloat16)
    parts[f"Qwen2-VL-7B language model + HPSv3 head ({(g // 2) ** 2} image + {text_len} text tokens)"] = \
        count_flops(read, tokens) / n
    return lambda: read(see(decode())), parts


def flops_table(args):
    """The FLOPs per image of both routes at --resolution, counted on the meta device -> their totals."""
    totals = {}
    print(f"FLOPs per image, {args.resolution}x{args.resolution}, batch {args.score_batch} (FlopCounterMode on the meta "
          f"device: matmuls, convolutions, attention; elementwise work not counted)")
    print(f"{'route':<7}{'part':<82}{'GFLOP/image':>12}")
    for name, route in (("latent", latent_route), ("pixel", pixel_route)):
        _, parts = route(args, "meta", args.resolution)
        for part, f in parts.items():
            print(f"{name:<7}{part:<82}{'-' if f is None else f'{f / 1e9:,.0f}':>12}")
        totals[name] = sum(f for f in parts.values() if f is not None)
        print(f"{name:<7}{'total':<82}{totals[name] / 1e9:>12,.0f}")
    print(f"pixel / latent: {totals['pixel'] / totals['latent']:.2f} times the FLOPs")
    return totals


def compare_routes(args):
    """--route pixel: the FLOPs table (any machine); on a GPU, throughput, peak memory and MFU of each route, alone."""
    totals = flops_table(args)
    if device != "cuda":
        return print("throughput and peak memory: no GPU here (run the same command on one)")
    speed = {}
    for name, route in (("latent", latent_route), ("pixel", pixel_route)):
        score, _ = route(args, device, args.resolution)
        speed[name] = bench(name, torch.no_grad()(score), args.score_batch, "images", totals[name] * args.score_batch, args)
        del score
        torch.cuda.empty_cache()
    (v_lat, m_lat), (v_pix, m_pix) = speed["latent"], speed["pixel"]
    print(f"latent / pixel: {v_lat / v_pix:.2f} times the throughput at {m_lat / m_pix:.2f} of the peak memory")


def grpo_share(args):
    """--grpo-step: FLOPs per image of one Flow-GRPO iteration on SD3.5-M at 512x512 (grpo.py's flow-grpo preset), by
    phase, and the reward's share, latent or pixel."""
    pre, text_len, side = grpo.PRESETS["flow-grpo"], args.text_len or 333, 512
    steps = grpo.parser.get_default("steps")
    trained = int(steps * grpo.parser.get_default("timestep_fraction"))  # grpo.schedule's trained steps
    transformer = built(lambda: load_transformer("sd35m", random_init=True), "meta")
    with torch.device("meta"):
        align.add_policy_lora(transformer, pre["lora_rank"], pre["lora_alpha"])
    rows = 2 if pre["cfg"] > 1 else 1  # CFG: one forward over [uncond; cond]
    x = torch.randn(rows, 16, side // 8, side // 8, device="meta", dtype=torch.bfloat16)
    ctx = torch.randn(rows, text_len, 4096, device="meta", dtype=torch.bfloat16)
    pooled = torch.randn(rows, 2048, device="meta", dtype=torch.bfloat16)
    t = torch.full((rows,), 500.0, device="meta", dtype=torch.bfloat16)
    forward = lambda: transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)[0]
    fwd = count_flops(forward)
    fwd_bwd = count_flops(lambda: forward().float().mean().backward())  # gradients reach the LoRA weights only
    transformer.disable_adapters()  # the KL reference: the base model
    ref = count_flops(forward)
    phases = {f"sampling: {steps} SDE steps, CFG {pre['cfg']} ({rows} rows a step)": steps * fwd,
              f"training: {trained} steps, forward + backward through LoRA r {pre['lora_rank']}": trained * fwd_bwd,
              f"KL reference: {trained} forwards, LoRA off (beta {pre['beta']})": trained * ref * (pre["beta"] > 0)}
    args.score_batch = 1
    reward = {"latent": sum(latent_route(args, "meta", side)[1].values()),
              "pixel": sum(f for f in pixel_route(args, "meta", side)[1].values() if f is not None)}
    policy = sum(phases.values())
    print(f"One Flow-GRPO iteration per image, SD3.5-M {side}x{side}, {text_len} text tokens (FLOPs on the meta device)")
    for part, f in phases.items():
        print(f"  {part:<72}{f / 1e12:8.2f} TFLOP")
    for name, f in reward.items():
        print(f"  reward, {name} route{'':<57}{f / 1e12:8.2f} TFLOP   share of the iteration {100 * f / (policy + f):5.1f}%")


def memory(args):
    """--memory: what train_reward.py prints at start for this recipe (parallel.memory_estimate), without weights."""
    with torch.device("meta"):  # shapes only; what trains as the recipe says
        model = build_reward_model(args.backbone, args.head, lora_rank=args.lora_rank, full_finetune=args.full_finetune,
                                   random_init=True)
    tokens = (args.resolution // 16) ** 2 + (args.text_len or 154)  # patch 2 on latents of 1/8 the side
    n_train = sum(p.numel() for p in trainable_state(model).values())
    print(f"{args.head} on {args.backbone}, {n_train / 1e9:.2f}B trainable, {2 * args.batch} images of {tokens} tokens a "
          f"micro-batch, grad ckpt {args.grad_ckpt}")
    print(describe_memory(memory_estimate(model, 2 * args.batch, tokens, args.world, args.grad_ckpt, "cuda")))


def main(args):
    from diffusers.utils import logging
    logging.set_verbosity_error()  # casting random weights to bf16 warns about modules that have none to keep in float32
    if args.memory:
        return memory(args)
    if args.route:
        compare_routes(args)
    if args.grpo_step:
        grpo_share(args)
    if not (args.route or args.grpo_step):
        train_and_score(args)


if __name__ == "__main__":
    main(p.parse_args())
