"""
Builds the toy world on disk (DESIGN.md section 8) from a seed (float-level noise aside: see within_prompt_pairs):

  renders -> tiny AutoencoderKL -> tiny SD3 generator (rectified flow) -> its samples -> preference
  pairs (HPDv3 train/test JSON; the training pools hold the generator's own samples, ranked by the
  annotators) -> benchmarks in the real formats (HPDv2, ImageReward, GenAI-Bench, Pick-a-Pic) and
  the on-policy benchmark -> prompt lists -> summary.json.

The world itself lives here too (section "the world"): prompts, renderer, corruptions, the golden
oracle `toy_golden_score` and the simulated annotators `toy_annotate`.

Launch (about 16 minutes on 2 cores of an AMD EPYC: 2 train the VAE, 8 the generator, 6 sample it; faster CPUs take less):

  python toy.py                       # -> out/toy
  python toy.py --small --out /tmp/w  # a miniature world in seconds (tests)
  toy.build("out/toy")                # from another stage: builds the world unless out/toy/summary.json exists

Layout of out/toy (every path inside the JSON files is relative to out/toy, the readers'
image_root):
  images/render/*.png        the renders the VAE and the generator were trained on
  images/train/*.png         candidates of the training pairs; images/test/*.png: test + benchmarks
  pipeline/                  StableDiffusion3Pipeline (two CLIP encoders, no T5): from_pretrained(
                             dir, text_encoder_3=None, tokenizer_3=None)
  samples.png                generator samples with their prompts ('*': a held-out colour-shape combination)
  train.json, test.json      HPDv3 format; test_oracle.json: the oracle score of each test image
  bench/hpdv2_test.json, bench/imagereward_test.json, bench/genai_bench.jsonl, bench/pickapic_test.jsonl
  bench/generated.json       on-policy (HPDv2 ranked groups): K samples per training prompt and held-out
                             combo from fresh seeds, ranked by the oracle; generated_oracle.json their scores
  image_latents.safetensors  the generator's own latents of every generator image (key: its PNG's path): the
                             reward's cache stores them instead of the PNG's encoding (what alignment scores)
  prompts_train.txt, prompts_heldout.txt   the alignment stages' prompt files, one prompt per line
  summary.json               counts, timings, VAE error, generator match rates; written last

The world is built in `<out>.partial-<pid>` and renamed to `<out>` at the end, so a half-built world
is never mistaken for a built one. Deviations from SD3's recipe, for speed: the VAE decodes the
posterior mean in training (a tiny KL, 1e-6, still regularises it), so 500 steps suffice; the latent
normalisation is one scalar shift/scale for all channels, as SD3 does.
"""

import argparse
import copy
import itertools
import json
import os
import re
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file
from tqdm import tqdm

from model import make_tiny_pipeline


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


