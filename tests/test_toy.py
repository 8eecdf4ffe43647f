"""toy.py: the world's pieces (prompts, renderer, oracle, annotators) against what they promise; a miniature
world (--small) has every file, in the real formats, reloads, and is deterministic from its seed."""
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import toy
from toy import (TOY_BACKGROUNDS, TOY_COLORS, TOY_CORRUPTIONS, TOY_SHAPES, corrupt_toy, parse_toy_prompt,
                 render_toy, toy_annotate, toy_golden_score, toy_prompt)


def _toy_set(n, seed=0):
    rng = np.random.default_rng(seed)
    cols, bgs = list(TOY_COLORS), list(TOY_BACKGROUNDS)
    attrs = [(cols[rng.integers(len(cols))], TOY_SHAPES[rng.integers(3)], bgs[rng.integers(len(bgs))])
             for _ in range(n)]
    return [render_toy(*a, rng) for a in attrs], attrs, rng


# ----------------------------------------------------------------------------- the world
def test_prompt_roundtrip_and_errors():
    for c in TOY_COLORS:
        for s in TOY_SHAPES:
            for b in TOY_BACKGROUNDS:
                assert parse_toy_prompt(toy_prompt(c, s, b)) == (c, s, b)
    assert not set(TOY_COLORS.values()) & set(TOY_BACKGROUNDS.values())
    with pytest.raises(ValueError, match="a pink circle"):
        parse_toy_prompt("a pink circle on a white background")


def test_render_inside_frame_and_deterministic():
    imgs, attrs, _ = _toy_set(50)
    imgs2, _, _ = _toy_set(50)
    for im, im2, (c, s, b) in zip(imgs, imgs2, attrs):
        x = np.asarray(im)
        assert im.size == (32, 32) and np.array_equal(x, np.asarray(im2))
        assert (x[0] == TOY_BACKGROUNDS[b]).all() or (x[:, 0] == TOY_BACKGROUNDS[b]).any()
        area = (x == TOY_COLORS[c]).all(-1).sum()
        assert 0.4 ** 2 * 1024 * 0.45 <= area <= 0.75 ** 2 * 1024 + 1


def test_oracle_reads_clean_renders():
    imgs, attrs, _ = _toy_set(300)
    prompts = [toy_prompt(*a) for a in attrs]
    s = toy_golden_score(imgs, prompts)
    assert s.shape == (300,) and s.dtype.kind == "f"
    assert (s > 0.9).mean() > 0.95 and s.min() >= 0 and s.max() <= 1
    assert np.array_equal(s, toy_golden_score(imgs, prompts))  # deterministic
    # uint8 array and float (N,3,H,W) in [-1, 1] inputs give the same score
    u8 = np.stack([np.asarray(im) for im in imgs])
    f = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.allclose(toy_golden_score(u8, prompts), s)
    assert np.allclose(toy_golden_score(f, prompts), s, atol=1e-3)


def test_oracle_reads_ragged_squares_as_squares():
    """The shape is read off the corners of the object's box: a square whose edges lose pixels (as the generator's
    do, a tenth of its area) is still a square (nearly always), and a square with its corners cut off is a circle."""
    rng = np.random.default_rng(3)
    ragged, cut = [], []
    for _ in range(40):
        x = np.full((32, 32, 3), 255, np.uint8)
        s, y0, x0 = (int(v) for v in rng.integers([14, 2, 2], [24, 8, 8]))
        x[y0:y0 + s, x0:x0 + s] = TOY_COLORS["red"]
        r = x.copy()
        for k in range(s):  # bite up to 2 pixels off the top and right edges, at random
            r[y0:y0 + int(rng.integers(0, 3)), x0 + k] = 255
            r[y0 + k, x0 + s - int(rng.integers(0, 3)):x0 + s] = 255
        ragged.append(r)
        c = x.copy()
        q = s // 3
        for i in range(q):  # each corner cut along its diagonal: row i from the top and from the bottom
            for row in (y0 + i, y0 + s - 1 - i):
                c[row, x0:x0 + q - i] = 255
                c[row, x0 + s - (q - i):x0 + s] = 255
        cut.append(c)
    read = [parse_toy_prompt(p)[1] for p in toy.oracle_read(np.stack(ragged))]
    assert read.count("square") >= 0.9 * len(read)
    read = [parse_toy_prompt(p)[1] for p in toy.oracle_read(np.stack(cut))]
    assert read.count("circle") >= 0.9 * len(read)


