"""
Train a diffusion-native latent reward model on preference pairs.

Quick start (the toy world is built into out/toy/ on first use; 17 to 25 minutes on 2 CPU cores):
    python train_reward.py
DiNa-LRM on HPDv3 with SD3.5-M, 8 GPUs (encode the cache once, then train as often as you like):
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35m --head dina \
        --data /data/HPDv3/train.json --eval-data /data/HPDv3/test.json --image-root /data/HPDv3 --cache-only
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35m --head dina --compile \
        --data /data/HPDv3/train.json --eval-data /data/HPDv3/test.json --image-root /data/HPDv3
DRM (21 blocks, full fine-tune, Bradley-Terry) and DiT-Reward (frozen SD3.5-L + MLP):
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35m --head drm --full-finetune ...
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35l --head ditr --lora-rank 0 ...

The step, in plain sight: a global batch of pairs (never mixing resolution buckets) is split over
ranks and micro-batches; each pair gets its own noise level t and noise, seeded by (seed, step, pair)
so that results do not depend on the number of processes (--batching groups: each group of pairs
that share images, a prompt's pool, is one unit with one t and noise, its images forwarded once and
all of its labelled pairs trained on: the toy's default); the loss is the head's recipe
(noise-calibrated Thurstone for dina, Bradley-Terry for drm/ditr); AdamW, EMA, periodic held-out
accuracy with the EMA weights, atomic checkpoints, exact --resume.

Deviations: the DiNa paper's LoRA rank and learning rate for SD3.5-M are not restated here from
the paper; the defaults below are our choice and are marked so. On the toy world DiNa's noise
levels are moved to its 16x16 latents with SD3's resolution shift (TOY_WORLD below).
"""

import argparse
import copy
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import (add_noise, bt_loss, build_reward_model, cast_frozen, check_names, load_checkpoint, load_pipeline,
                   make_encoders, prompt_noise, sample_t, save_checkpoint, thurstone_loss, trainable_state)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
# backbone and head
parser.add_argument("--backbone", default="toy", help="tiny | toy | sd35m | sd35l")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--random-backbone", action="store_true", help="ablation: same architecture, random weights")
parser.add_argument("--head", default="dina", help="dina | drm | ditr")
parser.add_argument("--blocks", type=int, default=None, help="blocks kept (default: the preset's, e.g. 12 for dina on sd35m)")
parser.add_argument("--taps", type=lambda s: tuple(int(x) for x in s.split(",")), default=None, help="e.g. 4,8,12")
parser.add_argument("--combine", default="softmax", help="ditr layer combination: softmax | concat")
parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on the attention projections; 0 = frozen (ours)")
parser.add_argument("--lora-alpha", type=int, default=None, help="LoRA scale alpha / rank; default 2 x rank for dina (the released "
                    "DiNa-LRM: 128 / 64), rank otherwise")
parser.add_argument("--full-finetune", action=argparse.BooleanOptionalAction, default=False,
                    help="train every kept block (DRM's recipe; the toy world's default, --no-full-finetune for LoRA)")
parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the kept blocks")
parser.add_argument("--compile", action="store_true", help="torch.compile each kept block (GPU: 1.7x on an H100, 20-45 s to compile)")
parser.add_argument("--frozen-dtype", default="bf16", choices=("bf16", "fp32"), help="storage of the weights that do not "
                    "train, on CUDA (trainable weights are float32; CPU runs are float32)")
# loss and noise levels
parser.add_argument("--loss", default=None, choices=("thurstone", "thurstone-fixed", "bt"),
                    help="default: thurstone for dina, bt otherwise")
parser.add_argument("--k", type=float, default=2.0, help="Thurstone variance slope, s2(t) = k t^2 + sigma_u^2 (DiNa)")
parser.add_argument("--sigma-u", type=float, default=0.1, help="Thurstone variance floor (paper 0.1; released code sqrt(0.05))")
parser.add_argument("--soft-labels", action="store_true", help="use the annotators' vote share as the label y")
parser.add_argument("--t-sampling", default="uniform", help="uniform (DiNa) | logit-normal | fixed")
parser.add_argument("--t-mu", type=float, default=0.0)
parser.add_argument("--t-s", type=float, default=1.0)
parser.add_argument("--t-shift", type=float, default=1.0, help="SD3 resolution shift of the sampled t, s t / (1 + (s-1) t); "
                    "1 = none (SD3.5 at 1024px); the toy uses 1/8")
