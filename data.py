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


# ----------------------------------------------------------------------------- readers
FORMATS = ("hpdv3", "pickapic", "hpdv2", "imagereward", "genai", "jsonl")
_SIGNATURE = {"path1": "hpdv3", "jpg_0": "pickapic", "image_path": "hpdv2",
              "generations": "imagereward", "left_image": "genai", "chosen": "jsonl"}


def _field(rec, key, typ, where):
    v = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(v, typ) or isinstance(v, bool) or (isinstance(v, (str, list)) and not v):
        raise ValueError(f"{where}: missing or invalid {key!r} (got {v!r:.80})")
    return v


def _load_records(path):
    """A JSON array or JSONL file -> list of records (one-line errors name the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON/JSONL: {e}") from None


def _read_parquet(path):
    """Pick-a-Pic parquet -> records whose jpg_0/jpg_1 are image files. The bytes are written
    once to `<file stem>_images/<sha1 of bytes>.jpg` next to the parquet (reused on re-read)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                          "or export the rows to JSONL with jpg_0/jpg_1 as image paths") from None
    img_dir = os.path.splitext(path)[0] + "_images"
    os.makedirs(img_dir, exist_ok=True)
    cols = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    recs = [r for b in pq.ParquetFile(path).iter_batches(256, columns=cols) for r in b.to_pylist()]
    for i, r in enumerate(recs):
        for k in ("jpg_0", "jpg_1"):
            b = _field(r, k, bytes, f"{path}: record {i}")
            r[k] = os.path.join(img_dir, hashlib.sha1(b).hexdigest()[:20] + ".jpg")
            if not os.path.exists(r[k]):
                with open(r[k] + ".tmp", "wb") as f:
                    f.write(b)
                os.replace(r[k] + ".tmp", r[k])
    return recs


