"""Data: the toy world, preference-pair readers, resolution buckets and the latent cache.

Nothing here imports diffusers: the cache builder takes the VAE / text encoders as plain
callables (model.py wraps them), so this file is usable on any machine.

- Toy world (DESIGN.md section 8): `render_toy`, `corrupt_toy`, the oracle
  `toy_golden_score` and the simulated annotators `toy_annotate`.
- Readers (section 7): every format becomes canonical pair records
  `{"prompt", "chosen", "rejected", "label", "group", "src"}` with `label` = P(chosen wins)
  and `src` = "file:record" for error messages. `read_benchmark` auto-detects the format.
- Cache: `build_cache` (one call per rank, torchrun-friendly) + `finalize_cache` (rank 0)
  write safetensors shards and `index.json`; `PairCache` reads them lazily (no pickle).

Reliability (section 12): a malformed record, a missing or corrupt image, an unknown
format or a bad latent shape is a one-line error naming the file and the record, or, with
`skip_bad=True`, a counted and reported skip.
"""
import hashlib
import io
import json
import math
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

# ----------------------------------------------------------------------------- toy world
# Palettes chosen far apart in RGB (every colour >= 80 from every other colour and from
# every background), so a nearest-colour read is unambiguous on clean renders.
TOY_COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
              "yellow": (240, 210, 30), "purple": (140, 40, 190), "orange": (245, 130, 20)}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# (color, shape) combos never shown in training; each colour and shape still is.
TOY_HELDOUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"),
               ("orange", "triangle"), ("purple", "square"))
TOY_CORRUPTIONS = ("blur", "noise", "contrast", "clip")
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
    else:  # upright isosceles triangle filling its box
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
    return img


