"""Data: real-data pair readers, the accuracy protocol, resolution buckets and the latent cache (docs/design.md §7).

- Readers: every format -> canonical pairs {"prompt", "chosen", "rejected", "label", "group", "src"}, label =
  P(chosen wins), src = "file: record i" for errors; `read_benchmark`; the protocol `pairwise_accuracy`.
- Cache: `build_cache` per rank (VAE / text encoders come in as callables: no diffusers here),
  `finalize_cache` on rank 0 -> safetensors shards + index.json, read lazily by `PairCache`.
Bad input is a one-line error naming the file and record, or (skip_bad=True) a counted skip.
"""
import functools
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model import atomic_write

# ----------------------------------------------------------------------------- readers
FORMATS = ("hpdv3", "pickapic", "hpdv2", "imagereward", "genai", "jsonl")
_SIGNATURE = {"path1": "hpdv3", "jpg_0": "pickapic", "image_path": "hpdv2",
              "generations": "imagereward", "left_image": "genai", "chosen": "jsonl"}
_VOTES = ("leftvote", "rightvote", "tievote", "bothbad_vote")
_COLUMNS = {"pickapic": ("caption", "jpg_0", "jpg_1", "label_0", "label_1"),  # the columns read of a published parquet
            "genai": ("prompt", "left_image", "right_image", "vote_type")}
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"RIFF", ".webp"), (b"GIF8", ".gif"))  # image bytes -> suffix


def _field(rec, key, typ, where):
    v = rec.get(key)
    if not isinstance(v, typ) or isinstance(v, bool) or (isinstance(v, (str, list)) and not v):
        raise ValueError(f"{where}: missing or invalid {key!r} (got {v!r:.80})")
    return v


def _load_records(path):
    """A JSON array or a JSONL file -> list of records (one-line errors name the file)."""
    text = Path(path).read_text(encoding="utf-8").strip()  # missing: FileNotFoundError naming it
    try:
        recs = json.loads(text) if text.startswith("[") else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON/JSONL: {e}") from None
    if not isinstance(recs, list) or not recs:
        raise ValueError(f"{path}: empty file, or not a JSON array / JSONL of records")
    return recs


def _read_parquet(path, fmt=None):
    """A published parquet -> (format, records), the format being the one of _COLUMNS whose columns the schema holds
    (only those are read). Pick-a-Pic v2 (19 columns): caption string (may be ""), jpg_0 / jpg_1 binary (JPEG), label_0 /
    label_1 float64 (0.5 / 0.5 = tie), uids, urls, ...; GenAI-Bench (test_v1, 1,735 rows): prompt, left_model, right_model,
    vote_type string, left_image / right_image struct<bytes: binary, path: string>. Image bytes are written once to
    `<parquet stem>_images/<sha1>.<ext>` (reused on re-reads); a struct without bytes keeps its path (joined to the root)."""
    import pyarrow.parquet as pq  # a requirement, imported here so that the JSON formats do not need it
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors do not name the file
        raise ValueError(f"{path}: unreadable parquet: {e}".splitlines()[0]) from None
    names = pf.schema_arrow.names
    fmt = fmt or next((f for f, cols in _COLUMNS.items() if set(cols) <= set(names)), None)
    if fmt not in _COLUMNS or not set(_COLUMNS[fmt]) <= set(names):
        raise ValueError(f"{path}: unknown parquet schema (columns {names}); expected the columns of one of {_COLUMNS}")
    img_dir, recs = os.path.splitext(path)[0] + "_images", []
    os.makedirs(img_dir, exist_ok=True)
    for i, r in enumerate(r for b in pf.iter_batches(256, columns=list(_COLUMNS[fmt])) for r in b.to_pylist()):
        for k, v in r.items():  # image cells: bytes (Pick-a-Pic), or a struct {bytes, path} (GenAI-Bench)
            if isinstance(v, dict):  # a struct: its bytes, or its path when it has none
                r[k] = v = _field(v, "path", str, f"{path}: record {i}: {k}") if v.get("bytes") is None else v["bytes"]
            if isinstance(v, bytes):  # written once, reused on re-reads
                ext = next((e for m, e in _MAGIC if v.startswith(m)), ".img")
                r[k] = os.path.join(img_dir, hashlib.sha1(v).hexdigest()[:20] + ext)
                if not os.path.exists(r[k]):
                    atomic_write(r[k], lambda tmp: Path(tmp).write_bytes(v))
        recs.append(r)
    return fmt, recs


