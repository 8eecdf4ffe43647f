"""
Where does a reward model fail on the toy test set? Accuracy per pair type (the sources of the two
images: render, blur, noise, contrast, clip, wrong-color / -shape / -background, generator), per
oracle gap, and on seen vs held-out (colour, shape) combinations.

  python eval_reward.py --ckpt out/reward-toy-dina
  python scripts/pair_types.py out/reward-toy-dina/scores.jsonl      # [--world out/toy] [--t 0.08]
  python eval_reward.py --ckpt out/reward-toy-dina --bench hpdv3/train=out/toy/train.json --out out/evtrain
  python scripts/pair_types.py out/evtrain/scores.jsonl --split train  # does it fit its own training pairs
"""
import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from toy import TOY_HELDOUT, parse_toy_prompt, toy_golden_score  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("scores", help="scores.jsonl of eval_reward.py (its hpdv3 rows) or of dev/probe_latents.py")
parser.add_argument("--world", default="out/toy")
parser.add_argument("--t", type=float, default=None, help="which noise level's rows (default: the first one)")
parser.add_argument("--split", default="test", choices=("test", "train"), help="train: the training pairs (scores of eval_reward.py "
                    "--bench hpdv3/train=out/toy/train.json): does the reward fit them; the oracle is read off their images")


def main(args):
    test = json.load(open(os.path.join(args.world, f"{args.split}.json")))
    if args.split == "test":
        oracle = json.load(open(os.path.join(args.world, "test_oracle.json")))
    else:  # no oracle file for the training images: score them here
        paths = sorted({r[k] for r in test for k in ("path1", "path2")})
        prompt = {r[k]: r["prompt"] for r in test for k in ("path1", "path2")}
        images = [data.load_image(os.path.join(args.world, p)) for p in paths]
        oracle = dict(zip(paths, toy_golden_score(images, [prompt[p] for p in paths]).tolist()))
    rows = [json.loads(l) for l in open(args.scores)]
    rows = [r for r in rows if r["benchmark"] == "hpdv3" and r.get("run", "main") == "main"]
    t = rows[0]["t"] if args.t is None else [args.t]
    rows = {r["pair"]: r for r in rows if r["t"] == t}
    if len(rows) != len(test):
        raise ValueError(f"{args.scores}: {len(rows)} hpdv3 rows at t={t}, but {len(test)} pairs in {args.world}/{args.split}.json")
    groups = collections.defaultdict(list)
    for i, rec in enumerate(test):
        ok = rows[i]["r_chosen"] > rows[i]["r_rejected"]
        gap = abs(oracle[rec["path1"]] - oracle[rec["path2"]])
        seen = "held-out combo" if tuple(parse_toy_prompt(rec["prompt"])[:2]) in TOY_HELDOUT else "seen combo"
        bucket = next(f"gap {lo:.2f}-{hi:.2f}" for lo, hi in ((0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 1.01)) if gap < hi)
        for key in ("all", " vs ".join(sorted((rec["model1"], rec["model2"]))), bucket, seen):
            groups[key].append(ok)
    print(f"{'pairs (t = ' + str(t) + ')':42s} {'n':>5s} {'accuracy':>9s}")
    for k, v in sorted(groups.items(), key=lambda kv: (kv[0] != "all", not kv[0].startswith(("gap", "seen", "held")), -len(kv[1]))):
        print(f"{k:42s} {len(v):5d} {np.mean(v):9.2%}")


if __name__ == "__main__":
    main(parser.parse_args())
