"""
The toy world (docs/design.md §8, with the layout of out/toy): prompts, renderer, corruptions, the golden oracle
`toy_golden_score` and the simulated annotators `toy_annotate`; and its build from a seed, in phases main calls in order:
render -> train the VAE -> train the generator -> sample it -> preference pairs and labels -> benchmarks -> summary.

  python toy.py                       # -> out/toy, the default sizes (the world of docs/results.md)
  python toy.py --small --out /tmp/w  # the SMALL preset: a miniature world (tests)
  toy.build("out/toy")                # from another stage: builds the world unless out/toy/summary.json exists

Deviations from SD3's recipe, for speed: the VAE decodes the posterior mean in training (a tiny KL, 1e-6, still
regularises it); the latent normalisation is one scalar shift/scale for all channels, as SD3 does.
"""

import argparse
import copy
import itertools
import json
import os
import re
import shutil
import time
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file
from tqdm import tqdm

from model import make_tiny_pipeline, to_tensor


# ----------------------------------------------------------------------------- the world: prompts, renderer, corruptions, oracle, annotators
# Palettes chosen far apart in RGB (every colour >= 80 from every other colour and from
# every background), so a nearest-colour read is unambiguous on clean renders.
TOY_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
              "yellow": (240, 210, 30), "purple": (140, 40, 190), "orange": (245, 130, 20)}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# (color, shape) combos never shown in training; each colour and shape still is.
TOY_HELDOUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"), ("orange", "triangle"), ("purple", "square"))
TOY_CORRUPTIONS = ("blur", "noise", "contrast", "clip")
TOY_WORDS = ("a", "on", "background", *TOY_COLORS, *TOY_SHAPES, *TOY_BACKGROUNDS)  # one token each in its tokenizer
_COL, _BGC = np.array(list(TOY_COLORS.values()), float), np.array(list(TOY_BACKGROUNDS.values()), float)
_SHAPE_CORNERS = np.array([[0.24, 0.24], [1.0, 1.0], [0.0, 0.8]])  # toy_read's corners (top, bottom), measured on renders
_TOY_RE = re.compile(r"a (\w+) (\w+) on a (\w+) background")


def toy_prompt(color, shape, background):
    return f"a {color} {shape} on a {background} background"


def parse_toy_prompt(prompt):
    m = _TOY_RE.fullmatch(prompt.strip()) if isinstance(prompt, str) else None
    if m is None or m[1] not in TOY_COLORS or m[2] not in TOY_SHAPES or m[3] not in TOY_BACKGROUNDS:
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return m[1], m[2], m[3]


def render_toy(color, shape, background, rng, size=32):
    """One flat-coloured object (side 40-75% of the image) fully inside the frame, no AA."""
    parse_toy_prompt(toy_prompt(color, shape, background))  # validates the three names
    img = Image.new("RGB", (size, size), TOY_BACKGROUNDS[background])
    s = int(rng.integers(round(0.4 * size), round(0.75 * size) + 1))  # object side, pixels
    x, y = (int(v) for v in rng.integers(0, size - s + 1, size=2))
    box, fill, draw = [x, y, x + s - 1, y + s - 1], TOY_COLORS[color], ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright triangle
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    return img


