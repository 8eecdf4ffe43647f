"""
Train a diffusion-native latent reward model on preference pairs.

Quick start (the toy world is built into out/toy/ on first use; its time and accuracy: docs/results.md):
    python train_reward.py
DiNa-LRM on HPDv3 with SD3.5-M, 8 GPUs (encode the cache once, then train as often as you like):
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35m --head dina \
        --data /data/HPDv3/train.json --eval-data /data/HPDv3/test.json --image-root /data/HPDv3 --cache-only
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35m --head dina --compile \
        --data /data/HPDv3/train.json --eval-data /data/HPDv3/test.json --image-root /data/HPDv3
DRM (full fine-tune, Bradley-Terry; --fsdp: sharded, see the memory estimate at start) and DiT-Reward (frozen SD3.5-L):
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35l --head drm --full-finetune --grad-ckpt --fsdp ...
    torchrun --nproc_per_node=8 train_reward.py --backbone sd35l --head ditr --lora-rank 0 ...

The flags a command line leaves unset take the values of a named preset (PRESETS: sd35, tiny, toy; chosen by
--backbone, or --preset), printed at start. A step: a global batch of pairs from one resolution bucket, split over
ranks and micro-batches; each unit (a pair, or with --batching groups a prompt's pool, its images forwarded once and
every labelled pair among them trained on) gets its own t and noise, seeded by (seed, step, unit), so results do not
depend on the number of processes; the head's loss (Thurstone for dina, Bradley-Terry otherwise); AdamW, EMA,
held-out accuracy with the EMA weights, atomic checkpoints, exact --resume.

Deviations: the DiNa paper's LoRA rank and learning rate for SD3.5-M are not restated here from the paper; the
sd35 preset's are our choice and are marked so. On the toy world DiNa's noise levels are moved to its 16x16 latents
with SD3's resolution shift (the toy preset).
"""

import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import align
import data
import toy
from align import barrier, print0
from model import (add_noise, bt_loss, build_reward_model, cast_frozen, check_names, load_pipeline, make_encoders,
                   prompt_noise, sample_t, thurstone_loss, trainable_state)
from parallel import describe_memory, distribute, memory_estimate

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
# backbone and head
parser.add_argument("--backbone", default="toy", help="tiny | toy | sd35m | sd35l")
parser.add_argument("--preset", default=None, help="recipe of the flags left unset: sd35 | tiny | toy (PRESETS)")
parser.add_argument("--backbone-path", default=None, help="diffusers folder or hub id overriding the preset")
parser.add_argument("--random-backbone", action="store_true", help="ablation: same architecture, random weights")
parser.add_argument("--head", default="dina", help="dina | drm | ditr")
parser.add_argument("--blocks", type=int, default=None, help="blocks kept (default: the preset's, e.g. 12 for dina on sd35m)")
parser.add_argument("--taps", type=lambda s: tuple(int(x) for x in s.split(",")), default=None, help="e.g. 4,8,12")
parser.add_argument("--combine", default="softmax", help="ditr layer combination: softmax | concat")
parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on the attention projections; 0 = frozen")
parser.add_argument("--lora-alpha", type=int, default=None, help="default 2 x rank for dina (released DiNa-LRM: 128/64), else rank")
parser.add_argument("--full-finetune", action=argparse.BooleanOptionalAction, default=None,
                    help="train every kept block (DRM's recipe; the toy preset's; --no-full-finetune for LoRA)")
parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the kept blocks")
parser.add_argument("--compile", action="store_true", help="torch.compile each kept block (GPU)")
parser.add_argument("--fsdp", action="store_true", help="torchrun: shard weights, gradients and AdamW over the ranks (FSDP2)")
parser.add_argument("--frozen-dtype", default="bf16", choices=("bf16", "fp32"), help="CUDA storage of the frozen weights")
# loss and noise levels
parser.add_argument("--loss", default=None, choices=("thurstone", "thurstone-fixed", "bt"),
                    help="default: thurstone for dina, bt otherwise")