def test_oracle_penalises_wrong_attributes():
    imgs, attrs, _ = _toy_set(200, seed=1)
    clean = toy_golden_score(imgs, [toy_prompt(*a) for a in attrs])
    cols, bgs = list(TOY_COLORS), list(TOY_BACKGROUNDS)
    for j in range(3):
        wrong = []
        for a in attrs:
            a = list(a)
            pool = [cols, TOY_SHAPES, bgs][j]
            a[j] = pool[(pool.index(a[j]) + 1) % len(pool)]
            wrong.append(toy_prompt(*a))
        w = toy_golden_score(imgs, wrong)
        assert (w < clean - 0.15).mean() > 0.95, j


def test_oracle_corruptions_monotone():
    imgs, attrs, rng = _toy_set(150, seed=2)
    prompts = [toy_prompt(*a) for a in attrs]
    clean = toy_golden_score(imgs, prompts).mean()
    for kind in TOY_CORRUPTIONS:
        means = [toy_golden_score([corrupt_toy(im, kind, st, rng) for im in imgs], prompts).mean()
                 for st in (0.25, 0.5, 0.75, 1.0)]
        assert clean - means[1] > 0.1, kind
        assert all(a > b for a, b in zip(means, means[1:])), (kind, means)


def test_oracle_speed_and_empty_image():
    import time
    imgs, attrs, _ = _toy_set(1000, seed=3)
    u8 = np.stack([np.asarray(im) for im in imgs])
    t = time.time()
    toy_golden_score(u8, [toy_prompt(*a) for a in attrs])
    assert time.time() - t < 2.0
    blank = np.full((1, 32, 32, 3), 255, np.uint8)
    assert toy_golden_score(blank, ["a red circle on a white background"])[0] < 0.6


def test_annotators():
    rng = np.random.default_rng(0)
    a, b = np.full(4000, 0.6), np.full(4000, 0.5)
    k = toy_annotate(a, b, 5, rng, noise=0.1)
    assert k.shape == (4000,) and k.min() >= 0 and k.max() <= 5
    from math import erf, sqrt
    p = 0.5 * (1 + erf(0.1 / (0.1 * sqrt(2)) / sqrt(2)))  # P(N(0.1, 2*0.01) > 0)
    assert abs(k.mean() / 5 - p) < 0.02
    assert (toy_annotate(a, a - 1, 3, rng) == 3).all()


# ----------------------------------------------------------------------------- a miniature world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy") / "world")
    toy.main(toy.parser.parse_args(["--out", out, "--small", "--seed", "3"]))
    return out


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f] if path.endswith(".jsonl") else json.load(f)