def _pairs_from(fmt, recs, path, root):
    """Records of one format -> (canonical pairs, counts: see read_benchmark); image paths joined to root."""
    pairs, groups, count = [], {}, {"skipped_ties": 0, "skipped_bothbad": 0, "empty_prompt_pairs": 0}
    for i, rec in enumerate(recs):
        w, group, found = f"{path}: record {i}", None, []  # found: [(chosen, rejected, label)]
        if not isinstance(rec, dict):
            raise ValueError(f"{w}: expected a JSON object, got {type(rec).__name__}")
        if fmt in ("hpdv2", "imagereward"):  # ranked group -> all pairs; annotator ties skipped
            ik, rk = ("image_path", "rank") if fmt == "hpdv2" else ("generations", "ranking")
            ims, rank, group = _field(rec, ik, list, w), _field(rec, rk, list, w), i
            if len(ims) != len(rank) or not all(isinstance(x, (int, float)) for x in rank) \
                    or not all(isinstance(x, str) and x for x in ims):
                raise ValueError(f"{w}: {ik!r} (paths) and {rk!r} (numbers) must have equal length")
            for a, b in itertools.combinations(range(len(ims)), 2):
                if rank[a] == rank[b]:
                    count["skipped_ties"] += 1
                else:  # lower rank = better
                    found.append((ims[a], ims[b], 1.0) if rank[a] < rank[b] else (ims[b], ims[a], 1.0))
        elif fmt == "hpdv3":  # path1 is always preferred; choice_dist (and more) may be null
            cd = rec.get("choice_dist")
            if cd is not None and not (isinstance(cd, list) and len(cd) == 2 and all(
                    isinstance(x, (int, float)) and x >= 0 for x in cd) and sum(cd) > 0):
                raise ValueError(f"{w}: invalid 'choice_dist' {cd!r:.80}")
            found.append((_field(rec, "path1", str, w), _field(rec, "path2", str, w), cd[0] / sum(cd) if cd else 1.0))
        elif fmt == "pickapic":  # label_0/label_1 = vote shares; 0.5/0.5 ties dropped
            l0, l1 = _field(rec, "label_0", (int, float), w), _field(rec, "label_1", (int, float), w)
            j0, j1 = _field(rec, "jpg_0", str, w), _field(rec, "jpg_1", str, w)
            if not (l0 >= 0 and l1 >= 0 and l0 + l1 > 0):  # written so that a NaN fails too
                raise ValueError(f"{w}: invalid labels {l0!r}, {l1!r}")
            if l0 == l1:
                count["skipped_ties"] += 1
            else:
                found.append((j0, j1, l0 / (l0 + l1)) if l0 > l1 else (j1, j0, l1 / (l0 + l1)))
        elif fmt == "genai":  # tie and both-bad votes are dropped, counted
            vote, lft, rgt = (_field(rec, k, str, w) for k in ("vote_type", "left_image", "right_image"))
            if vote not in _VOTES:
                raise ValueError(f"{w}: unknown vote_type {vote!r}, expected one of {_VOTES}")
            if vote in ("leftvote", "rightvote"):
                found.append((lft, rgt, 1.0) if vote == "leftvote" else (rgt, lft, 1.0))
            else:
                count["skipped_ties" if vote == "tievote" else "skipped_bothbad"] += 1
        else:  # canonical JSONL: label optional (1.0), group optional
            label, group = rec.get("label", 1.0), rec.get("group")
            if not isinstance(label, (int, float)) or isinstance(label, bool) or not 0 <= label <= 1:
                raise ValueError(f"{w}: 'label' must be a number in [0, 1] (got {label!r:.80})")
            found.append((_field(rec, "chosen", str, w), _field(rec, "rejected", str, w), label))
        key = "caption" if fmt == "pickapic" else "prompt"
        # An empty prompt is kept as the empty prompt, not skipped (Pick-a-Pic v2 has rows with caption ""): it is what
        # the generator was asked and what the annotator judged, and the text encoders accept it. Counted, reported.
        prompt = "" if rec.get(key) == "" else _field(rec, key, str, w)
        count["empty_prompt_pairs"] += 0 if prompt else len(found)
        if group is None and found:  # pairwise formats: group = index of the prompt (for per-prompt means)
            group = groups.setdefault(prompt, len(groups))
        pairs += [{"prompt": prompt, "chosen": os.path.normpath(os.path.join(root, c)), "rejected":
                   os.path.normpath(os.path.join(root, r)), "label": float(lab), "group": group, "src": w}
                  for c, r, lab in found]
    return pairs, count


