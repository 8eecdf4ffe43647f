"""CPU tests for data.py: readers, buckets, cache round trip."""
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from toy import TOY_BACKGROUNDS, TOY_COLORS, TOY_SHAPES, render_toy, toy_prompt  # noqa: E402


# ----------------------------------------------------------------------------- readers
def _write(path, obj, jsonl=False):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in obj) if jsonl else json.dumps(obj))
    return str(path)


def test_hpdv3_with_nulls(tmp_path):
    f = _write(tmp_path / "hpdv3.json", [
        {"prompt": "p0", "path1": "a.png", "path2": "b.png", "choice_dist": [3, 1], "confidence": 0.9,
         "model1": "m1", "model2": "m2"},
        {"prompt": "p1", "path1": "c.png", "path2": "/abs/d.png", "choice_dist": None, "confidence": None,
         "model1": None, "model2": None},
        {"prompt": "p0", "path1": "e.png", "path2": "a.png"}])
    pairs, info = data.read_benchmark(f)
    assert info["format"] == "hpdv3" and info["pairs"] == 3
    assert pairs[0]["label"] == 0.75 and pairs[1]["label"] == 1.0
    assert pairs[0]["chosen"] == str(tmp_path / "a.png") and pairs[1]["rejected"] == "/abs/d.png"
    assert [p["group"] for p in pairs] == [0, 1, 0]
    assert data.read_pairs(f, image_root="/root")[0]["chosen"] == "/root/a.png"


def test_ranked_groups_expand_and_skip_ties(tmp_path):
    ir = _write(tmp_path / "ir.json", [{"prompt": "x", "generations": ["a", "b", "c", "d"], "ranking": [1, 2, 2, 3]}])
    pairs, info = data.read_benchmark(ir)
    assert info["format"] == "imagereward" and len(pairs) == 5 and info["skipped_ties"] == 1
    names = {(os.path.basename(p["chosen"]), os.path.basename(p["rejected"])) for p in pairs}
    assert names == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")}
    hp = _write(tmp_path / "hpdv2.json", [{"prompt": "x", "image_path": ["a", "b", "c"], "rank": [3, 1, 2]},
                                          {"prompt": "y", "image_path": ["d", "e"], "rank": [1, 1]}])
    pairs, info = data.read_benchmark(hp, fmt="hpdv2")
    assert len(pairs) == 3 and info["skipped_ties"] == 1 and {p["group"] for p in pairs} == {0}
    names = {(os.path.basename(p["chosen"]), os.path.basename(p["rejected"])) for p in pairs}
    assert names == {("b", "a"), ("c", "a"), ("b", "c")}


def test_genai_votes_and_pickapic_jsonl(tmp_path):
    recs = [{"prompt": "p", "left_image": "l", "right_image": "r", "vote_type": v}
            for v in ("leftvote", "rightvote", "tievote", "bothbad_vote", "leftvote")]
    pairs, info = data.read_benchmark(_write(tmp_path / "g.jsonl", recs, jsonl=True))
    assert info["format"] == "genai" and len(pairs) == 3
    assert info["skipped_ties"] == 1 and info["skipped_bothbad"] == 1
    assert [os.path.basename(p["chosen"]) for p in pairs] == ["l", "r", "l"]
    recs = [{"caption": "c", "jpg_0": "x.jpg", "jpg_1": "y.jpg", "label_0": a, "label_1": 1 - a} for a in (1, 0, 0.5)]
    pairs, info = data.read_benchmark(_write(tmp_path / "pap.jsonl", recs, jsonl=True))
    assert info["format"] == "pickapic" and len(pairs) == 2 and info["skipped_ties"] == 1
    assert [os.path.basename(p["chosen"]) for p in pairs] == ["x.jpg", "y.jpg"]


