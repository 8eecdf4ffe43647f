"""eval_reward.py with the tiny backbone (CPU): a checkpoint saved without training, toy images on disk and
one benchmark file in each real format (ranked groups and rankings with ties, votes with tie / both-bad,
Pick-a-Pic ties). The accuracy is recomputed independently from the per-pair JSONL, the pair counts are
checked by hand, and the bad-input cases of docs/design.md §12 leave no results behind."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval_reward
from model import build_reward_model, prompt_noise, save_checkpoint, trainable_state
from toy import corrupt_toy, render_toy, toy_prompt

ROOT = Path(__file__).resolve().parents[1]
P1, P2 = toy_prompt("red", "circle", "white"), toy_prompt("blue", "square", "black")
TRAIN_ARGS = dict(backbone="tiny", head="dina", backbone_path=None, blocks=None, taps=None, lora_rank=0,
                  full_finetune=False, seed=0, combine="softmax", t_eval=0.4, resolution=32, max_text_len=8)


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dina checkpoint (random head, step 0) and five benchmark files over 10 images."""
    d = tmp_path_factory.mktemp("eval")
    model = build_reward_model("tiny", "dina")
    save_checkpoint(str(d / "ckpt" / "ckpt.safetensors"), {"model." + n: p for n, p in trainable_state(model).items()},
                    {"args": TRAIN_ARGS, "step": 0})
    rng = np.random.default_rng(0)
    (d / "img").mkdir()
    for i in range(5):  # a{i}: the red circle at decreasing quality, b{i}: the blue square
        corrupt_toy(render_toy("red", "circle", "white", rng), "blur", i / 4, rng).save(d / f"img/a{i}.png")
        corrupt_toy(render_toy("blue", "square", "black", rng), "noise", i / 4, rng).save(d / f"img/b{i}.png")
    a, b = [f"img/a{i}.png" for i in range(5)], [f"img/b{i}.png" for i in range(5)]
    (d / "hpdv3.json").write_text(json.dumps([  # 3 pairs
        dict(prompt=P1, path1=a[0], path2=a[1], choice_dist=[3, 1], confidence=None, model1=None, model2=None),
        dict(prompt=P1, path1=a[2], path2=a[3], choice_dist=None, confidence=None, model1=None, model2=None),
        dict(prompt=P2, path1=b[0], path2=b[4], choice_dist=[5, 0], confidence=0.9, model1="x", model2="y")]))
    (d / "hpdv2.json").write_text(json.dumps([  # rank [1,2,2,3]: 6 pairs, 1 tie -> 5; [2,1,3]: 3 -> 8 pairs, 1 tie
        dict(prompt=P1, image_path=a[:4], rank=[1, 2, 2, 3]), dict(prompt=P2, image_path=b[:3], rank=[2, 1, 3])]))
    (d / "imagereward.json").write_text(json.dumps([  # [1,1,2]: 2 pairs, 1 tie; [1,2,2,2]: 3 pairs, 3 ties
        dict(prompt=P1, generations=a[2:5], ranking=[1, 1, 2]), dict(prompt=P2, generations=b[1:5], ranking=[1, 2, 2, 2])]))
    write_jsonl(d / "genai.jsonl", [dict(prompt=P1, left_image=a[0], right_image=a[4], vote_type=v) for v in
                                    ("leftvote", "rightvote", "tievote", "bothbad_vote")]
                + [dict(prompt=P2, left_image=b[3], right_image=b[0], vote_type="rightvote")])  # 3 pairs
    write_jsonl(d / "pickapic.jsonl", [dict(caption=P1, jpg_0=a[1], jpg_1=a[3], label_0=1.0, label_1=0.0),
                                       dict(caption=P2, jpg_0=b[1], jpg_1=b[2], label_0=0.0, label_1=1.0),
                                       dict(caption=P2, jpg_0=b[3], jpg_1=b[4], label_0=0.5, label_1=0.5)])  # 2 pairs
    return d


EXPECTED = {  # name: (file, pairs, skipped ties, skipped both-bad, unique images scored)
    "hpdv3": ("hpdv3.json", 3, 0, 0, 6), "hpdv2": ("hpdv2.json", 8, 1, 0, 7),
    "imagereward": ("imagereward.json", 5, 4, 0, 7), "genai": ("genai.jsonl", 3, 1, 1, 4),
    "pickapic": ("pickapic.jsonl", 2, 1, 0, 4)}


def run(world, out, *extra, benches=EXPECTED):
    bench = [x for n, v in benches.items() for x in ("--bench", f"{n}/test={world / v[0]}")]
    return eval_reward.main(eval_reward.parser.parse_args(
        ["--ckpt", str(world / "ckpt"), "--cache-dir", str(world / "cache"), "--out", str(out), *bench, *extra]))