def read_benchmark(path, fmt=None, image_root=None):
    """Any supported file -> (canonical pairs, info). fmt in FORMATS or None = auto-detect
    (a parquet's columns, else the keys of record 0). Relative image paths are joined to image_root
    (default: the file's folder). info: file, format, records, pairs, skipped_ties, skipped_bothbad (GenAI-Bench)
    and empty_prompt_pairs (pairs kept with the empty prompt)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}, expected one of {FORMATS}")
    with open(path, "rb") as fh:  # a parquet is known by its magic bytes, not its suffix; missing: FileNotFoundError
        parquet = fh.read(4) == b"PAR1"
    fmt, recs = _read_parquet(path, fmt) if parquet else (fmt, _load_records(path))
    keys = recs[0] if recs and isinstance(recs[0], dict) else {}  # auto-detect from the keys of record 0
    fmt = fmt or next((f for k, f in _SIGNATURE.items() if k in keys), None)
    if fmt is None:
        raise ValueError(f"{path}: unknown pair format (record 0 keys {sorted(keys)}); pass fmt in {FORMATS}")
    pairs, count = _pairs_from(fmt, recs, path, os.path.dirname(os.path.abspath(path)) if image_root is None else image_root)
    return pairs, {"file": path, "format": fmt, "records": len(recs), "pairs": len(pairs), **count}


def read_pairs(path, image_root=None, fmt=None):
    """Training pairs from any supported file; read_benchmark's counts are printed when one is not zero."""
    pairs, info = read_benchmark(path, fmt, image_root)
    if info["skipped_ties"] or info["skipped_bothbad"] or info["empty_prompt_pairs"]:
        print(", ".join(f"{k}: {v}" for k, v in info.items()))
    return pairs


def pairwise_accuracy(r_pos, r_neg, groups):
    """The protocol (docs/design.md §7): correct iff r_pos > r_neg strictly (model ties are wrong), pooled over pairs;
    per_prompt_acc = the mean over groups of each group's accuracy. -> dict(acc, per_prompt_acc, pairs, prompts)"""
    ok, g = np.asarray(r_pos, float) > np.asarray(r_neg, float), np.asarray(groups)
    if ok.ndim != 1 or not len(ok) or g.shape != ok.shape:
        raise ValueError(f"need N>0 scores, groups: {ok.shape} {g.shape}")
    per = [ok[g == k].mean() for k in np.unique(g)]
    return dict(acc=float(ok.mean()), per_prompt_acc=float(np.mean(per)), pairs=len(ok), prompts=len(per))


def load_image(path, record_desc=""):
    """-> RGB PIL image; a missing or corrupt file is a one-line error naming it and the record."""
    where = f" ({record_desc})" if record_desc else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found{where}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types on bad files
        raise ValueError(f"{path}: corrupt image{where}: {type(e).__name__}: {e}".splitlines()[0]) from None


# ----------------------------------------------------------------------------- buckets
# SD3.5 aspect-ratio buckets (W, H), ~1 Mpx, multiples of 64. The toy world passes [(32, 32)].
BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
           (1344, 768), (768, 1344), (1536, 640), (640, 1536)]


def nearest_bucket(w, h, buckets=BUCKETS):
    """The (W, H) whose log aspect ratio is closest to w/h (the first one wins a tie)."""
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(w / h)))


def to_bucket(img, bucket):
    """Resize so the image covers the bucket, center-crop -> float (3, H, W) in [-1, 1]."""
    (bw, bh), (w, h) = bucket, img.size
    s = max(bw / w, bh / h)
    img = img.resize((max(bw, round(w * s)), max(bh, round(h * s))), Image.BICUBIC)  # no-op if same size
    left, top = (img.size[0] - bw) // 2, (img.size[1] - bh) // 2
    x = np.asarray(img.crop((left, top, left + bw, top + bh)), dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1) / 127.5 - 1.0


# ----------------------------------------------------------------------------- cache
# out_dir/ latents_RRR_NNNN.safetensors: key sha1(image path)[:20] -> (C,h,w) latents;
# text_RRR_NNNN.safetensors: "<sha1(prompt)[:20]>.embeds" (L,D) and ".pooled" (P,);
# shard_RRR.json: what rank RRR wrote (key -> file, shapes, bad images); index.json: pairs.
def cache_key(s):  # the stable key of an image path or prompt in the cache (public: eval_reward uses it)
    return hashlib.sha1(s.encode("utf-8")).hexdigest()[:20]


