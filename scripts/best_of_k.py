"""
Can the reward judge the generator's own samples? On the toy's on-policy benchmark (bench/generated.json:
K samples of the toy pipeline per training prompt and per held-out combination, from seeds never used in
training, with their golden-oracle scores), for training and held-out prompts separately:

- pairwise accuracy on the pairs of one prompt whose oracle scores differ by more than --gap (0.05),
  with the standard error over prompts (pairs of one prompt are not independent);
- best-of-K: the golden gain of the reward's pick over the mean sample, next to the oracle's own pick
  (the most any reranker can gain), each with its standard error over prompts;
- the within-prompt Pearson correlation of reward and oracle.

A row "seen": the same figures on the generator samples of the training pools (train.json), the very latents the
reward was trained on, training prompts only: a reward that orders fresh samples worse than these does not
generalise; one that orders these no better does not fit them.

A yardstick row, "vae": the oracle itself read off the VAE's reconstruction of each PNG (decode(encode(png))),
used as the reward. What the latent keeps of the oracle's judgement is an upper bound of what a latent
reward can pick; if it gets most of the oracle's gain, the limit is the reward model, not the VAE.

Each sample is scored twice: as an alignment stage reads it, the generator's own latent (no decode), and
as eval_reward.py reads the PNG (decoded, saved, VAE-encoded again). The images of one prompt share one
noise draw (eval_reward's prompt_noise), as a GRPO group's rewards would.

  python scripts/best_of_k.py out/reward-toy-dina            # [--world out/toy] [--t 0.08] [--k 16]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from eval_reward import Scorer  # noqa: E402
from model import load_pipeline, prompt_noise  # noqa: E402
from toy import is_heldout, oracle_read, parse_toy_prompt, toy_golden_score  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("ckpt", help="checkpoint folder (or .safetensors) of a toy reward model")
parser.add_argument("--world", default="out/toy")
parser.add_argument("--t", type=float, default=None, help="noise level (default: the checkpoint's t_eval)")
parser.add_argument("--k", type=int, default=None, help="best of the first k samples of each prompt (default: all K)")
parser.add_argument("--gap", type=float, default=0.05, help="oracle gap above which a pair counts for the accuracy")
parser.add_argument("--seed", type=int, default=0, help="noise seed (as eval_reward.py's)")


def summarise(groups, gap):
    """groups [(reward scores (K,), oracle scores (K,))] of one split -> dict of figures with standard errors."""
    correct, counted, gain_r, gain_o, corr = [], [], [], [], []
    for r, o in groups:
        i, j = np.triu_indices(len(o), 1)
        keep = np.abs(o[i] - o[j]) > gap
        good = (r[i] - r[j]) * np.sign(o[i] - o[j]) > 0  # strict: a model tie is wrong
        correct.append(int((good & keep).sum()))
        counted.append(int(keep.sum()))
        gain_r.append(o[np.argmax(r)] - o.mean())
        gain_o.append(o.max() - o.mean())
        corr.append(np.corrcoef(r, o)[0, 1] if r.std() > 0 and o.std() > 0 else 0.0)
    c, n, P = np.array(correct), np.array(counted), len(groups)
    acc = c.sum() / max(n.sum(), 1)
    acc_se = np.sqrt(P / max(P - 1, 1) * ((c - acc * n) ** 2).sum()) / max(n.sum(), 1)  # clustered by prompt
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return dict(prompts=P, pairs=int(n.sum()), acc=float(acc), acc_se=float(acc_se), gain_reward=float(np.mean(gain_r)),
                gain_reward_se=se(gain_r), gain_oracle=float(np.mean(gain_o)), gain_oracle_se=se(gain_o),
                share=float(np.mean(gain_r) / max(np.mean(gain_o), 1e-9)), corr=float(np.mean(corr)), corr_se=se(corr))


def by_kind(rows, gap):
    """rows [(reward (K,), oracle (K,), shape read right (K,), colour read right (K,))] of one split -> {kind: (correct,
    pairs)} over the pairs with an oracle gap above `gap`, by what the oracle reads off the two samples."""
    out = {}
    for r, o, shape_ok, colour_ok in rows:
        i, j = np.triu_indices(len(o), 1)
        keep = np.abs(o[i] - o[j]) > gap
        good = (r[i] - r[j]) * np.sign(o[i] - o[j]) > 0
        kind = np.where(shape_ok[i] != shape_ok[j], "shape right vs wrong",
                        np.where(colour_ok[i] != colour_ok[j], "colour right vs wrong", "same reads"))
        for k in np.unique(kind[keep]):
            m = keep & (kind == k)
            c, n = out.get(str(k), (0, 0))
            out[str(k)] = (c + int(good[m].sum()), n + int(m.sum()))
    return out


def score_prompt(sc, enc_txt, prompt, z, seed):
    """The reward of K latents (K,C,h,w) of one prompt, all under that prompt's one noise draw -> (K,) numpy."""
    pe, pooled = enc_txt([prompt])
    eps = prompt_noise(seed, data.cache_key(prompt), 0, z.shape[1:])
    return sc.score_latents(z, eps.expand_as(z), pe.expand(len(z), -1, -1), pooled.expand(len(z), -1)).numpy()