def lines(out):
    return [json.loads(l) for l in open(out / "scores.jsonl")]


def test_accuracy_counts_and_independent_recomputation(world, tmp_path, capsys):
    run(world, tmp_path)
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    rows = lines(tmp_path)
    for name, (_, pairs, ties, bothbad, images) in EXPECTED.items():
        r = res["benchmarks"][name]
        assert (r["pairs"], r["skipped_ties"], r["skipped_bothbad"], r["images"], r["split"]) == \
            (pairs, ties, bothbad, images, "test"), (name, r)
        mine = [l for l in rows if l["benchmark"] == name and l["run"] == "main"]
        assert len(mine) == pairs and all(l["t"] == [0.4] for l in mine)  # the checkpoint's t_eval
        # independent recomputation: plain Python, strict >, pooled, then the mean over groups
        ok = [l["r_chosen"] > l["r_rejected"] for l in mine]
        groups = {}
        for l, o in zip(mine, ok):
            groups.setdefault(l["group"], []).append(o)
        assert r["acc"] == pytest.approx(sum(ok) / len(ok))
        assert r["per_prompt_acc"] == pytest.approx(sum(sum(g) / len(g) for g in groups.values()) / len(groups))
        assert r["prompts"] == len(groups)
        assert f"{name:<14}test" in text and f"{pairs:>7}" in text
        # one score per unique image: an image shared by several pairs has the same score in each
        score = {}
        for l in mine:
            for k in ("chosen", "rejected"):
                assert score.setdefault(l[k], l["r_" + k]) == l["r_" + k]
        assert len(score) == images
    # ranked groups expand inside the group: hpdv2 groups 0 (4 images) and 1 (3 images)
    assert sorted({l["group"] for l in rows if l["benchmark"] == "hpdv2"}) == [0, 1]
    assert "images/s" in text and "peak memory" in text and res["cost"]["images"] == sum(v[4] for v in EXPECTED.values())


def test_noise_matches_model_score_and_is_batch_invariant(world, tmp_path):
    """prompt_noise passed as noise= == RewardModel.score with the same generator (batch 1); and scores do not
    depend on --batch; the same seed reproduces the scores exactly, another seed changes them."""
    sc = eval_reward.Scorer(str(world / "ckpt"), ensemble=(0.2, 0.5, 0.7), device="cpu")  # float32 on any machine
    g = torch.Generator().manual_seed(123)
    lat, pe, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 81, 32, generator=g), torch.randn(1, 32, generator=g)
    key = data.cache_key(P1)
    for ts in ((0.4,), (0.2, 0.5, 0.7)):
        mine = sc.score_latents(lat, prompt_noise(0, key, 0, lat.shape[1:])[None], pe, pooled, ts)
        gen = torch.Generator().manual_seed((0 * 1_000_003 + int(key[:12], 16)) % 2 ** 63)
        with torch.no_grad():
            ref = sc.model.score(lat, pe, pooled, ts=ts, generator=gen)
        torch.testing.assert_close(mine, ref)
    drm = build_reward_model("tiny", "drm").eval()  # the mean-of-scores branch of the other heads
    eps = prompt_noise(0, key, 0, lat.shape[1:])[None]
    with torch.no_grad():
        torch.testing.assert_close(drm.score(lat, pe, pooled, ts=(0.2, 0.7), noise=eps), drm.score(
            lat, pe, pooled, ts=(0.2, 0.7), generator=torch.Generator().manual_seed(int(key[:12], 16))))
    run(world, tmp_path / "a", "--batch", "1")
    run(world, tmp_path / "b", "--batch", "16")
    run(world, tmp_path / "c", "--batch", "16")
    run(world, tmp_path / "d", "--seed", "1")
    a, b, c, d = (lines(tmp_path / x) for x in "abcd")
    assert b == c  # determinism: same seed, same scores, bit for bit
    np.testing.assert_allclose([l["r_chosen"] for l in a], [l["r_chosen"] for l in b], rtol=1e-5, atol=1e-6)
    assert [l["r_chosen"] for l in d] != [l["r_chosen"] for l in b]