_PIXEL_CORRUPTIONS = {  # (x (H,W,3) float 0..255, strength s, rng) -> x, clipped afterwards
    "noise": lambda x, s, rng: x + np.kron(rng.normal(0.0, 60.0 * s, (-(-x.shape[0] // 4), -(-x.shape[1] // 4), 3)),
                                           np.ones((4, 4, 1)))[:x.shape[0], :x.shape[1]],  # 4x4 cells: a 4x VAE keeps them
    "contrast": lambda x, s, rng: 128.0 + (x - 128.0) * (1.0 - 0.8 * s),  # toward mid-gray
    "clip": lambda x, s, rng: x * (1.0 + 1.5 * s) + 40.0 * s}  # over-exposure, then saturate


def corrupt_toy(img, kind, strength, rng):
    """The "aesthetic" axis: strength 0 = unchanged, 1 = severe."""
    s = float(np.clip(strength, 0.0, 1.0))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=2.0 * s))
    if kind not in _PIXEL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}, not in {TOY_CORRUPTIONS}")
    x = _PIXEL_CORRUPTIONS[kind](np.asarray(img, dtype=np.float32), s, rng)
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def _as_pixels(images):
    """PIL list | uint8 (N,H,W,3) | float tensor/array (N,3,H,W) in [-1,1] -> (N,H,W,3) in 0..255."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.dtype != np.uint8 and images.ndim == 4 and images.shape[1] == 3:
        return (np.clip(images.transpose(0, 2, 3, 1), -1, 1) * 127.5 + 127.5).astype(np.float32)
    x = images if isinstance(images, np.ndarray) else np.stack([np.asarray(im.convert("RGB")) for im in images])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be PIL, uint8 (N,H,W,3) or float (N,3,H,W), got {x.dtype} {x.shape}")
    return x.astype(np.float32)


def _soft_pick(features, palette, sigma):
    """features (N,K), palette (M,K) -> (N,M) softmax of -d^2 / 2 sigma^2."""
    d2 = ((features[:, None, :] - palette[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    p = np.exp(-(d2 - d2.min(1, keepdims=True)))
    return p / p.sum(1, keepdims=True)


def toy_read(images):
    """Pixels -> bg, fg (N,3) colours; corners (N,2) how full the top and bottom corners of the object's box are (the
    shape); n_fg (N,) object pixels; resid (N,) mean distance to the nearer of bg, fg (blur, noise); pal (N,) distance
    to the palettes (contrast, clip)."""
    x = _as_pixels(images)  # (N,H,W,3)
    n, h, w, _ = x.shape
    # background = median of the border pixels (N,2H+2W,3): robust to an object touching it
    bg = np.median(np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1), 1)
    d = np.linalg.norm(x - bg[:, None, None], axis=-1)  # (N,H,W)
    thr = np.maximum(30.0, 0.5 * np.percentile(d.reshape(n, -1), 99, axis=1))
    m = d > thr[:, None, None]
    # drop isolated specks (noise): keep pixels with >= 3 object pixels in their 3x3
    mp = np.pad(m, ((0, 0), (1, 1), (1, 1))).astype(np.int8)
    m = m & (sum(mp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) >= 3)
    n_fg, rows, cols = m.sum((1, 2)), m.any(2), m.any(1)  # (N,), (N,H), (N,W)
    top, left = rows.argmax(1), cols.argmax(1)  # the object's bounding box: rows top..bottom-1, columns left..right-1
    bottom, right = h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)
    # shape: how full the box's corner cells (a quarter of its height and width) are, top two and bottom two averaged: on
    # renders square (1, 1), circle (0.24, 0.24), triangle (0, 0.8); the fill ratio read ragged squares as circles
    v = (np.arange(h)[None, :, None] - top[:, None, None] + 0.5) / np.maximum(bottom - top, 1)[:, None, None]  # (N,H,1)
    u = (np.arange(w)[None, None, :] - left[:, None, None] + 0.5) / np.maximum(right - left, 1)[:, None, None]  # (N,1,W)
    lo_v, hi_v, lo_u, hi_u = (v > 0) & (v < 0.25), (v > 0.75) & (v < 1), (u > 0) & (u < 0.25), (u > 0.75) & (u < 1)
    cells = [lo_v & lo_u, lo_v & hi_u, hi_v & lo_u, hi_v & hi_u]
    occ = [(m & c).sum((1, 2)) / np.maximum(c.sum((1, 2)), 1) for c in cells]  # 4 x (N,)
    corners = np.stack([(occ[0] + occ[1]) / 2, (occ[2] + occ[3]) / 2], 1)  # (N,2): top, bottom
    fg = (x * m[..., None]).sum((1, 2)) / np.maximum(n_fg, 1)[:, None]  # mean object colour
    fg = np.where(n_fg[:, None] > 0, fg, bg)  # no object: fg = bg
    resid = np.minimum(d, np.linalg.norm(x - fg[:, None, None], axis=-1)).mean((1, 2))
    pal = np.linalg.norm(fg[:, None] - _COL, axis=-1).min(1) + np.linalg.norm(bg[:, None] - _BGC, axis=-1).min(1)
    return dict(bg=bg, fg=fg, corners=corners, n_fg=n_fg, resid=resid, pal=pal / 2)


def toy_golden_score(images, prompts, parts=False):
    """Oracle in [0, 1], deterministic: 0.6 * fidelity + 0.4 * quality. fidelity = mean soft probability (softmax over
    the palette of -distance^2) that the colour, shape and background read off the pixels are the prompted ones;
    quality = exp(-resid / 15 - pal / 50), 1 when clean. images: PIL list, uint8 (N,H,W,3) or float (N,3,H,W) in
    [-1, 1] (the VAE range). parts=True: a dict of the weighted terms (colour, shape, background: 0.2 each; quality
    0.4) and the score."""
    r, attrs = toy_read(images), [parse_toy_prompt(p) for p in prompts]
    if len(attrs) != len(r["bg"]):
        raise ValueError(f"{len(r['bg'])} images but {len(attrs)} prompts")
    ci, si, bi = (np.array([list(names).index(a[j]) for a in attrs])
                  for j, names in enumerate((TOY_COLORS, TOY_SHAPES, TOY_BACKGROUNDS)))
    idx, has = np.arange(len(attrs)), r["n_fg"] >= 4  # no object -> no colour or shape credit
    p_col = _soft_pick(r["fg"], _COL, 25.0)[idx, ci] * has
    p_shp = _soft_pick(r["corners"], _SHAPE_CORNERS, 0.15)[idx, si] * has
    p_bg = _soft_pick(r["bg"], _BGC, 25.0)[idx, bi]
    fidelity = (p_col + p_shp + p_bg) / 3
    quality = np.exp(-r["resid"] / 15.0 - r["pal"] / 50.0)
    score = np.clip(0.6 * fidelity + 0.4 * quality, 0.0, 1.0)
    if parts:
        return dict(color=0.2 * p_col, shape=0.2 * p_shp, background=0.2 * p_bg, quality=0.4 * quality, score=score)
    return score


def toy_annotate(score_a, score_b, n_raters, rng, noise=0.1):
    """-> (N,) int, how many of n_raters Thurstone raters prefer a: iff score_a + noise*N(0,1) > score_b + noise*N(0,1)."""
    a, b = np.asarray(score_a, float)[:, None], np.asarray(score_b, float)[:, None]
    z = noise * rng.standard_normal((2, len(a), n_raters))
    return (a + z[0] > b + z[1]).sum(1)


# ----------------------------------------------------------------------------- the build's flags (the defaults: docs/results.md's world)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# output
parser.add_argument("--out", default="out/toy")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--small", action="store_true", help="the SMALL preset: the miniature world of the tests")
# renders (the generator's training set)
parser.add_argument("--renders-per-prompt", type=int, default=64)
# the web-like mix: real generators learn from flawed images under clean captions and from captions naming a wrong
# attribute, which is why their samples carry coarse flaws that alignment removes (docs/design.md §8). The shares are
# measured: colour and shape each wrong in a third of the samples (docs/results.md §9); 0 and 0 give the clean world
parser.add_argument("--flawed-share", type=float, default=0.3, help="share of the renders replaced by a corrupted copy")
parser.add_argument("--flaw-strength", type=lambda s: tuple(map(float, s.split(","))), default=(0.3, 1.0),
                    help="LO,HI: a flaw's strength ~ U(LO, HI)")
parser.add_argument("--wrong-captions", type=float, default=0.25, help="share of the captions naming a wrong attribute")
parser.add_argument("--wrong-attribute", default="color", choices=("color", "shape", "any"),
                    help="what a wrong caption names wrongly (never a held-out colour-shape combination)")
# VAE: L1 + L2 reconstruction + a small KL
parser.add_argument("--vae-steps", type=int, default=200, help="the quick start's sizing (docs/results.md §9)")
parser.add_argument("--vae-batch", type=int, default=32)
parser.add_argument("--vae-lr", type=float, default=2e-3)
parser.add_argument("--kl-weight", type=float, default=1e-6)
parser.add_argument("--vae-corrupt", type=float, default=0.5, help="share of corrupted renders added to the VAE's data")
# generator: rectified flow, logit-normal t (SD3), empty-prompt dropout for CFG (--p-uncond), EMA
parser.add_argument("--gen-steps", type=int, default=400, help="the quick start's sizing: coloured blobs, shapes near "
                    "chance; 1,200 steps draw shapes (docs/results.md §9, docs/log.md)")
parser.add_argument("--gen-batch", type=int, default=32)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--p-uncond", type=float, default=0.1)
parser.add_argument("--ema", type=float, default=0.99)
# sampling with the pipeline itself
parser.add_argument("--sample-steps", type=int, default=10, help="Flow-GRPO's 10 steps: the samples an alignment stage draws")
parser.add_argument("--cfg", type=float, default=4.0)
parser.add_argument("--gen-per-prompt", type=int, default=3, help="generator samples in each test prompt's pool")
parser.add_argument("--train-gen-per-prompt", type=int, default=4, help="generator samples per training prompt in the mixed pools")
parser.add_argument("--onpolicy-per-prompt", type=int, default=32, help="generator samples per training prompt, in on-policy pools of "
                    "--onpolicy-pool samples, 2 renders and 4 corrupted ones, each ranked whole (HPDv3; measured: docs/results.md)")
parser.add_argument("--onpolicy-pool", type=int, default=16)
parser.add_argument("--bench-per-prompt", type=int, default=16, help="K of bench/generated.json: samples from fresh seeds "
                    "per training prompt and per held-out combination, ranked by the oracle")
parser.add_argument("--reuse-pipeline", default=None, help="a built world's pipeline/: its VAE and generator, not retrained; only the data is rebuilt")
parser.add_argument("--train-wrong", type=int, default=1, help="wrong-attribute renders per attribute in each training pool")
# preference pairs (HPDv3) and benchmarks
parser.add_argument("--train-pools", type=int, default=8, help="candidate pools per training prompt, each like a test pool; no pair crosses two")
parser.add_argument("--n-train-pairs", type=int, default=0, help="0: every pair of every pool (each pool ranked whole)")
parser.add_argument("--n-test-pairs", type=int, default=800)
parser.add_argument("--test-train-prompts", type=int, default=9, help="training prompts added to the test prompts")
parser.add_argument("--train-raters", type=int, default=5)
parser.add_argument("--test-raters", type=int, default=21)
parser.add_argument("--rater-noise", type=float, default=0.1)
parser.add_argument("--tie-margin", type=float, default=0.05, help="oracle gap below which annotators tie")
parser.add_argument("--bothbad", type=float, default=0.5, help="GenAI-Bench: both oracle scores below -> bothbad_vote")
parser.add_argument("--n-bench", type=int, default=300, help="pairs in each pairwise benchmark")
# The SMALL preset (--small), the miniature world of the tests: each size is capped at its value here, so a smaller
# flag given with --small still wins, and --n-train-pairs 0 (every pair) becomes 200.
SMALL = dict(renders_per_prompt=4, vae_steps=3, vae_batch=8, gen_steps=3, gen_batch=8, warmup=1, sample_steps=2,
             gen_per_prompt=1, train_gen_per_prompt=1, onpolicy_per_prompt=3, onpolicy_pool=2, bench_per_prompt=2,
             train_wrong=1, train_pools=1, n_train_pairs=200, n_test_pairs=60, test_train_prompts=2, n_bench=20)
# Seed streams besides args.seed's own (numpy: renders, test set, benchmarks; torch: the VAE's and generator's batches)
BENCH_SEED_OFFSET = 1_000_003  # the on-policy benchmark samples from seeds args.seed + this + k: never a training pool's
TRAIN_POOL_STREAM = 1  # default_rng([args.seed, this]): the training pools' own stream, so they never redraw the test set

# ----------------------------------------------------------------------------- pure helpers


def warmup_cosine(step, warmup, total):
    """lr factor: linear warmup over `warmup` steps, then cosine decay to 0 at `total` (VAE and generator)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / total))