def test_reader_errors(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                        {"prompt": "p", "chosen": "a", "rejected": "b", "label": 1.5}], jsonl=True)
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1: 'label'"):
        data.read_benchmark(f)
    f = _write(tmp_path / "bad3.json", [{"prompt": "p", "path1": "a", "path2": "b"}, {"prompt": "p", "path1": 3}])
    with pytest.raises(ValueError, match=r"bad3.json: record 1: missing or invalid 'path1'"):
        data.read_benchmark(f)
    with pytest.raises(ValueError, match="unknown vote_type"):
        data.read_benchmark(_write(tmp_path / "g.json", [{"prompt": "p", "left_image": "l", "right_image": "r",
                                                          "vote_type": "maybe"}]))
    with pytest.raises(ValueError, match="unknown pair format"):
        data.read_benchmark(_write(tmp_path / "u.json", [{"foo": 1}]))
    with pytest.raises(ValueError, match="unknown format"):
        data.read_benchmark(f, fmt="laion")
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(ValueError, match="empty.json: empty file"):
        data.read_benchmark(str(tmp_path / "empty.json"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.read_benchmark(str(tmp_path / "nope.json"))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")  # the magic bytes, no footer
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):  # a requirement: say which module is missing
            data.read_benchmark(str(tmp_path / "x.parquet"))
    else:
        with pytest.raises(ValueError, match="x.parquet: unreadable parquet"):
            data.read_benchmark(str(tmp_path / "x.parquet"))


# ----------------------------------------------------------------------------- the parquet files as published
def encoded(color, fmt="PNG", size=32):
    """The encoded bytes of a small flat-coloured image (distinguishable: one colour per image)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def pickapic_parquet(path, rows):
    """Pick-a-Pic v2 with all 19 columns and their arrow types. rows: [(caption, jpg_0 bytes, jpg_1 bytes, label_0)],
    label_1 = 1 - label_0; a 0.5 / 0.5 tie has best_image_uid "none", as published."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
                        ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()), ("image_0_uid", pa.string()),
                        ("image_0_url", pa.string()), ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
                        ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()),
                        ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64()),
                        ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64()), ("__index_level_0__", pa.int64())])
    cols = {k: [] for k in schema.names}
    for i, (caption, j0, j1, l0) in enumerate(rows):
        uids = (f"uid-{i}-0", f"uid-{i}-1")
        best = "none" if l0 is None or l0 == 0.5 else uids[0 if l0 > 0.5 else 1]
        for k, v in zip(schema.names, (j0 != j1, best, caption, 1_683_000_000_000_000_000 + i, True, uids[0],
                                       f"https://x/{uids[0]}.png", uids[1], f"https://x/{uids[1]}.png", j0, j1,
                                       l0, None if l0 is None else 1 - l0, "sdxl", "sd-2.1", 100 + i, 7, 2, i)):
            cols[k].append(v)
    pq.write_table(pa.table(cols, schema=schema), str(path))
    return str(path)