def test_ensemble_sweep_and_uncertainty(world, tmp_path, capsys):
    benches = {k: EXPECTED[k] for k in ("hpdv2", "genai")}
    run(world, tmp_path, "--ensemble", "0.2,0.5,0.7", "--sweep-t", "0.0,0.5,0.9", "--uncertainty", "3",
        "--uncertainty-t", "0.0,0.8", benches=benches)
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["t"] == [0.2, 0.5, 0.7] and "(ensemble)" in text
    with Image.open(tmp_path / "sweep_t.png") as im:
        assert im.size[0] > 100
    rows = lines(tmp_path)
    for name, r in res["benchmarks"].items():
        assert set(r["sweep"]) == {"0.0", "0.5", "0.9"}
        for t, acc in r["sweep"].items():  # each sweep point recomputes from its JSONL lines
            mine = [l for l in rows if l["benchmark"] == name and l["run"] == "sweep" and l["t"] == [float(t)]]
            assert len(mine) == r["pairs"] and acc == pytest.approx(np.mean([l["r_chosen"] > l["r_rejected"] for l in mine]))
        u0, u8 = r["uncertainty"]["0.0"], r["uncertainty"]["0.8"]
        assert u0["variation_ratio"] == 0 and u0["score_var"] < 1e-10  # t = 0: the noise has no effect
        assert u8["score_var"] > 0 and 0 <= u8["variation_ratio"] <= 2 / 3 and u8["margin"] > 0
    assert "accuracy vs t" in text and "variation ratio" in text and "score var" in text