def test_files_and_formats(world):
    assert not [p for p in os.listdir(os.path.dirname(world)) if ".partial" in p]
    s = load(os.path.join(world, "summary.json"))
    assert {"render", "vae", "generator", "sample", "pairs", "bench", "total"} <= set(s["timings"])
    assert 0 <= s["generator"]["train_prompts"]["match"] <= 1 and s["generator"]["heldout_prompts"]["n"] > 0
    train, test = load(os.path.join(world, "train.json")), load(os.path.join(world, "test.json"))
    oracle = load(os.path.join(world, "test_oracle.json"))
    assert len(train) == s["pairs"]["train"] > 0 and len(test) == s["pairs"]["test"] > 0
    for r in train + test:
        assert set(r) == {"prompt", "path1", "path2", "choice_dist", "confidence", "model1", "model2"}
        parse_toy_prompt(r["prompt"])
        assert r["choice_dist"][0] >= r["choice_dist"][1] and r["confidence"] >= 0.5
        assert r["path1"] != r["path2"] and Image.open(os.path.join(world, r["path1"])).size == (32, 32)
    assert all(sum(r["choice_dist"]) == 5 for r in train) and all(sum(r["choice_dist"]) == 21 for r in test)
    assert not {r["path1"] for r in test} & ({r["path1"] for r in train} | {r["path2"] for r in train})
    assert all(abs(oracle[r["path1"]] - oracle[r["path2"]]) >= 0.02 for r in test)  # annotator ties dropped
    assert any(toy.is_heldout(r["prompt"]) for r in test) and not any(toy.is_heldout(r["prompt"]) for r in train)
    assert {"render", "generator", "blur"} <= {r["model1"] for r in train} | {r["model2"] for r in train}
    b = os.path.join(world, "bench")
    for r in load(os.path.join(b, "hpdv2_test.json")):
        assert len(r["image_path"]) == len(r["rank"]) and sorted(r["rank"]) == list(range(1, len(r["rank"]) + 1))
    for r in load(os.path.join(b, "imagereward_test.json")):
        assert len(r["generations"]) == len(r["ranking"]) and min(r["ranking"]) == 1
    votes = {r["vote_type"] for r in load(os.path.join(b, "genai_bench.jsonl"))}
    assert votes <= {"leftvote", "rightvote", "tievote", "bothbad_vote"}
    for r in load(os.path.join(b, "pickapic_test.jsonl")):
        assert r["label_0"] + r["label_1"] == 1 and os.path.isfile(os.path.join(world, r["jpg_0"]))
    assert Image.open(os.path.join(world, "samples.png")).size[0] > 96


def test_web_like_mix(tmp_path):
    """The generator's training set holds the flawed share of corrupted renders and the wrong-caption share of wrong
    captions, never a held-out combination."""
    rng = np.random.default_rng(0)
    prompts = [p for p in toy.all_prompts() if not toy.is_heldout(p)]
    args = toy.parser.parse_args(["--renders-per-prompt", "4", "--flawed-share", "0.5", "--wrong-captions", "0.25",
                                  "--wrong-attribute", "any", "--vae-corrupt", "0"])
    drawn, captions, x, x_vae = toy.render_training_set(prompts, rng, args, str(tmp_path))
    assert len(drawn) == len(captions) == len(x) == len(x_vae) == 4 * len(prompts)
    wrong = [c for c, p in zip(captions, drawn) if c != p]
    assert len(wrong) == round(0.25 * len(drawn)) and not any(toy.is_heldout(c) for c in captions)
    assert all(sum(a != b for a, b in zip(parse_toy_prompt(c), parse_toy_prompt(p))) == 1
               for c, p in zip(captions, drawn) if c != p)  # exactly one attribute named wrongly
    quality = toy_golden_score(x, drawn, parts=True)["quality"]
    assert (quality < 0.39).sum() >= 0.4 * len(drawn)  # about half are flawed (a mild flaw can read as nearly clean)