parser.add_argument("--k", type=float, default=2.0, help="Thurstone variance slope, s2(t) = k t^2 + sigma_u^2 (DiNa)")
parser.add_argument("--sigma-u", type=float, default=0.1, help="Thurstone variance floor (paper 0.1; released code sqrt(0.05))")
parser.add_argument("--soft-labels", action="store_true", help="use the annotators' vote share as the label y")
parser.add_argument("--t-sampling", default="uniform", help="uniform (DiNa) | logit-normal | fixed")
parser.add_argument("--t-mu", type=float, default=0.0)
parser.add_argument("--t-s", type=float, default=1.0)
parser.add_argument("--t-shift", type=float, default=None, help="SD3 resolution shift of the sampled t: s t / (1 + (s-1) t)")
parser.add_argument("--t-eval", type=float, default=None, help="noise level of the held-out evaluation; also t* of fixed")
parser.add_argument("--same-noise", type=int, default=None, help="1: chosen and rejected share noise (DiNa default), 0: independent (DRM)")
# optimisation
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--global-batch", type=int, default=None, help="pairs per optimizer step, over all ranks")
parser.add_argument("--micro-batch", type=int, default=None, help="pairs (groups: 2x images) per forward on one rank")
parser.add_argument("--batching", default=None, choices=("pairs", "groups"), help="groups: a step forwards 2 x "
                    "--global-batch images, whole pools of pairs sharing images, and trains on every pair among them")
parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
parser.add_argument("--weight-decay", type=float, default=0.01)
parser.add_argument("--warmup", type=int, default=None)
parser.add_argument("--lr-schedule", default=None, choices=("constant", "cosine"), help="after the linear warmup")
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the trainable weights (DiNa 0.995), warmed up as min(ema, (1+step)/(10+step)); 0 = off")
# data
parser.add_argument("--data", default=None, help="training pairs: HPDv3 JSON, Pick-a-Pic parquet/JSONL, or canonical JSONL")
parser.add_argument("--eval-data", default=None, help="held-out pairs, any format of docs/design.md §7")
parser.add_argument("--image-root", default=None, help="root of the image paths (default: the data file's folder)")
parser.add_argument("--cache-dir", default=None, help="where latent/text caches go (default: next to the data file)")
parser.add_argument("--max-text-len", type=int, default=None, help="T5 tokens after the CLIP tokens")
parser.add_argument("--resolution", type=int, default=None, help="one square bucket instead of the SD3.5 aspect buckets")
parser.add_argument("--skip-bad", action="store_true", help="count and skip unreadable images instead of stopping")
parser.add_argument("--cache-only", action="store_true", help="encode the caches and exit")
# run
parser.add_argument("--out", default=None, help="output dir (default: out/reward-<backbone>-<head>)")
parser.add_argument("--log-interval", type=int, default=None)
parser.add_argument("--eval-interval", type=int, default=None)
parser.add_argument("--ckpt-interval", type=int, default=None)
parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.safetensors")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--wandb", default=None, help="wandb project name (only if wandb is installed)")

# -----------------------------------------------------------------------------
# Recipes: the values of the flags a command line leaves unset (None above), one dict per recipe

# SD3.5-M/L on real preference data at 1024px. DiNa-LRM: t ~ U(0, 1) in training, t_eval 0.4 (the paper's);
# the learning rate, LoRA rank and schedule are ours (not restated from the paper).
SD35 = dict(steps=20000, global_batch=64, lr=1e-4, warmup=500, lr_schedule="constant", lora_rank=16, full_finetune=False,
            batching="pairs", t_shift=1.0, t_eval=0.4, max_text_len=77, resolution=None, log_interval=50,
            eval_interval=1000, ckpt_interval=1000)
# The tiny backbone of the tests: laptop sizes, DiNa's noise levels.
TINY = SD35 | dict(steps=600, global_batch=32, lr=1e-3, warmup=50, lr_schedule="cosine", lora_rank=8, log_interval=25,
                   eval_interval=100, ckpt_interval=100, resolution=32, max_text_len=8)