def all_prompts():
    return [toy_prompt(c, s, b) for c in TOY_COLORS for s in TOY_SHAPES for b in TOY_BACKGROUNDS]


def is_heldout(prompt):
    return tuple(parse_toy_prompt(prompt)[:2]) in set(map(tuple, TOY_HELDOUT))


def oracle_read(images):
    """The prompt the oracle reads off each image: argmax over all toy prompts of toy_golden_score (fidelity is a sum
    over colour, shape and background, so this reads each attribute)."""
    prompts = all_prompts()
    scores = np.stack([toy_golden_score(images, [p] * len(images)) for p in prompts], 1)  # (N, P)
    return [prompts[i] for i in scores.argmax(1)]


def match_stats(images, prompts):
    """Fraction of images whose colour, shape, background (and all three) match their prompt."""
    if not images:
        return {}
    read = [parse_toy_prompt(p) for p in oracle_read(images)]
    want = [parse_toy_prompt(p) for p in prompts]
    hit = np.array([[r[k] == w[k] for k in range(3)] for r, w in zip(read, want)])
    return dict(n=len(images), match=float(hit.all(1).mean()), color=float(hit[:, 0].mean()),
                shape=float(hit[:, 1].mean()), background=float(hit[:, 2].mean()),
                oracle=float(toy_golden_score(images, prompts).mean()))


