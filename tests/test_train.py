"""train_reward.py on the real-data path: HPDv3-format JSON + images on disk, cached with the `tiny`
backbone and trained exactly as a user would with HPDv3. World-size invariance, exact resume, and
the bad-input cases of docs/design.md §12."""
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_reward
from model import build_reward_model, load_checkpoint, load_reward_model, prompt_noise, trainable_state
from toy import corrupt_toy, render_toy, toy_prompt

ROOT = Path(__file__).resolve().parents[1]


def write_hpdv3(folder, n_pairs, seed=0):
    """n_pairs HPDv3 records: path1 (preferred) = a clean render of the prompt, path2 = a render with
    the wrong colour, blurred. The last four fields are null in half of the records, as in HPDv3."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n_pairs):
        color, wrong = ("red", "blue") if i % 2 else ("green", "yellow")
        shape, bg = ("circle", "square")[i % 2], "white"
        good = render_toy(color, shape, bg, rng)
        bad = corrupt_toy(render_toy(wrong, shape, bg, rng), "blur", 0.8, rng)
        good.save(folder / f"images/{i}_a.png")
        bad.save(folder / f"images/{i}_b.png")
        extra = dict(choice_dist=[4, 1], confidence=0.8, model1="render", model2="wrong") if i % 2 else \
            dict(choice_dist=None, confidence=None, model1=None, model2=None)
        recs.append(dict(prompt=toy_prompt(color, shape, bg), path1=f"images/{i}_a.png", path2=f"images/{i}_b.png", **extra))
    return recs


def write_pools(folder, prompts, seed=1):
    """HPDv3 records of candidate pools, as HPDv3 and the toy world have them: per prompt 4 images (a clean
    render, the wrong colour, blurred, noisy) and all 6 pairs among them, so every image is in 3 pairs."""
    rng, recs = np.random.default_rng(seed), []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k, (color, wrong, shape) in enumerate(prompts):
        ims = [render_toy(color, shape, "white", rng), render_toy(wrong, shape, "white", rng),
               corrupt_toy(render_toy(color, shape, "white", rng), "blur", 0.8, rng),
               corrupt_toy(render_toy(color, shape, "white", rng), "noise", 0.8, rng)]
        for j, im in enumerate(ims):
            im.save(folder / f"images/{k}_{j}.png")
        recs += [dict(prompt=toy_prompt(color, shape, "white"), path1=f"images/{k}_{i}.png", path2=f"images/{k}_{j}.png",
                      choice_dist=[4, 1], confidence=0.8, model1=None, model2=None)
                 for i, j in itertools.combinations(range(4), 2)]
    return recs


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    d = tmp_path_factory.mktemp("pools")
    recs = write_pools(d, [(c, w, s) for (c, w) in (("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green"))
                           for s in ("circle", "square")] + [("purple", "orange", "triangle"), ("orange", "purple", "circle")])
    (d / "train.json").write_text(json.dumps(recs[:48]))  # 8 pools of 6 pairs
    (d / "test.json").write_text(json.dumps(recs[48:]))
    return d


@pytest.fixture(scope="module")
def hpdv3(tmp_path_factory):
    d = tmp_path_factory.mktemp("hpdv3")
    recs = write_hpdv3(d, 40)
    (d / "train.json").write_text(json.dumps(recs[:32]))
    (d / "test.json").write_text(json.dumps(recs[32:]))
    return d


def run(args_list):
    return train_reward.main(train_reward.parser.parse_args(args_list))


def common(d, out, *extra):
    return ["--backbone", "tiny", "--data", str(d / "train.json"), "--eval-data", str(d / "test.json"),
            "--out", str(out), "--global-batch", "8", "--log-interval", "1", "--eval-interval", "4",
            "--ckpt-interval", "2", *extra]


def log(out):
    return [json.loads(l) for l in open(out / "log.jsonl")]


def test_hpdv3_train_and_reload(hpdv3, tmp_path, capsys):
    for head in ("dina", "drm", "ditr"):
        out = tmp_path / head
        run(common(hpdv3, out, "--head", head, "--steps", "8", "--lr", "3e-3", "--warmup", "1", "--soft-labels"))
        text = capsys.readouterr().out
        assert "held-out accuracy" in text and "on 8 pairs" in text, text[-500:]
        lines = log(out)
        assert [l["step"] for l in lines] == list(range(1, 9)) and "eval_acc" in lines[-1]
        model, meta = load_reward_model(str(out / "ckpt.safetensors"))
        assert meta["step"] == 8 and meta["args"]["head"] == head
        # the reloaded EMA model reproduces the held-out accuracy the run logged
        from data import PairCache
        cache = PairCache(str(hpdv3 / "test.cache-tiny"))
        b = cache.batch(list(range(len(cache))))
        eps = torch.stack([prompt_noise(0, p["prompt"], 0, b["lat_pos"].shape[1:]) for p in cache.pairs])
        t = torch.full((len(eps),), 0.4)
        with torch.no_grad():
            rp = model((1 - 0.4) * b["lat_pos"] + 0.4 * eps, t, b["prompt_embeds"], b["pooled"])
            rn = model((1 - 0.4) * b["lat_neg"] + 0.4 * eps, t, b["prompt_embeds"], b["pooled"])
        assert abs((rp > rn).float().mean().item() - lines[-1]["eval_acc"]) < 1e-6


def test_learns_easy_pairs(hpdv3, tmp_path):
    """Clean right-colour renders vs blurred wrong-colour ones: even the tiny random backbone + the DiNa
    head separates them in 60 steps (the train loss falls, the held-out accuracy is high)."""
    out = tmp_path / "learn"
    run(common(hpdv3, out, "--head", "dina", "--steps", "60", "--lr", "1e-3", "--warmup", "1", "--ema", "0",
               "--eval-interval", "60", "--t-sampling", "fixed"))
    lines = log(out)
    first, last = np.mean([l["loss"] for l in lines[:5]]), np.mean([l["loss"] for l in lines[-5:]])
    assert last < 0.7 * first, (first, last)
    assert lines[-1]["eval_acc"] >= 0.75


def test_toy_recipe_fills_only_flags_not_given():
    """On tiny/toy the laptop recipe replaces flags left at their SD3.5 defaults, never flags given on the
    command line, even when given at the default's value (`--t-shift 1 --t-eval 0.4` on the toy)."""
    a = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "toy"]))
    assert (a.t_shift, a.t_eval, a.steps, a.lr_schedule, a.data) == (0.125, 0.08, 600, "cosine", "out/toy/train.json")
    assert (a.batching, a.full_finetune, a.lr) == ("groups", True, 5e-4)
    a = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "toy", "--no-full-finetune", "--batching", "pairs"]))
    assert (a.batching, a.full_finetune, a.lora_rank) == ("pairs", False, 8)
    a = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "toy", "--t-shift", "1", "--t-eval", "0.4", "--steps", "20000"]))
    assert (a.t_shift, a.t_eval, a.steps, a.lr_schedule) == (1.0, 0.4, 20000, "cosine")
    a = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "sd35m"]))
    assert (a.t_shift, a.t_eval, a.steps, a.lr_schedule, a.lora_rank) == (1.0, 0.4, 20000, "constant", 16)
    assert a.lora_alpha == 32  # dina: LoRA scale 2, as the released DiNa-LRM's 128 / 64; other heads: scale 1
    assert train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "sd35m", "--head", "drm"])).lora_alpha == 16
    assert train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "sd35m", "--lora-alpha", "5"])).lora_alpha == 5
    a = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "tiny"]))  # tests' backbone: DiNa's noise levels
    assert (a.t_shift, a.t_eval, a.steps, a.batching, a.full_finetune) == (1.0, 0.4, 600, "pairs", False)