# The toy world (toy.py builds out/toy/). DiNa's t ~ U(0, 1), t_eval 0.4 were tuned on SD3.5's 128x128 latents; SD3's
# resolution shift with s = sqrt(16*16 / (128*128)) = 1/8 gives the same signal-to-noise at the toy's 16x16:
# t ~ shift_t(U(0, 1), 1/8), t_eval = shift_t(0.4, 1/8) = 0.08. Groups and the full fine-tune: measured, docs/results.md.
TOY = TINY | dict(data="out/toy/train.json", eval_data="out/toy/test.json", t_shift=0.125, t_eval=0.08, batching="groups",
                  full_finetune=True, lr=5e-4, steps=600)  # 600: the quick start's knee (docs/results.md §9)
PRESETS = dict(sd35=SD35, tiny=TINY, toy=TOY)


def resolve_args(args):
    """The flags left unset take the preset's values (--preset, or the backbone's); then the head's own rules."""
    check_names(args.backbone, args.head)
    args.preset = args.preset or (args.backbone if args.backbone in ("tiny", "toy") else "sd35")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    align.fill_preset(args, PRESETS[args.preset])
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


def ensure_cache(args, path, procs):
    """Encode images + prompts of a pair file once (each rank a shard); returns the cache folder."""
    rank, world = procs.rank, procs.world
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
        if rank == 0 and world > 1:  # with one rank build_cache already wrote the index
            data.finalize_cache(folder, pairs, world)
        barrier()
    return folder


@torch.no_grad()
def evaluate(model, cache, args, procs):
    """Held-out pairwise accuracy at t = t_eval with the EMA weights, by data.pairwise_accuracy (strict >).
    Every unique image is scored once with model.prompt_noise: the noise of a prompt, shared by the two images of
    a pair and the same noise eval_reward.py uses, so its accuracy at the same t and seed is this one. Sharded over ranks."""
    model.eval()
    rank, world, dev, scores = procs.rank, procs.world, procs.device, {}
    for shape, items in cache.images().items():
        rounds = math.ceil(len(items) / (world * 64))  # the same number of forwards on every rank (FSDP gathers in each)
        for i0 in range(rank * 64, rounds * world * 64, world * 64):
            chunk = items[i0:i0 + 64]  # empty past the end: that rank scores one image and keeps no score
            lat, pe, pooled = (x.to(dev, torch.float32) for x in cache.image_batch(chunk or items[:1]))
            eps = torch.stack([prompt_noise(args.seed, q, 0, shape) for _, q in chunk or items[:1]]).to(dev)
            with procs.autocast:
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


class EpochPlan:
    """The global batches of each epoch, drawn when the steps reach it (epochs of --batching groups differ in length)."""

    def __init__(self, cache, args, micro):
        self.cache, self.args, self.micro = cache, args, micro
        self.epoch, self.first_step, self.batches = -1, 0, []

    def batch(self, step):
        """-> the global batch of `step`: accum x world micro-batches, each a list of units (lists of pair indices)."""
        while step >= self.first_step + len(self.batches):
            self.epoch, self.first_step = self.epoch + 1, self.first_step + len(self.batches)
            self.batches = global_batches(self.cache, self.args.global_batch, self.micro, self.args.seed, self.epoch,
                                          self.args.batching == "groups")
            if not self.batches:
                raise ValueError(f"{self.args.data}: fewer pairs per bucket than one global batch ({self.args.global_batch})")
        return self.batches[step - self.first_step]