def make_pool(prompt, rng, n_clean=3, n_strengths=2, n_wrong=1, avoid=()):
    """Candidates for one prompt: [(PIL, source)], clean renders, n_wrong renders per wrong attribute and
    corrupted renders (each kind at n_strengths random strengths). Generator samples come later.
    avoid: (colour, shape) combos no wrong render may show (training pools avoid the held-out combos)."""
    c, s, b = parse_toy_prompt(prompt)
    pool = [(render_toy(c, s, b, rng), "render") for _ in range(n_clean)]
    for _ in range(n_wrong):
        pool.append((render_toy(str(rng.choice([x for x in TOY_COLORS if x != c and (x, s) not in avoid])), s, b, rng),
                     "wrong-color"))
        pool.append((render_toy(c, str(rng.choice([x for x in TOY_SHAPES if x != s and (c, x) not in avoid])), b, rng),
                     "wrong-shape"))
        pool.append((render_toy(c, s, str(rng.choice([x for x in TOY_BACKGROUNDS if x != b])), rng), "wrong-background"))
    for kind in TOY_CORRUPTIONS:
        for strength in rng.uniform(0.2, 1.0, n_strengths):
            pool.append((corrupt_toy(render_toy(c, s, b, rng), kind, strength, rng), kind))
    return pool


def hpdv3_records(items, pairs, votes, n_raters):
    """items [Item], pairs (K,2) index pairs, votes (K,) for the first -> HPDv3
    records with path1 = the majority's choice, choice_dist = [votes path1, votes path2]."""
    out = []
    for (i, j), v in zip(pairs, votes):
        v = int(v)
        if 2 * v < n_raters:
            i, j, v = j, i, n_raters - v
        out.append(dict(prompt=items[i].prompt, path1=items[i].path, path2=items[j].path, choice_dist=[v, n_raters - v],
                        confidence=v / n_raters, model1=items[i].source, model2=items[j].source))
    return out


def within_prompt_pairs(groups, n_pairs, rng, scores=None, margin=0.0):
    """Sample n_pairs distinct pairs (i, j) inside the index groups; drop oracle near-ties if scores (after the shuffle:
    a float-level change of a score, e.g. another library version, changes only pairs near the margin)."""
    pairs = np.array([p for g in groups for p in itertools.combinations(g, 2)])
    pairs = pairs[rng.permutation(len(pairs))]
    if scores is not None:
        pairs = pairs[np.abs(scores[pairs[:, 0]] - scores[pairs[:, 1]]) >= margin]
    pairs = pairs[:n_pairs or None]  # 0: all
    return np.where(rng.random((len(pairs), 1)) < 0.5, pairs, pairs[:, ::-1])  # random left / right


def ties_ranking(scores, margin):
    """Competition ranking (1 = best) with near-ties tied: from the best down, a tie group holds every score
    within margin of the group's first (best) score, so two scores margin or more apart never share a rank."""
    order = np.argsort(-scores, kind="stable")
    rank, r, top = np.zeros(len(scores), int), 1, scores[order[0]]
    for k, i in enumerate(order):
        if top - scores[i] >= margin:
            r, top = k + 1, scores[i]
        rank[i] = r
    return rank.tolist()