def corrupt_toy(img, kind, strength, rng):
    """The "aesthetic" axis: strength 0 = unchanged, 1 = severe."""
    s = float(np.clip(strength, 0.0, 1.0))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=2.0 * s))
    x = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    if kind == "noise":
        x = x + rng.normal(0.0, 60.0 * s, x.shape)
    elif kind == "contrast":  # pull every colour toward mid-gray
        x = 128.0 + (x - 128.0) * (1.0 - 0.8 * s)
    elif kind == "clip":  # over-exposure: gain + offset, then saturate
        x = x * (1.0 + 1.5 * s) + 40.0 * s
    else:
        raise ValueError(f"unknown corruption {kind!r}, expected one of {TOY_CORRUPTIONS}")
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def _as_pixels(images):
    """PIL list | uint8 array (N,H,W,3) | float tensor/array (N,3,H,W) in [-1,1] -> (N,H,W,3) f32 0..255."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be (N,3,H,W) in [-1,1], got {images.shape}")
        return (np.clip(images.transpose(0, 2, 3, 1), -1, 1) * 127.5 + 127.5).astype(np.float32)
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"uint8 images must be (N,H,W,3), got {images.shape}")
    return images.astype(np.float32)


def _soft_pick(x, palette, sigma):
    """x (N,K) features, palette (M,K) -> (N,M) softmax of -d^2 / 2 sigma^2."""
    d2 = ((x[:, None, :] - palette[None]) ** 2).sum(-1) / (2 * sigma ** 2)
    p = np.exp(-(d2 - d2.min(1, keepdims=True)))
    return p / p.sum(1, keepdims=True)


_SHAPE_FILL = np.array([[0.78], [1.0], [0.53]])  # fill of the bbox, measured on renders


def toy_read(images):
    """Read the pixels (vectorised). Returns dict of (N,...) arrays:
    bg, fg (N,3) colour estimates; fill (N,) object area / bbox area; n_fg (N,) object
    pixels; resid (N,) mean distance of a pixel to the nearer of {bg, fg} (0 for a clean
    two-colour render, grows with blur and noise); pal (N,) distance of bg and fg to
    their nearest palette colours (grows with low contrast and clipping)."""
    x = _as_pixels(images)  # (N,H,W,3)
    n, h, w, _ = x.shape
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # (N,2H+2W,3)
    bg = np.median(border, 1)  # robust to an object touching the border
    d = np.linalg.norm(x - bg[:, None, None], axis=-1)  # (N,H,W)
    thr = np.maximum(30.0, 0.5 * np.percentile(d.reshape(n, -1), 99, axis=1))
    m = d > thr[:, None, None]
    # drop isolated specks (noise): keep pixels with >= 3 object pixels in their 3x3
    mp = np.pad(m, ((0, 0), (1, 1), (1, 1))).astype(np.int8)
    nb = sum(mp[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
    m = m & (nb >= 3)
    n_fg = m.sum((1, 2))
    rows, cols = m.any(2), m.any(1)  # (N,H), (N,W)
    hh = (h - rows[:, ::-1].argmax(1)) - rows.argmax(1)
    ww = (w - cols[:, ::-1].argmax(1)) - cols.argmax(1)
    fill = np.where(n_fg > 0, n_fg / np.maximum(hh * ww, 1), 0.0)
    fg_px = np.where(m[..., None], x, np.nan).reshape(n, -1, 3)
    with warnings.catch_warnings():  # all-NaN rows (no object) are handled by np.where
        warnings.simplefilter("ignore", RuntimeWarning)
        fg = np.where(n_fg[:, None] > 0, np.nan_to_num(np.nanmedian(fg_px, 1)), bg)
    resid = np.minimum(d, np.linalg.norm(x - fg[:, None, None], axis=-1)).mean((1, 2))
    pal_fg = np.linalg.norm(fg[:, None] - np.array(list(TOY_COLORS.values()))[None], axis=-1).min(1)
    pal_bg = np.linalg.norm(bg[:, None] - np.array(list(TOY_BACKGROUNDS.values()))[None], axis=-1).min(1)
    return dict(bg=bg, fg=fg, fill=fill, n_fg=n_fg, resid=resid, pal=0.5 * (pal_fg + pal_bg))


def toy_golden_score(images, prompts):
    """Oracle in [0, 1]: 0.6 * fidelity + 0.4 * quality, deterministic.

    fidelity = mean of the soft probabilities that the colour, shape and background read
    off the pixels are the prompted ones (softmax over the palette of -distance^2);
    quality = exp(-resid / 15 - pal / 50) (see `toy_read`), 1 for a clean render.
    images: list of PIL images, uint8 (N,H,W,3), or float (N,3,H,W) in [-1, 1] (VAE range).
    """
    r = toy_read(images)
    attrs = [parse_toy_prompt(p) for p in prompts]
    if len(attrs) != len(r["bg"]):
        raise ValueError(f"{len(r['bg'])} images but {len(attrs)} prompts")
    ci = np.array([list(TOY_COLORS).index(a[0]) for a in attrs])
    si = np.array([TOY_SHAPES.index(a[1]) for a in attrs])
    bi = np.array([list(TOY_BACKGROUNDS).index(a[2]) for a in attrs])
    idx = np.arange(len(ci))
    has = r["n_fg"] >= 4  # no object -> no colour or shape credit
    p_col = _soft_pick(r["fg"], np.array(list(TOY_COLORS.values()), float), 25.0)[idx, ci] * has
    p_shp = _soft_pick(r["fill"][:, None], _SHAPE_FILL, 0.06)[idx, si] * has
    p_bg = _soft_pick(r["bg"], np.array(list(TOY_BACKGROUNDS.values()), float), 25.0)[idx, bi]
    fidelity = (p_col + p_shp + p_bg) / 3
    quality = np.exp(-r["resid"] / 15.0 - r["pal"] / 50.0)
    return np.clip(0.6 * fidelity + 0.4 * quality, 0.0, 1.0)


def toy_annotate(score_a, score_b, n_raters, rng, noise=0.1):
    """Thurstone raters: each prefers a iff score_a + noise*N(0,1) > score_b + noise*N(0,1).
    Returns (N,) int, the number of raters (out of n_raters) preferring a."""
    a, b = np.asarray(score_a, float), np.asarray(score_b, float)
    za = a[:, None] + noise * rng.standard_normal((len(a), n_raters))
    zb = b[:, None] + noise * rng.standard_normal((len(b), n_raters))
    return (za > zb).sum(1)