parser.add_argument("--t-eval", type=float, default=0.4, help="noise level of the held-out evaluation (DiNa: 0.4); also t* of fixed")
parser.add_argument("--same-noise", type=int, default=None, help="1: chosen and rejected share noise (DiNa default), 0: independent (DRM)")
# optimisation
parser.add_argument("--steps", type=int, default=20000)
parser.add_argument("--global-batch", type=int, default=64, help="pairs per optimizer step, over all ranks")
parser.add_argument("--micro-batch", type=int, default=None, help="pairs (groups: 2x images) per forward on one rank (default: global / world)")
parser.add_argument("--batching", default="pairs", choices=("pairs", "groups"), help="groups: a step forwards 2 x "
                    "--global-batch images, whole groups of pairs sharing images (a prompt's pool), and trains on every pair "
                    "among them (ours; the toy's default)")
parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (ours)")
parser.add_argument("--weight-decay", type=float, default=0.01)
parser.add_argument("--warmup", type=int, default=500)
parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                    help="after the linear warmup (cosine: to 0 at --steps)")
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the trainable weights (DiNa 0.995), warmed up as min(ema, (1+step)/(10+step)); 0 = off")
# data
parser.add_argument("--data", default=None, help="training pairs: HPDv3 JSON, Pick-a-Pic parquet/JSONL, or canonical JSONL")
parser.add_argument("--eval-data", default=None, help="held-out pairs, any format of DESIGN.md section 7")
parser.add_argument("--image-root", default=None, help="root of the image paths (default: the data file's folder)")
parser.add_argument("--cache-dir", default=None, help="where latent/text caches go (default: next to the data file)")
parser.add_argument("--max-text-len", type=int, default=77, help="T5 tokens after the CLIP tokens (77; 16 on tiny/toy) (ours)")
parser.add_argument("--resolution", type=int, default=None, help="one square bucket instead of the SD3.5 aspect buckets")
parser.add_argument("--skip-bad", action="store_true", help="count and skip unreadable images instead of stopping")
parser.add_argument("--cache-only", action="store_true", help="encode the caches and exit")
# run
parser.add_argument("--out", default=None, help="output dir (default: out/reward-<backbone>-<head>)")
parser.add_argument("--log-interval", type=int, default=50)
parser.add_argument("--eval-interval", type=int, default=1000)
parser.add_argument("--ckpt-interval", type=int, default=1000)
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--wandb", default=None, help="wandb project name (only if wandb is installed)")

# what changes when the backbone is the laptop-sized toy or tiny one (only where the user left the flag alone)
TOY_RECIPE = dict(steps=600, global_batch=32, lr=1e-3, warmup=50, lr_schedule="cosine", lora_rank=8, log_interval=25, eval_interval=100,
                  ckpt_interval=100, resolution=32, max_text_len=8)
# and on the toy world only: its data, and the noise levels moved to its 16x16 latents. DiNa's t ~ U(0,1), t_eval 0.4
# were tuned on SD3.5's 128x128 latents; SD3's resolution shift with s = sqrt(16*16 / (128*128)) = 1/8 maps them to
# the same signal-to-noise at 16x16: t ~ shift_t(U(0,1), 1/8), t_eval = shift_t(0.4, 1/8) = 0.08 (README: measured
# against the unshifted recipe, `--t-shift 1 --t-eval 0.4`). A step trains on every pair of the pools it forwards
# (--batching groups); its 4 kept blocks are fully fine-tuned, 3.2M parameters with the head (README: LoRA learns less);
# 1,200 steps, because the generator's own samples are learnt late (README: at 600 the pick gains a third of the oracle's).
TOY_WORLD = dict(data="out/toy/train.json", eval_data="out/toy/test.json", t_shift=0.125, t_eval=0.08, batching="groups",
                 full_finetune=True, lr=5e-4, steps=1200)