def sample_grid(images, prompts, scale=3, cols=6):
    """Upscaled samples with their prompts written under them."""
    w, h = max(32 * scale, 120), 32 * scale + 30  # a label line is ~20 characters of the default font
    grid = Image.new("RGB", (cols * w, -(-len(images) // cols) * h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (im, p) in enumerate(zip(images, prompts)):
        x, y = (k % cols) * w, (k // cols) * h
        grid.paste(im.resize((32 * scale, 32 * scale), Image.NEAREST), (x + (w - 32 * scale) // 2, y))
        c, s, b = parse_toy_prompt(p)
        draw.text((x + 4, y + 32 * scale + 2), f"{c} {s}" + (" *" if is_heldout(p) else ""), fill="black")
        draw.text((x + 4, y + 32 * scale + 14), f"on {b}", fill="black")
    return grid


def save_images(folder, images, root):
    """Write PNGs named 00000.png... under root/folder; return the paths relative to root."""
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    paths = [f"{folder}/{k:05d}.png" for k in range(len(images))]
    for im, path in zip(images, paths):
        im.save(os.path.join(root, path))
    return paths


def write_json(path, obj, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(r) + "\n" for r in obj)
        else:
            json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- the build, phase by phase (main calls them in order)


Samples = namedtuple("Samples", "images latents prompts")  # [PIL], (N,C,h,w) normalised (what alignment reads), [str]
Item = namedtuple("Item", "path source prompt")  # a pool's image: path in the world, source (render, blur, ...), prompt
Split = namedtuple("Split", "items groups scores")  # a split's pools: [Item], [[item index]] a pool each, (N,) oracle


def apply_preset(args):
    """--small: cap each size of the SMALL preset at its value. Prints the world's sizes, either way."""
    if args.small:
        for k, v in SMALL.items():
            setattr(args, k, min(getattr(args, k) or v, v))  # 0 = all pairs: the small world's 200
    sizes = ", ".join(f"{k} {getattr(args, k)}" for k in SMALL)
    print(f"world, seed {args.seed}, {'the SMALL preset' if args.small else 'the default sizes'}: {sizes}")
    if args.reuse_pipeline:
        print(f"VAE and generator: {args.reuse_pipeline}'s, not retrained (no VAE or generator steps)")


def lap(timings, name, t0):
    """Record and print the seconds since t0 as phase `name`'s -> now, the next phase's t0."""
    now = time.time()
    timings[name] = now - t0
    print(f"{name}: {timings[name]:.1f} s")
    return now


def wrong_caption(prompt, attribute, rng):
    """The prompt with one attribute named wrongly (a random one for "any"), never a held-out colour-shape combination:
    a web caption that does not match its image."""
    c, s, b = parse_toy_prompt(prompt)
    attribute = str(rng.choice(["color", "shape", "background"])) if attribute == "any" else attribute
    if attribute == "color":
        c = str(rng.choice([x for x in TOY_COLORS if x != c and (x, s) not in TOY_HELDOUT]))
    elif attribute == "shape":
        s = str(rng.choice([x for x in TOY_SHAPES if x != s and (c, x) not in TOY_HELDOUT]))
    else:
        b = str(rng.choice([x for x in TOY_BACKGROUNDS if x != b]))
    return toy_prompt(c, s, b)


def render_training_set(train_prompts, rng, args, root):
    """The generator's web-like training set: renders of the training prompts, a random --flawed-share of them replaced
    by a corrupted copy under their clean caption, a random --wrong-captions share captioned wrongly -> (the prompts
    drawn, the captions trained on, the images (N,3,32,32) in [-1, 1], the VAE's data)."""
    prompts = [p for p in train_prompts for _ in range(args.renders_per_prompt)]
    renders = [render_toy(*parse_toy_prompt(p), rng) for p in tqdm(prompts, desc="render", leave=False)]
    captions = list(prompts)
    if args.flawed_share > 0:
        for i in rng.permutation(len(renders))[:round(args.flawed_share * len(renders))]:
            renders[i] = corrupt_toy(renders[i], str(rng.choice(TOY_CORRUPTIONS)), rng.uniform(*args.flaw_strength), rng)
    if args.wrong_captions > 0:
        for i in rng.permutation(len(renders))[:round(args.wrong_captions * len(renders))]:
            captions[i] = wrong_caption(prompts[i], args.wrong_attribute, rng)
    save_images("images/render", renders, root)
    x_all = to_tensor(renders)  # (N,3,32,32) in [-1,1]
    # the VAE sees more corrupted images (as SD's VAE sees all kinds of photos), so its latents keep the blur / noise /
    # contrast / clipping the reward must read (the first renders: the VAE does not read captions)
    bad = [corrupt_toy(im, str(rng.choice(TOY_CORRUPTIONS)), float(rng.uniform(0.1, 1.0)), rng)
           for im in renders[:int(args.vae_corrupt * len(renders))]]
    x_vae = torch.cat([x_all, to_tensor(bad)]) if bad else x_all
    print(f"render: {len(renders)} images of {len(train_prompts)} training prompts, {args.flawed_share:.0%} flawed, "
          f"{args.wrong_captions:.0%} captioned with a wrong {args.wrong_attribute}")
    return prompts, captions, x_all, x_vae


def train_vae(vae, x_vae, args, g):
    """L1 + L2 reconstruction of the posterior mean (a short run learns much faster than with samples) + a small KL."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.warmup, args.vae_steps))
    pbar = tqdm(range(args.vae_steps), desc="vae", leave=False)
    for step in pbar:
        x = x_vae[torch.randint(len(x_vae), (args.vae_batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}")


@torch.no_grad()
def normalise_latents(vae, x_all, render_prompts):
    """SD3's latent normalisation (z - shift) * scale from the renders -> their latents (N,4,16,16), the VAE's figures."""
    vae.eval().requires_grad_(False)
    z = torch.cat([vae.encode(xb).latent_dist.mean for xb in x_all.split(256)])  # (N,4,16,16)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    ev = torch.arange(0, len(x_all), max(1, len(x_all) // 512))  # every prompt, ~512 renders
    rec = torch.cat([vae.decode(zb).sample for zb in z[ev].split(256)]).clamp(-1, 1)
    rec_pil = [Image.fromarray(px) for px in ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)]
    stats = dict(l1=float((rec - x_all[ev]).abs().mean() / 2), shift_factor=shift, scaling_factor=scale,
                 recon=match_stats(rec_pil, [render_prompts[i] for i in ev]))
    print(f"vae: L1 {stats['l1']:.4f}, recon match {stats['recon']['match']:.2f}, shift {shift:.3f} scale {scale:.3f}")
    return (z - shift) * scale, stats


def generator_step(net, ema, opt, sched, latents, pid, pe, pooled, step, batch, p_uncond, ema_decay, g):
    """One step of rectified flow on a batch of latents (N,4,16,16) of prompts pid (N,) -> the loss. pe, pooled: each
    prompt's embeddings, the empty prompt's last (CFG's dropout). Then the EMA of the weights (warmed up)."""
    idx = torch.randint(len(latents), (batch,), generator=g)
    x0, c = latents[idx], pid[idx]
    c = torch.where(torch.rand(len(c), generator=g) < p_uncond, len(pe) - 1, c)  # the empty prompt
    t = torch.sigmoid(torch.randn(len(c), generator=g))  # logit-normal(0, 1), SD3
    eps = torch.randn(x0.shape, generator=g)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = net(hidden_states=xt, encoder_hidden_states=pe[c], pooled_projections=pooled[c], timestep=1000 * t).sample
    loss = F.mse_loss(v, eps - x0)  # rectified flow: v = eps - x0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        d = min(ema_decay, (1 + step) / (10 + step))
        for p_ema, p in zip(ema.parameters(), net.parameters()):
            p_ema.lerp_(p, 1 - d)
    return loss


def train_generator(pipe, latents, render_prompts, train_prompts, args, g):
    """Rectified flow on the renders' latents (SD3's recipe); the EMA of the weights becomes the pipeline's transformer."""
    with torch.no_grad():  # the frozen random CLIP encoders, once per prompt (+ the empty prompt)
        pe, _, pooled, _ = pipe.encode_prompt(train_prompts + [""], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)  # (P+1, 16 + 8, 64), (P+1, 64)
    pid = torch.tensor([train_prompts.index(p) for p in render_prompts])
    net = pipe.transformer.train()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.warmup, args.gen_steps))
    loss = torch.tensor(float("nan"))
    pbar = tqdm(range(args.gen_steps), desc="generator", leave=False)
    for step in pbar:
        loss = generator_step(net, ema, opt, sched, latents, pid, pe, pooled, step, args.gen_batch, args.p_uncond,
                              args.ema, g)
        pbar.set_postfix(loss=f"{loss.item():.4f}")
    pipe.transformer = ema.eval()
    pipe.register_modules(transformer=pipe.transformer)
    print(f"generator: {args.gen_steps} steps, last loss {loss.item():.4f}")


@torch.no_grad()
def draw_samples(pipe, prompts, seed, cfg, steps, batch=64):
    """The pipeline's own samples of prompts, batch k seeded by seed + k (the batch size is part of the seed stream)."""
    images, latents = [], []
    for k in tqdm(range(0, len(prompts), batch), desc="sample", leave=False):
        z = pipe(prompts[k:k + batch], height=32, width=32, num_inference_steps=steps, guidance_scale=cfg,
                 max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(seed + k)).images
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        images += pipe.image_processor.postprocess(x, output_type="pil")
        latents.append(z)
    return Samples(images, torch.cat(latents), prompts)


@torch.no_grad()
def sample_generator(pipe, train_prompts, heldout_prompts, args, root):
    """The pipeline's own samples for the training pools and, from other seeds, for the on-policy benchmark and the test
    pools (no test image is a training image); saves pipeline/ and samples.png -> both Samples, the match rates."""
    train_gen = [p for p in train_prompts for _ in range(args.train_gen_per_prompt + args.onpolicy_per_prompt)]
    bench_gen = [p for p in train_prompts + heldout_prompts for _ in range(args.bench_per_prompt)]
    train = draw_samples(pipe, train_gen, args.seed, args.cfg, args.sample_steps)
    bench = draw_samples(pipe, bench_gen, args.seed + BENCH_SEED_OFFSET, args.cfg, args.sample_steps)
    n_tr = len(train_prompts) * args.bench_per_prompt
    tr, ho = match_stats(bench.images[:n_tr], bench_gen[:n_tr]), match_stats(bench.images[n_tr:], bench_gen[n_tr:])
    pipe.save_pretrained(os.path.join(root, "pipeline"))
    show = list(range(0, n_tr, args.bench_per_prompt))[:24] + list(range(n_tr, len(bench_gen), args.bench_per_prompt))[:12]
    sample_grid([bench.images[i] for i in show], [bench_gen[i] for i in show]).save(os.path.join(root, "samples.png"))
    print(f"sample: {len(train_gen)} + {len(bench_gen)} samples; match rate train prompts {tr['match']:.2f}, "
          f"held-out {ho['match']:.2f}; oracle {tr['oracle']:.3f} / {ho['oracle']:.3f}")
    return train, bench, dict(train_prompts=tr, heldout_prompts=ho)


def candidate_pools(split, prompts, samples, rng, args, root):
    """Each prompt's candidate pools (make_pool's and generator samples; a training prompt's on-policy pools: its own
    samples, 2 renders, 4 corrupted ones) saved under images/<split> -> Split, {path: latent} of its generator images."""
    train = split == "train"
    n_pools, n_wrong = (args.train_pools, args.train_wrong) if train else (1, 1)
    # held-out combos are never shown in training, not even as wrong-attribute renders: a model that saw
    # them only as rejected images would learn "red triangles are bad" instead of reading the prompt
    avoid = set(map(tuple, TOY_HELDOUT)) if train else set()
    n_mixed = args.train_gen_per_prompt if train else args.gen_per_prompt
    own = {}  # prompt -> [(PIL, "generator")], in sampling order
    for im, p in zip(samples.images, samples.prompts):
        own.setdefault(p, []).append((im, "generator"))
    items, groups, images = [], [], []
    for p in tqdm(prompts, desc=f"{split} pool", leave=False):
        mixed = own[p][:n_mixed]
        onpolicy = own[p][n_mixed:] if train else []  # a test pool takes n_mixed of the K
        # a training pool is built as a test pool is; pairs never cross pools (measured against merged pools: docs/log.md)
        pools = [make_pool(p, rng, n_wrong=n_wrong, avoid=avoid) + mixed[k::n_pools] for k in range(n_pools)]
        for k in range(0, len(onpolicy), args.onpolicy_pool):
            pools.append(make_pool(p, rng, n_clean=2, n_strengths=1, n_wrong=0) + onpolicy[k:k + args.onpolicy_pool])
        for pool in pools:
            groups.append(list(range(len(items), len(items) + len(pool))))
            items += [Item(f"images/{split}/{len(images) + j:05d}.png", src, p) for j, (_, src) in enumerate(pool)]
            images += [im for im, _ in pool]
    save_images(f"images/{split}", images, root)
    latent_of = {id(im): z for im, z in zip(samples.images, samples.latents)}
    given = {it.path: latent_of[id(im)] for it, im in zip(items, images) if id(im) in latent_of}
    return Split(items, groups, toy_golden_score(images, [it.prompt for it in items])), given


def preference_pairs(train_samples, bench_samples, train_prompts, heldout_prompts, rng, args, root):
    """Both splits' pools and their labelled pairs: train.json, test.json (HPDv3), test_oracle.json -> the test Split
    (the benchmarks draw from it), {image path: generator latent} of the pools' images, the summary's figures."""
    rng_train = np.random.default_rng([args.seed, TRAIN_POOL_STREAM])
    picked = sorted(rng.choice(len(train_prompts), args.test_train_prompts, replace=False))
    test_prompts = heldout_prompts + [train_prompts[i] for i in picked]
    train, given = candidate_pools("train", train_prompts, train_samples, rng_train, args, root)
    test, given_test = candidate_pools("test", test_prompts, bench_samples, rng, args, root)
    given.update(given_test)
    pairs = within_prompt_pairs(train.groups, args.n_train_pairs, rng_train)  # noisy labels: few raters, near-ties kept
    votes = toy_annotate(train.scores[pairs[:, 0]], train.scores[pairs[:, 1]], args.train_raters, rng_train, args.rater_noise)
    train_records = hpdv3_records(train.items, pairs, votes, args.train_raters)
    write_json(os.path.join(root, "train.json"), train_records)
    agree = (train.scores[pairs[:, 0]] > train.scores[pairs[:, 1]]) == (2 * votes > args.train_raters)  # label vs oracle
    onpolicy = np.array([train.items[i].source == train.items[j].source == "generator" for i, j in pairs])
    apart = np.abs(train.scores[pairs[:, 0]] - train.scores[pairs[:, 1]]) > args.tie_margin
    share = lambda m: float(agree[m].mean()) if m.any() else None  # noqa: E731
    onpolicy_agree = dict(pairs=int(onpolicy.sum()), agree=share(onpolicy), apart=int((onpolicy & apart).sum()),
                          agree_apart=share(onpolicy & apart))
    pairs = within_prompt_pairs(test.groups, args.n_test_pairs, rng, test.scores, args.tie_margin)
    votes = toy_annotate(test.scores[pairs[:, 0]], test.scores[pairs[:, 1]], args.test_raters, rng, args.rater_noise)
    test_records = hpdv3_records(test.items, pairs, votes, args.test_raters)
    write_json(os.path.join(root, "test.json"), test_records)
    oracle = {it.path: float(s) for it, s in zip(test.items, test.scores)}
    write_json(os.path.join(root, "test_oracle.json"), oracle)
    test_agree = np.mean([oracle[r["path1"]] > oracle[r["path2"]] for r in test_records])
    stats = dict(train=len(train_records), test=len(test_records), train_images=len(train.items),
                 test_images=len(test.items), train_labels_agree_with_oracle=float(agree.mean()),
                 train_generator_pairs=onpolicy_agree, test_labels_agree_with_oracle=float(test_agree))
    print(f"pairs: {len(train_records)} train pairs, {len(test_records)} test pairs")
    return test, given, stats


def bench_pairs(groups, scores, rng, args):
    """--n-bench pairs inside the test pools -> pairs (K,2), votes for the first of many raters (K,), oracle ties (K,)."""
    pairs = within_prompt_pairs(groups, args.n_bench, rng)
    votes = toy_annotate(scores[pairs[:, 0]], scores[pairs[:, 1]], args.test_raters, rng, args.rater_noise)
    return pairs, votes, np.abs(scores[pairs[:, 0]] - scores[pairs[:, 1]]) < args.tie_margin


def benchmarks(test, bench, rng, args, root):
    """The benchmarks in their real formats, drawn from the test pools (HPDv2, ImageReward, GenAI-Bench, Pick-a-Pic), and
    the on-policy one (HPDv2 ranked groups of K fresh samples, ranked by the oracle with near-ties tied, their oracle
    scores beside) -> bench/*, the summary's counts, the on-policy images' paths."""
    items, groups, scores = test
    hpdv2, imagereward = [], []
    for group in groups:  # two random groups of up to 6 images per test prompt
        hp, ir = (sorted(rng.choice(group, min(6, len(group)), replace=False).tolist()) for _ in range(2))
        ij = np.array(list(itertools.combinations(range(len(hp)), 2)))  # HPDv2: rank by majority wins of many raters
        v = toy_annotate(scores[hp][ij[:, 0]], scores[hp][ij[:, 1]], args.test_raters, rng, args.rater_noise)
        wins = np.bincount(np.where(2 * v > args.test_raters, ij[:, 0], ij[:, 1]), minlength=len(hp))
        order = np.lexsort((-scores[hp], -wins))  # most wins first, oracle breaks ties
        hpdv2.append(dict(prompt=items[hp[0]].prompt, image_path=[items[i].path for i in hp],
                          rank=(np.argsort(order) + 1).tolist()))
        imagereward.append(dict(prompt=items[ir[0]].prompt, generations=[items[i].path for i in ir],
                                ranking=ties_ranking(scores[ir], args.tie_margin)))  # 1 = best, near-ties share
    pairs, votes, tie = bench_pairs(groups, scores, rng, args)
    bad = np.maximum(scores[pairs[:, 0]], scores[pairs[:, 1]]) < args.bothbad
    vote_type = np.where(tie, "tievote", np.where(bad, "bothbad_vote", np.where(
        2 * votes > args.test_raters, "leftvote", "rightvote")))
    genai = [dict(prompt=items[i].prompt, left_image=items[i].path, right_image=items[j].path, vote_type=str(t))
             for (i, j), t in zip(pairs.tolist(), vote_type)]
    pairs, votes, tie = bench_pairs(groups, scores, rng, args)
    label0 = np.where(tie, 0.5, (2 * votes > args.test_raters).astype(float))
    pickapic = [dict(caption=items[i].prompt, jpg_0=items[i].path, jpg_1=items[j].path, label_0=float(l), label_1=1 - float(l))
                for (i, j), l in zip(pairs.tolist(), label0)]
    write_json(os.path.join(root, "bench/hpdv2_test.json"), hpdv2)
    write_json(os.path.join(root, "bench/imagereward_test.json"), imagereward)
    write_json(os.path.join(root, "bench/genai_bench.jsonl"), genai, lines=True)
    write_json(os.path.join(root, "bench/pickapic_test.jsonl"), pickapic, lines=True)
    paths, K = save_images("images/generated", bench.images, root), args.bench_per_prompt
    g_scores = toy_golden_score(bench.images, bench.prompts)
    generated = [dict(prompt=bench.prompts[k], image_path=paths[k:k + K], rank=ties_ranking(g_scores[k:k + K], args.tie_margin))
                 for k in range(0, len(paths), K)]
    write_json(os.path.join(root, "bench/generated.json"), generated)
    write_json(os.path.join(root, "bench/generated_oracle.json"), dict(zip(paths, g_scores.tolist())))
    stats = dict(hpdv2_groups=len(hpdv2), imagereward_groups=len(imagereward),
                 imagereward_tied_groups=sum(len(set(r["ranking"])) < len(r["ranking"]) for r in imagereward),
                 genai_votes={k: int((vote_type == k).sum()) for k in sorted(set(vote_type.tolist()))},
                 pickapic=len(pickapic), pickapic_ties=int(tie.sum()), generated_groups=len(generated))
    print(f"bench: {stats}")
    return stats, paths


def build(out_dir="out/toy", seed=0, force=False, **overrides):
    """Build the toy world into out_dir unless it is already built (its summary.json exists).
    overrides: any parser flag by its dest name, e.g. build(d, small=True, gen_steps=10)."""
    if os.path.isfile(os.path.join(out_dir, "summary.json")) and not force:
        return out_dir
    args = parser.parse_args(["--out", str(out_dir), "--seed", str(seed)])
    vars(args).update(overrides)
    main(args)
    return out_dir

# -----------------------------------------------------------------------------


def main(args):
    apply_preset(args)
    if args.gen_per_prompt > args.bench_per_prompt:
        raise ValueError(f"--gen-per-prompt {args.gen_per_prompt} > --bench-per-prompt {args.bench_per_prompt}: the test "
                         f"pools take their generator samples from the on-policy benchmark's")
    out = args.out.rstrip("/")
    tmp = f"{out}.partial-{os.getpid()}"  # per process: two concurrent builds never share a half-built folder
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    timings, summary, t_all = {}, {"args": vars(args)}, time.time()
    train_prompts = [p for p in all_prompts() if not is_heldout(p)]
    heldout_prompts = [p for p in all_prompts() if is_heldout(p)]

    render_prompts, captions, x_all, x_vae = render_training_set(train_prompts, rng, args, tmp)
    t0 = lap(timings, "render", t_all)
    if args.reuse_pipeline:  # a built world's VAE and generator: neither is retrained
        from diffusers import StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline.from_pretrained(args.reuse_pipeline, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = make_tiny_pipeline(args.seed, size="toy", words=TOY_WORDS)
        train_vae(pipe.vae, x_vae, args, g)
    pipe.set_progress_bar_config(disable=True)
    latents, summary["vae"] = normalise_latents(pipe.vae, x_all, render_prompts)
    t0 = lap(timings, "vae", t0)
    if not args.reuse_pipeline:
        train_generator(pipe, latents, captions, train_prompts, args, g)
    t0 = lap(timings, "generator", t0)
    train_samples, bench_samples, summary["generator"] = sample_generator(pipe, train_prompts, heldout_prompts, args, tmp)
    t0 = lap(timings, "sample", t0)
    test, given, summary["pairs"] = preference_pairs(train_samples, bench_samples, train_prompts, heldout_prompts, rng,
                                                     args, tmp)
    t0 = lap(timings, "pairs", t0)
    summary["timings"] = timings
    summary["bench"], generated_paths = benchmarks(test, bench_samples, rng, args, tmp)
    lap(timings, "bench", t0)

    # the alignment stages' files: the generator's latent of each of its images by path, and the prompt lists
    given.update(zip(generated_paths, bench_samples.latents))
    save_file({k: v.clone() for k, v in given.items()}, os.path.join(tmp, "image_latents.safetensors"))
    for name, prompts in (("train", train_prompts), ("heldout", heldout_prompts)):
        with open(os.path.join(tmp, f"prompts_{name}.txt"), "w") as f:
            f.writelines(p + "\n" for p in prompts)

    timings["total"] = time.time() - t_all
    write_json(os.path.join(tmp, "summary.json"), summary)  # last: its presence marks a built world
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # a half-built world is never mistaken for a built one
    print(f"total: {timings['total']:.1f} s -> {out}")
    return summary


if __name__ == "__main__":
    main(parser.parse_args())