def _pairs_from(fmt, recs, path, root):
    """Records of one format -> (canonical pairs, skip counts). `root` prefixes image paths."""
    pairs, skip = [], {"skipped_ties": 0, "skipped_bothbad": 0}
    img = lambda p: os.path.normpath(os.path.join(root, p))  # noqa: E731 (absolute p stays)
    add = lambda pr, c, r, lab, g, w: pairs.append(  # noqa: E731
        {"prompt": pr, "chosen": img(c), "rejected": img(r), "label": float(lab), "group": g, "src": w})
    for i, rec in enumerate(recs):
        w = f"{path}: record {i}"
        if fmt in ("hpdv2", "imagereward"):  # ranked group -> all pairs, annotator ties skipped
            ik, rk = ("image_path", "rank") if fmt == "hpdv2" else ("generations", "ranking")
            prompt, ims, rank = _field(rec, "prompt", str, w), _field(rec, ik, list, w), _field(rec, rk, list, w)
            if len(ims) != len(rank) or not all(isinstance(x, (int, float)) for x in rank) \
                    or not all(isinstance(x, str) and x for x in ims):
                raise ValueError(f"{w}: {ik!r} (paths) and {rk!r} (numbers) must have equal length")
            for a in range(len(ims)):
                for b in range(a + 1, len(ims)):
                    if rank[a] == rank[b]:
                        skip["skipped_ties"] += 1
                        continue
                    c, r = (a, b) if rank[a] < rank[b] else (b, a)  # lower rank = better
                    add(prompt, ims[c], ims[r], 1.0, i, w)
        elif fmt == "hpdv3":  # path1 is always the preferred image; choice_dist may be null
            cd, label = rec.get("choice_dist") if isinstance(rec, dict) else None, 1.0
            if cd is not None:
                if not (isinstance(cd, list) and len(cd) == 2 and all(isinstance(x, (int, float)) and x >= 0
                                                                      for x in cd) and sum(cd) > 0):
                    raise ValueError(f"{w}: invalid 'choice_dist' {cd!r:.80}")
                label = cd[0] / sum(cd)
            add(_field(rec, "prompt", str, w), _field(rec, "path1", str, w), _field(rec, "path2", str, w), label, None, w)
        elif fmt == "pickapic":  # label_0/label_1 = vote shares; 0.5/0.5 ties dropped
            l0, l1 = _field(rec, "label_0", (int, float), w), _field(rec, "label_1", (int, float), w)
            if l0 < 0 or l1 < 0 or l0 + l1 <= 0:
                raise ValueError(f"{w}: invalid labels {l0!r}, {l1!r}")
            if l0 == l1:
                skip["skipped_ties"] += 1
                continue
            j0, j1 = _field(rec, "jpg_0", str, w), _field(rec, "jpg_1", str, w)
            c, r = (j0, j1) if l0 > l1 else (j1, j0)
            add(_field(rec, "caption", str, w), c, r, max(l0, l1) / (l0 + l1), None, w)
        elif fmt == "genai":  # tie and both-bad votes are dropped for accuracy
            vote = _field(rec, "vote_type", str, w)
            if vote not in ("leftvote", "rightvote", "tievote", "bothbad_vote"):
                raise ValueError(f"{w}: unknown vote_type {vote!r}")
            if vote in ("tievote", "bothbad_vote"):
                skip["skipped_ties" if vote == "tievote" else "skipped_bothbad"] += 1
                continue
            lft, rgt = _field(rec, "left_image", str, w), _field(rec, "right_image", str, w)
            c, r = (lft, rgt) if vote == "leftvote" else (rgt, lft)
            add(_field(rec, "prompt", str, w), c, r, 1.0, None, w)
        else:  # canonical JSONL: label optional (1.0), group optional
            label = rec.get("label", 1.0) if isinstance(rec, dict) else None
            if not isinstance(label, (int, float)) or isinstance(label, bool) or not 0 <= label <= 1:
                raise ValueError(f"{w}: 'label' must be a number in [0, 1] (got {label!r:.80})")
            add(_field(rec, "prompt", str, w), _field(rec, "chosen", str, w),
                _field(rec, "rejected", str, w), label, rec.get("group"), w)
    groups = {}  # pairwise formats: group = index of the prompt (for per-prompt means)
    for p in pairs:
        if p["group"] is None:
            p["group"] = groups.setdefault(p["prompt"], len(groups))
    return pairs, skip


