"""
What the alignment stages share (grpo.py, refl.py, step_grpo.py, sample_stepwise.py): their processes (torchrun or
not, print0), the generator as a policy (prompts encoded once, LoRA on its transformer and its export in diffusers'
format, the checkpoint of a run), the frozen rewards beside it (train_reward.py checkpoints or released DiNa-LRM folders
checked against the generator, or the toy's golden oracle), the fixed evaluation, and the files a run writes
(summary.json, curves.png, grid.png, the final lines).

The math (sde_step, cps_step, sample) lives in model.py; this file holds the plumbing the stages would otherwise copy.
"""
import json
import os
import tempfile
from contextlib import nullcontext
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import released
from data import read_prompts
from model import (atomic_write, decode_latents, encode_images, load_checkpoint, sample, save_checkpoint, seeded,
                   to_tensor)
from parallel import gathered, shard_like

# -----------------------------------------------------------------------------
# Processes: one per GPU under torchrun (NCCL), or one or more on CPUs (gloo)


class Processes(NamedTuple):
    ddp: bool  # launched by torchrun (RANK is set)
    rank: int
    world: int
    device: str  # cuda:LOCAL_RANK, or cpu
    autocast: object  # bf16 autocast on CUDA, a null context on CPU (float32)


def setup_distributed():
    """-> Processes: torchrun's environment if RANK is set (NCCL on GPUs, gloo on CPUs); bf16 autocast on CUDA only.
    Every stage ends with barrier() and a normal exit, not destroy_process_group (which aborts under gloo)."""
    ddp = "RANK" in os.environ
    if ddp and not dist.is_initialized():  # a second main() in one process (tests) keeps the group
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    return Processes(ddp, rank, world, device, autocast)


def barrier():
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def print0(*args):
    """print on rank 0 only (flushed: the lines show as they come under torchrun)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def print_recipe(name, recipe, args):
    """The resolved recipe, printed once at start: what a reader sees declared is what runs."""
    print0(f"recipe {name}: " + ", ".join(f"{k}={getattr(args, k)}" for k in recipe))


def fill_preset(args, values):
    """A preset's values for the flags left at None: a flag given on the command line always wins."""
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# -----------------------------------------------------------------------------
# A run's state: the checkpoint (trained weights, their EMA, AdamW) and its log; train_reward.py and the stages alike