def genai_parquet(path, rows):
    """GenAI-Bench image preference with its 6 columns and arrow types. rows: [(prompt, left, right, vote_type)],
    left / right an image struct {bytes, path}: encoded bytes (path: the original file name), or (None, path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("left_model", pa.string()), ("left_image", image),
                        ("right_model", pa.string()), ("right_image", image), ("vote_type", pa.string())])
    cell = lambda im, i: {"bytes": None, "path": im[1]} if isinstance(im, tuple) else {"bytes": im, "path": f"{i}.png"}
    table = pa.table({"prompt": [r[0] for r in rows], "left_model": ["dalle3"] * len(rows),
                      "left_image": [cell(r[1], i) for i, r in enumerate(rows)], "right_model": ["sdxl"] * len(rows),
                      "right_image": [cell(r[2], i) for i, r in enumerate(rows)], "vote_type": [r[3] for r in rows]},
                     schema=schema)
    pq.write_table(table, str(path))
    return str(path)


def test_pickapic_v2_parquet(tmp_path):
    """All 19 columns; a tie (skipped, counted), an empty caption (kept as the empty prompt, counted); the chosen
    image is the one with the higher label, whatever its side; each image's bytes are written once and reused.
    The format comes from the columns: the file has no .parquet suffix."""
    red, blue, green, white = (encoded(c, "JPEG") for c in ("red", "blue", "green", "white"))
    f = pickapic_parquet(tmp_path / "test-00000-of-00001.data", [
        ("a red cat", red, blue, 1.0), ("a green dog", blue, green, 0.0), ("", white, red, 0.0),
        ("a tie", green, white, 0.5), ("a red cat", red, green, 1.0)])
    pairs, info = data.read_benchmark(f)
    assert (info["format"], info["records"], info["pairs"], info["skipped_ties"], info["empty_prompt_pairs"]) == \
        ("pickapic", 5, 4, 1, 1)
    assert [(p["prompt"], Path(p["chosen"]).read_bytes(), Path(p["rejected"]).read_bytes()) for p in pairs] == [
        ("a red cat", red, blue), ("a green dog", green, blue), ("", red, white), ("a red cat", red, green)]
    assert [p["label"] for p in pairs] == [1.0] * 4 and [p["src"].split(": ")[1] for p in pairs] == \
        ["record 0", "record 1", "record 2", "record 4"]
    assert [p["group"] for p in pairs] == [0, 1, 2, 0]
    img_dir = tmp_path / "test-00000-of-00001_images"
    names = sorted(hashlib.sha1(b).hexdigest()[:20] + ".jpg" for b in (red, blue, green, white))
    assert sorted(os.listdir(img_dir)) == names  # 10 image cells, 4 distinct images: <sha1 of bytes>.<ext>
    for p in img_dir.iterdir():  # a re-read writes nothing: same files, same times
        os.utime(p, ns=(1, 1))
    assert data.read_benchmark(f)[0] == pairs
    assert len(os.listdir(img_dir)) == 4 and all(p.stat().st_mtime_ns == 1 for p in img_dir.iterdir())


def test_genai_bench_parquet(tmp_path):
    """Image structs {bytes, path}; leftvote / rightvote orient the pair, tievote and bothbad_vote are skipped and
    counted apart (as in the JSON reader); a struct without bytes is its path, joined to the image root."""
    red, blue, green = (encoded(c) for c in ("red", "blue", "green"))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "imgs" / "w.png")
    f = genai_parquet(tmp_path / "genai_bench_test_v1.parquet", [
        ("p0", red, blue, "leftvote"), ("p1", red, blue, "rightvote"), ("p2", red, green, "tievote"),
        ("p3", blue, green, "bothbad_vote"), ("p4", (None, "imgs/w.png"), green, "rightvote"),
        ("p5", (None, "imgs/w.png"), green, "leftvote")])
    pairs, info = data.read_benchmark(f)
    assert (info["format"], info["records"], info["pairs"], info["skipped_ties"], info["skipped_bothbad"],
            info["empty_prompt_pairs"]) == ("genai", 6, 4, 1, 1, 0)
    assert [(p["prompt"], Path(p["chosen"]).read_bytes(), Path(p["rejected"]).read_bytes()) for p in pairs] == [
        ("p0", red, blue), ("p1", blue, red), ("p4", green, (tmp_path / "imgs/w.png").read_bytes()),
        ("p5", (tmp_path / "imgs/w.png").read_bytes(), green)]
    assert pairs[3]["chosen"] == str(tmp_path / "imgs/w.png")
    assert data.read_benchmark(f, image_root="/elsewhere")[0][3]["chosen"] == "/elsewhere/imgs/w.png"
    assert sorted(p.suffix for p in (tmp_path / "genai_bench_test_v1_images").iterdir()) == [".png"] * 3


def test_parquet_errors(tmp_path):
    """Unknown schema: one line naming the file and its columns, no image written; a malformed row: one line naming
    the file and the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a"], "image": [encoded("red")]}), str(tmp_path / "other.parquet"))
    with pytest.raises(ValueError, match=r"other.parquet: unknown parquet schema \(columns \['text', 'image'\]\)"):
        data.read_benchmark(str(tmp_path / "other.parquet"))
    assert not (tmp_path / "other_images").exists()
    red = encoded("red", "JPEG")
    for rows, match in (([("c", red, red, 1.0), ("c", red, None, 1.0)], r"pap.parquet: record 1: missing or invalid 'jpg_1'"),
                        ([("c", red, red, float("nan"))], r"pap.parquet: record 0: invalid labels nan"),
                        ([("c", red, red, None)], r"pap.parquet: record 0: missing or invalid 'label_0'"),
                        ([("c", red, red, 1.0), (None, red, red, 1.0)], r"pap.parquet: record 1: missing or invalid 'caption'")):
        with pytest.raises(ValueError, match=match):
            data.read_benchmark(pickapic_parquet(tmp_path / "pap.parquet", rows))
    for rows, match in (([("p", red, (None, None), "leftvote")], r"g.parquet: record 0: right_image: missing or invalid 'path'"),
                        ([("p", red, red, "leftvote"), ("p", red, red, "maybe")], r"g.parquet: record 1: unknown vote_type")):
        with pytest.raises(ValueError, match=match):
            data.read_benchmark(genai_parquet(tmp_path / "g.parquet", rows))


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.png: image not found \(f.json: record 7\)"):
        data.load_image(str(tmp_path / "missing.png"), "f.json: record 7")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage bytes")
    with pytest.raises(ValueError, match=r"junk.png: corrupt image \(f.json: record 3\)"):
        data.load_image(str(tmp_path / "junk.png"), "f.json: record 3")


