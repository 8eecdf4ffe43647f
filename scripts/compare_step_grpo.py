"""
Step-GRPO against Flow-GRPO from their run folders: the golden score of the fixed evaluation (EMA policy) against
iterations (the same generator forwards per iteration when step_grpo.py's --trajectories equals grpo.py's images per
iteration, 48 on the toy) and against wall time (sampling + reward + training, from log.jsonl), in one PNG; and the
iterations and seconds each run needs to reach the first run's final golden score (DRM claims 2.5x fewer steps).

    python scripts/compare_step_grpo.py out/grpo out/step-grpo out/step-grpo-k4 --png assets/step_grpo_curves.png
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from align import save_curves  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", help="run folders (log.jsonl + summary.json); the first is the reference")
parser.add_argument("--split", default="train", help="train | heldout: the evaluation split compared")
parser.add_argument("--png", default=None, help="the figure (default: <first run>/compare.png)")


def curve(run, split):
    """-> (iterations, cumulative seconds, golden) at each evaluation of a run, iteration 0 from its summary.json."""
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    summary = json.load(open(os.path.join(run, "summary.json")))
    its, secs, gold, total = [0], [0.0], [summary[f"golden_before_{split}"]], 0.0
    for rec in log:
        total += sum(rec["seconds"].values())
        if "eval" in rec:
            its.append(rec["iter"])
            secs.append(total)
            gold.append(rec["eval"][split]["golden"])
    return np.array(its), np.array(secs), np.array(gold)


def main(args):
    curves = {run: curve(run, args.split) for run in args.runs}
    target = curves[args.runs[0]][2][-1]
    print(f"target: the final golden score of {args.runs[0]} ({args.split}) = {target:.4f}")
    print("| run | final golden | gain | iterations to the target | seconds to the target |")
    print("|---|---|---|---|---|")
    for run, (its, secs, gold) in curves.items():
        hit = np.nonzero(gold[1:] >= target)[0]
        reach = (f"{its[1 + hit[0]]}", f"{secs[1 + hit[0]]:.0f}") if len(hit) else ("not reached", "")
        print(f"| {run} | {gold[-1]:.4f} | {gold[-1] - gold[0]:+.4f} | {reach[0]} | {reach[1]} |")
    png = args.png or os.path.join(args.runs[0], "compare.png")
    save_curves(png, [(f"golden ({args.split}, EMA policy)", xl, {run: (c[i], c[2]) for run, c in curves.items()})
                      for xl, i in (("iteration (same generator forwards)", 0), ("wall time (s)", 1))])
    print(f"figure: {png}")


if __name__ == "__main__":
    main(parser.parse_args())