def test_cosine_lr_and_ema_warmup(hpdv3, tmp_path):
    """--lr-schedule cosine: lr = base * warmup * (1 + cos(pi step / steps)) / 2; the EMA decay warms up as
    min(ema, (1 + step) / (10 + step)), so after one step EMA = 0.1 * initial + 0.9 * trained weights."""
    out = tmp_path / "cos"
    run(common(hpdv3, out, "--steps", "1", "--ckpt-interval", "1", "--lr", "1e-3", "--warmup", "1",
               "--lr-schedule", "cosine", "--ema", "0.995"))
    tensors, _ = load_checkpoint(str(out / "ckpt.safetensors"))
    init = trainable_state(build_reward_model("tiny", "dina", lora_rank=8, seed=0))  # the run's recipe and seed
    for n, p in init.items():
        torch.testing.assert_close(tensors[f"ema.{n}"], 0.1 * p.detach() + 0.9 * tensors[f"model.{n}"])
    out = tmp_path / "cos6"
    for _ in range(2):  # a second fresh run (no --resume) into the same folder starts a fresh log
        run(common(hpdv3, out, "--steps", "6", "--lr", "1e-3", "--warmup", "1", "--lr-schedule", "cosine"))
    assert [l["lr"] for l in log(out)] == pytest.approx([1e-3 * (1 + math.cos(math.pi * s / 6)) / 2 for s in range(6)])