def read_benchmark(path, fmt=None, image_root=None):
    """Any supported file -> (canonical pairs, info). fmt in FORMATS or None (auto-detect
    from the extension / the keys of the first record). Relative image paths are joined
    to image_root (default: the file's folder). info counts records, pairs and skips."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}, expected one of {FORMATS}")
    if path.endswith(".parquet"):
        fmt, recs = fmt or "pickapic", _read_parquet(path)
    else:
        recs = _load_records(path)
    if not isinstance(recs, list) or not recs:
        raise ValueError(f"{path}: expected a non-empty JSON array or JSONL of records")
    if fmt is None:
        keys = recs[0] if isinstance(recs[0], dict) else {}
        fmt = next((f for k, f in _SIGNATURE.items() if k in keys), None)
        if fmt is None:
            raise ValueError(f"{path}: unknown pair format (record 0 keys {sorted(keys)}); "
                             f"pass fmt= one of {FORMATS}")
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else image_root
    pairs, skip = _pairs_from(fmt, recs, path, root)
    return pairs, {"file": path, "format": fmt, "records": len(recs), "pairs": len(pairs), **skip}


def read_pairs(path, image_root=None, fmt=None):
    """Training pairs from any supported file; skipped ties are counted and printed."""
    pairs, info = read_benchmark(path, fmt, image_root)
    if info["skipped_ties"] or info["skipped_bothbad"]:
        print(f"{path}: {info['format']}: {info['pairs']} pairs, skipped {info['skipped_ties']} "
              f"ties and {info['skipped_bothbad']} both-bad")
    return pairs


def load_image(path, record_desc=""):
    """-> RGB PIL image; a missing or corrupt file is a one-line error naming it and the record."""
    where = f" ({record_desc})" if record_desc else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found{where}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types on bad files
        msg = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: corrupt image{where}: {type(e).__name__}: {msg}") from None


# ----------------------------------------------------------------------------- buckets
# SD3.5 aspect-ratio buckets (W, H), ~1 Mpx, multiples of 64. The toy world passes [(32, 32)].
BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
           (1344, 768), (768, 1344), (1536, 640), (640, 1536)]


def nearest_bucket(w, h, buckets=BUCKETS):
    """The (W, H) whose log aspect ratio is closest to w/h (first one wins a tie)."""
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(w / h)))


def to_bucket(img, bucket):
    """Resize so the image covers the bucket, center-crop, -> float (3, H, W) in [-1, 1]."""
    (bw, bh), (w, h) = bucket, img.size
    s = max(bw / w, bh / h)
    img = img.resize((max(bw, round(w * s)), max(bh, round(h * s))), Image.BICUBIC) if s != 1 else img
    left, top = (img.size[0] - bw) // 2, (img.size[1] - bh) // 2
    x = np.asarray(img.crop((left, top, left + bw, top + bh)), dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1) / 127.5 - 1.0


# ----------------------------------------------------------------------------- cache
# out_dir/ latents_RRR_NNNN.safetensors (key sha1(image path)[:20] -> (C,h,w)),
# text_RRR_NNNN.safetensors ("<sha1(prompt)>.embeds" (L,D), ".pooled" (P,)), shard_RRR.json
# (what rank RRR wrote + bad images), index.json (finalize_cache, rank 0, after all ranks).
def _key(s):
    return hashlib.sha1(s.encode("utf-8")).hexdigest()[:20]


def _path(root, p):
    return os.path.normpath(os.path.join(root, p)) if root else p


def _atomic_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _check(t, ndim, n, what):
    if not (isinstance(t, torch.Tensor) and t.ndim == ndim and len(t) == n and torch.isfinite(t).all()):
        raise ValueError(f"{what}: encoder returned {getattr(t, 'shape', type(t))}, "
                         f"expected a finite {ndim}-D tensor with batch {n}")


def build_cache(pairs, image_root, out_dir, encode_images, encode_prompts, buckets, rank=0,
                world_size=1, batch_size=16, skip_bad=False, dtype=torch.float32, shard_size=1024):
    """Encode rank's share (every world_size-th, in sorted order) of the unique images and
    prompts, each exactly once. encode_images: (B,3,H,W) in [-1,1] -> normalised latents
    (B,C,h,w); encode_prompts: list[str] -> (prompt_embeds (B,L,D), pooled (B,P)); both move
    data to their own device. Tensors are stored as `dtype` (bf16 halves real-data disk).
    world_size == 1 also writes the index; else call finalize_cache on rank 0 after a barrier.
    skip_bad: count, report and drop unreadable images (and their pairs) instead of raising."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    src = {}  # unique image path -> first record using it (for error messages)
    for p in pairs:
        for k in ("chosen", "rejected"):
            src.setdefault(_path(image_root, p[k]), p.get("src", "pair"))
    images, prompts = sorted(src)[rank::world_size], sorted({p["prompt"] for p in pairs})[rank::world_size]
    meta = {"images": {}, "text": {}, "bad": {}, "dtype": str(dtype).replace("torch.", "")}
    buf, nfile, pending = {"latents": {}, "text": {}}, {"latents": 0, "text": 0}, {}
    bar = tqdm(total=len(images) + len(prompts), disable=rank != 0, desc="cache")

    def flush(kind, force=False):  # buffered tensors -> one shard file, written atomically
        if buf[kind] and (force or len(buf[kind]) >= shard_size):
            name = f"{kind}_{rank:03d}_{nfile[kind]:04d}.safetensors"
            save_file(buf[kind], os.path.join(out_dir, name + ".tmp"))
            os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
            for k in buf[kind]:
                meta["images" if kind == "latents" else "text"][k.split(".")[0]]["file"] = name
            buf[kind], nfile[kind] = {}, nfile[kind] + 1

    def encode(items):  # [(path, (3,H,W))], one bucket -> latents into the buffer
        with torch.no_grad():
            z = encode_images(torch.stack([x for _, x in items]))
        _check(z, 4, len(items), f"{items[0][0]} ({src[items[0][0]]})")
        for (p, _), zi in zip(items, z.detach().cpu().to(dtype)):
            buf["latents"][_key(p)], meta["images"][_key(p)] = zi.contiguous(), {"shape": list(zi.shape)}
        flush("latents")

    for p in images:  # one pass: load, bucket, encode a bucket once it holds a full batch
        bar.update()
        try:
            img = load_image(p, src[p])
        except (FileNotFoundError, ValueError) as e:
            if not skip_bad:
                raise
            meta["bad"][p] = str(e)
            continue
        b = tuple(nearest_bucket(*img.size, buckets))
        pending.setdefault(b, []).append((p, to_bucket(img, b)))
        if len(pending[b]) == batch_size:
            encode(pending.pop(b))
    for items in pending.values():
        encode(items)
    flush("latents", force=True)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        try:
            with torch.no_grad():
                e, pooled = encode_prompts(batch)
        except Exception as err:
            raise RuntimeError(f"encode_prompts failed on the batch starting {batch[0]!r}: {err}") from err
        _check(e, 3, len(batch), f"prompt_embeds for {batch[0]!r}")
        _check(pooled, 2, len(batch), f"pooled for {batch[0]!r}")
        for pr, ei, pi in zip(batch, e.detach().cpu().to(dtype), pooled.detach().cpu().to(dtype)):
            buf["text"].update({_key(pr) + ".embeds": ei.contiguous(), _key(pr) + ".pooled": pi.contiguous()})
            meta["text"][_key(pr)] = {}
        flush("text")
        bar.update(len(batch))
    flush("text", force=True)
    bar.close()
    if meta["bad"]:
        print(f"rank {rank}: skipped {len(meta['bad'])} unreadable images, e.g. {next(iter(meta['bad'].values()))}")
    _atomic_json(meta, os.path.join(out_dir, f"shard_{rank:03d}.json"))
    info = {"images": len(meta["images"]), "prompts": len(meta["text"]), "bad_images": len(meta["bad"])}
    return {**info, **finalize_cache(out_dir, pairs, 1, image_root)} if world_size == 1 else info