def parse(argv=None):
    """parser.parse_args, plus args.explicit: the flags given on the command line, which the toy recipe
    never replaces (so `--t-shift 1` on the toy means 1, although 1 is also the SD3.5 default)."""
    args = parser.parse_args(argv)
    given = copy.deepcopy(parser)
    for action in given._actions:
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(given.parse_args(argv)))
    return args


def resolve_args(args):
    check_names(args.backbone, args.head)
    explicit = set(getattr(args, "explicit", ()))  # absent when main() gets plain parser.parse_args()
    if args.backbone in ("tiny", "toy"):
        for k, v in (TOY_RECIPE | TOY_WORLD if args.backbone == "toy" else TOY_RECIPE).items():
            if k not in explicit and getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    args.loss = args.loss or ("thurstone" if args.head == "dina" else "bt")
    args.same_noise = bool(args.head == "dina" if args.same_noise is None else args.same_noise)
    args.lora_alpha = args.lora_alpha or (2 * args.lora_rank if args.head == "dina" else args.lora_rank)
    args.out = args.out or f"out/reward-{args.backbone}-{args.head}"
    return args


def pair_loss(args, r_pos, r_neg, t, y):
    """The recipe's loss on one micro-batch; y (B,) are soft labels or ones."""
    if args.loss == "thurstone":
        return thurstone_loss(r_pos, r_neg, t, args.k, args.sigma_u, y)
    if args.loss == "thurstone-fixed":  # DiNa's ablation: constant variance
        return thurstone_loss(r_pos, r_neg, t, k=0.0, sigma_u=0.5, y=y)
    return bt_loss(r_pos, r_neg, y)


def unit_noise(args, step, units, b):
    """Per-unit t and noise seeded by (seed, step, the unit's first pair index): independent of rank and world
    size. A unit's images share one t; and one noise draw (DiNa's same noise for chosen and rejected, --same-noise 1)
    or one each (DRM). Pair batching: a unit is one pair, and its chosen image draws before its rejected one."""
    t, eps = torch.empty(len(b["unit"])), torch.empty(b["lat"].shape)
    for u, ids in enumerate(units):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 100_003 + int(ids[0]))
        rows = (b["unit"] == u).nonzero().flatten().tolist()
        t[rows] = sample_t(1, args.t_sampling, g, args.t_mu, args.t_s, args.t_eval, args.t_shift)
        shared = torch.randn(b["lat"].shape[1:], generator=g)
        for k, row in enumerate(rows):
            eps[row] = shared if args.same_noise or k == 0 else torch.randn(b["lat"].shape[1:], generator=g)
    return t, eps


def global_batches(cache, batch, micro, seed, epoch, groups=False):
    """All global batches of one epoch, shuffled, each from one bucket: a list of micro-batches, each a list of
    units (lists of pair indices) whose images are forwarded together.
    pairs: a unit is one pair; a micro-batch holds `micro` pairs and a global batch `batch` pairs.
    groups: a unit is a connected group of pairs (data.PairCache.components: a prompt's pool) or, if its images
    overflow a micro-batch (2 * micro images, the forward cost of `micro` pairs), a random piece of one;
    micro-batches take whole units in a shuffled order up to 2 * micro images, and a global batch is
    batch / micro of them. Every labelled pair among the images of a unit is trained on (InstructGPT, Sec. 3.5:
    all K-choose-2 comparisons of a prompt as one batch element)."""
    g = torch.Generator().manual_seed(seed + 7919 * epoch)
    out, per_global = [], batch // micro
    nodes = lambda i: {(cache.pairs[i][k], cache.pairs[i]["prompt"]) for k in ("chosen", "rejected")}  # its 2 images
    comps = cache.components() if groups else [[i] for i in range(len(cache))]
    by_bucket = {}
    for c in comps:
        by_bucket.setdefault(tuple(cache.pairs[c[0]]["shape"]), []).append(c)
    for units in by_bucket.values():
        if groups:  # cut units that overflow a micro-batch: pairs in a random order, a new piece when one would overflow
            cut = []
            for c in units:
                piece, imgs = [], set()
                for i in [c[j] for j in torch.randperm(len(c), generator=g).tolist()]:
                    if len(imgs | nodes(i)) > 2 * micro:
                        cut.append(piece)
                        piece, imgs = [], set()
                    piece, imgs = piece + [i], imgs | nodes(i)
                cut.append(piece)
            units = cut
        units = [units[j] for j in torch.randperm(len(units), generator=g).tolist()]
        micros, cur, n = [], [], 0
        for u in units:  # next fit in the shuffled order; an unfilled last micro-batch is dropped (drop_last)
            k = len(set().union(*map(nodes, u)))
            if cur and n + k > 2 * micro:
                micros.append(cur)
                cur, n = [], 0
            cur, n = cur + [u], n + k
            if n == 2 * micro:
                micros.append(cur)
                cur, n = [], 0
        out += [micros[i:i + per_global] for i in range(0, len(micros) - per_global + 1, per_global)]
    return [out[j] for j in torch.randperm(len(out), generator=g).tolist()]


