"""
Evaluate a reward model: pairwise accuracy on preference benchmarks, noise-level sweeps, multi-noise
ensembling, decision uncertainty, and scoring your own images.

One process (torchrun is not needed: scoring a benchmark is small next to training):
    python eval_reward.py --ckpt out/reward-toy-dina                 # the six toy benchmarks at t = t_eval
    python eval_reward.py --ckpt out/reward-toy-dina --sweep-t       # accuracy vs t = 0.0..0.9 + sweep_t.png
    python eval_reward.py --ckpt out/reward-toy-dina --ensemble 0.2,0.5,0.7 --uncertainty 8
    python eval_reward.py --ckpt out/reward-sd35m-dina --bench hpdv3/test=/data/HPDv3/test.json \
        --image-root /data/HPDv3                                      # NAME[/SPLIT]=PATH, repeatable
    python eval_reward.py --ckpt out/reward-toy-dina --prompt "a red circle on a white background" a.png b.png
The released DiNa-LRM (its folder: config.json + checkpoint/, released.py) scores the same way, and a dina
checkpoint of ours is written in its layout for the authors' own reader:
    python eval_reward.py --ckpt /path/to/DiNa-LRM-SD35M-12layers --score-normalisation plus10 --bench ...
    python eval_reward.py --ckpt out/reward-sd35m-dina --export-released out/reward-sd35m-dina-released
From Python, two lines:
    from eval_reward import Scorer
    Scorer("out/reward-toy-dina").score("a red circle on a white background", ["a.png", "b.png"])

Protocol (docs/design.md §7): every benchmark goes through its reader in data.py (annotator ties and GenAI
both-bad votes skipped and counted, pairs with an empty prompt kept and counted; the counts are printed
and written per benchmark into results.json) and through the one accuracy function, data.pairwise_accuracy:
correct iff r(chosen) > r(rejected) strictly, pooled over pairs, plus the per-prompt mean. Each benchmark
is encoded once into a latent cache (unique images once, unique prompts once) with the checkpoint's VAE
and text encoders. Noise: all images of one prompt get the same noise, seeded by (seed, prompt, repeat),
so the two images of a pair share their noise (DiNa's same-noise comparison), every unique image is scored
once per level although ranked groups reuse it in many pairs, and a score depends neither on the batch
nor on the order. Outputs go next to the checkpoint (--out): results.json, scores.jsonl (one line per
pair and noise level: recompute any accuracy from it) and sweep_t.png; each is written to a temp file and
renamed, and only after every benchmark was scored, so a failed run leaves no (new) results.
Cost: images/s and peak memory of the scoring (CUDA: max allocated; CPU: the process's peak RSS, which
includes the encoders when a cache was built in the same run). bf16 autocast on CUDA, float32 on CPU.
Deviation: the uncertainty levels (0.2, 0.4, 0.6, 0.8) are our choice, in the spirit of DiNa-LRM Table 4.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections import namedtuple
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import align
import data
import released
from model import SCORE_NORMALISATIONS, atomic_write, load_pipeline, make_encoders, prompt_noise


def floats(text):
    return tuple(float(x) for x in text.split(","))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
# checkpoint
parser.add_argument("--ckpt", required=True, help="checkpoint file, the folder holding ckpt.safetensors, or a released "
                    "DiNa-LRM folder (config.json + checkpoint/)")
parser.add_argument("--head", default=None, help="require this head (dina | drm | ditr): clear error on a mismatch")
parser.add_argument("--backbone", default=None, help="require this backbone (tiny | toy | sd35m | sd35l)")
parser.add_argument("--score-normalisation", default="raw", choices=list(SCORE_NORMALISATIONS), help="the scores written: "
                    "raw | plus10 = (raw + 10) / 10 (the released DiNa-LRM's demos) | plus12 = (raw + 12) / 10 (its GRPO)")
parser.add_argument("--export-released", default=None, metavar="DIR", help="write this dina checkpoint in the released "
                    "DiNa-LRM layout into the new folder DIR (for the authors' reader) and exit")
# benchmarks (default for the toy backbone: the six toy benchmarks in out/toy)
parser.add_argument("--bench", action="append", default=None, metavar="NAME[/SPLIT]=PATH",
                    help="benchmark file in any format of docs/design.md §7 (auto-detected); repeatable")
parser.add_argument("--image-root", default=None, help="root of the image paths (default: each file's folder)")
parser.add_argument("--cache-dir", default=None, help="where benchmark caches go (default: next to each file)")
parser.add_argument("--skip-bad", action="store_true", help="count and drop pairs with unreadable images")
# noise levels
parser.add_argument("--t", type=float, default=None, help="noise level (default: the checkpoint's t_eval; DiNa 0.4)")
parser.add_argument("--ensemble", type=floats, default=None, help="multi-noise levels, e.g. 0.2,0.5,0.7 (DiNa Sec. 3.4)")
parser.add_argument("--sweep-t", type=floats, nargs="?", const=tuple(i / 10 for i in range(10)), default=None,
                    help="accuracy vs t for every benchmark + sweep_t.png (default levels 0.0,0.1,...,0.9)")
parser.add_argument("--uncertainty", type=int, default=0, metavar="K", help="K repeated noisings per pair (DiNa Table 4)")
parser.add_argument("--uncertainty-t", type=floats, default=(0.2, 0.4, 0.6, 0.8), help="levels of --uncertainty (ours)")
# run
parser.add_argument("--batch", type=int, default=32, help="images per scoring forward (and per cache encoding batch)")
parser.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same scores")
parser.add_argument("--out", default=None, help="folder of results.json, scores.jsonl, sweep_t.png (default: the ckpt's)")
# score your own images
parser.add_argument("--prompt", default=None, help="score the images given as arguments for this prompt")
parser.add_argument("images", nargs="*", help="image files scored with --prompt")

TOY_DIR = "out/toy"  # every path in the toy benchmark files is relative to it (toy.py)
TOY_BENCH = [("hpdv3", "test", "test.json"), ("hpdv2", "test", "bench/hpdv2_test.json"),
             ("imagereward", "test", "bench/imagereward_test.json"), ("genai-bench", "test", "bench/genai_bench.jsonl"),
             ("pickapic", "test", "bench/pickapic_test.jsonl"),
             ("generated", "test", "bench/generated.json")]  # on-policy: K samples of the toy generator per prompt, ranked

# ----------------------------------------------------------------------------- pure helpers


def parse_benches(specs, image_root, backbone, toy_dir=TOY_DIR):
    """--bench NAME[/SPLIT]=PATH list -> [(name, split, path, image_root)]; none given on the toy backbone:
    the six toy benchmarks (split defaults to the file's stem)."""
    if not specs:
        if backbone != "toy":
            raise ValueError("no --bench NAME=PATH given (the toy benchmarks are the default only for backbone toy)")
        out = [(n, s, os.path.join(toy_dir, f), toy_dir) for n, s, f in TOY_BENCH]
        missing = [p for _, _, p, _ in out if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: toy benchmark not found; build the toy world with `python toy.py`")
        return out
    out = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"--bench {spec!r}: expected NAME[/SPLIT]=PATH, e.g. hpdv3/test=/data/HPDv3/test.json")
        name, _, split = name.partition("/")
        if not name:
            raise ValueError(f"--bench {spec!r}: expected NAME[/SPLIT]=PATH with a non-empty NAME")
        out.append((name, split or os.path.splitext(os.path.basename(path))[0], path, image_root))
    return out


def pair_scores(cache, scores):
    """{(image, prompt): score} -> r_chosen, r_rejected, groups (arrays over the cache's pairs)."""
    rp = np.array([scores[(p["chosen"], p["prompt"])] for p in cache.pairs])
    rn = np.array([scores[(p["rejected"], p["prompt"])] for p in cache.pairs])
    return rp, rn, np.array([p["group"] for p in cache.pairs])


def uncertainty_stats(runs, cache):
    """K scorings of a cache at one level, each with its own noise -> variation ratio of the decisions (the
    fraction of a pair's K decisions that differ from its modal one, averaged over pairs), the mean margin
    |r+ - r-| and the mean per-image score variance over the K noisings (DiNa-LRM Table 4)."""
    K = len(runs)
    d = np.stack([np.subtract(*pair_scores(cache, s)[:2]) for s in runs])  # (K, pairs)
    wins = (d > 0).sum(0)  # decision: r+ > r- (a model tie counts as wrong, as in the accuracy)
    items = sorted(runs[0])
    var = np.stack([[s[i] for i in items] for s in runs]).var(0, ddof=1 if K > 1 else 0)  # (images,)
    return dict(K=K, variation_ratio=float((1 - np.maximum(wins, K - wins) / K).mean()),
                margin=float(np.abs(d).mean()), score_var=float(var.mean()))


def plot_sweep(path, ts, curves):
    """Accuracy vs noise level, one line per benchmark (as DiNa-LRM Figure 2)."""
    align.save_curves(path, [("pairwise accuracy vs t", "noise level t", {n: (ts, [100 * a for a in acc]) for n, acc in curves.items()})])


def peak_memory():
    """-> (bytes, what): CUDA max allocated, else the process's peak RSS (Linux reports KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"

# ----------------------------------------------------------------------------- the scorer


class Scorer:
    """A checkpoint ready to score: EMA weights, its noise level(s), its VAE and text encoders (loaded on
    first use), its resolution buckets. Scorer(ckpt).score(prompt, [paths or PIL images]) -> [floats]."""

    def __init__(self, ckpt, t=None, ensemble=None, seed=0, device=None, expect=None, normalisation="raw"):
        run_folder = os.path.isdir(ckpt) and not released.is_released(ckpt)
        self.path = os.path.join(ckpt, "ckpt.safetensors") if run_folder else ckpt  # the file (or released folder)
        self.model, self.meta = released.load_reward(ckpt, expect=expect, normalisation=normalisation)
        self.args, self.seed, self._enc = self.meta["args"], seed, None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.ts = tuple(ensemble) if ensemble else (float(self.args.get("t_eval", 0.4) if t is None else t),)
        r = self.args.get("resolution")
        self.buckets = [(r, r)] if r else data.BUCKETS

    def encoders(self):  # -> (encode_images, encode_prompts) of the checkpoint's own pipeline, loaded once
        if self._enc is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            no_t5 = self.args["backbone"] in ("tiny", "toy")  # then diffusers reads the T5 width off the transformer
            pipe = load_pipeline(self.args["backbone"], self.args.get("backbone_path"), self.args.get("seed", 0),
                                 with_transformer=no_t5, dtype=dtype).to(self.device)
            self._enc = make_encoders(pipe, self.device, self.args.get("max_text_len", 77))
        return self._enc

    @torch.no_grad()
    def score_latents(self, lat, eps, prompt_embeds, pooled, ts=None):
        """Clean latents (B,C,h,w), noise (B,C,h,w), prompt_embeds (B,L,D), pooled (B,P) -> (B,) on CPU."""
        cuda = self.device.startswith("cuda")
        x = [v.to(self.device, torch.float32) for v in (lat, eps, prompt_embeds, pooled)]
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            return self.model.score(x[0], x[2], x[3], ts=ts or self.ts, noise=x[1]).float().cpu()

    def score_cache(self, cache, ts=None, rep=0, batch=32):
        """Every unique (image, prompt) of a data.PairCache scored once -> {(image key, prompt key): score}."""
        out = {}
        for shape, items in cache.images().items():
            for i in range(0, len(items), batch):
                chunk = items[i:i + batch]
                lat, pe, pooled = cache.image_batch(chunk)  # (B,C,h,w), (B,L,D), (B,P)
                eps = torch.stack([prompt_noise(self.seed, q, rep, shape) for _, q in chunk])
                out.update(zip(chunk, self.score_latents(lat, eps, pe, pooled, ts).tolist()))
        return out

    def score(self, prompt, images):
        """Your own images (paths or PIL) for one prompt -> one score per image, at the checkpoint's t
        (or ensemble); the images share their noise, as the two images of a benchmark pair do."""
        enc_img, enc_txt = self.encoders()
        pe, pooled = enc_txt([prompt])
        out = []
        for im in images:
            im = data.load_image(str(im)) if isinstance(im, (str, os.PathLike)) else im.convert("RGB")
            z = enc_img(data.to_bucket(im, data.nearest_bucket(*im.size, self.buckets))[None])  # (1,C,h,w)
            out.append(self.score_latents(z, prompt_noise(self.seed, data.cache_key(prompt), 0, z.shape[1:])[None], pe, pooled).item())
        return out


def open_cache(sc, name, path, root, cache_dir=None, skip_bad=False, batch=32):
    """Read a benchmark, encode it once into a latent cache (reused while the pairs and the encoders'
    settings are unchanged) -> (data.PairCache, reader info, {image key: path})."""
    pairs, info = data.read_benchmark(path, image_root=os.path.abspath(root) if root else None)
    if not pairs:
        raise ValueError(f"{path}: empty benchmark: no scorable pairs in {info['records']} records "
                         f"({info['skipped_ties']} ties, {info['skipped_bothbad']} both-bad skipped)")
    ckpt_args = sc.args
    given = bool(root) and os.path.isfile(os.path.join(root, "image_latents.safetensors"))  # part of the cache's identity
    fp = hashlib.sha1(json.dumps([given, [ckpt_args.get(k) for k in ("backbone", "backbone_path", "seed", "resolution", "max_text_len")],
                                  [[p["prompt"], p["chosen"], p["rejected"], p["label"], p["group"]] for p in pairs]],
                                 ).encode()).hexdigest()[:10]
    folder = os.path.join(cache_dir or os.path.dirname(os.path.abspath(path)),
                          f"{os.path.splitext(os.path.basename(path))[0]}.eval-{ckpt_args['backbone']}-{fp}")
    if not os.path.isfile(os.path.join(folder, "index.json")):
        print(f"{name}: caching {len(pairs)} pairs of {path} into {folder}")
        try:
            data.build_cache(pairs, None, folder, *sc.encoders(), sc.buckets, batch_size=batch, skip_bad=skip_bad,
                             given=data.given_latents(os.path.abspath(root)) if root else None)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # no half-built cache is left to be mistaken for one
            raise
    cache = data.PairCache(folder, latent_channels=sc.model.tap.config.in_channels)
    return cache, info, {data.cache_key(p[k]): p[k] for p in pairs for k in ("chosen", "rejected")}


# ----------------------------------------------------------------------------- main's phases, in the order it calls them
Benchmark = namedtuple("Benchmark", "name split file cache info paths")  # read and cached; paths: {image key: path}


def export_released(sc, folder):
    """Write a dina checkpoint in the released DiNa-LRM's layout (config.json and checkpoint/) into a new folder."""
    released.export(sc.model, sc.meta, folder)
    print(f"wrote {folder}: config.json and checkpoint/, the released DiNa-LRM's layout")


def score_own_images(sc, prompt, images):
    """Score image files for one prompt and print them ranked -> their scores."""
    if not (prompt and images):
        raise ValueError("--prompt needs image paths, and image paths need --prompt")
    scores = sc.score(prompt, images)
    order = np.argsort(-np.array(scores), kind="stable")
    rank = {i: r for r, i in enumerate(order, start=1)}
    print(f"prompt: {prompt!r}\n{'rank':>4}  {'score':>10}  image")
    for i, (path, score) in enumerate(zip(images, scores)):
        print(f"{rank[i]:>4}  {score:>10.5f}  {path}")
    print("ranking (best first): " + " > ".join(images[i] for i in order))
    return scores


def open_benchmarks(sc, args):
    """Every benchmark read and encoded once into its latent cache -> [Benchmark]; then the encoders are let go."""
    benches = []
    for name, split, path, root in parse_benches(args.bench, args.image_root, sc.args["backbone"]):
        cache, info, paths = open_cache(sc, name, path, root, args.cache_dir, args.skip_bad, args.batch)
        benches.append(Benchmark(name, split, path, cache, info, paths))
    sc._enc = None  # the VAE and text encoders are not needed for scoring the caches
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return benches


def timed_scores(sc, cache, levels, cost, batch, rep=0):
    """One timed scoring of every unique image of a benchmark (repeat `rep` of its noise) -> {(image, prompt): score};
    adds the images, backbone passes and seconds to cost."""
    t0 = time.time()
    scores = sc.score_cache(cache, levels, rep, batch)
    cost.update(images=cost["images"] + len(scores), passes=cost["passes"] + len(scores) * len(levels),
                seconds=cost["seconds"] + time.time() - t0)
    if not np.isfinite(list(scores.values())).all():
        raise FloatingPointError(f"{cache.dir}: non-finite scores at t={levels}; check the checkpoint {sc.path}")
    return scores


def score_rows(bench, scores, levels, run):
    """The lines of scores.jsonl of one benchmark scored at `levels`: one per pair."""
    return [dict(benchmark=bench.name, split=bench.split, run=run, t=list(levels), pair=i, chosen=bench.paths[p["chosen"]],
                 rejected=bench.paths[p["rejected"]], prompt=p["prompt_text"], group=p["group"],
                 r_chosen=scores[(p["chosen"], p["prompt"])], r_rejected=scores[(p["rejected"], p["prompt"])])
            for i, p in enumerate(bench.cache.pairs)]


def accuracy(sc, benches, ts, cost, batch):
    """Pairwise accuracy of every benchmark at t (or the ensemble), with the reader's counts -> results, score lines."""
    results, lines = {}, []
    for b in benches:
        scores = timed_scores(sc, b.cache, ts, cost, batch)
        acc = data.pairwise_accuracy(*pair_scores(b.cache, scores))
        results[b.name] = dict(split=b.split, file=b.file, format=b.info["format"], records=b.info["records"],
                               skipped_ties=b.info["skipped_ties"], skipped_bothbad=b.info["skipped_bothbad"],
                               empty_prompt_pairs=b.info["empty_prompt_pairs"],
                               dropped=b.info["pairs"] - len(b.cache), images=len(scores), **acc)
        lines += score_rows(b, scores, ts, "main")
    return results, lines


def sweep(sc, benches, levels, results, cost, batch):
    """Accuracy vs t (DiNa-LRM Figure 2) into results[name]["sweep"] -> score lines."""
    lines = []
    for t in levels:
        for b in benches:
            scores = timed_scores(sc, b.cache, [t], cost, batch)
            results[b.name].setdefault("sweep", {})[str(t)] = data.pairwise_accuracy(*pair_scores(b.cache, scores))["acc"]
            lines += score_rows(b, scores, [t], "sweep")
    return lines


def uncertainty(sc, benches, levels, k, results, cost, batch):
    """K repeated noisings per pair at each level (DiNa-LRM Table 4) into results[name]["uncertainty"]."""
    for t in levels:
        for b in benches:
            runs = [timed_scores(sc, b.cache, [t], cost, batch, rep) for rep in range(k)]
            results[b.name].setdefault("uncertainty", {})[str(t)] = uncertainty_stats(runs, b.cache)


def report(results, cost, ts, args):
    """Print the accuracy table, the sweep and uncertainty tables if run, and the scoring cost."""
    print(f"\naccuracy at t = {','.join(map(str, ts))} (strict r+ > r-; annotator ties and both-bad votes skipped, "
          f"pairs with an empty prompt kept):")
    print(f"{'benchmark':<14}{'split':<10}{'format':<13}{'pairs':>7}{'ties':>7}{'both-bad':>9}{'empty prompt':>13}"
          f"{'accuracy':>10}{'per-prompt':>12}{'prompts':>9}")
    for name, r in results.items():
        print(f"{name:<14}{r['split']:<10}{r['format']:<13}{r['pairs']:>7}{r['skipped_ties']:>7}{r['skipped_bothbad']:>9}"
              f"{r['empty_prompt_pairs']:>13}{100 * r['acc']:>9.2f}%{100 * r['per_prompt_acc']:>11.2f}%{r['prompts']:>9}")
    for name, r in results.items():
        if r["dropped"]:
            print(f"note: {name}: {r['dropped']} of {r['pairs'] + r['dropped']} pairs dropped (unreadable images with "
                  f"--skip-bad, or two images in different buckets)")
    if args.sweep_t:
        cols = [f"{n}/{r['split']} ({r['pairs']})" for n, r in results.items()]
        print("\naccuracy vs t (benchmark/split (pairs)):\n" + f"{'t':>5}  " + "".join(f"{c:>28}" for c in cols))
        for t in args.sweep_t:
            print(f"{t:>5.2f}  " + "".join(f"{100 * r['sweep'][str(t)]:>27.2f}%" for r in results.values()))
    if args.uncertainty > 0:
        print(f"\nuncertainty over K = {args.uncertainty} noisings per pair:")
        print(f"{'benchmark':<14}{'split':<10}{'pairs':>7}{'t':>6}{'variation ratio':>17}{'margin':>10}{'score var':>12}")
        for name, r in results.items():
            for t, u in r["uncertainty"].items():
                print(f"{name:<14}{r['split']:<10}{r['pairs']:>7}{float(t):>6.2f}{u['variation_ratio']:>17.4f}"
                      f"{u['margin']:>10.4f}{u['score_var']:>12.3g}")
    print(f"\nscoring cost: {cost['images']} image scores ({cost['passes']} backbone passes) in {cost['seconds']:.2f} s = "
          f"{cost['images_per_s']:.1f} images/s at batch {cost['batch']} on {cost['device']}; peak memory "
          f"{cost['peak_memory_mb']:.0f} MiB ({cost['peak_memory_kind']})")


def write_results(sc, ts, results, cost, lines, args):
    """scores.jsonl, sweep_t.png if swept, results.json (each atomic) into --out or the checkpoint's folder -> the
    results.json summary."""
    out = args.out or (sc.path if os.path.isdir(sc.path) else os.path.dirname(os.path.abspath(sc.path)))
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "scores.jsonl"), lambda tmp: Path(tmp).write_text("".join(json.dumps(l) + "\n" for l in lines)))
    if args.sweep_t:
        plot_sweep(os.path.join(out, "sweep_t.png"), list(args.sweep_t),
                   {f"{n}/{r['split']}": [r["sweep"][str(t)] for t in args.sweep_t] for n, r in results.items()})
    summary = dict(ckpt=sc.path, step=sc.meta.get("step"), head=sc.args["head"], backbone=sc.args["backbone"], t=ts,
                   seed=args.seed, benchmarks=results, cost=cost, scores="scores.jsonl",
                   sweep_png="sweep_t.png" if args.sweep_t else None)
    atomic_write(os.path.join(out, "results.json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(f"wrote {out}/results.json, scores.jsonl ({len(lines)} lines)" + (", sweep_t.png" if args.sweep_t else ""))
    return summary

# -----------------------------------------------------------------------------


def main(args):
    # checkpoint (EMA weights), noise levels
    sc = Scorer(args.ckpt, args.t, args.ensemble, args.seed, expect={"head": args.head, "backbone": args.backbone},
                normalisation=args.score_normalisation)
    ts = list(sc.ts)
    if args.export_released:
        return export_released(sc, args.export_released)
    snapped = ""
    if sc.model.t_grid is not None:  # a released DiNa-LRM reads the nearest sigma of its training grid
        snapped = f" (read at {','.join(f'{sc.model.snap(t):.6f}' for t in ts)})"
    print(f"{sc.args['head']} on {sc.args['backbone']}, step {sc.meta.get('step')} ({sc.path}, EMA weights if saved); "
          f"t = {','.join(map(str, ts))}{snapped}{' (ensemble)' if len(ts) > 1 else ''}; seed {args.seed}; device {sc.device}")
    if args.prompt is not None or args.images:
        return score_own_images(sc, args.prompt, args.images)

    # benchmarks -> caches (encoded once); accuracy at t, vs t, uncertainty; every benchmark scored before any write
    benches = open_benchmarks(sc, args)
    cost = dict(images=0, passes=0, seconds=0.0)
    results, lines = accuracy(sc, benches, ts, cost, args.batch)
    if args.sweep_t:
        lines += sweep(sc, benches, args.sweep_t, results, cost, args.batch)
    if args.uncertainty > 0:
        uncertainty(sc, benches, args.uncertainty_t, args.uncertainty, results, cost, args.batch)
    mem, mem_what = peak_memory()
    cost.update(images_per_s=cost["images"] / max(cost["seconds"], 1e-9), peak_memory_mb=mem / 2 ** 20,
                peak_memory_kind=mem_what, batch=args.batch, device=sc.device)
    report(results, cost, ts, args)
    return write_results(sc, ts, results, cost, lines, args)


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:  # bad input: one line naming the file
        sys.exit(f"eval_reward.py: error: {e}")