def test_golden_headroom_report(world, monkeypatch):
    """dev/golden_headroom.py on the miniature world: both splits, renders, VAE round trips and samples with guidance
    on and off; clean renders score golden 1 with the colour right, each term within its weight."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(toy.__file__)), "dev"))
    import golden_headroom
    s = golden_headroom.headroom(world, per_prompt=2, steps=2)
    kinds = ("renders", "vae", "cfg4.5", "cfg1")
    assert set(s) == {f"{split}_{kind}" for split in ("train", "heldout") for kind in kinds}
    for r in s.values():
        assert 0 <= r["color"] <= 0.2 + 1e-6 and 0 <= r["shape"] <= 0.2 + 1e-6 and 0 <= r["background"] <= 0.2 + 1e-6
        assert 0 <= r["quality"] <= 0.4 + 1e-6 and r["golden"] == pytest.approx(sum(r[t] for t in golden_headroom.TERMS))
        assert r["spread"] >= 0 and 0 <= r["color_right"] <= 1 and 0 <= r["shape_right"] <= 1
    for split in ("train", "heldout"):
        assert s[f"{split}_renders"]["golden"] > 0.99 and s[f"{split}_renders"]["color_right"] == 1


def test_pipeline_reloads(world):
    import torch
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(world, "pipeline"), text_encoder_3=None, tokenizer_3=None)
    s = load(os.path.join(world, "summary.json"))["vae"]
    assert pipe.vae.config.scaling_factor == pytest.approx(s["scaling_factor"])
    img = pipe("a red circle on a white background", height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
               max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)


def test_deterministic_and_build_skips(world, tmp_path):
    again = toy.build(str(tmp_path / "again"), seed=3, small=True)
    assert load(os.path.join(again, "train.json")) == load(os.path.join(world, "train.json"))
    assert load(os.path.join(again, "bench/imagereward_test.json")) == load(os.path.join(world, "bench/imagereward_test.json"))
    mtime = os.path.getmtime(os.path.join(again, "summary.json"))
    toy.build(again, seed=3, small=True)  # already built: nothing is redone
    assert os.path.getmtime(os.path.join(again, "summary.json")) == mtime


def test_ties_ranking():
    assert toy.ties_ranking(np.array([0.5, 0.9, 0.895, 0.1]), 0.02) == [3, 1, 1, 4]
    # a chain of near-ties does not tie its ends: each group is anchored at its best score
    assert toy.ties_ranking(np.array([0.81, 0.9, 0.84, 0.87]), 0.05) == [3, 1, 3, 1]


def test_generated_benchmark_ranks_follow_the_oracle(world):
    """bench/generated.json: K samples for every training prompt and every held-out combination, read by the
    HPDv2 reader; a better rank is a higher oracle score, a tie is a near-tie, and scores a margin apart are never
    tied. The latents stored beside it are the generator's own: decoded by the world's VAE, they give the PNGs."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file
    import data
    args = load(os.path.join(world, "summary.json"))["args"]
    K, margin = args["bench_per_prompt"], args["tie_margin"]
    groups = load(os.path.join(world, "bench/generated.json"))
    oracle = load(os.path.join(world, "bench/generated_oracle.json"))
    assert sorted(g["prompt"] for g in groups) == sorted(toy.all_prompts())
    n_tied = 0
    for g in groups:
        assert len(g["image_path"]) == K and min(g["rank"]) == 1
        o = [oracle[p] for p in g["image_path"]]
        for a, b in itertools.combinations(range(K), 2):
            if g["rank"][a] == g["rank"][b]:
                assert abs(o[a] - o[b]) < margin
                n_tied += 1
            else:
                assert (g["rank"][a] < g["rank"][b]) == (o[a] > o[b])
    pairs, info = data.read_benchmark(os.path.join(world, "bench/generated.json"), image_root=world)
    assert info["format"] == "hpdv2" and info["skipped_ties"] == n_tied
    assert info["pairs"] + n_tied == len(groups) * K * (K - 1) // 2
    rel = lambda p: os.path.relpath(p, world)
    assert all(oracle[rel(p["chosen"])] > oracle[rel(p["rejected"])] for p in pairs)
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(world, "pipeline"), text_encoder_3=None, tokenizer_3=None)
    lat, paths = load_file(os.path.join(world, "image_latents.safetensors")), groups[0]["image_path"]
    assert set(oracle) <= set(lat)
    with torch.no_grad():
        z = torch.stack([lat[p] for p in paths])
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    png = np.stack([np.asarray(Image.open(os.path.join(world, p))) for p in paths]).astype(int)
    dec = np.round(pipe.image_processor.postprocess(x, output_type="np") * 255).astype(int)
    assert np.abs(png - dec).max() <= 1  # uint8 rounding