def ensure_cache(args, path, rank, world, master):
    """Encode images + prompts of a pair file once (each rank a shard); returns the cache folder."""
    folder = os.path.join(args.cache_dir or os.path.dirname(os.path.abspath(path)),
                          f"{os.path.splitext(os.path.basename(path))[0]}.cache-{args.backbone}")
    if not os.path.isfile(os.path.join(folder, "index.json")):
        root = args.image_root or os.path.dirname(os.path.abspath(path))
        pairs = data.read_pairs(path, root)  # image paths come back joined to root
        buckets = [(args.resolution, args.resolution)] if args.resolution else data.BUCKETS
        print0(f"caching {len(pairs)} pairs of {path} into {folder} ({world} rank(s) encode)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(args.backbone, args.backbone_path, args.seed,
                             dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
        enc_img, enc_txt = make_encoders(pipe, device, args.max_text_len)
        given = data.given_latents(root)  # a generator's own latents of its samples (the toy's), used as given
        data.build_cache(pairs, None, folder, enc_img, enc_txt, buckets, rank, world, skip_bad=args.skip_bad, given=given)
        del pipe, enc_img, enc_txt  # the VAE and text encoders are not resident while training
        barrier()
        if master and world > 1:  # with one rank build_cache already wrote the index
            data.finalize_cache(folder, pairs, world)
        barrier()
    return folder


@torch.no_grad()
def evaluate(model, cache, args, rank, world, autocast):
    """Held-out pairwise accuracy at t = t_eval with the EMA weights, by data.pairwise_accuracy (strict >).
    Every unique image is scored once with model.prompt_noise: the noise of a prompt, shared by the two images of
    a pair and the same noise eval_reward.py uses, so its accuracy at the same t and seed is this one. Sharded over ranks."""
    model.eval()
    dev, scores = next(model.parameters()).device, {}
    for shape, items in cache.images().items():
        for i0 in range(rank * 64, len(items), world * 64):
            chunk = items[i0:i0 + 64]
            lat, pe, pooled = (x.to(dev, torch.float32) for x in cache.image_batch(chunk))
            eps = torch.stack([prompt_noise(args.seed, q, 0, shape) for _, q in chunk]).to(dev)
            with autocast:
                r = model.score(lat, pe, pooled, t=args.t_eval, noise=eps)
            scores.update(zip(chunk, r.float().cpu().tolist()))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, scores)
        scores = {k: v for part in parts for k, v in part.items()}
    model.train()
    res = data.pairwise_accuracy([scores[(p["chosen"], p["prompt"])] for p in cache.pairs],
                                 [scores[(p["rejected"], p["prompt"])] for p in cache.pairs], [p["group"] for p in cache.pairs])
    return res["acc"], res["pairs"]


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main(args):
    args = resolve_args(args)
    # -------------------------------------------------------------------------- distributed, precision
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    micro = args.micro_batch or args.global_batch // world
    if args.global_batch % (micro * world):
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of micro-batch {micro} x world {world}")
    accum = args.global_batch // (micro * world)
    print0(f"world {world}, global batch {args.global_batch} = micro {micro} x accum {accum} x world {world}, device {device}")
    if args.batching == "groups":
        print0(f"batching groups: a micro-batch forwards up to {2 * micro} images, whole groups of pairs that share them")

    # -------------------------------------------------------------------------- data (toy world built on first use)
    if args.backbone == "toy" and args.data == TOY_WORLD["data"] and not os.path.isfile("out/toy/summary.json"):
        if master:
            import toy
            print0("building the toy world into out/toy/ (first use, 12 to 17 minutes on 2 CPU cores)")
            toy.build("out/toy", seed=args.seed)
        barrier()
    if args.data is None:
        raise ValueError("--data is required for this backbone (HPDv3 JSON, Pick-a-Pic, or canonical JSONL)")
    train_dir = ensure_cache(args, args.data, rank, world, master)
    eval_dir = ensure_cache(args, args.eval_data, rank, world, master) if args.eval_data else None
    if args.cache_only:
        print0("caches written; exiting (--cache-only)")
        return barrier()

    # -------------------------------------------------------------------------- model, optimizer, EMA
    model = build_reward_model(args.backbone, args.head, args.backbone_path, args.blocks, args.taps, args.lora_rank,
                               args.full_finetune, args.seed, args.combine, random_init=args.random_backbone,
                               lora_alpha=args.lora_alpha).to(device)
    model.tap.grad_ckpt = args.grad_ckpt
    if device.startswith("cuda") and args.frozen_dtype == "bf16":
        cast_frozen(model, torch.bfloat16)  # bf16 autocast reads them in bf16 anyway
    if args.compile:
        model.tap.compile_blocks()
    C = model.tap.config.in_channels  # the cache must hold latents this backbone reads
    train_cache = data.PairCache(train_dir, latent_channels=C)
    eval_cache = data.PairCache(eval_dir, latent_channels=C) if eval_dir else None
    print0(f"train: {len(train_cache)} pairs in {len(train_cache.buckets())} bucket(s)"
           + (f"; held-out: {len(eval_cache)} pairs" if eval_cache else ""))
    params = trainable_state(model)
    print0(f"{args.head} on {args.backbone}: {sum(p.numel() for p in params.values()) / 1e6:.3f}M trainable / "
           f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, taps {model.tap.taps}")
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    ema = {n: p.detach().clone() for n, p in params.items()}
    step, ckpt_path = 0, os.path.join(args.out, "ckpt.safetensors")
    if args.resume and not os.path.isfile(ckpt_path):
        print0(f"--resume: no checkpoint at {ckpt_path} yet; starting from step 0")
    if args.resume and os.path.isfile(ckpt_path):
        tensors, meta = load_checkpoint(ckpt_path)
        step = meta["step"]
        for n, p in params.items():
            p.data.copy_(tensors[f"model.{n}"])
            ema[n].copy_(tensors[f"ema.{n}"])
            if f"optim.{n}.exp_avg" in tensors:
                opt.state[p] = {k: tensors[f"optim.{n}.{k}"].to("cpu" if k == "step" else device)
                                for k in ("step", "exp_avg", "exp_avg_sq")}
        torch.set_rng_state(tensors["rng.torch"])
        print0(f"resumed from {ckpt_path} at step {step}")
    train_model = DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None) if ddp else model
    log_path = os.path.join(args.out, "log.jsonl")
    if master:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        if os.path.isfile(log_path):
            # a fresh run (step 0) starts a fresh log; a resumed one drops what a killed run wrote after its checkpoint
            lines = [l for l in open(log_path) if 0 < json.loads(l).get("step", 0) <= step]
            open(log_path, "w").writelines(lines)
    wandb = None
    if args.wandb and master:
        try:
            import wandb
            wandb.init(project=args.wandb, config=vars(args))
        except ImportError:
            print0("wandb is not installed; logging to stdout and log.jsonl only")

    def checkpoint(step, metrics):
        tensors = {f"model.{n}": p for n, p in params.items()} | {f"ema.{n}": e for n, e in ema.items()}
        for n, p in params.items():
            for k, v in opt.state.get(p, {}).items():
                tensors[f"optim.{n}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        save_checkpoint(ckpt_path, tensors, dict(args=vars(args), step=step, world_size=world, metrics=metrics))

    def swap_ema():  # exchange live and EMA weights (evaluate with EMA, then swap back)
        for n, p in params.items():
            tmp = p.detach().clone()
            p.data.copy_(ema[n])
            ema[n].copy_(tmp)

    # -------------------------------------------------------------------------- the loop
    plan = (-1, 0, [])  # (epoch, its first step, its global batches); epochs of --batching groups differ in length
    acc_eval, t0, metrics = None, (time.time(), step, 0), {}
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc="train", mininterval=5)
    while step < args.steps:
        while step >= plan[1] + len(plan[2]):  # walk to the epoch holding this step (from 0 after --resume)
            plan = (plan[0] + 1, plan[1] + len(plan[2]),
                    global_batches(train_cache, args.global_batch, micro, args.seed, plan[0] + 1, args.batching == "groups"))
            if not plan[2]:
                raise ValueError(f"{args.data}: fewer pairs per bucket than one global batch ({args.global_batch})")
        batch = plan[2][step - plan[1]]  # accum x world micro-batches
        n_pairs = sum(len(u) for m in batch for u in m)  # in the global batch: the loss is their mean
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup, then constant or cosine
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.lr_schedule == "cosine" else 1.0
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for a in range(accum):
            units = batch[a * world + rank]  # rank r takes micro-batches r, r + world, ...
            b = cache_to(train_cache.group_batch(units), device)
            t, eps = (x.to(device) for x in unit_noise(args, step, units, b))
            y = b["label"] if args.soft_labels else torch.ones_like(b["label"])
            sync = nullcontext() if (not ddp or a == accum - 1) else train_model.no_sync()
            with sync, autocast:
                r = train_model(add_noise(b["lat"], t, eps), t, b["prompt_embeds"], b["pooled"]).float()  # (N,) images
                r_pos, r_neg = r[b["pos"]], r[b["neg"]]  # (K,) pairs
                loss = pair_loss(args, r_pos, r_neg, t[b["pos"]], y) * len(y) / n_pairs  # this micro-batch's share
                (loss * world).backward()  # DDP averages over ranks
            loss_sum += loss.detach()
            correct += (r_pos > r_neg).float().sum().detach()
        if ddp:
            for x in (loss_sum, correct):  # each rank holds its share of the global mean
                dist.all_reduce(x)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"step {step}: loss is {loss_sum.item()} on pairs {batch[0][:8]}...; "
                                     f"check the data (cache {train_cache.dir}) or lower --lr")
        gnorm = torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # EMA warmup (as timm's / DiT's): the decay grows to args.ema over the first steps,
            d = min(args.ema, (1 + step) / (10 + step))  # so early evaluations are not ~the initial weights
            for n, p in params.items():
                ema[n].lerp_(p.detach(), 1 - d)
        step, t0 = step + 1, (*t0[:2], t0[2] + n_pairs)
        bar.update(1)
        # ---------------------------------------------------------------------- log, eval, checkpoint
        if step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.steps:
            metrics = dict(step=step, loss=loss_sum.item(), acc=correct.item() / n_pairs, lr=lr, gnorm=gnorm.item(),
                           pairs_per_s=t0[2] / (time.time() - t0[0]))
            if eval_cache and (step % args.eval_interval == 0 or step == args.steps):
                swap_ema()
                acc_eval, n_eval = evaluate(model, eval_cache, args, rank, world, autocast)
                swap_ema()
                metrics.update(eval_acc=acc_eval, eval_pairs=n_eval)
            if master:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if wandb:
                    wandb.log(metrics, step=step)
            t0 = (time.time(), step, 0)  # training throughput excludes the evaluation
        if master and (step % args.ckpt_interval == 0 or step == args.steps):
            checkpoint(step, metrics)
    bar.close()
    barrier()
    if acc_eval is not None:
        print0(f"final: {args.head} on {args.backbone}, step {step}, held-out accuracy {100 * acc_eval:.2f}% on "
               f"{n_eval} pairs of {args.eval_data} (t={args.t_eval}, EMA weights); checkpoint {ckpt_path}")
    else:
        print0(f"final: {args.head} on {args.backbone}, step {step}; checkpoint {ckpt_path}")
    barrier()  # a normal exit after a barrier (destroy_process_group can abort under gloo)


def cache_to(b, device):
    return {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in b.items()}


if __name__ == "__main__":
    main(parse())