@pytest.mark.parametrize("batching", ["pairs", "groups"])
def test_world_size_invariance(hpdv3, pools, batching, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the losses of 1 process at the same global batch; with
    --batching groups on pools of 4 images (a micro-batch of 2 pairs' cost = one pool, 24 pairs a step) too."""
    outs, d = {}, hpdv3 if batching == "pairs" else pools
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        args = common(d, out, "--steps", "4", "--micro-batch", "2", "--lr", "3e-3", "--warmup", "1", "--batching", batching,
                      "--cache-dir", str(tmp_path / f"cache{n}"))  # each world size encodes its own cache
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master-port", str(29500 + n),
               str(ROOT / "train_reward.py"), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # 2 CPU processes (gloo), also on a GPU machine
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"world {n}, global batch 8 = micro 2 x accum {4 // n} x world {n}" in r.stdout
        outs[n] = out
    # the 2-rank cache: each rank encoded its own shard, rank 0 merged them into the same index
    assert sorted(p.name for p in (tmp_path / "cache2/train.cache-tiny").glob("latents_*")) == \
        ["latents_000_0000.safetensors", "latents_001_0000.safetensors"]
    i1, i2 = (json.loads((tmp_path / f"cache{n}/train.cache-tiny/index.json").read_text())["pairs"] for n in (1, 2))
    assert [(p["chosen"], p["rejected"], p["prompt"]) for p in i1] == [(p["chosen"], p["rejected"], p["prompt"]) for p in i2]
    l1, l2 = log(outs[1]), log(outs[2])
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):  # same loss and same gradient norm (before clipping) at every step
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["acc"] == b["acc"]
        assert a["gnorm"] == pytest.approx(b["gnorm"], rel=1e-4)
    # Weights: AdamW divides by sqrt(v), so parameters whose true gradient is zero (the output bias, and the FFN's last
    # bias with no norm after it, add the same to r+ and r-; attention key biases cancel in the softmax) turn float
    # round-off into lr-sized steps: they are excluded; every other weight agrees to a small fraction of one step
    # (lr 3e-3): 2e-4 for all but a rare element (1e-3 for those).
    zero_grad = ("head.head.bias", "head.ff.2.bias", "to_k_vis.bias", "to_k_text.bias")
    w1, w2 = (load_checkpoint(str(o / "ckpt.safetensors"))[0] for o in (outs[1], outs[2]))
    for k in w1:
        if k.startswith("model.") and not k.endswith(zero_grad):
            d = (w1[k] - w2[k]).abs()  # a rare element may still round differently: < 1/3 of one step
            assert d.max() < 1e-3 and (d > 2e-4).float().mean() < 1e-3, (k, d.max().item())


@pytest.mark.parametrize("batching", ["pairs", "groups"])
def test_resume_equals_uninterrupted(hpdv3, pools, batching, tmp_path, monkeypatch):
    straight, killed, d = tmp_path / "straight", tmp_path / "killed", hpdv3 if batching == "pairs" else pools
    args = ["--steps", "7", "--lr", "3e-3", "--warmup", "3", "--lora-rank", "2", "--batching", batching]
    run(common(d, straight, *args))
    # kill the second run at step 6 (after the checkpoint of step 4, with step 5 logged but not checkpointed)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(common(d, killed, *args))
    assert load_checkpoint(str(killed / "ckpt.safetensors"))[1]["step"] == 4
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    run(common(d, killed, *args, "--resume"))
    a, b = (load_checkpoint(str(o / "ckpt.safetensors"))[0] for o in (straight, killed))
    assert set(a) == set(b)
    for k in a:
        if not k.startswith("rng"):
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert [l["step"] for l in log(killed)] == list(range(1, 8))  # the lost step-5 line is not duplicated
    assert [l["loss"] for l in log(killed)] == [l["loss"] for l in log(straight)]


def test_group_batches_cover_each_pair_once(pools, tmp_path):
    """--batching groups: the plan's units are a prompt's pool (or pieces of one when it overflows a micro-batch),
    every micro-batch fits 2 x micro images, and an epoch trains on each pair at most once (here: all of them)."""
    import data
    run(["--backbone", "tiny", "--data", str(pools / "train.json"), "--out", str(tmp_path / "o"), "--cache-only",
         "--cache-dir", str(tmp_path)])
    cache = data.PairCache(str(tmp_path / "train.cache-tiny"))
    comps = cache.components()
    assert sorted(map(sorted, comps)) == [list(range(6 * k, 6 * k + 6)) for k in range(8)]  # the 8 pools
    images = lambda u: {k for i in u for k in (cache.pairs[i]["chosen"], cache.pairs[i]["rejected"])}
    for micro, n_units in ((2, 1), (4, 2), (1, 3)):  # a pool of 4 images: whole (fits 4 or 8) or cut in pieces of <= 2
        for epoch in range(3):
            plan = train_reward.global_batches(cache, 8, micro, 0, epoch, groups=True)
            seen = [i for gb in plan for m in gb for u in m for i in u]
            assert len(seen) == len(set(seen)) and all(len(gb) == 8 // micro for gb in plan)
            assert len(seen) == 48 if micro > 1 else len(seen) >= 24
            for m in (m for gb in plan for m in gb):
                assert sum(len(images(u)) for u in m) <= 2 * micro and all(len({cache.pairs[i]["prompt"] for i in u}) == 1 for u in m)
            assert max(len(u) for gb in plan for m in gb for u in m) == (6 if micro > 1 else 1), micro
    # pairs batching is the same plan as before groups existed: `micro` pairs per micro-batch, shuffled
    plan = train_reward.global_batches(cache, 8, 2, 0, 0)
    assert all(len(m) == 2 and all(len(u) == 1 for u in m) for gb in plan for m in gb) and len(plan) == 6


def test_group_loss_is_the_mean_pair_loss(pools, tmp_path):
    """One forward per image of a pool gives the loss of forwarding each pair on its own with the pool's t and
    noise (seeded by the unit's first pair): grouping changes the cost, not the objective."""
    import data
    from model import add_noise, sample_t
    run(["--backbone", "tiny", "--data", str(pools / "train.json"), "--out", str(tmp_path / "o"), "--cache-only",
         "--cache-dir", str(tmp_path)])
    cache = data.PairCache(str(tmp_path / "train.cache-tiny"))
    args = train_reward.resolve_args(train_reward.parser.parse_args(["--backbone", "tiny", "--data", "x.json"]))
    model = build_reward_model("tiny", "dina", lora_rank=2, seed=0)
    units = cache.components()[:2]
    b = cache.group_batch(units)
    assert len(b["lat"]) == 8 and len(b["pos"]) == 12  # 8 images forwarded for 12 pairs
    t, eps = train_reward.unit_noise(args, 5, units, b)
    with torch.no_grad():
        r = model(add_noise(b["lat"], t, eps), t, b["prompt_embeds"], b["pooled"])
        grouped = train_reward.pair_loss(args, r[b["pos"]], r[b["neg"]], t[b["pos"]], torch.ones(12))
        losses = []
        for u in units:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + 5 * 100_003 + u[0])
            tu = sample_t(1, args.t_sampling, g, args.t_mu, args.t_s, args.t_eval, args.t_shift)
            eu = torch.randn(b["lat"].shape[1:], generator=g)
            for i in u:
                p = cache.pair(i)
                x = add_noise(torch.stack([p["lat_pos"], p["lat_neg"]]), tu.repeat(2), torch.stack([eu, eu]))
                rp, rn = model(x, tu.repeat(2), p["prompt_embeds"].expand(2, -1, -1), p["pooled"].expand(2, -1))
                losses.append(train_reward.pair_loss(args, rp[None], rn[None], tu, torch.ones(1)))
    torch.testing.assert_close(grouped, torch.stack(losses).mean(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_and_corrupt_images(tmp_path, capsys):
    recs = write_hpdv3(tmp_path, 10)
    os.remove(tmp_path / "images/3_b.png")
    (tmp_path / "images/5_a.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "train.json").write_text(json.dumps(recs))
    with pytest.raises(FileNotFoundError, match=r"3_b\.png.*train\.json.*3"):
        run(["--backbone", "tiny", "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "o"), "--steps", "1"])
    (tmp_path / "images/3_b.png").write_bytes((tmp_path / "images/2_b.png").read_bytes())
    with pytest.raises(ValueError, match=r"5_a\.png: corrupt image.*train\.json.*5"):
        run(["--backbone", "tiny", "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "o"), "--steps", "1"])
    # with --skip-bad the pair is counted, reported and dropped; training goes on
    run(["--backbone", "tiny", "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "o"), "--steps", "1",
         "--global-batch", "4", "--skip-bad"])
    text = capsys.readouterr().out
    assert "dropped 1 pairs with unreadable images" in text and "train: 9 pairs" in text


def test_malformed_record(tmp_path):
    recs = write_hpdv3(tmp_path, 4)
    del recs[2]["path2"]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"train\.json: record 2: .*path2"):
        run(["--backbone", "tiny", "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag,value", [("--backbone", "sd4"), ("--head", "clip")])
def test_unknown_names(flag, value, tmp_path):
    with pytest.raises(ValueError, match=f"unknown {flag[2:]} '{value}'"):
        run(["--backbone", "tiny", flag, value, "--data", "x.json", "--out", str(tmp_path)])


def test_wrong_latent_channels(hpdv3, tmp_path):
    """A cache holding 3-channel latents (written for another backbone) is refused, naming the file and key."""
    import data
    pairs = data.read_pairs(str(hpdv3 / "train.json"))
    enc_img = lambda x: torch.nn.functional.avg_pool2d(x, 4)  # (B,3,8,8): the tiny backbone reads 4 channels
    enc_txt = lambda ps: (torch.zeros(len(ps), 85, 32), torch.zeros(len(ps), 32))
    data.build_cache(pairs, str(hpdv3), str(tmp_path / "train.cache-tiny"), enc_img, enc_txt, [(32, 32)])
    with pytest.raises(ValueError, match=r"latents_\w+\.safetensors: key \w+: .*3 channels, expected 4"):
        run(["--backbone", "tiny", "--data", str(hpdv3 / "train.json"), "--out", str(tmp_path / "o"),
             "--steps", "1", "--cache-dir", str(tmp_path)])


def test_nan_loss_stops_with_a_clear_error(hpdv3, tmp_path, monkeypatch):
    monkeypatch.setattr(train_reward, "pair_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match=r"step 0: loss is nan on pairs"):
        run(common(hpdv3, tmp_path / "nan", "--steps", "3"))
    assert not (tmp_path / "nan" / "ckpt.safetensors").exists()


def test_bench_script_runs_on_cpu():
    """scripts/bench_reward.py (the GPU benchmark of the README) runs end to end on the tiny backbone."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_reward.py"), "--backbone", "tiny", "--resolution", "64",
                        "--batch", "2", "--score-batch", "2", "--steps", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pairs/s" in r.stdout and "images/s" in r.stdout and "TFLOP/pair" in r.stdout


def test_route_flops_on_cpu():
    """scripts/bench_reward.py --route pixel --grpo-step on a CPU, at the real sizes (meta device: no weights, no
    compute): the FLOPs table of both routes with every part counted and each total the sum of its parts, the GPU
    figures left to a GPU, and the reward's share of a Flow-GRPO iteration, latent and pixel."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_reward.py"), "--route", "pixel", "--grpo-step"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^(latent|pixel) +(.+?) +([\d,]+)$", r.stdout, re.M)
    for route in ("latent", "pixel"):
        parts = [int(f.replace(",", "")) for name, part, f in rows if name == route and part != "total"]
        total = [int(f.replace(",", "")) for name, part, f in rows if name == route and part == "total"]
        assert len(parts) == (2 if route == "latent" else 3) and all(parts) and abs(sum(parts) - total[0]) <= 2, rows
    assert "not counted (" not in r.stdout and "no GPU here" in r.stdout and "times the FLOPs" in r.stdout
    shares = re.findall(r"reward, (latent|pixel) route .* share of the iteration +([\d.]+)%", r.stdout)
    assert [s for s, _ in shares] == ["latent", "pixel"] and 0 < float(shares[0][1]) < float(shares[1][1]) < 100


# ---------------------------------------------------------------------------------------------- FSDP

FSDP_DRIVER = """
import json, sys
import torch
from torch.distributed.tensor import DTensor
import align, train_reward
for argv in json.loads(sys.argv[1]):  # the runs, one after another in the same two processes
    train_reward.main(train_reward.parser.parse_args(argv))
args = train_reward.resolve_args(train_reward.parser.parse_args(json.loads(sys.argv[2])))
procs = align.setup_distributed()
held = {}
for args.fsdp in (False, True):  # the bytes of parameters this process holds: a replica, or its shards
    model, _ = train_reward.make_model(args, procs)
    held[args.fsdp] = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
print(f"rank {procs.rank} holds {held[False]} bytes of parameters under DDP, {held[True]} under FSDP", flush=True)
align.barrier()
"""


def test_fsdp_equals_ddp_and_one_process(hpdv3, tmp_path):
    """DRM's full fine-tune under torchrun --nproc_per_node=2 (gloo): with --fsdp the same losses and the same checkpoint
    (one file of full tensors) as under DDP and in one process; a run stopped at step 2 and resumed gives the
    uninterrupted run's, resuming across DDP, FSDP (with activation checkpointing) and one process; and a process holds
    about half the parameter bytes under FSDP that it holds under DDP."""
    cache = str(tmp_path / "cache")
    recipe = ["--head", "drm", "--full-finetune", "--micro-batch", "2", "--lr", "3e-3", "--warmup", "1",
              "--lr-schedule", "constant", "--cache-dir", cache]  # constant lr: a 2-step run is the 4-step run's start
    a = lambda name, steps, *x: common(hpdv3, tmp_path / name, *recipe, "--steps", str(steps), *x)
    runs = [a("ddp", 4), a("fsdp", 4, "--fsdp"), a("fsdp-stop", 2, "--fsdp"), a("fsdp-stop", 4, "--fsdp", "--resume"),
            a("ddp-stop", 2), a("ddp-stop", 4, "--fsdp", "--resume", "--grad-ckpt"), a("to-one", 2, "--fsdp")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port", "29540", "--no-python",
           sys.executable, "-c", FSDP_DRIVER, json.dumps(runs), json.dumps(a("held", 4))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # 2 CPU processes (gloo)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "memory per process, DDP (estimate)" in r.stdout and "FSDP over 2 (estimate)" in r.stdout
    for rank in (0, 1):
        ddp, fsdp = map(int, re.search(rf"rank {rank} holds (\d+) bytes .* DDP, (\d+) under FSDP", r.stdout).groups())
        assert 0.45 < fsdp / ddp < 0.55, (rank, ddp, fsdp)
    run(a("one", 4))  # one process, reading the same cache
    run(a("to-one", 4, "--resume"))  # FSDP's checkpoint of step 2, continued in one process
    ref = log(tmp_path / "one")
    for name in ("ddp", "fsdp", "fsdp-stop", "ddp-stop", "to-one"):
        lines = log(tmp_path / name)
        assert [l["step"] for l in lines] == [1, 2, 3, 4], name
        for x, y in zip(ref, lines):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["acc"] == y["acc"], name
            assert x["gnorm"] == pytest.approx(y["gnorm"], rel=1e-4), name
    w = {n: load_checkpoint(str(tmp_path / n / "ckpt.safetensors"))[0] for n in ("one", "ddp", "fsdp", "fsdp-stop",
                                                                                 "ddp-stop", "to-one")}
    for name in ("ddp", "fsdp", "ddp-stop", "to-one"):  # every tensor: weights, EMA, AdamW's moments and step
        assert set(w[name]) == set(w["one"]), name  # the same tensors in one file, whatever the sharding
        for k in (k for k in w["one"] if not k.startswith("rng")):
            torch.testing.assert_close(w[name][k], w["one"][k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    for k in w["fsdp"]:  # stopped and resumed under FSDP: the uninterrupted FSDP run's tensors, bit for bit
        if not k.startswith("rng"):
            torch.testing.assert_close(w["fsdp-stop"][k], w["fsdp"][k], atol=0, rtol=0, msg=k)
    model, meta = load_reward_model(str(tmp_path / "fsdp"))  # loads without FSDP
    assert meta["step"] == 4 and meta["args"]["fsdp"] and model.kind == "drm"