def _soft_pick(x, palette, sigma):
    """x (N,K) features, palette (M,K) -> (N,M) softmax of -d^2 / 2 sigma^2."""
    d2 = ((x[:, None, :] - palette[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    p = np.exp(-(d2 - d2.min(1, keepdims=True)))
    return p / p.sum(1, keepdims=True)


def toy_read(images):
    """Pixels -> bg, fg (N,3) colours; corners (N,2) how full the top and bottom corners of the object's box
    are (the shape); n_fg (N,) object pixels; resid (N,)
    mean distance to the nearer of bg, fg (blur, noise); pal (N,) distance to the palettes (contrast, clip)."""
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
    """Oracle in [0, 1], deterministic: 0.6 * fidelity + 0.4 * quality. fidelity = mean soft
    probability (softmax over the palette of -distance^2) that the colour, shape and background
    read off the pixels are the prompted ones; quality = exp(-resid / 15 - pal / 50), 1 when
    clean. images: PIL list, uint8 (N,H,W,3) or float (N,3,H,W) in [-1, 1] (the VAE range).
    parts=True: a dict of the weighted terms (colour, shape, background: 0.2 each; quality 0.4) and the score."""
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


# ----------------------------------------------------------------------------- the build's flags
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# output
parser.add_argument("--out", default="out/toy")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--small", action="store_true", help="miniature world for tests (few steps, few images)")
# renders (the generator's training set)
parser.add_argument("--renders-per-prompt", type=int, default=64)
# VAE: L1 + L2 reconstruction + a small KL
parser.add_argument("--vae-steps", type=int, default=500)
parser.add_argument("--vae-batch", type=int, default=32)
parser.add_argument("--vae-lr", type=float, default=2e-3)
parser.add_argument("--kl-weight", type=float, default=1e-6)
parser.add_argument("--vae-corrupt", type=float, default=0.5, help="share of corrupted renders added to the VAE's data")
# generator: rectified flow, logit-normal t (SD3), 10% empty-prompt dropout for CFG, EMA
parser.add_argument("--gen-steps", type=int, default=1200, help="its samples draw shapes (at 400: blobs; scripts/generator_steps.py)")
parser.add_argument("--gen-batch", type=int, default=32)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--p-uncond", type=float, default=0.1)
parser.add_argument("--ema", type=float, default=0.99)
# sampling with the pipeline itself
parser.add_argument("--sample-steps", type=int, default=10, help="Flow-GRPO's 10 steps: the samples an alignment stage draws")
parser.add_argument("--cfg", type=float, default=4.0)
parser.add_argument("--gen-per-prompt", type=int, default=3, help="generator samples in each test prompt's pool")
parser.add_argument("--train-gen-per-prompt", type=int, default=16, help="generator samples per training prompt, 2 per mixed pool")
parser.add_argument("--onpolicy-per-prompt", type=int, default=80, help="generator samples per training prompt, in on-policy pools of "
                    "--onpolicy-pool samples, 2 renders and 4 corrupted ones, each ranked whole (HPDv3; README: 16 -> 80)")
parser.add_argument("--onpolicy-pool", type=int, default=16)
parser.add_argument("--bench-per-prompt", type=int, default=16, help="K of bench/generated.json: samples from fresh seeds "
                    "per training prompt and per held-out combination, ranked by the oracle")
parser.add_argument("--reuse-pipeline", default=None, help="a built world's pipeline/: its VAE and generator, not retrained; only the data is rebuilt")
parser.add_argument("--train-wrong", type=int, default=1, help="wrong-attribute renders per attribute in each training pool")
# preference pairs (HPDv3) and benchmarks
parser.add_argument("--train-pools", type=int, default=8, help="candidate pools per training prompt, each like a test pool; no pair crosses two")
parser.add_argument("--n-train-pairs", type=int, default=0, help="0: every pair of every pool (46,449; ranked whole)")
parser.add_argument("--n-test-pairs", type=int, default=800)
parser.add_argument("--test-train-prompts", type=int, default=9, help="training prompts added to the test prompts")
parser.add_argument("--train-raters", type=int, default=5)
parser.add_argument("--test-raters", type=int, default=21)
parser.add_argument("--rater-noise", type=float, default=0.1)
parser.add_argument("--tie-margin", type=float, default=0.05, help="oracle gap below which annotators tie")
parser.add_argument("--bothbad", type=float, default=0.5, help="GenAI-Bench: both oracle scores below -> bothbad_vote")
parser.add_argument("--n-bench", type=int, default=300, help="pairs in each pairwise benchmark")
SMALL = dict(renders_per_prompt=4, train_pools=1, vae_steps=3, vae_batch=8, gen_steps=3, gen_batch=8, warmup=1, sample_steps=2, gen_per_prompt=1,
             train_gen_per_prompt=1, onpolicy_per_prompt=3, onpolicy_pool=2, bench_per_prompt=2, train_wrong=1, n_train_pairs=200, n_test_pairs=60, test_train_prompts=2, n_bench=20)

# ----------------------------------------------------------------------------- pure helpers


def warmup_cosine(step, warmup, total):
    """lr factor: linear warmup over `warmup` steps, then cosine decay to 0 at `total` (VAE and generator)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / total))


def to_tensor(images):
    """PIL list -> (N,3,H,W) float in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1


def all_prompts():
    return [toy_prompt(c, s, b) for c in TOY_COLORS for s in TOY_SHAPES for b in TOY_BACKGROUNDS]


def is_heldout(prompt):
    return tuple(parse_toy_prompt(prompt)[:2]) in set(map(tuple, TOY_HELDOUT))


def oracle_read(images):
    """The prompt the oracle reads off each image: argmax over all toy prompts of toy_golden_score
    (fidelity is a sum over colour, shape and background, so this reads each attribute)."""
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
    """items [(path, source, prompt)], pairs (K,2) index pairs, votes (K,) for the first -> HPDv3
    records with path1 = the majority's choice, choice_dist = [votes path1, votes path2]."""
    out = []
    for (i, j), v in zip(pairs, votes):
        v = int(v)
        if 2 * v < n_raters:
            i, j, v = j, i, n_raters - v
        out.append(dict(prompt=items[i][2], path1=items[i][0], path2=items[j][0], choice_dist=[v, n_raters - v],
                        confidence=v / n_raters, model1=items[i][1], model2=items[j][1]))
    return out


def within_prompt_pairs(groups, n, rng, scores=None, margin=0.0):
    """Sample n distinct pairs (i, j) inside the index groups; drop oracle near-ties if scores (after the shuffle:
    a float-level change of a score, e.g. another library version, changes only pairs near the margin)."""
    pairs = np.array([p for g in groups for p in itertools.combinations(g, 2)])
    pairs = pairs[rng.permutation(len(pairs))]
    if scores is not None:
        pairs = pairs[np.abs(scores[pairs[:, 0]] - scores[pairs[:, 1]]) >= margin]
    pairs = pairs[:n or None]  # n = 0: all
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


@torch.no_grad()
def generate(pipe, prompts, seed, args, batch=64):
    """The pipeline's own sampling (args.sample_steps, CFG args.cfg), batch k seeded by seed + k -> PIL images and
    the generator's latents (N,C,h,w) (normalised, what a latent reward reads in alignment; the images are their decode)."""
    images, latents = [], []
    for k in tqdm(range(0, len(prompts), batch), desc="sample", leave=False):
        z = pipe(prompts[k:k + batch], height=32, width=32, num_inference_steps=args.sample_steps, guidance_scale=args.cfg,
                 max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(seed + k)).images
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        images += pipe.image_processor.postprocess(x, output_type="pil")
        latents.append(z)
    return images, torch.cat(latents)


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
    paths = []
    for k, im in enumerate(images):
        paths.append(f"{folder}/{k:05d}.png")
        im.save(os.path.join(root, paths[-1]))
    return paths


def write_json(path, obj, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(r) + "\n" for r in obj)
        else:
            json.dump(obj, f, indent=1)


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
    if args.small:
        for k, v in SMALL.items():
            setattr(args, k, min(getattr(args, k) or v, v))  # 0 = all pairs: the small world's 200
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
    prompts = all_prompts()
    train_prompts = [p for p in prompts if not is_heldout(p)]
    heldout_prompts = [p for p in prompts if is_heldout(p)]

    # ------------------------------------------------------------------ renders
    t0 = time.time()
    render_prompts = [p for p in train_prompts for _ in range(args.renders_per_prompt)]
    renders = [render_toy(*parse_toy_prompt(p), rng) for p in tqdm(render_prompts, desc="render", leave=False)]
    save_images("images/render", renders, tmp)
    x_all = to_tensor(renders)  # (N,3,32,32) in [-1,1]
    # the VAE sees corrupted images too (as SD's VAE sees all kinds of photos), so their latents keep the
    # blur / noise / contrast / clipping the reward must read; the generator learns the clean renders only
    bad = [corrupt_toy(im, str(rng.choice(TOY_CORRUPTIONS)), float(rng.uniform(0.1, 1.0)), rng)
           for im in renders[:int(args.vae_corrupt * len(renders))]]
    x_vae = torch.cat([x_all, to_tensor(bad)]) if bad else x_all
    timings["render"] = time.time() - t0
    print(f"render: {timings['render']:.1f} s ({len(renders)} images, {len(train_prompts)} training prompts)")

    # ------------------------------------------------------------------ VAE
    t0 = time.time()
    if args.reuse_pipeline:  # the VAE and generator of a built world: no training steps below
        from diffusers import StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline.from_pretrained(args.reuse_pipeline, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = make_tiny_pipeline(args.seed, size="toy", words=TOY_WORDS)
    pipe.set_progress_bar_config(disable=True)
    steps = dict(vae=0, gen=0) if args.reuse_pipeline else dict(vae=args.vae_steps, gen=args.gen_steps)
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.warmup, args.vae_steps))
    pbar = tqdm(range(steps["vae"]), desc="vae", leave=False)
    for step in pbar:
        x = x_vae[torch.randint(len(x_vae), (args.vae_batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # the posterior mean: a short run learns much faster than with samples
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # latent statistics -> SD3-style normalisation (z - shift) * scale
        z = torch.cat([vae.encode(xb).latent_dist.mean for xb in x_all.split(256)])  # (N,4,16,16)
        shift, scale = z.mean().item(), 1.0 / z.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        ev = torch.arange(0, len(x_all), max(1, len(x_all) // 512))  # every prompt, ~512 renders
        rec = torch.cat([vae.decode(zb).sample for zb in z[ev].split(256)]).clamp(-1, 1)
    latents = (z - shift) * scale  # (N,4,16,16), ~unit variance
    rec_pil = [Image.fromarray(a) for a in ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)]
    summary["vae"] = dict(l1=float((rec - x_all[ev]).abs().mean() / 2), shift_factor=shift, scaling_factor=scale,
                          recon=match_stats(rec_pil, [render_prompts[i] for i in ev]))
    timings["vae"] = time.time() - t0
    print(f"vae: {timings['vae']:.1f} s (L1 {summary['vae']['l1']:.4f} in [0,1] units, "
          f"recon match {summary['vae']['recon']['match']:.2f}, shift {shift:.3f} scale {scale:.3f})")

    # ------------------------------------------------------------------ generator
    t0 = time.time()
    with torch.no_grad():  # the frozen random CLIP encoders, once per prompt (+ the empty prompt)
        pe, _, pooled, _ = pipe.encode_prompt(train_prompts + [""], None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)  # (P+1, 16 + 8, 64), (P+1, 64)
    pid = torch.tensor([train_prompts.index(p) for p in render_prompts])
    net = pipe.transformer.train()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.warmup, args.gen_steps))
    loss = torch.tensor(float("nan"))
    pbar = tqdm(range(steps["gen"]), desc="generator", leave=False)
    for step in pbar:
        idx = torch.randint(len(latents), (args.gen_batch,), generator=g)
        x0, c = latents[idx], pid[idx]
        c = torch.where(torch.rand(len(c), generator=g) < args.p_uncond, len(train_prompts), c)  # empty prompt
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
            d = min(args.ema, (1 + step) / (10 + step))
            for pe_, p in zip(ema.parameters(), net.parameters()):
                pe_.lerp_(p, 1 - d)
        pbar.set_postfix(loss=f"{loss.item():.4f}")
    pipe.transformer = ema.eval()
    pipe.register_modules(transformer=pipe.transformer)
    timings["generator"] = time.time() - t0
    print(f"generator: {timings['generator']:.1f} s ({steps['gen']} steps, last loss {loss.item():.4f})")

    # ------------------------------------------------------------------ generator samples (the pipeline itself)
    t0 = time.time()
    test_prompts = heldout_prompts + [train_prompts[i] for i in
                                      sorted(rng.choice(len(train_prompts), args.test_train_prompts, replace=False))]
    # the training pools' samples; the benchmark's, from seeds never used for them (every training prompt and
    # held-out combo), also fill the test pools: no test image is a training image
    train_gen = [p for p in train_prompts for _ in range(args.train_gen_per_prompt + args.onpolicy_per_prompt)]
    bench_gen = [p for p in train_prompts + heldout_prompts for _ in range(args.bench_per_prompt)]
    samples, sample_latents = generate(pipe, train_gen, args.seed, args)
    bench, bench_latents = generate(pipe, bench_gen, args.seed + 1_000_003, args)
    n_tr = len(train_prompts) * args.bench_per_prompt
    summary["generator"] = dict(train_prompts=match_stats(bench[:n_tr], bench_gen[:n_tr]),
                                heldout_prompts=match_stats(bench[n_tr:], bench_gen[n_tr:]))
    pipe.save_pretrained(os.path.join(tmp, "pipeline"))
    show = list(range(0, n_tr, args.bench_per_prompt))[:24] + list(range(n_tr, len(bench), args.bench_per_prompt))[:12]
    sample_grid([bench[i] for i in show], [bench_gen[i] for i in show]).save(os.path.join(tmp, "samples.png"))
    timings["sample"] = time.time() - t0
    gs = summary["generator"]
    print(f"sample: {timings['sample']:.1f} s ({len(samples)} + {len(bench)} samples; match rate train prompts "
          f"{gs['train_prompts']['match']:.2f}, held-out {gs['heldout_prompts']['match']:.2f}; oracle "
          f"{gs['train_prompts']['oracle']:.3f} / {gs['heldout_prompts']['oracle']:.3f})")

    # ------------------------------------------------------------------ preference pairs (HPDv3 format)
    t0 = time.time()
    gen = {}  # (split, prompt) -> [(PIL, "generator")]
    for split, ims, ps in (("train", samples, train_gen), ("test", bench, bench_gen)):
        for s, p in zip(ims, ps):
            gen.setdefault((split, p), []).append((s, "generator"))
    lat_of = {id(im): z for im, z in zip(samples + bench, torch.cat([sample_latents, bench_latents]))}
    given = {}  # image path -> the generator's own latent of that image
    splits, rng_train = {}, np.random.default_rng([args.seed, 1])  # its own stream: the training pools' flags never
    for split, split_prompts in (("train", train_prompts), ("test", test_prompts)):  # redraw the test set or benchmarks
        items, groups, images = [], [], []
        n_pools, n_wrong = (args.train_pools, args.train_wrong) if split == "train" else (1, 1)
        # held-out combos are never shown in training, not even as wrong-attribute renders: a model that saw
        # them only as rejected images would learn "red triangles are bad" instead of reading the prompt
        avoid = set(map(tuple, TOY_HELDOUT)) if split == "train" else set()
        n_mixed = args.train_gen_per_prompt if split == "train" else args.gen_per_prompt
        for p in tqdm(split_prompts, desc=f"{split} pool", leave=False):
            mixed = gen[(split, p)][:n_mixed]
            own = gen[(split, p)][n_mixed:] if split == "train" else []  # a test pool takes n_mixed of the K
            # a training pool is built as a test pool is; pairs never cross pools (README: better than merged pools)
            r = rng_train if split == "train" else rng
            pools = [make_pool(p, r, n_wrong=n_wrong, avoid=avoid) + mixed[k::n_pools] for k in range(n_pools)]
            for k in range(0, len(own), args.onpolicy_pool):  # on-policy pools: its own samples against each other and real images
                pools.append(make_pool(p, r, n_clean=2, n_strengths=1, n_wrong=0) + own[k:k + args.onpolicy_pool])
            for pool in pools:
                groups.append(list(range(len(items), len(items) + len(pool))))
                items += [(f"images/{split}/{len(images) + j:05d}.png", src, p) for j, (_, src) in enumerate(pool)]
                images += [im for im, _ in pool]
        save_images(f"images/{split}", images, tmp)
        given.update({it[0]: lat_of[id(im)] for it, im in zip(items, images) if id(im) in lat_of})
        splits[split] = (items, groups, toy_golden_score(images, [it[2] for it in items]))
    items, groups, scores = splits["train"]
    pairs = within_prompt_pairs(groups, args.n_train_pairs, rng_train)  # noisy labels: few raters, near-ties kept
    votes = toy_annotate(scores[pairs[:, 0]], scores[pairs[:, 1]], args.train_raters, rng_train, args.rater_noise)
    train = hpdv3_records(items, pairs, votes, args.train_raters)
    agree = (scores[pairs[:, 0]] > scores[pairs[:, 1]]) == (2 * votes > args.train_raters)  # (K,) label vs oracle
    onpolicy = np.array([items[i][1] == items[j][1] == "generator" for i, j in pairs])
    apart = np.abs(scores[pairs[:, 0]] - scores[pairs[:, 1]]) > args.tie_margin
    share = lambda m: float(agree[m].mean()) if m.any() else None
    onpolicy_agree = dict(pairs=int(onpolicy.sum()), agree=share(onpolicy), apart=int((onpolicy & apart).sum()),
                          agree_apart=share(onpolicy & apart))
    write_json(os.path.join(tmp, "train.json"), train)
    items, groups, scores = splits["test"]
    pairs = within_prompt_pairs(groups, args.n_test_pairs, rng, scores, args.tie_margin)  # annotator ties dropped
    votes = toy_annotate(scores[pairs[:, 0]], scores[pairs[:, 1]], args.test_raters, rng, args.rater_noise)
    test = hpdv3_records(items, pairs, votes, args.test_raters)
    write_json(os.path.join(tmp, "test.json"), test)
    oracle = {it[0]: float(s) for it, s in zip(items, scores)}
    write_json(os.path.join(tmp, "test_oracle.json"), oracle)
    test_agree = np.mean([oracle[r["path1"]] > oracle[r["path2"]] for r in test])
    summary["pairs"] = dict(train=len(train), test=len(test), train_images=len(splits["train"][0]),
                            test_images=len(items), train_labels_agree_with_oracle=float(agree.mean()),
                            train_generator_pairs=onpolicy_agree,
                            test_labels_agree_with_oracle=float(test_agree))
    timings["pairs"] = time.time() - t0
    print(f"pairs: {timings['pairs']:.1f} s ({len(train)} train pairs, {len(test)} test pairs)")

    summary["timings"] = timings
    # ------------------------------------------------------------------ benchmarks (held-out images, real formats)
    t0 = time.time()
    hpdv2, imagereward = [], []
    for g_ in groups:  # two random groups of up to 6 images per test prompt
        a, b = (sorted(rng.choice(g_, min(6, len(g_)), replace=False).tolist()) for _ in range(2))
        ij = np.array(list(itertools.combinations(range(len(a)), 2)))  # HPDv2: rank by majority wins of many raters
        v = toy_annotate(scores[np.array(a)[ij[:, 0]]], scores[np.array(a)[ij[:, 1]]], args.test_raters, rng,
                         args.rater_noise)
        wins = np.bincount(np.where(2 * v > args.test_raters, ij[:, 0], ij[:, 1]), minlength=len(a))
        order = np.lexsort((-scores[a], -wins))  # most wins first, oracle breaks ties
        hpdv2.append(dict(prompt=items[a[0]][2], image_path=[items[i][0] for i in a],
                          rank=(np.argsort(order) + 1).tolist()))
        imagereward.append(dict(prompt=items[b[0]][2], generations=[items[i][0] for i in b],
                                ranking=ties_ranking(scores[b], args.tie_margin)))  # 1 = best, near-ties share
    pairs = within_prompt_pairs(groups, args.n_bench, rng)
    votes = toy_annotate(scores[pairs[:, 0]], scores[pairs[:, 1]], args.test_raters, rng, args.rater_noise)
    tie = np.abs(scores[pairs[:, 0]] - scores[pairs[:, 1]]) < args.tie_margin
    bad = np.maximum(scores[pairs[:, 0]], scores[pairs[:, 1]]) < args.bothbad
    vote_type = np.where(tie, "tievote", np.where(bad, "bothbad_vote", np.where(
        2 * votes > args.test_raters, "leftvote", "rightvote")))
    genai = [dict(prompt=items[i][2], left_image=items[i][0], right_image=items[j][0], vote_type=str(t))
             for (i, j), t in zip(pairs.tolist(), vote_type)]
    pairs = within_prompt_pairs(groups, args.n_bench, rng)
    votes = toy_annotate(scores[pairs[:, 0]], scores[pairs[:, 1]], args.test_raters, rng, args.rater_noise)
    tie = np.abs(scores[pairs[:, 0]] - scores[pairs[:, 1]]) < args.tie_margin
    label0 = np.where(tie, 0.5, (2 * votes > args.test_raters).astype(float))
    pickapic = [dict(caption=items[i][2], jpg_0=items[i][0], jpg_1=items[j][0], label_0=float(l), label_1=1 - float(l))
                for (i, j), l in zip(pairs.tolist(), label0)]
    write_json(os.path.join(tmp, "bench/hpdv2_test.json"), hpdv2)
    write_json(os.path.join(tmp, "bench/imagereward_test.json"), imagereward)
    write_json(os.path.join(tmp, "bench/genai_bench.jsonl"), genai, lines=True)
    write_json(os.path.join(tmp, "bench/pickapic_test.jsonl"), pickapic, lines=True)
    # the on-policy benchmark (HPDv2 ranked groups): K samples per training prompt and held-out combo, fresh
    # seeds, ranked by the oracle with near-ties tied, and their oracle scores beside
    paths, K = save_images("images/generated", bench, tmp), args.bench_per_prompt
    g_scores = toy_golden_score(bench, bench_gen)
    generated = [dict(prompt=bench_gen[k], image_path=paths[k:k + K], rank=ties_ranking(g_scores[k:k + K], args.tie_margin))
                 for k in range(0, len(paths), K)]
    write_json(os.path.join(tmp, "bench/generated.json"), generated)
    write_json(os.path.join(tmp, "bench/generated_oracle.json"), dict(zip(paths, g_scores.tolist())))
    given.update(zip(paths, bench_latents))
    save_file({k: v.clone() for k, v in given.items()}, os.path.join(tmp, "image_latents.safetensors"))
    for name, ps in (("train", train_prompts), ("heldout", heldout_prompts)):  # the alignment stages' prompt files
        with open(os.path.join(tmp, f"prompts_{name}.txt"), "w") as f:
            f.writelines(p + "\n" for p in ps)
    summary["bench"] = dict(hpdv2_groups=len(hpdv2), imagereward_groups=len(imagereward),
                            imagereward_tied_groups=sum(len(set(r["ranking"])) < len(r["ranking"]) for r in imagereward),
                            genai_votes={k: int((vote_type == k).sum()) for k in sorted(set(vote_type.tolist()))},
                            pickapic=len(pickapic), pickapic_ties=int(tie.sum()), generated_groups=len(generated))
    timings["bench"] = time.time() - t0
    print(f"bench: {timings['bench']:.1f} s ({summary['bench']})")

    timings["total"] = time.time() - t_all
    write_json(os.path.join(tmp, "summary.json"), summary)  # last: its presence marks a built world
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"total: {timings['total']:.1f} s -> {out}")
    return summary


if __name__ == "__main__":
    main(parser.parse_args())