# ----------------------------------------------------------------------------- buckets, cache
def test_buckets():
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in data.BUCKETS)
    assert data.nearest_bucket(1000, 1010) == (1024, 1024)
    assert data.nearest_bucket(1920, 1080) == (1344, 768)
    assert data.nearest_bucket(500, 900, data.BUCKETS) == (768, 1344)
    assert data.nearest_bucket(7, 3, [(32, 32)]) == (32, 32)
    x = data.to_bucket(Image.new("RGB", (100, 50), (255, 0, 0)), (32, 32))
    assert x.shape == (3, 32, 32) and x[0].eq(1).all() and x[1].eq(-1).all()


def _toy_pairs(tmp_path, n_img=10):
    rng = np.random.default_rng(0)
    paths, prompts = [], []
    for i in range(n_img):
        c, s, b = list(TOY_COLORS)[i % 6], TOY_SHAPES[i % 3], list(TOY_BACKGROUNDS)[i % 3]
        size = 32 if i != 3 else 48  # one non-square-source image still lands in (32, 32)
        render_toy(c, s, b, rng, size=size).save(tmp_path / f"im{i}.png")
        paths.append(f"im{i}.png")
        prompts.append(toy_prompt(c, s, b))
    pairs = [{"prompt": prompts[i], "chosen": paths[i], "rejected": paths[(i + 1) % n_img], "label": 0.8,
              "group": i % 4, "src": f"toy:{i}"} for i in range(n_img)]
    pairs += [{"prompt": prompts[0], "chosen": paths[i], "rejected": paths[i + 2], "label": 1.0, "group": 0}
              for i in range(0, n_img - 2, 3)]
    return pairs


def _encoders(seen):
    def enc_img(x):  # (B,3,32,32) -> (B,2,8,8): avg-pool /4, first 2 channels
        seen.extend(x.flatten(1).sum(1).tolist())
        return torch.nn.functional.avg_pool2d(x, 4)[:, :2]

    def enc_txt(prompts):  # deterministic from the string
        v = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 97)] for p in prompts])
        return v[:, None, :].repeat(1, 5, 3), v[:, :1] * 2
    return enc_img, enc_txt


