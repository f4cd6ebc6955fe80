"""One figure from several evaluation rounds and kvpress side by side: per task and context, each setting's mean
score (needles: share passed) with a 95% interval, from the per-run data files docs/evaluation.md keeps.

  python scripts/eval_compare_plot.py docs/data/eval_gpu_h200_round8.json[:LABEL] [more.json[:LABEL] ...]
      --tasks needle-code,needle-docs,needle-prose --settings full,asrkf@round8,h2o,snapkv --png OUT.png

A data file holds {"runs": [...]} (eval's per-run figures: task, ctx, setting, budget, score) and optionally
{"kvpress": {"runs": [...]}} (press, budget, score). A setting is named as in the runs ("full", "asrkf", "h2o",
"full-q8_0"), "snapkv" for kvpress's press, and NAME@LABEL to take it from the file given that label only (two
rounds of one setting side by side). Budgets: --budget (default 0.25) for the budgeted settings.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def wilson(k: float, n: int, z: float = 1.96):
    if n == 0:
        return 0.0, 0.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def load(specs, budget):
    """{(setting, label): {(task, ctx): [score, ...]}}"""
    out = defaultdict(lambda: defaultdict(list))
    for spec in specs:
        path, _, label = spec.partition(":")
        data = json.load(open(path, encoding="utf-8"))
        for r in data.get("runs", []):
            if r.get("score") is None:
                continue
            b = r.get("budget") or 1.0
            if r["setting"].startswith("full") or abs(b - budget) < 1e-9:
                out[(r["setting"], label)][(r["task"], r["ctx"])].append(float(r["score"]))
        for r in data.get("kvpress", {}).get("runs", []):
            if abs(r["budget"] - budget) < 1e-9 and r.get("score") is not None:
                out[(r["press"], label)][(r["task"], r["ctx"])].append(float(r["score"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--settings", required=True)
    ap.add_argument("--ctx", default="4096,8192,16384")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--title", default="")
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load(args.files, args.budget)
    tasks = args.tasks.split(",")
    ctxs = [int(c) for c in args.ctx.split(",")]
    settings = args.settings.split(",")

    def scores(setting, task, ctx):
        name, _, label = setting.partition("@")
        xs = []
        for (s, lab), cells in data.items():
            if s == name and (not label or lab == label):
                xs += cells.get((task, ctx), [])
        return xs

    cols = [(t, c) for t in tasks for c in ctxs if any(scores(s, t, c) for s in settings)]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.35 * len(cols) * len(settings))), 4))
    w = 0.8 / len(settings)
    for j, s in enumerate(settings):
        xs, ys, lo, hi = [], [], [], []
        for i, (t, c) in enumerate(cols):
            v = scores(s, t, c)
            if not v:
                continue
            m = sum(v) / len(v)
            if all(x in (0.0, 1.0) for x in v):
                a, b = wilson(sum(v), len(v))
            else:  # partial scores: normal interval of the mean
                sd = (sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5
                a, b = m - 1.96 * sd / len(v) ** 0.5, m + 1.96 * sd / len(v) ** 0.5
            xs.append(i + (j - (len(settings) - 1) / 2) * w)
            ys.append(m)
            lo.append(max(0.0, m - a))
            hi.append(max(0.0, b - m))
        ax.bar(xs, ys, w, yerr=[lo, hi], capsize=2, label=s)
    ax.set_xticks(range(len(cols)), [f"{t}\n{c // 1024}k" for t, c in cols], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean score (needles: share passed), 95% CI")
    ax.set_title(args.title or f"budget {100 * args.budget:g}% for the budgeted settings", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(settings), 6))
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