def test_score_own_images_cli_and_python(world, tmp_path, capsys):
    ims = [str(world / f"img/a{i}.png") for i in (0, 4)]
    scores = eval_reward.Scorer(str(world / "ckpt" / "ckpt.safetensors")).score(P1, ims)
    assert len(scores) == 2 and all(np.isfinite(scores))
    out = eval_reward.main(eval_reward.parser.parse_args(["--ckpt", str(world / "ckpt"), "--prompt", P1, *ims]))
    assert out == scores
    text = capsys.readouterr().out
    assert "ranking (best first)" in text and f"{scores[0]:.5f}" in text
    # the same image and prompt score the same through a benchmark cache (same noise, same encoders)
    run(world, tmp_path, benches={"genai": EXPECTED["genai"]})
    l = next(l for l in lines(tmp_path) if l["prompt"] == P1)
    ref = eval_reward.Scorer(str(world / "ckpt")).score(P1, [Image.open(l["chosen"]), l["rejected"]])
    np.testing.assert_allclose(ref, [l["r_chosen"], l["r_rejected"]], rtol=1e-4, atol=1e-5)
    # the command line as a user types it
    r = subprocess.run([sys.executable, "eval_reward.py", "--ckpt", str(world / "ckpt"), "--prompt", P1, *ims],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ranking (best first)" in r.stdout, r.stderr[-2000:]


def test_released_folder_scores_as_the_checkpoint(world, tmp_path, capsys):
    """--export-released writes the (frozen) tiny checkpoint in the released DiNa-LRM layout, with no backbone_lora;
    --ckpt on that folder scores every pair as the checkpoint does at a level on the released grid (0.5), and
    --score-normalisation plus10 writes (raw + 10) / 10 with the same accuracy."""
    rel = tmp_path / "rel"
    eval_reward.main(eval_reward.parser.parse_args(["--ckpt", str(world / "ckpt"), "--export-released", str(rel)]))
    assert (rel / "checkpoint" / "rm_head.pt").is_file() and not (rel / "checkpoint" / "backbone_lora").exists()
    bench = {"hpdv2": EXPECTED["hpdv2"]}
    ours = run(world, tmp_path / "ours", "--t", "0.5", benches=bench)
    theirs = eval_reward.main(eval_reward.parser.parse_args(
        ["--ckpt", str(rel), "--t", "0.5", "--score-normalisation", "plus10", "--cache-dir", str(world / "cache"),
         "--out", str(tmp_path / "rel_out"), "--bench", f"hpdv2/test={world / 'hpdv2.json'}"]))
    assert "t = 0.5 (read at 0.500000)" in capsys.readouterr().out
    assert theirs["benchmarks"]["hpdv2"]["acc"] == ours["benchmarks"]["hpdv2"]["acc"]
    a, b = lines(tmp_path / "ours"), lines(tmp_path / "rel_out")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert (x["chosen"], x["rejected"]) == (y["chosen"], y["rejected"])
        np.testing.assert_allclose([y["r_chosen"], y["r_rejected"]], [(x["r_chosen"] + 10) / 10, (x["r_rejected"] + 10) / 10],
                                   rtol=1e-6, atol=1e-6)


def test_bad_input(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("previous")

    def fails(exc, match, benches=None, extra=(), world_=world):
        with pytest.raises(exc, match=match):
            run(world_, out, *extra, benches=benches or {"hpdv3": EXPECTED["hpdv3"]})
        assert (out / "results.json").read_text() == "previous" and not (out / "scores.jsonl").exists()
        assert not list(out.glob("*.tmp"))

    (world / "wrong.json").write_text(json.dumps([dict(prompt=P1, image=["x.png"], score=[1])]))
    fails(ValueError, "wrong.json: unknown pair format", {"w": ("wrong.json",)})
    (world / "broken.json").write_text(json.dumps([dict(prompt=P1, image_path=["img/a0.png", "img/a1.png"], rank=[1])]))
    fails(ValueError, r"broken.json: record 0: 'image_path' \(paths\) and 'rank'", {"w": ("broken.json",)})
    (world / "missing.json").write_text(json.dumps([dict(prompt=P1, path1="img/a0.png", path2="img/nope.png")]))
    fails(FileNotFoundError, r"nope.png: image not found \(.*missing.json: record 0\)", {"m": ("missing.json",)})
    assert not [p for p in (world / "cache").iterdir() if p.name.startswith("missing.")]  # no half-built cache
    write_jsonl(world / "ties.jsonl", [dict(prompt=P1, left_image="img/a0.png", right_image="img/a1.png", vote_type="tievote")])
    fails(ValueError, "ties.jsonl: empty benchmark: no scorable pairs", {"e": ("ties.jsonl",)})
    (world / "empty.json").write_text("[]")
    fails(ValueError, "empty.json: empty file", {"e": ("empty.json",)})
    fails(ValueError, "ckpt.safetensors: checkpoint has head='dina', but 'drm' was asked for", extra=("--head", "drm"))
    fails(ValueError, "checkpoint has backbone='tiny', but 'sd35m'", extra=("--backbone", "sd35m"))
    with pytest.raises(ValueError, match="expected NAME"):
        eval_reward.main(eval_reward.parser.parse_args(["--ckpt", str(world / "ckpt"), "--bench", str(world / "hpdv3.json")]))
    with pytest.raises(ValueError, match="--prompt needs image paths"):
        eval_reward.main(eval_reward.parser.parse_args(["--ckpt", str(world / "ckpt"), "--prompt", P1]))
    with pytest.raises(FileNotFoundError, match="nope.png: image not found"):
        eval_reward.Scorer(str(world / "ckpt")).score(P1, [str(world / "img/nope.png")])
    # the command line: one line on stderr naming the file, exit code 1, no traceback
    r = subprocess.run([sys.executable, "eval_reward.py", "--ckpt", str(world / "ckpt"), "--bench",
                        f"w={world / 'wrong.json'}", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "wrong.json: unknown pair format" in r.stderr and "Traceback" not in r.stderr


def test_published_parquet_files(world, tmp_path, capsys):
    """Pick-a-Pic v2 (all 19 columns, JPEG bytes, a tie, an empty caption) and GenAI-Bench (image structs, PNG
    bytes, all four votes) parquet files read end to end: counts in the table and in results.json, each pair's chosen
    file holds the preferred image's bytes, an empty prompt is scored, images are written once."""
    from test_data import genai_parquet, pickapic_parquet
    ims = {n: (world / f"img/{n}.png").read_bytes() for n in ("a0", "a4", "b0", "b3")}  # PNG toy images
    jpg = {n: encoded_jpeg(world / f"img/{n}.png") for n in ("a1", "a3", "b1", "b2")}
    pickapic_parquet(tmp_path / "pickapic_v2_test.parquet", [
        (P1, jpg["a1"], jpg["a3"], 1.0), (P2, jpg["b1"], jpg["b2"], 0.0), ("", jpg["a3"], jpg["b1"], 1.0),
        (P2, jpg["b2"], jpg["a1"], 0.5)])  # 3 pairs, 1 tie, 1 empty caption
    genai_parquet(tmp_path / "genai_bench_test_v1.parquet", [
        (P1, ims["a0"], ims["a4"], "leftvote"), (P1, ims["a0"], ims["a4"], "rightvote"), (P1, ims["a0"], ims["a4"], "tievote"),
        (P1, ims["a0"], ims["a4"], "bothbad_vote"), (P2, ims["b3"], ims["b0"], "rightvote")])  # as genai.jsonl: 3 pairs
    benches = {"pickapic": ("pickapic_v2_test.parquet",), "genai-bench": ("genai_bench_test_v1.parquet",)}
    bench = [x for n, v in benches.items() for x in ("--bench", f"{n}/test={tmp_path / v[0]}")]
    args = ["--ckpt", str(world / "ckpt"), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *bench]
    res = eval_reward.main(eval_reward.parser.parse_args(args))["benchmarks"]
    text = capsys.readouterr().out
    got = {n: [res[n][k] for k in ("format", "records", "pairs", "skipped_ties", "skipped_bothbad", "empty_prompt_pairs")]
           for n in res}
    assert got == {"pickapic": ["pickapic", 4, 3, 1, 0, 1], "genai-bench": ["genai", 5, 3, 1, 1, 0]}
    assert json.loads((tmp_path / "out/results.json").read_text())["benchmarks"]["pickapic"]["empty_prompt_pairs"] == 1
    assert f"{'pickapic':<14}test      {'pickapic':<13}{3:>7}{1:>7}{0:>9}{1:>13}" in text
    assert f"{'genai-bench':<14}test      {'genai':<13}{3:>7}{1:>7}{1:>9}{0:>13}" in text
    rows = [(l["benchmark"], l["prompt"], Path(l["chosen"]).read_bytes(), Path(l["rejected"]).read_bytes())
            for l in lines(tmp_path / "out")]
    assert rows == [("pickapic", P1, jpg["a1"], jpg["a3"]), ("pickapic", P2, jpg["b2"], jpg["b1"]),
                    ("pickapic", "", jpg["a3"], jpg["b1"]), ("genai-bench", P1, ims["a0"], ims["a4"]),
                    ("genai-bench", P1, ims["a4"], ims["a0"]), ("genai-bench", P2, ims["b0"], ims["b3"])]
    assert all(np.isfinite([l["r_chosen"], l["r_rejected"]]).all() for l in lines(tmp_path / "out"))
    written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*_images/*")}
    assert sorted(p.suffix for p in written) == [".jpg"] * 4 + [".png"] * 4
    first = lines(tmp_path / "out")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["c"], "image": [jpg["a1"]]}), str(tmp_path / "other.parquet"))
    with pytest.raises(ValueError, match=r"other.parquet: unknown parquet schema \(columns \['caption', 'image'\]\)"):
        eval_reward.main(eval_reward.parser.parse_args([*args, "--bench", f"x={tmp_path / 'other.parquet'}"]))
    eval_reward.main(eval_reward.parser.parse_args(args))  # a second run reuses the image files and the caches
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*_images/*")} == written and lines(tmp_path / "out") == first


def encoded_jpeg(png):
    """The JPEG bytes of an image file (Pick-a-Pic v2 stores JPEG)."""
    buf = io.BytesIO()
    Image.open(png).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def test_toy_default_benchmarks(world, tmp_path, monkeypatch, capsys):
    """A `toy`-backbone checkpoint with no --bench evaluates the six toy benchmark files of out/toy (paths
    relative to out/toy), its encoders loaded from the saved diffusers folder without the transformer."""
    from model import make_tiny_pipeline
    monkeypatch.chdir(tmp_path)
    toy = tmp_path / "out/toy"
    make_tiny_pipeline(0, size="toy").save_pretrained(str(toy / "pipeline"))
    model = build_reward_model("toy", "dina")
    save_checkpoint("out/reward-toy-dina/ckpt.safetensors", {"model." + n: p for n, p in trainable_state(model).items()},
                    {"args": {**TRAIN_ARGS, "backbone": "toy"}, "step": 0})
    (toy / "bench").mkdir()
    (toy / "images").symlink_to(world / "img")
    rel = lambda s: s.replace(str(world) + "/", "").replace("img/", "images/")
    for f, dst in (("hpdv3.json", "test.json"), ("hpdv2.json", "bench/hpdv2_test.json"),
                   ("imagereward.json", "bench/imagereward_test.json"), ("genai.jsonl", "bench/genai_bench.jsonl"),
                   ("pickapic.jsonl", "bench/pickapic_test.jsonl"), ("hpdv2.json", "bench/generated.json")):
        (toy / dst).write_text(rel((world / f).read_text()))
    res = eval_reward.main(eval_reward.parser.parse_args(["--ckpt", "out/reward-toy-dina"]))
    assert [(n, r["split"], r["pairs"]) for n, r in res["benchmarks"].items()] == [
        ("hpdv3", "test", 3), ("hpdv2", "test", 8), ("imagereward", "test", 5), ("genai-bench", "test", 3), ("pickapic", "test", 2),
        ("generated", "test", 8)]
    assert (tmp_path / "out/reward-toy-dina/results.json").is_file() and (toy / "bench" / "hpdv2_test.json").is_file()
    assert "genai-bench   test" in capsys.readouterr().out
    (toy / "bench/pickapic_test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="pickapic_test.jsonl: toy benchmark not found"):
        eval_reward.main(eval_reward.parser.parse_args(["--ckpt", "out/reward-toy-dina"]))