@functools.lru_cache(maxsize=512)  # open handles live per process: PairCache pickles to workers
def _shard(path, mtime):  # mtime in the key: a rebuilt cache is never read through a stale handle
    return safe_open(path, framework="pt")


def _group(items):  # [(key, value)] -> {key: [values]}, keys in order of first appearance
    out = {}
    for k, v in items:
        out.setdefault(k, []).append(v)
    return out


def _check(t, ndim, n, what):  # encoder outputs: a finite (n, ...) tensor of ndim dims
    if not (isinstance(t, torch.Tensor) and t.ndim == ndim and len(t) == n and torch.isfinite(t).all()):
        raise ValueError(f"{what}: encoder returned {getattr(t, 'shape', type(t))}, expected finite {ndim}-D, batch {n}")


def given_latents(root):
    """{path under root: (C,h,w)} from root/image_latents.safetensors if it exists (keys relative to root), else {}:
    a generator's own latents of its samples (the toy world writes them). build_cache stores these as given instead of
    the VAE encoding of their PNG, so a reward learns the latents it will judge in alignment."""
    f = os.path.join(root, "image_latents.safetensors")
    if not os.path.isfile(f):
        return {}
    with safe_open(f, framework="pt") as h:
        return {os.path.normpath(os.path.join(root, k)): h.get_tensor(k) for k in h.keys()}