def finalize_cache(out_dir, pairs, world_size, image_root=None):
    """Rank 0, after every rank's build_cache: merge shard_RRR.json into index.json.
    Pairs using a bad image, or whose two images fall in different buckets, are dropped
    and counted. Groups are renumbered 0..G-1 by first appearance."""
    shards = [os.path.join(out_dir, f"shard_{r:03d}.json") for r in range(world_size)]
    for f in shards:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: missing; did every rank finish build_cache?")
    metas = [json.load(open(f)) for f in shards]
    img, txt = {k: v for m in metas for k, v in m["images"].items()}, {k: v for m in metas for k, v in m["text"].items()}
    bad, out, groups, n_bad, n_mixed = {p for m in metas for p in m["bad"]}, [], {}, 0, 0
    for p in pairs:
        c, r, kp = _path(image_root, p["chosen"]), _path(image_root, p["rejected"]), _key(p["prompt"])
        if c in bad or r in bad:
            n_bad += 1
            continue
        for k, what in ((_key(c), c), (_key(r), r), (kp, repr(p["prompt"]))):
            if k not in img and k not in txt:
                raise ValueError(f"{out_dir}: {what} ({p.get('src')}) is in no shard; were all ranks given the same pairs?")
        if img[_key(c)]["shape"] != img[_key(r)]["shape"]:
            n_mixed += 1
            continue
        out.append({"prompt": kp, "chosen": _key(c), "rejected": _key(r), "label": float(p.get("label", 1.0)),
                    "group": groups.setdefault(p.get("group", p["prompt"]), len(groups)),
                    "shape": img[_key(c)]["shape"], "prompt_text": p["prompt"], "src": p.get("src")})
    if not out:
        raise ValueError(f"{out_dir}: no pairs left to cache ({n_bad} with bad images, {n_mixed} mixed-bucket)")
    if n_bad or n_mixed:
        print(f"{out_dir}: dropped {n_bad} pairs with unreadable images, {n_mixed} pairs across two buckets")
    _atomic_json({"pairs": out, "dtype": metas[0]["dtype"], "latents": {k: v["file"] for k, v in img.items()},
                  "text": {k: v["file"] for k, v in txt.items()}}, os.path.join(out_dir, "index.json"))
    return {"pairs": len(out), "dropped_bad_image": n_bad, "dropped_mixed_bucket": n_mixed}