def seen_groups(sc, enc_txt, args, latents):
    """The training pools' generator samples, read as their latents: [(reward (n,), oracle (n,))] per training prompt."""
    paths = {}  # prompt -> the distinct generator images of its training pairs
    for r in json.load(open(os.path.join(args.world, "train.json"))):
        for k in ("1", "2"):
            if r["model" + k] == "generator":
                paths.setdefault(r["prompt"], set()).add(r["path" + k])
    groups = []
    for prompt, ps in sorted(paths.items()):
        ps = sorted(ps)
        r = score_prompt(sc, enc_txt, prompt, torch.stack([latents[p] for p in ps]), args.seed)
        o = toy_golden_score([data.load_image(os.path.join(args.world, p)) for p in ps], [prompt] * len(ps))
        groups.append((r, o))
    return groups


@torch.no_grad()
def main(args):
    bench = os.path.join(args.world, "bench")
    groups = json.load(open(os.path.join(bench, "generated.json")))
    oracle = json.load(open(os.path.join(bench, "generated_oracle.json")))
    latents = load_file(os.path.join(args.world, "image_latents.safetensors"))
    sc = Scorer(args.ckpt, t=args.t, seed=args.seed)
    enc_img, enc_txt = sc.encoders()
    vae = load_pipeline(sc.args["backbone"], sc.args.get("backbone_path"), with_transformer=False).vae
    kinds = {"training prompts": [], "held-out combos": []}  # the latent read, with the oracle's reading of each sample
    mean_reward = {read: {k: [] for k in kinds} for read in ("latent", "png")}  # per prompt: the round trip's two reads
    out, shift, terms = {}, [], []  # shift: ||encode(decode(z)) - z|| / ||z|| per prompt, the generator's latent vs its PNG's
    for read in ("latent", "png", "vae"):
        split = {"training prompts": [], "held-out combos": []}
        for g in groups:
            paths = g["image_path"][:args.k]
            z_gen = torch.stack([latents[p] for p in paths])  # (K,C,h,w): the generator's own output
            pngs = [data.load_image(os.path.join(args.world, p)) for p in paths]
            z = z_gen if read == "latent" else enc_img(torch.stack([data.to_bucket(im, (32, 32)) for im in pngs]))
            if read == "vae":  # the yardstick: the oracle on decode(encode(png)), z = encode(png) normalised
                x = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
                r = toy_golden_score(x, [g["prompt"]] * len(z))
            else:
                r = score_prompt(sc, enc_txt, g["prompt"], z, args.seed)
            if read == "png":  # what separates the samples, and how far the PNG's latent is from the generator's
                parts = toy_golden_score(pngs, [g["prompt"]] * len(paths), parts=True)  # the oracle's weighted terms
                terms.append({k: float(np.std(v)) for k, v in parts.items()})
                shift.append(float((z - z_gen).norm() / z_gen.norm()))
            key = "held-out combos" if is_heldout(g["prompt"]) else "training prompts"
            split[key].append((r, np.array([oracle[p] for p in paths])))
            if read in mean_reward:
                mean_reward[read][key].append(float(np.mean(r)))
            if read == "latent":
                want, reads = parse_toy_prompt(g["prompt"]), [parse_toy_prompt(p) for p in oracle_read(pngs)]
                right = np.array([[a == b for a, b in zip(rd[:2], want[:2])] for rd in reads])  # (K, 2): colour, shape
                kinds[key].append((r, split[key][-1][1], right[:, 1], right[:, 0]))
        out[read] = {k: summarise(v, args.gap) for k, v in split.items()}
    out["seen"] = {"training prompts": summarise(seen_groups(sc, enc_txt, args, latents), args.gap)}
    K = len(groups[0]["image_path"][:args.k])
    print(f"{sc.path} at t = {','.join(map(str, sc.ts))}: best of K = {K} generator samples per prompt ({args.world}/bench)")
    print(f"{'scored':<8}{'prompts':<18}{'n':>4}{'pairs':>7}  {'acc (gap > ' + str(args.gap) + ')':<18}"
          f"{'reward pick':<18}{'oracle pick':<18}{'share':>6}  {'corr':<12}")
    for read, res in out.items():
        for k, s in res.items():
            print(f"{read:<8}{k:<18}{s['prompts']:>4}{s['pairs']:>7}  {100 * s['acc']:6.2f} +- {100 * s['acc_se']:4.2f}%    "
                  f"{s['gain_reward']:+.3f} +- {s['gain_reward_se']:.3f}  {s['gain_oracle']:+.3f} +- {s['gain_oracle_se']:.3f}  "
                  f"{100 * s['share']:5.0f}%  {s['corr']:.2f} +- {s['corr_se']:.2f}")
    for key, rows in kinds.items():
        acc = by_kind(rows, args.gap)
        print(f"latent read, {key}, by what the oracle reads off the two samples: "
              + ", ".join(f"{k} {c / n:.1%} of {n}" for k, (c, n) in sorted(acc.items())))
        out["latent"][key]["by_kind"] = {k: dict(correct=c, pairs=n) for k, (c, n) in acc.items()}
    print("what separates the samples of one prompt: within-prompt std of the oracle's weighted terms, "
          + ", ".join(f"{k} {np.mean([t[k] for t in terms]):.3f}" for k in terms[0]))
    out["roundtrip"] = {}
    for key in kinds:  # the reward of a sample as alignment reads it (its latent) minus as its picture reads (re-encoded)
        d = np.array(mean_reward["latent"][key]) - np.array(mean_reward["png"][key])
        out["roundtrip"][key] = dict(latent=float(np.mean(mean_reward["latent"][key])),
                                     reencoded=float(np.mean(mean_reward["png"][key])), gap=float(d.mean()),
                                     gap_se=float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"))
        r = out["roundtrip"][key]
        print(f"round trip, {key}: mean reward {r['latent']:.3f} on the generator's latents, {r['reencoded']:.3f} on the "
              f"VAE re-encodings of their PNGs: gap {r['gap']:+.3f} +- {r['gap_se']:.3f}")
    print(f"the PNG's latent differs from the generator's own by {np.mean(shift):.1%} of its norm "
          f"(||encode(decode(z)) - z|| / ||z||, mean over prompts): the PNG read is not the read alignment uses")
    path = os.path.join(os.path.dirname(os.path.abspath(sc.path)), f"best_of_{K}.json")
    with open(path, "w") as f:
        json.dump(dict(ckpt=sc.path, t=list(sc.ts), k=K, gap=args.gap, results=out, latent_shift=float(np.mean(shift))), f, indent=1)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main(parser.parse_args())