@torch.no_grad()
def build_cache(pairs, image_root, out_dir, encode_images, encode_prompts, buckets, rank=0,
                world_size=1, batch_size=16, skip_bad=False, dtype=torch.float32, shard_size=1024, given=None):
    """Encode this rank's share (every world_size-th, sorted) of the unique images and prompts,
    each exactly once. encode_images: (B,3,H,W) in [-1,1] -> normalised latents (B,C,h,w);
    encode_prompts: list[str] -> (prompt_embeds (B,L,D), pooled (B,P)); both handle devices.
    Stored as `dtype` (bf16 halves real-data disk). world_size == 1 also writes the index, else
    call finalize_cache on rank 0 after a barrier. skip_bad: count and drop unreadable images.
    given: {image path: (C,h,w) latents} stored as they are instead of encoding the image (data.given_latents)."""
    os.makedirs(out_dir, exist_ok=True)
    src = {}  # unique image path -> first record that uses it (for error messages)
    for p in pairs:
        for k in ("chosen", "rejected"):
            src.setdefault(os.path.join(image_root or "", p[k]), p.get("src", "pair"))
    images, prompts = sorted(src)[rank::world_size], sorted({p["prompt"] for p in pairs})[rank::world_size]
    meta = {"latents": {}, "text": {}, "shapes": {}, "bad": {}, "dtype": str(dtype).split(".")[-1]}
    buf, pending = {"latents": {}, "text": {}}, {}  # tensors not yet on disk; bucket -> items
    bar = tqdm(total=len(images) + len(prompts), disable=rank != 0, desc="cache")

    def flush(kind, force=False):  # every shard_size tensors -> one file, written atomically
        if buf[kind] and (force or len(buf[kind]) >= shard_size):
            name = f"{kind}_{rank:03d}_{len(set(meta[kind].values())):04d}.safetensors"
            atomic_write(os.path.join(out_dir, name), lambda tmp: save_file(buf[kind], tmp))
            meta[kind].update({k.split(".")[0]: name for k in buf[kind]})
            buf[kind] = {}

    def encode(items):  # [(path, (3,H,W))] of one bucket -> (B,C,h,w) latents
        z = encode_images(torch.stack([x for _, x in items]))
        _check(z, 4, len(items), f"{items[0][0]} ({src[items[0][0]]})")
        for (p, _), zi in zip(items, z.detach().cpu().to(dtype)):
            buf["latents"][cache_key(p)], meta["shapes"][cache_key(p)] = zi.contiguous(), list(zi.shape)
        flush("latents")

    for p in images:  # one pass: load, bucket, encode a bucket whenever it holds a batch
        bar.update()
        z = (given or {}).get(os.path.normpath(p))
        if z is not None:
            buf["latents"][cache_key(p)], meta["shapes"][cache_key(p)] = z.to(dtype).contiguous(), list(z.shape)
            flush("latents")
            continue
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
            e, pooled = encode_prompts(batch)
        except Exception as err:  # name the prompts; the cause stays chained
            raise RuntimeError(f"encode_prompts failed on the batch starting {batch[0]!r}: {err}") from err
        _check(e, 3, len(batch), f"prompt_embeds of {batch[0]!r}")
        _check(pooled, 2, len(batch), f"pooled of {batch[0]!r}")
        for pr, ei, pi in zip(batch, e.detach().cpu().to(dtype), pooled.detach().cpu().to(dtype)):
            buf["text"].update({cache_key(pr) + ".embeds": ei.contiguous(), cache_key(pr) + ".pooled": pi.contiguous()})
        flush("text")
        bar.update(len(batch))
    flush("text", force=True)
    bar.close()
    atomic_write(os.path.join(out_dir, f"shard_{rank:03d}.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    info = {"images": len(meta["shapes"]), "prompts": len(prompts), "bad_images": len(meta["bad"])}
    return {**info, **finalize_cache(out_dir, pairs, 1, image_root)} if world_size == 1 else info


def finalize_cache(out_dir, pairs, world_size, image_root=None):
    """Rank 0, after every rank's build_cache: merge the shard_RRR.json into index.json.
    Pairs with a bad image or with two images in different buckets are dropped, counted."""
    shards = [os.path.join(out_dir, f"shard_{r:03d}.json") for r in range(world_size)]
    for f in shards:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: missing; did every rank finish build_cache?")
    metas = [json.loads(Path(f).read_text()) for f in shards]
    m = {k: {kk: v for mm in metas for kk, v in mm[k].items()} for k in ("latents", "text", "shapes", "bad")}
    out, groups, n_bad, n_mixed = [], {}, 0, 0
    for p in pairs:
        c, r = (os.path.join(image_root or "", p[k]) for k in ("chosen", "rejected"))
        (kc, kr), kp = (cache_key(c), cache_key(r)), cache_key(p["prompt"])
        if c in m["bad"] or r in m["bad"]:
            n_bad += 1
        elif kc not in m["latents"] or kr not in m["latents"] or kp not in m["text"]:
            raise ValueError(f"{out_dir}: {p.get('src', p['prompt'])} is not cached; same pairs on every rank?")
        elif m["shapes"][kc] != m["shapes"][kr]:
            n_mixed += 1
        else:  # group renumbered 0..G-1 by first appearance
            out.append({"prompt": kp, "chosen": kc, "rejected": kr, "label": float(p.get("label", 1.0)),
                        "group": groups.setdefault(p["prompt"] if p.get("group") is None else p["group"], len(groups)),
                        "shape": m["shapes"][kc], "prompt_text": p["prompt"], "src": p.get("src")})
    msg = f"{out_dir}: dropped {n_bad} pairs with unreadable images, {n_mixed} with images in two buckets"
    if not out:
        raise ValueError(msg + ", none left")
    if n_bad or n_mixed:
        print(msg)
    index = {"dtype": metas[0]["dtype"], "latents": m["latents"], "text": m["text"], "pairs": out}
    atomic_write(os.path.join(out_dir, "index.json"), lambda tmp: Path(tmp).write_text(json.dumps(index)))
    return {"pairs": len(out), "dropped_bad_image": n_bad, "dropped_mixed_bucket": n_mixed}


class PairCache:
    """A finished cache; shard files are opened lazily with safetensors.safe_open (no pickle)."""

    def __init__(self, out_dir, latent_channels=None):
        idx = json.loads(Path(out_dir, "index.json").read_text())  # missing: FileNotFoundError naming it
        self.dir, self.pairs, self.lat, self.txt = out_dir, idx["pairs"], idx["latents"], idx["text"]
        for p in self.pairs:
            if latent_channels is not None and p["shape"][0] != latent_channels:
                raise ValueError(f"{os.path.join(out_dir, self.lat[p['chosen']])}: key {p['chosen']}: latents "
                                 f"have {p['shape'][0]} channels, expected {latent_channels}")

    def __len__(self):
        return len(self.pairs)

    def tensor(self, name, key):  # one tensor from a shard file, opened lazily
        f = os.path.join(self.dir, name)
        return _shard(f, os.stat(f).st_mtime_ns).get_tensor(key)

    def pair(self, i):
        p = self.pairs[i]
        return {"lat_pos": self.tensor(self.lat[p["chosen"]], p["chosen"]),  # (C,h,w)
                "lat_neg": self.tensor(self.lat[p["rejected"]], p["rejected"]),
                "prompt_embeds": self.tensor(self.txt[p["prompt"]], p["prompt"] + ".embeds"),  # (L,D)
                "pooled": self.tensor(self.txt[p["prompt"]], p["prompt"] + ".pooled"),  # (P,)
                "label": p["label"], "group": p["group"]}

    def batch(self, indices):
        """-> dict of stacked (B, ...) tensors, one row per pair; all pairs must share one bucket."""
        g = self.group_batch([[i] for i in indices])
        return {"lat_pos": g["lat"][g["pos"]], "lat_neg": g["lat"][g["neg"]], "prompt_embeds": g["prompt_embeds"][g["pos"]],
                "pooled": g["pooled"][g["pos"]], "label": g["label"],
                "group": torch.tensor([self.pairs[i]["group"] for i in indices], dtype=torch.long)}

    def group_batch(self, units):
        """units [[pair indices]] -> each unit's distinct images (an image = a (latent, prompt) node), loaded once
        however many of its pairs hold them: lat (N,C,h,w), prompt_embeds (N,L,D), pooled (N,P), unit (N,) per
        image row; pos, neg (K,) the rows of each pair's chosen and rejected image; label (K,). One bucket only."""
        if len({tuple(self.pairs[i]["shape"]) for ids in units for i in ids}) != 1:
            raise ValueError(f"{self.dir}: batch {units[:4]} mixes buckets; batch within PairCache.buckets()")
        rows, pos, neg = {}, [], []  # (unit, image key, prompt key) -> row, in insertion order
        for u, i in ((u, i) for u, ids in enumerate(units) for i in ids):
            p = self.pairs[i]
            pos.append(rows.setdefault((u, p["chosen"], p["prompt"]), len(rows)))
            neg.append(rows.setdefault((u, p["rejected"], p["prompt"]), len(rows)))
        lat, embeds, pooled = self.image_batch([(k, q) for _, k, q in rows])
        return {"lat": lat, "prompt_embeds": embeds, "pooled": pooled, "unit": torch.tensor([u for u, _, _ in rows]),
                "pos": torch.tensor(pos), "neg": torch.tensor(neg),
                "label": torch.tensor([self.pairs[i]["label"] for ids in units for i in ids], dtype=torch.float32)}

    def images(self):
        """Every (image key, prompt key) of the pairs once, by latent shape: {shape: [items]} (scoring unique images)."""
        items = {(p[k], p["prompt"]): tuple(p["shape"]) for p in self.pairs for k in ("chosen", "rejected")}
        return _group((shape, it) for it, shape in sorted(items.items()))

    def image_batch(self, items):
        """[(image key, prompt key)] of one shape -> lat (B,C,h,w), prompt_embeds (B,L,D), pooled (B,P)."""
        return (torch.stack([self.tensor(self.lat[k], k) for k, _ in items]),
                torch.stack([self.tensor(self.txt[q], q + ".embeds") for _, q in items]),
                torch.stack([self.tensor(self.txt[q], q + ".pooled") for _, q in items]))

    def components(self):
        """-> [[pair indices]]: the connected groups of the pair graph over (image, prompt) nodes: pairs that
        share an image under one prompt (a prompt's pool of candidates) fall in one group."""
        parent = {}  # union-find over the (image, prompt) nodes
        node = lambda i, side: (self.pairs[i][side], self.pairs[i]["prompt"])

        def find(x):
            while parent.setdefault(x, x) != x:
                parent[x] = x = parent[parent[x]]  # path halving
            return x
        for i in range(len(self.pairs)):
            parent[find(node(i, "chosen"))] = find(node(i, "rejected"))
        return list(_group((find(node(i, "chosen")), i) for i in range(len(self.pairs))).values())

    def buckets(self):
        """-> {"CxHxW": [pair indices]}, so the trainer never mixes buckets in a batch."""
        return _group(("x".join(map(str, p["shape"])), i) for i, p in enumerate(self.pairs))


# ----------------------------------------------------------------------------- prompt lists
def read_prompts(path, flag="--prompts"):
    """A prompts file, one prompt per line (blank lines skipped) -> list[str]; a missing or empty file is an error."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such prompts file (one prompt per line)")
    prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    if not prompts:
        raise ValueError(f"{flag} {path}: the prompts file is empty")
    return prompts