def save_state(path, params, ema, opt, meta, prefix="lora.", extra=None):
    """The trained weights {name: parameter} under `prefix` (model. for a reward, lora. for a policy), their EMA, AdamW's
    state and any extra tensors in one safetensors file with meta (args, step, ...) in its header, written by rank 0.
    FSDP shards are gathered whole (parallel.gathered): then every rank calls it."""
    tensors = {f"{prefix}{n}": p for n, p in params.items()} | {f"ema.{n}": e for n, e in ema.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim.{n}.{k}"] = v
    tensors = gathered(tensors)
    if int(os.environ.get("RANK", 0)) == 0:
        save_checkpoint(path, tensors | (extra or {}), meta)


def load_state(path, params, ema, opt, device="cpu", prefix="lora."):
    """The inverse of save_state, in place -> (tensors, meta); nothing is unpickled. FSDP shards take their part of
    each full tensor (parallel.shard_like), so runs with and without FSDP resume from each other."""
    tensors, meta = load_checkpoint(path)
    for n, p in params.items():
        part = lambda key: shard_like(tensors[key], p)  # the full tensor, or this rank's part of it as p holds it
        p.data.copy_(part(f"{prefix}{n}"))
        ema[n].copy_(part(f"ema.{n}"))
        if f"optim.{n}.exp_avg" in tensors:
            opt.state[p] = {k: part(f"optim.{n}.{k}").to(device) for k in ("exp_avg", "exp_avg_sq")}
            opt.state[p]["step"] = tensors[f"optim.{n}.step"]  # on the CPU, where AdamW keeps it
    return tensors, meta


# -----------------------------------------------------------------------------
# The generator as a policy: encode prompts once, LoRA on its transformer, the rewards beside it


@torch.no_grad()
def encode_prompt_table(pipe, prompts, max_text_len, device="cpu"):
    """Every distinct prompt (and the empty one, CFG's negative) through the pipeline's text encoders, once per run:
    -> {prompt: (prompt_embeds (L, D), pooled (P,))}. The generator and the latent reward read these same embeddings."""
    names = sorted(set(prompts) | {""})
    table = {}
    for i in range(0, len(names), 64):
        chunk = names[i:i + 64]
        pe, _, pooled, _ = pipe.encode_prompt(chunk, chunk, chunk, device=device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_text_len)
        table.update({p: (e.float().cpu(), q.float().cpu()) for p, e, q in zip(chunk, pe, pooled)})
    return table


def embeds(table, prompts, device="cpu"):
    """-> (prompt_embeds (B, L, D), pooled (B, P)) of a list of prompts from encode_prompt_table's table."""
    return tuple(torch.stack([table[p][j] for p in prompts]).to(device) for j in (0, 1))


POLICY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # Flow-GRPO's LoRA targets on SD3.5 (attention projections)


def add_policy_lora(transformer, rank=32, alpha=64, targets=POLICY_TARGETS, seed=0):
    """LoRA on the generator (diffusers' add_adapter; B = 0, so the policy starts as the base model). Only the LoRA
    weights train. -> {name: parameter} of them. The KL reference is the same network with the adapter disabled."""
    from peft import LoraConfig
    torch.manual_seed(seed)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"))
    params = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def save_policy_lora(folder, transformer):
    """The policy's LoRA (as the transformer holds it now) in diffusers' format, with its alpha in the metadata:
    StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(folder) gives the aligned generator."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)) or ".", prefix=".lora_tmp_")
    StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    os.rmdir(tmp)


def optimizer_step(params, opt, ema, ema_decay=0.9, grad_clip=1.0, ddp=False, where="step"):
    """One policy update after the backward passes: the LoRA gradients all-reduced (summed: each rank's loss is already
    divided by the global count) by hand, in one flat tensor (they are small; DDP would need one forward per backward),
    refused when non-finite, clipped; AdamW steps, then the EMA (ema_decay 0: a copy of the live weights) -> grad norm."""
    grads = torch.cat([p.grad.flatten() for p in params.values()])
    if ddp:
        torch.distributed.all_reduce(grads)
    if not torch.isfinite(grads).all():
        raise FloatingPointError(f"{where}: non-finite loss or gradient")
    for p, g in zip(params.values(), grads.split([p.numel() for p in params.values()])):
        p.grad.copy_(g.view_as(p))
    gnorm = torch.nn.utils.clip_grad_norm_(params.values(), grad_clip).item()
    opt.step()
    opt.zero_grad(set_to_none=False)
    for n, p in params.items():
        ema[n].lerp_(p.detach(), 1 - ema_decay)
    return gnorm


def start_run(out, resume, params, ema, opt, rank=0, device="cpu"):
    """Resume from <out>/ckpt.safetensors (exactly: the LoRA, its EMA, AdamW, the evaluations so far), or start at
    iteration 0 with no evaluation yet (the stage then evaluates the policy before training); the log is cut to match
    -> (iteration, history, checkpoint path, log path)."""
    it, history = 0, []
    ckpt_path, log_path = os.path.join(out, "ckpt.safetensors"), os.path.join(out, "log.jsonl")
    if resume and os.path.isfile(ckpt_path):
        _, meta = load_state(ckpt_path, params, ema, opt, device)
        it, history = meta["iteration"], meta["history"]
        print0(f"resumed from {ckpt_path} at iteration {it}")
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        truncate_log(log_path, it)
    return it, history, ckpt_path, log_path


def swap_weights(params, ema):
    """Exchange the live weights and their EMA in place (evaluate with the EMA, then swap back)."""
    for n, p in params.items():
        tmp = p.detach().clone()
        p.data.copy_(ema[n])
        ema[n].copy_(tmp)


def truncate_log(path, it, key="iter"):
    """A fresh run (it = 0) starts a fresh log.jsonl; a resumed one drops what a killed run logged after its checkpoint
    (key: the log's counter, iter for the stages, step for train_reward.py)."""
    if os.path.isfile(path):
        keep = [line for line in open(path) if 0 < json.loads(line)[key] <= it] if it else []
        open(path, "w").writelines(keep)


class Oracle(NamedTuple):
    """A golden judge of decoded images, passed in by a stage (the toy world's: toy_golden_score and match_stats).
    score(images, prompts, parts=False) -> (B,) array in [0, 1]; parts=True: {term: its weighted share (B,)} and score,
    the terms summing to it. match(images, prompts) -> {color, shape, background, match} rates."""
    score: Callable
    match: Callable


def load_rewards(paths, weights, transformer, t=None, device="cpu", oracle=None, normalisation="raw"):
    """The alignment stages' frozen rewards: train_reward.py checkpoints (EMA weights) or released DiNa-LRM folders,
    checked against the generator they judge, or "oracle" (the toy's golden oracle, decoded; the ceiling: needs
    `oracle`, an Oracle). normalisation: what the latent rewards return (model.SCORE_NORMALISATIONS).
    -> [dict(name, model (None: oracle), oracle, t: the noise level it reads (its checkpoint's t_eval unless t), weight,
    text_len, t_range: the noise levels it was trained on, (t*, t*) for --t-sampling fixed)]."""
    out = []
    for path, w in zip(paths, weights):
        if path == "oracle":
            if oracle is None:
                raise ValueError("--reward oracle is the toy world's golden oracle; it needs --backbone toy")
            out.append(dict(name=path, model=None, oracle=oracle, t=None, weight=w, text_len=None, t_range=None))
            continue
        reward, meta = released.load_reward(path, normalisation=normalisation)
        mine, gen = reward.tap.config, transformer.config
        for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
            if getattr(mine, key) != getattr(gen, key):
                raise ValueError(f"{path}: the reward's backbone has {key}={getattr(mine, key)} but the generator has "
                                 f"{getattr(gen, key)}; train the reward on this generator's backbone")
        trained = meta["args"]  # the reward's own training run
        fixed = trained.get("t_sampling") == "fixed"
        t_range = (trained["t_eval"],) * 2 if fixed else (0.0, 1.0)  # the noise levels it was trained on
        out.append(dict(name=path, model=reward.requires_grad_(False).to(device), oracle=None,
                        t=trained["t_eval"] if t is None else t, weight=w, text_len=trained["max_text_len"],
                        t_range=t_range))
    lens = {r["text_len"] for r in out} - {None}
    if len(lens) > 1:
        raise ValueError(f"the rewards read prompts of different lengths {sorted(lens)}; they must share embeddings")
    return out


def score_rewards(rewards, lat, prompts, table, keys, decode=None):
    """(R, B) float32 rewards of latents (B,C,h,w) from each reward; image b's re-noising noise is seeded by keys[b]
    (a tuple of ints), so a score never depends on the batch. Gradients flow to lat unless called under no_grad (ReFL).
    The oracle decodes (decode: latents -> PIL) and scores the images: no gradient."""
    out = []
    for r in rewards:
        if r["model"] is None:
            golden = r["oracle"].score(decode(lat.detach()), prompts)
            out.append(torch.tensor(golden, dtype=torch.float32, device=lat.device))
            continue
        eps = torch.stack([torch.randn(lat.shape[1:], generator=seeded(*k)) for k in keys]).to(lat.device)
        pe, pooled = embeds(table, prompts, lat.device)
        out.append(r["model"].score(lat, pe, pooled, t=r["t"], noise=eps).float())
    return torch.stack(out)


def score_noisy(rewards, x, t, prompts, table):
    """(R, B) float32 rewards of denoising states x (B,C,h,w) read at their own noise level t (DRM's dense per-step
    reward: no re-noising, the reward was trained on noisy latents). Only latent rewards can: the oracle sees images."""
    pe, pooled = embeds(table, prompts, x.device)
    tt = torch.full((len(x),), float(t), device=x.device)
    return torch.stack([r["model"](x, tt, pe, pooled).float() for r in rewards])


def check_dense(rewards, levels, flag="--reward"):
    """Every reward must score noisy latents at each of `levels` (the noise levels a stage reads them at): a latent
    reward trained at those levels (its checkpoint's t range), not the oracle."""
    for r in rewards:
        if r["model"] is None:
            raise ValueError(f"{flag} oracle scores decoded images; dense per-step rewards need a latent reward")
        lo, hi = r["t_range"]
        bad = [t for t in levels if not lo - 1e-6 <= t <= hi + 1e-6]
        if bad:
            raise ValueError(f"{flag} {r['name']}: trained at t in [{lo}, {hi}], it cannot score the noise level "
                             f"{bad[0]:.4f} of this schedule (choose a --steps-window inside, or another reward)")


EVAL_SEED = 4242  # the evaluation's noise stream: seeded(EVAL_SEED, image k of a prompt, the prompt's index)
PROXY_NOISE = 10 ** 9  # the evaluation proxy's re-noising stream: seeded(seed, PROXY_NOISE, image)


def judge_images(oracle, images, prompts):
    """An Oracle's verdict on decoded images -> dict(golden: the mean score, golden_all: each image's, terms: {term: its
    mean weighted share}, summing to golden, color / shape / background / match: prompt-match rates)."""
    parts = oracle.score(images, prompts, parts=True)
    stats = oracle.match(images, prompts)
    terms = {k: float(v.mean()) for k, v in parts.items() if k != "score"}
    return dict(golden=float(parts["score"].mean()), golden_all=parts["score"].tolist(), terms=terms,
                **{k: stats[k] for k in ("color", "shape", "background", "match")})


@torch.no_grad()
def evaluate_ema(run, args, reward_fn, autocast, batch=64):
    """A stage's fixed evaluation (docs/design.md §10) of its EMA weights: ODE samples of run.splits, image k of a
    prompt from seeded(EVAL_SEED, k, the prompt's index). reward_fn(latents, prompts) -> (B,), the proxy, reads their
    latents and (latent rewards only) the VAE re-encodings of their decoded images, batch by batch: the same noise.
    -> ({split: dict(reward, reward_reencoded, judge_images's verdict with an Oracle)}, {split: first-seed images})."""
    seeds = dict(train=args.eval_seeds, heldout=args.heldout_seeds)
    latent = all(r["model"] is not None for r in run.rewards)  # the oracle reads pixels: nothing to round-trip
    report, images = {}, {}
    swap_weights(run.params, run.ema)
    for name, prompts in run.splits.items():
        items = [(p, i, k) for k in range(seeds[name]) for i, p in enumerate(prompts)]
        r, again, pil = [], [], []
        for c in range(0, len(items), batch):
            chunk = items[c:c + batch]
            names = [p for p, _, _ in chunk]
            noise = torch.stack([torch.randn(run.transformer.config.in_channels, *run.shape,
                                             generator=seeded(EVAL_SEED, k, i)) for _, i, k in chunk]).to(run.device)
            pe, pooled = embeds(run.table, names, run.device)
            with autocast:
                lat = sample(run.transformer, noise, run.eval_sigmas, pe, pooled, args.eval_cfg,
                             embeds(run.table, [""], run.device))["latents"]
                r.append(reward_fn(lat, names).float().cpu())
                decoded = decode_latents(run.vae, lat)
                if latent:
                    again.append(reward_fn(encode_images(run.vae, to_tensor(decoded)), names).float().cpu())
            pil += decoded
        report[name] = dict(reward=torch.cat(r).mean().item())
        if again:
            report[name]["reward_reencoded"] = torch.cat(again).mean().item()
        if run.oracle:
            report[name].update(judge_images(run.oracle, pil, [p for p, _, _ in items]))
        images[name] = pil[:len(prompts)]
    swap_weights(run.params, run.ema)
    return report, images

# -----------------------------------------------------------------------------
# The files of a run: prompt lists, summary.json, curves, grids


def read_splits(args):
    """A training stage's prompts -> (training prompts, {split: fixed evaluation prompts}): train = --eval-prompts, or
    the first 32 training prompts; heldout = --heldout-prompts, if given."""
    train_prompts = read_prompts(args.prompts, "--prompts")
    seen = read_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else train_prompts[:32]
    splits = {"train": seen}
    if args.heldout_prompts:
        splits["heldout"] = read_prompts(args.heldout_prompts, "--heldout-prompts")
    return train_prompts, splits


def image_grid(rows, cell=96, labels=()):
    """rows: lists of PIL images (e.g. the same prompts and seeds before / after) -> one PIL grid, a label per row."""
    pad = 90 if labels else 0
    grid = Image.new("RGB", (pad + cell * max(map(len, rows)), cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        if r < len(labels):
            draw.text((4, r * cell + cell // 2 - 6), labels[r], fill="black")
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (pad + c * cell, r * cell))
    return grid


def save_curves(path, panels):
    """panels [(title, xlabel, {name: (xs, ys)})] -> one PNG, the panels side by side (matplotlib, Agg), written atomically."""
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone, no figure to close
    fig = Figure(figsize=(5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, xlabel, series) in zip(axes[0], panels):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def describe_eval(evaluation):
    """One line of an alignment evaluation {split: {reward, golden, color, shape, ...}} (and its "iter")."""
    parts = []
    for split, m in evaluation.items():
        if split == "iter":
            continue
        again = f" (re-encoded {m['reward_reencoded']:.4f})" if "reward_reencoded" in m else ""
        golden = f" golden {m['golden']:.4f} (color {m['color']:.2f} shape {m['shape']:.2f})" if "golden" in m else ""
        parts.append(f"{split}: proxy {m['reward']:.4f}{again}{golden}")
    return " | ".join(parts)


def compare(split, a, b):
    """A split's evaluations before (a) and after (b) training -> (its summary.json keys, its final line). golden_se:
    the standard error of the paired (same prompt and seed) golden difference over the split's images."""
    summary = {}
    for when, m in (("before", a), ("after", b)):
        summary.update({f"{k}_{when}_{split}": v for k, v in m.items() if k not in ("golden_all", "terms")})
        summary.update({f"golden_{k}_{when}_{split}": v for k, v in m.get("terms", {}).items()})
    line = f"{split}: proxy {a['reward']:.4f} -> {b['reward']:.4f}"
    if "reward_reencoded" in a:
        line += f" (re-encoded {a['reward_reencoded']:.4f} -> {b['reward_reencoded']:.4f})"
    if "golden" in a:
        d = np.array(b["golden_all"]) - np.array(a["golden_all"])
        se = float(d.std(ddof=1) / np.sqrt(len(d)))
        summary[f"golden_se_{split}"] = se
        terms = " ".join(f"{k} {b['terms'][k] - v:+.4f}" for k, v in a.get("terms", {}).items())
        line += (f", golden {a['golden']:.4f} -> {b['golden']:.4f} ({b['golden'] - a['golden']:+.4f} +- {se:.4f}; "
                 f"{terms}), colour match {a['color']:.2f} -> {b['color']:.2f}, "
                 f"shape match {a['shape']:.2f} -> {b['shape']:.2f}")
    return summary, line


def finish(out, history, after_images, unit="iterations"):
    """The end of a run (its LoRA exported to <out>/lora), from its evaluations (history[0] before training, [-1]
    after): the final lines, summary.json (compare's keys, the training split's also unsuffixed), curves.png and
    grid.png (out/before.png above the after images)."""
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    first, last = history[0], history[-1]
    splits = [s for s in first if s != "iter"]
    summary = dict(iterations=last["iter"], seconds=sum(sum(r["seconds"].values()) for r in log), curve=[])
    for h in history[1:] or [last]:  # every evaluation after the first, paired with it: the golden curve and its SE
        when = f"evaluation at {h['iter']} {unit}"
        if h is last:
            when = f"final ({summary['iterations']} {unit}, {summary['seconds']:.0f} s of training)"
        for s in splits:
            keys, line = compare(s, first[s], h[s])
            summary["curve"].append(dict(iter=h["iter"], **keys))
            print(f"{when}: {line}", flush=True)
    summary.update({k: v for entry in summary["curve"][-len(splits):] for k, v in entry.items() if k != "iter"})
    for k in ("golden_before", "golden_after", "golden_se", "reward_before", "reward_after"):  # the training split's
        if f"{k}_train" in summary:
            summary[k] = summary[f"{k}_train"]
    atomic_write(os.path.join(out, "summary.json"), lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    save_curves(os.path.join(out, "curves.png"), [(f"{k} (EMA policy, fixed seeds)", "iteration", {
        s: ([h["iter"] for h in history], [h[s][k] for h in history]) for s in splits})
        for k in ("reward", "reward_reencoded", "golden") if k in first["train"]])
    if after_images:
        before = Image.open(os.path.join(out, "before.png"))
        after = image_grid([im[:12] for im in after_images.values()])
        grid = Image.new("RGB", (before.width, before.height + after.height + 8), "white")
        grid.paste(before, (0, 0))
        grid.paste(after, (0, before.height + 8))
        grid.save(os.path.join(out, "grid.png"))
    print(f"aligned LoRA: {os.path.join(out, 'lora')} (pipe.load_lora_weights); summary {out}/summary.json", flush=True)