def learning_rate(args, step):
    """Linear warmup over --warmup steps, then constant or cosine to 0 at --steps."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    if args.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
    return lr


def forward_backward(train_model, cache, batch, args, step, procs, accum):
    """The global batch's loss (the mean over its pairs), its gradients accumulated over this rank's micro-batches
    (rank r takes micro-batches r, r + world, ...) -> (loss, pairs ordered right), summed over ranks."""
    rank, world, device = procs.rank, procs.world, procs.device
    n_pairs = sum(len(unit) for micro in batch for unit in micro)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for a in range(accum):
        units = batch[a * world + rank]
        b = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device)
             for k, v in cache.group_batch(units).items()}
        t, eps = (x.to(device) for x in unit_noise(args, step, units, b))
        y = b["label"] if args.soft_labels else torch.ones_like(b["label"])
        sync = train_model.no_sync() if hasattr(train_model, "no_sync") and a < accum - 1 else nullcontext()  # DDP
        with sync, procs.autocast:
            r = train_model(add_noise(b["lat"], t, eps), t, b["prompt_embeds"], b["pooled"]).float()  # (N,) images
            r_pos, r_neg = r[b["pos"]], r[b["neg"]]  # (K,) pairs
            loss = pair_loss(args, r_pos, r_neg, t[b["pos"]], y) * len(y) / n_pairs  # this micro-batch's share
            (loss * world).backward()  # DDP and FSDP average over ranks (FSDP reduce-scatters every micro-batch)
        loss_sum += loss.detach()
        correct += (r_pos > r_neg).float().sum().detach()
    if procs.ddp:
        for x in (loss_sum, correct):  # each rank holds its share of the global mean
            dist.all_reduce(x)
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"step {step}: loss is {loss_sum.item()} on pairs {batch[0][:8]}...; "
                                 f"check the data (cache {cache.dir}) or lower --lr")
    return loss_sum, correct, n_pairs


def load_data(args, procs):
    """The toy world (built on first use), the pair files encoded once into latent caches -> their folders."""
    if args.backbone == "toy" and args.data == TOY["data"] and not os.path.isfile("out/toy/summary.json"):
        if procs.rank == 0:
            print0("building the toy world into out/toy/ (first use)")
            toy.build("out/toy", seed=args.seed)
        barrier()
    if args.data is None:
        raise ValueError("--data is required for this backbone (HPDv3 JSON, Pick-a-Pic, or canonical JSONL)")
    train_dir = ensure_cache(args, args.data, procs)
    eval_dir = ensure_cache(args, args.eval_data, procs) if args.eval_data else None
    return train_dir, eval_dir


def make_model(args, procs):
    """The recipe's reward model on this rank's device and the module the loop calls (parallel.distribute)."""
    model = build_reward_model(args.backbone, args.head, args.backbone_path, args.blocks, args.taps, args.lora_rank,
                               args.full_finetune, args.seed, args.combine, random_init=args.random_backbone,
                               lora_alpha=args.lora_alpha).to(procs.device)
    model.tap.grad_ckpt = args.grad_ckpt
    if procs.device.startswith("cuda") and args.frozen_dtype == "bf16":
        cast_frozen(model, torch.bfloat16)  # bf16 autocast reads them in bf16 anyway
    if args.compile:
        model.tap.compile_blocks()
    return model, distribute(model, procs, args.fsdp, model.tap.blocks)


def open_wandb(args):
    try:
        import wandb
    except ImportError:
        return print0("wandb is not installed; logging to stdout and log.jsonl only")
    wandb.init(project=args.wandb, config=vars(args))
    return wandb


def main(args):
    args = resolve_args(args)
    procs = align.setup_distributed()
    master = procs.rank == 0
    align.print_recipe(args.preset, PRESETS[args.preset], args)
    micro = args.micro_batch or args.global_batch // procs.world
    if args.global_batch % (micro * procs.world):
        raise ValueError(f"--global-batch {args.global_batch} is not a multiple of micro-batch {micro} x world {procs.world}")
    accum = args.global_batch // (micro * procs.world)
    print0(f"world {procs.world}, global batch {args.global_batch} = micro {micro} x accum {accum} x world {procs.world}, "
           f"device {procs.device}")
    if args.batching == "groups":
        print0(f"batching groups: a micro-batch forwards up to {2 * micro} images, whole groups of pairs that share them")

    # -------------------------------------------------------------------------- data: pairs -> latent caches
    train_dir, eval_dir = load_data(args, procs)
    if args.cache_only:
        print0("caches written; exiting (--cache-only)")
        return barrier()

    # -------------------------------------------------------------------------- model, optimizer, EMA, resume
    model, train_model = make_model(args, procs)  # before the optimizer: FSDP replaces the parameters with their shards
    C = model.tap.config.in_channels  # the cache must hold latents this backbone reads
    train_cache = data.PairCache(train_dir, latent_channels=C)
    eval_cache = data.PairCache(eval_dir, latent_channels=C) if eval_dir else None
    print0(f"train: {len(train_cache)} pairs in {len(train_cache.buckets())} bucket(s)"
           + (f"; held-out: {len(eval_cache)} pairs" if eval_cache else ""))
    params = trainable_state(model)
    print0(f"{args.head} on {args.backbone}: {sum(p.numel() for p in params.values()) / 1e6:.3f}M trainable / "
           f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, taps {model.tap.taps}")
    _, h, w = max((p["shape"] for p in train_cache.pairs), key=lambda s: s[1] * s[2])  # the largest bucket's latents
    tokens = h * w // model.tap.config.patch_size ** 2 + len(train_cache.pair(0)["prompt_embeds"])  # image + text
    print0(describe_memory(memory_estimate(model, 2 * micro, tokens, procs.world, args.grad_ckpt, procs.device)))
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    ema = {n: p.detach().clone() for n, p in params.items()}
    step, ckpt_path, log_path = 0, os.path.join(args.out, "ckpt.safetensors"), os.path.join(args.out, "log.jsonl")
    if args.resume and not os.path.isfile(ckpt_path):
        print0(f"--resume: no checkpoint at {ckpt_path} yet; starting from step 0")
    if args.resume and os.path.isfile(ckpt_path):
        tensors, meta = align.load_state(ckpt_path, params, ema, opt, procs.device, prefix="model.")
        torch.set_rng_state(tensors["rng.torch"])
        step = meta["step"]
        print0(f"resumed from {ckpt_path} at step {step}")
    if master:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        align.truncate_log(log_path, step, key="step")
    wandb = open_wandb(args) if master and args.wandb else None

    # -------------------------------------------------------------------------- the loop
    plan, acc_eval, metrics = EpochPlan(train_cache, args, micro), None, {}
    clock, pairs_seen = time.time(), 0
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc="train", mininterval=5)
    while step < args.steps:
        batch = plan.batch(step)
        lr = learning_rate(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, correct, n_pairs = forward_backward(train_model, train_cache, batch, args, step, procs, accum)
        gnorm = torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(args.ema, (1 + step) / (10 + step))  # EMA warmup (as timm's / DiT's): the decay grows to args.ema
        for n, p in params.items():  # over the first steps, so early evaluations are not ~the initial weights
            ema[n].lerp_(p.detach(), 1 - decay)
        step, pairs_seen = step + 1, pairs_seen + n_pairs
        bar.update(1)
        # ---------------------------------------------------------------------- log, evaluate (EMA weights), checkpoint
        if step % args.log_interval == 0 or step % args.eval_interval == 0 or step == args.steps:
            metrics = dict(step=step, loss=loss.item(), acc=correct.item() / n_pairs, lr=lr, gnorm=gnorm.item(),
                           pairs_per_s=pairs_seen / (time.time() - clock))
            if eval_cache and (step % args.eval_interval == 0 or step == args.steps):
                align.swap_weights(params, ema)
                acc_eval, n_eval = evaluate(model, eval_cache, args, procs)
                align.swap_weights(params, ema)
                metrics.update(eval_acc=acc_eval, eval_pairs=n_eval)
            if master:
                write_metrics(bar, log_path, metrics, wandb)
            clock, pairs_seen = time.time(), 0  # training throughput excludes the evaluation
        if step % args.ckpt_interval == 0 or step == args.steps:  # every rank: FSDP gathers the shards, rank 0 writes
            meta = dict(args=vars(args), step=step, world_size=procs.world, metrics=metrics)
            align.save_state(ckpt_path, params, ema, opt, meta, prefix="model.", extra={"rng.torch": torch.get_rng_state()})
    bar.close()
    barrier()
    if acc_eval is not None:
        print0(f"final: {args.head} on {args.backbone}, step {step}, held-out accuracy {100 * acc_eval:.2f}% on "
               f"{n_eval} pairs of {args.eval_data} (t={args.t_eval}, EMA weights); checkpoint {ckpt_path}")
    else:
        print0(f"final: {args.head} on {args.backbone}, step {step}; checkpoint {ckpt_path}")
    barrier()  # a normal exit after a barrier (destroy_process_group can abort under gloo)


def write_metrics(bar, log_path, metrics, wandb=None):
    """One line to stdout and to log.jsonl (and wandb if asked for)."""
    bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    with open(log_path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if wandb:
        wandb.log(metrics, step=metrics["step"])


if __name__ == "__main__":
    main(parser.parse_args())
