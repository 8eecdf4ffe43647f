"""toy.py: a miniature world (--small) has every file, in the real formats, reloads, and is
deterministic from its seed."""
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

import toy
from data import parse_toy_prompt


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