class PairCache:
    """Reads a finished cache; shards are opened lazily with safetensors.safe_open (no pickle)."""

    def __init__(self, out_dir, latent_channels=None):
        path = os.path.join(out_dir, "index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no cache index (run build_cache / finalize_cache)")
        with open(path) as f:
            idx = json.load(f)
        self.dir, self.pairs, self.files, self._open = out_dir, idx["pairs"], {**idx["latents"], **idx["text"]}, {}
        for i, p in enumerate(self.pairs):
            if latent_channels is not None and p["shape"][0] != latent_channels:
                raise ValueError(f"{os.path.join(out_dir, self.files[p['chosen']])}: key {p['chosen']} (pair {i}): "
                                 f"latents have {p['shape'][0]} channels, expected {latent_channels}")

    def __len__(self):
        return len(self.pairs)

    def __getstate__(self):  # DataLoader workers reopen the files themselves
        return {**self.__dict__, "_open": {}}

    def _get(self, key, tensor_key, shape=None):
        from safetensors import safe_open
        name = self.files[key]
        if name not in self._open:
            self._open[name] = safe_open(os.path.join(self.dir, name), framework="pt")
        t = self._open[name].get_tensor(tensor_key)
        if shape is not None and list(t.shape) != shape:
            raise ValueError(f"{os.path.join(self.dir, name)}: key {tensor_key}: shape {list(t.shape)}, index says {shape}")
        return t

    def pair(self, i):
        p = self.pairs[i]
        return {"lat_pos": self._get(p["chosen"], p["chosen"], p["shape"]),  # (C,h,w)
                "lat_neg": self._get(p["rejected"], p["rejected"], p["shape"]),
                "prompt_embeds": self._get(p["prompt"], p["prompt"] + ".embeds"),  # (L,D)
                "pooled": self._get(p["prompt"], p["prompt"] + ".pooled"),  # (P,)
                "label": p["label"], "group": p["group"]}

    def batch(self, indices):
        """-> dict of stacked tensors (B,...); all pairs must share one bucket."""
        shapes = {tuple(self.pairs[i]["shape"]) for i in indices}
        if len(shapes) != 1:
            raise ValueError(f"batch mixes buckets {sorted(shapes)}; form batches from PairCache.buckets()")
        items = [self.pair(i) for i in indices]
        out = {k: torch.stack([it[k] for it in items]) for k in ("lat_pos", "lat_neg", "prompt_embeds", "pooled")}
        out["label"] = torch.tensor([it["label"] for it in items], dtype=torch.float32)
        out["group"] = torch.tensor([it["group"] for it in items], dtype=torch.long)
        return out

    def buckets(self):
        """-> {"CxhxW": [pair indices]}, so a batch never mixes buckets."""
        out = {}
        for i, p in enumerate(self.pairs):
            out.setdefault("x".join(map(str, p["shape"])), []).append(i)
        return out
