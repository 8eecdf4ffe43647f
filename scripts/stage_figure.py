"""
What each alignment stage did, from its run folder's summary.json: the golden change (after - before, +- 1 SE of the
paired difference) on training prompts and held-out combinations, next to the change of the reward it climbed on the
policy's own latents and on the VAE re-encodings of its decoded images (the round trip: a gain on latents that the
re-encodings do not keep is latent hacking, a gain on both that the golden score does not share is reward hacking).
With --stepwise, a third panel: Step-wise Sampling's golden gain over k=1 (+- 1 SE) against k, from results.json. One
PNG (matplotlib, Agg), and the numbers it plots printed as tables.

    python scripts/stage_figure.py out/grpo out/grpo-oracle out/refl --labels "GRPO" "GRPO oracle" "ReFL" --stepwise out/sw
"""
import argparse
import json
import os

import numpy as np

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", help="run folders of grpo.py, step_grpo.py or refl.py (summary.json)")
parser.add_argument("--labels", nargs="+", default=None, help="a name per run (default: the folder names)")
parser.add_argument("--stepwise", default=None, help="a sample_stepwise.py folder (results.json): a third panel")
parser.add_argument("--png", default=None, help="the figure (default: <first run>/stages.png)")


def changes(summary):
    """A summary.json -> {column: after - before} (NaN where absent: no held-out split, no re-encoding for the oracle)."""
    def delta(key, split):
        after, before = summary.get(f"{key}_after_{split}"), summary.get(f"{key}_before_{split}")
        return np.nan if after is None or before is None else after - before
    return dict(golden_train=delta("golden", "train"), se_train=summary.get("golden_se_train", np.nan),
                golden_heldout=delta("golden", "heldout"), se_heldout=summary.get("golden_se_heldout", np.nan),
                proxy=delta("reward", "train"), reencoded=delta("reward_reencoded", "train"),
                oracle="reward_reencoded_before_train" not in summary)


def stepwise(folder):
    """A sample_stepwise.py folder -> ({k: (golden, gain over k=1, its SE)}, the ODE's (golden, gain, SE))."""
    res = json.load(open(os.path.join(folder, "results.json")))["results"]
    row = {k: (r["golden"], r["gain"], r["gain_se"]) for k, r in res.items()}
    return {int(k): v for k, v in row.items() if k != "ode"}, row.get("ode")


def main(args):
    labels = args.labels or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    assert len(labels) == len(args.runs), f"{len(labels)} labels for {len(args.runs)} runs"
    rows = [changes(json.load(open(os.path.join(run, "summary.json")))) for run in args.runs]
    print("| run | golden change, training prompts | held-out combinations | proxy change, latents | re-encoded |")
    print("|---|---|---|---|---|")
    for label, r in zip(labels, rows):
        proxy = "(oracle reward) | -" if r["oracle"] else f"{r['proxy']:+.4f} | {r['reencoded']:+.4f}"
        print(f"| {label} | {r['golden_train']:+.4f} +- {r['se_train']:.4f} | "
              f"{r['golden_heldout']:+.4f} +- {r['se_heldout']:.4f} | {proxy} |")

    from matplotlib.figure import Figure  # Agg: savefig picks it for a PNG, no pyplot, no display
    fig = Figure(figsize=(5.5 * (2 + bool(args.stepwise)), 4.2))
    axes = fig.subplots(1, 2 + bool(args.stepwise), squeeze=False)[0]
    x, w = np.arange(len(rows)), 0.38
    for ax in axes[:2]:
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(rows) - 0.4)  # a slot for every run, even one with no bar (NaN)
        ax.grid(axis="y", alpha=0.3)
    for i, split in enumerate(("train", "heldout")):
        axes[0].bar(x + (i - 0.5) * w, [r[f"golden_{split}"] for r in rows], w, capsize=3,
                    yerr=[r[f"se_{split}"] for r in rows], label=("training prompts", "held-out combinations")[i])
    axes[0].set(title="the truth: golden change (+- 1 SE)", ylabel="golden change")
    for i, key in enumerate(("proxy", "reencoded")):
        axes[1].bar(x + (i - 0.5) * w, [np.nan if r["oracle"] else r[key] for r in rows], w,
                    label=("on the policy's latents", "on VAE re-encodings of its images")[i])
    for xi in x[[r["oracle"] for r in rows]]:
        axes[1].text(xi, 0, "oracle\nreward", ha="center", va="bottom", fontsize=8, color="grey")
    axes[1].set(title="what it climbed: proxy change (training prompts)", ylabel="latent reward change")

    if args.stepwise:
        ks, ode = stepwise(args.stepwise)
        print(f"\nStep-wise Sampling ({args.stepwise}):\n| k | golden | gain over k=1 |\n|---|---|---|")
        for k, (golden, gain, se) in sorted(ks.items()) + ([("ode", ode)] if ode else []):
            print(f"| {k} | {golden:.4f} | {gain:+.4f} +- {se:.4f} |")
        k = sorted(ks)
        axes[2].sharey(axes[0])  # the same golden scale as the stages'
        axes[2].errorbar(k, [ks[i][1] for i in k], yerr=[ks[i][2] for i in k], marker="o", capsize=3, label="best of k")
        if ode:
            axes[2].axhline(ode[1], color="grey", ls="--", label=f"ODE sampler ({ode[1]:+.4f})")
        axes[2].axhline(0, color="black", lw=0.8)
        axes[2].set_xscale("log", base=2)
        axes[2].set_xticks(k, [str(i) for i in k])
        axes[2].set(title="Step-wise Sampling: golden gain over k=1", xlabel="k (SDE successors per step)",
                    ylabel="golden change")
        axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = args.png or os.path.join(args.runs[0], "stages.png")
    fig.savefig(png, dpi=110)
    print(f"figure: {png}")


if __name__ == "__main__":
    main(parser.parse_args())