def test_cache_round_trip_two_ranks(tmp_path):
    pairs = _toy_pairs(tmp_path)
    out, seen = str(tmp_path / "cache"), []
    enc_img, enc_txt = _encoders(seen)
    infos = [data.build_cache(pairs, str(tmp_path), out, enc_img, enc_txt, [(32, 32)], rank=r, world_size=2,
                              batch_size=3, shard_size=2) for r in range(2)]
    assert len(seen) == 10 and sum(i["images"] for i in infos) == 10  # each unique image once
    assert sum(i["prompts"] for i in infos) == len({p["prompt"] for p in pairs})
    info = data.finalize_cache(out, pairs, 2, image_root=str(tmp_path))
    assert info["pairs"] == len(pairs)
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    cache = data.PairCache(out, latent_channels=2)
    assert len(cache) == len(pairs) and list(cache.buckets()) == ["2x8x8"]
    for i, p in enumerate(pairs):
        it = cache.pair(i)
        img = data.to_bucket(data.load_image(str(tmp_path / p["chosen"])), (32, 32))
        assert torch.equal(it["lat_pos"], torch.nn.functional.avg_pool2d(img[None], 4)[0, :2])
        e, pooled = enc_txt([p["prompt"]])
        assert torch.equal(it["prompt_embeds"], e[0]) and torch.equal(it["pooled"], pooled[0])
        assert it["label"] == p["label"]
    b = cache.batch([0, 3, 5])
    assert b["lat_pos"].shape == (3, 2, 8, 8) and b["prompt_embeds"].shape == (3, 5, 6) and b["pooled"].shape == (3, 1)
    assert b["label"].dtype == torch.float32 and b["group"].tolist() == [cache.pair(i)["group"] for i in (0, 3, 5)]
    with pytest.raises(ValueError, match="channels, expected 16"):
        data.PairCache(out, latent_channels=16)


def test_cache_stores_given_latents(tmp_path):
    """data.given_latents: a generator's own latents (root/image_latents.safetensors, keys relative to root) are stored
    as given, not encoded; the other images are encoded as usual."""
    from safetensors.torch import save_file
    pairs, seen = _toy_pairs(tmp_path), []
    own = torch.randn(2, 8, 8)
    save_file({"im1.png": own}, str(tmp_path / "image_latents.safetensors"))
    given = data.given_latents(str(tmp_path))
    assert list(given) == [os.path.normpath(str(tmp_path / "im1.png"))]
    enc_img, enc_txt = _encoders(seen)
    data.build_cache(pairs, str(tmp_path), str(tmp_path / "c"), enc_img, enc_txt, [(32, 32)], given=given)
    assert len(seen) == 9  # 10 images, one given
    cache = data.PairCache(str(tmp_path / "c"))
    i = next(i for i, p in enumerate(pairs) if p["chosen"] == "im1.png")
    assert torch.equal(cache.pair(i)["lat_pos"], own)
    assert data.given_latents(str(tmp_path / "nowhere")) == {}


def test_cache_bad_images(tmp_path):
    pairs = _toy_pairs(tmp_path)
    (tmp_path / "im4.png").write_bytes(b"not a png")
    enc_img, enc_txt = _encoders([])
    with pytest.raises(ValueError, match=r"im4.png: corrupt image \(toy:3\)"):
        data.build_cache(pairs, str(tmp_path), str(tmp_path / "c1"), enc_img, enc_txt, [(32, 32)])
    info = data.build_cache(pairs, str(tmp_path), str(tmp_path / "c2"), enc_img, enc_txt, [(32, 32)],
                            skip_bad=True, dtype=torch.bfloat16)
    n_use = sum("im4.png" in (p["chosen"], p["rejected"]) for p in pairs)
    assert info["bad_images"] == 1 and info["dropped_bad_image"] == n_use and info["pairs"] == len(pairs) - n_use
    assert data.PairCache(str(tmp_path / "c2")).pair(0)["lat_pos"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="encoder returned"):
        data.build_cache(pairs, str(tmp_path), str(tmp_path / "c3"), lambda x: x[:, :, :1] * float("nan"),
                         enc_txt, [(32, 32)], skip_bad=True)