def test_prompt_lists(world):
    """prompts_train.txt holds exactly the training prompts, prompts_heldout.txt the held-out combinations."""
    read = lambda name: open(os.path.join(world, f"prompts_{name}.txt")).read().splitlines()
    train, held = read("train"), read("heldout")
    assert train == [p for p in toy.all_prompts() if not toy.is_heldout(p)]
    assert held == [p for p in toy.all_prompts() if toy.is_heldout(p)] and len(held) == 3 * len(toy.TOY_HELDOUT)
    assert not set(train) & set(held) and len(train) + len(held) == len(toy.all_prompts())
    assert {r["prompt"] for r in load(os.path.join(world, "train.json"))} <= set(train)


def test_every_training_sample_has_its_own_latent(world):
    """image_latents.safetensors holds the generator's own latent of every training sample, each drawn once:
    --train-gen-per-prompt in the mixed pools and --onpolicy-per-prompt in the on-policy pools, per prompt."""
    from safetensors.torch import load_file
    args = load(os.path.join(world, "summary.json"))["args"]
    lat = {k: v for k, v in load_file(os.path.join(world, "image_latents.safetensors")).items()
           if k.startswith("images/train/")}
    n_prompts = len([p for p in toy.all_prompts() if not toy.is_heldout(p)])
    assert len(lat) == n_prompts * (args["onpolicy_per_prompt"] + args["train_gen_per_prompt"])
    assert len({v.numpy().tobytes() for v in lat.values()}) == len(lat)
    gen = {r[f"path{k}"] for r in load(os.path.join(world, "train.json")) for k in "12" if r[f"model{k}"] == "generator"}
    assert gen <= set(lat)
    # the on-policy samples go in pools of --onpolicy-pool (3 in pools of 2 and 1 here), each with real images of its own
    p, rng = toy.all_prompts()[0], np.random.default_rng(0)
    mixed, real = len(toy.make_pool(p, rng, n_wrong=args["train_wrong"])), len(toy.make_pool(p, rng, 2, 1, 0))
    n_own = -(-args["onpolicy_per_prompt"] // args["onpolicy_pool"])  # ceil
    assert n_own == 2
    per_prompt = args["train_pools"] * mixed + n_own * real + args["onpolicy_per_prompt"] + args["train_gen_per_prompt"]
    assert load(os.path.join(world, "summary.json"))["pairs"]["train_images"] == n_prompts * per_prompt


def test_best_of_k_closed_forms_and_run(world, capsys):
    """scripts/best_of_k.py: a reward equal to the oracle orders every counted pair and gains what the oracle
    gains; its negation orders none; the clustered standard error against a hand computation; and the script
    runs on the miniature world (training prompts and held-out combos, the latent and the PNG read; the seen samples)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import best_of_k
    from model import build_reward_model, save_checkpoint, trainable_state
    rng = np.random.default_rng(0)
    o = [rng.uniform(0, 1, 8) for _ in range(6)]
    s = best_of_k.summarise([(x, x) for x in o], 0.05)
    n = [int((np.abs(x[:, None] - x[None]) > 0.05).sum() // 2) for x in o]
    assert s["acc"] == 1 and s["pairs"] == sum(n) and s["acc_se"] == 0 and s["share"] == pytest.approx(1)
    assert s["gain_reward"] == pytest.approx(np.mean([x.max() - x.mean() for x in o])) and s["corr"] == pytest.approx(1)
    s = best_of_k.summarise([(-x, x) for x in o], 0.05)
    assert s["acc"] == 0 and s["gain_reward"] == pytest.approx(np.mean([x.min() - x.mean() for x in o]))
    r = [x + rng.normal(0, 0.3, 8) for x in o]  # a noisy reward: the standard error clustered by prompt
    s = best_of_k.summarise(list(zip(r, o)), 0.05)
    c = np.array([sum((ri[a] - ri[b]) * (x[a] - x[b]) > 0 for a, b in itertools.combinations(range(8), 2)
                      if abs(x[a] - x[b]) > 0.05) for ri, x in zip(r, o)])
    acc = c.sum() / sum(n)
    assert s["acc"] == pytest.approx(acc)
    assert s["acc_se"] == pytest.approx(np.sqrt(6 / 5 * ((c - acc * np.array(n)) ** 2).sum()) / sum(n))
    model = build_reward_model("toy", "dina", path=os.path.join(world, "pipeline"))
    a = dict(backbone="toy", head="dina", backbone_path=os.path.join(world, "pipeline"), t_eval=0.08, resolution=32,
             max_text_len=8, seed=0)
    ckpt = os.path.join(os.path.dirname(world), "bok", "ckpt.safetensors")
    save_checkpoint(ckpt, {"model." + k: p for k, p in trainable_state(model).items()}, {"args": a, "step": 0})
    out = best_of_k.main(best_of_k.parser.parse_args([ckpt, "--world", world]))
    for read in ("latent", "png", "vae"):
        assert out[read]["training prompts"]["prompts"] == 39 and out[read]["held-out combos"]["prompts"] == 15
    assert 0 < out["seen"]["training prompts"]["prompts"] <= 39 and "held-out combos" not in out["seen"]
    assert "best of K = 2" in capsys.readouterr().out


def test_within_prompt_pairs_margin_and_stability():
    """Near-ties are dropped; a float-level change of the scores changes only pairs near the margin."""
    rng = np.random.default_rng(0)
    groups, scores = [list(range(k, k + 17)) for k in range(0, 170, 17)], rng.uniform(0, 1, 170)
    a = toy.within_prompt_pairs(groups, 400, np.random.default_rng(1), scores, 0.05)
    assert len(a) == 400 and (np.abs(scores[a[:, 0]] - scores[a[:, 1]]) >= 0.05).all()
    assert all(any(i in g and j in g for g in groups) for i, j in a)  # never across groups
    moved = scores + rng.normal(0, 1e-3, 170)
    every = np.array([p for g in groups for p in itertools.combinations(g, 2)])
    keep = lambda s: np.abs(s[every[:, 0]] - s[every[:, 1]]) >= 0.05
    n_cross = int((keep(scores) != keep(moved)).sum())  # pairs that cross the margin
    assert n_cross > 0
    b = toy.within_prompt_pairs(groups, 400, np.random.default_rng(1), moved, 0.05)
    assert len({tuple(sorted(p)) for p in a} ^ {tuple(sorted(p)) for p in b}) <= 2 * n_cross


def test_pair_types_script(world, capsys):
    """scripts/pair_types.py on oracle scores: per-type accuracies are the oracle's own agreement with the
    majority labels (100% where it agrees), counted over all test pairs; a short scores file is refused."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import pair_types
    test, oracle = load(os.path.join(world, "test.json")), load(os.path.join(world, "test_oracle.json"))
    rows = [dict(benchmark="hpdv3", run="main", t=[0.08], pair=k, r_chosen=oracle[r["path1"]], r_rejected=oracle[r["path2"]])
            for k, r in enumerate(test)]
    path = os.path.join(os.path.dirname(world), "scores.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pair_types.main(pair_types.parser.parse_args([path, "--world", world]))
    lines = {l[:42].strip(): l[42:].split() for l in capsys.readouterr().out.splitlines()[1:]}
    agree = np.mean([oracle[r["path1"]] > oracle[r["path2"]] for r in test])
    assert lines["all"] == [str(len(test)), f"{agree:.2%}"]
    assert sum(int(v[0]) for k, v in lines.items() if " vs " in k) == len(test)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:-1])
    with pytest.raises(ValueError, match="test.json"):
        pair_types.main(pair_types.parser.parse_args([path, "--world", world]))
