"""Does entropy recovery earn its place (issue 16)? Tables and a plot from the KL runs of several eval directories
(one a seed: every seed is another text of each kind).

    python -m asrkf_gguf.evaluation.recovery DIR [DIR ...] [--png docs/img/recovery.png]

Per kind (kl = essays, kl-code, kl-docs) and pooled over every text: KL median / p95 / mean of each setting, a
bootstrap interval over texts (texts resampled, their tokens pooled), the paired difference to asrkf-norec and
in how many texts a setting's median is below norec's; recovery events per 1k tokens, tokens restored, their
cost; and the trigger's precision and recall: a spike step (the entropy monitor's judgement, first measurement of
a step, acted on or not) against the steps where the run disagrees with the full cache (top-1 differs, or the KL
is above the run's own 90th percentile).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .tasks import KL_TASKS

KINDS = ["kl", "kl-code", "kl-docs"]
KIND_NAME = {"kl": "essays", "kl-code": "code", "kl-docs": "docs"}
ORDER = ["h2o", "asrkf-norec", "asrkf-norec-q15", "asrkf-paper", "asrkf-fresh", "asrkf-fresh-all", "asrkf-batch", "asrkf"]
ACTING = {"FR", "RR"}  # the levels that move anything once the budget binds (nothing is frozen then)


def load_runs(dirs: Sequence[str]) -> List[dict]:
    """The budgeted KL runs; each carries `full_spikes`, the spike steps of the full cache on the same text."""
    runs = []
    for d in dirs:
        data = json.loads((Path(d) / "results.json").read_text(encoding="utf-8"))
        recs = [r for r in data["records"] if r["task"] in KL_TASKS]
        full = {r["case"]: {i for i, _, _ in r.get("spikes", [])} for r in recs if r["setting"] == "full"}
        for r in recs:
            if r["setting"] != "full":
                runs.append({**r, "full_spikes": full.get(r["case"])})
    return runs


def _text(r: dict) -> tuple:
    return r["task"], r["seed"]


def bootstrap_median(per_text: Dict[tuple, np.ndarray], n: int = 2000, seed: int = 0) -> tuple:
    """Median of the pooled tokens, and its 95% interval with texts resampled."""
    keys = sorted(per_text)
    rng = np.random.default_rng(seed)
    meds = []
    for _ in range(n):
        pick = rng.integers(len(keys), size=len(keys))
        meds.append(np.median(np.concatenate([per_text[keys[i]] for i in pick])))
    return float(np.median(np.concatenate([per_text[k] for k in keys]))), *np.percentile(meds, [2.5, 97.5])


def paired_delta(a: Dict[tuple, np.ndarray], b: Dict[tuple, np.ndarray], n: int = 2000, seed: int = 0) -> tuple:
    """Pooled median of a minus that of b on the texts both ran, with a 95% interval (texts resampled)."""
    keys = sorted(set(a) & set(b))
    rng = np.random.default_rng(seed)

    def delta(ks):
        return float(np.median(np.concatenate([a[k] for k in ks])) - np.median(np.concatenate([b[k] for k in ks])))

    ds = [delta([keys[i] for i in rng.integers(len(keys), size=len(keys))]) for _ in range(n)]
    return delta(keys), *np.percentile(ds, [2.5, 97.5])


def trigger_counts(r: dict, levels: Optional[set] = None) -> Dict[str, int]:
    """Spike steps vs disagreeing steps (first measurement of each step)."""
    n = r["n_continuation"]
    spike = np.zeros(n, bool)
    for i, level, _ in r.get("spikes", []):
        if levels is None or level in levels:
            spike[i] = True
    spike[0] = False  # step 0 comes from the prompt: never judged
    kl = np.asarray(r["kl_first"], float)
    d_top1 = np.asarray(r["top1_match_first"]) == 0
    d_kl = kl > np.percentile(kl, 90)
    # control: as many steps as spiked, the highest entropies of the run (no running statistics)
    ent = step_entropy(r)
    top_ent = np.zeros(n, bool)
    if spike.sum():
        top_ent[np.argsort(-np.nan_to_num(ent, nan=-1.0), kind="stable")[: int(spike.sum())]] = True
    in_full = r.get("full_spikes") or set()
    return {"n": n, "spikes": int(spike.sum()), "also_full": int(sum(spike[i] for i in in_full if i < n)),
            "top1": int(d_top1.sum()), "hit_top1": int((spike & d_top1).sum()),
            "klhi": int(d_kl.sum()), "hit_klhi": int((spike & d_kl).sum()),
            "hit_top1_entropy": int((top_ent & d_top1).sum())}


def step_entropy(r: dict) -> np.ndarray:
    """Entropy of each continuation step's distribution (first measurement), from the trace; NaN where unknown."""
    n, n_prompt = r["n_continuation"], r["n_prompt"]
    ent = np.full(n, np.nan)
    tr = r["trace"]
    for n_new, m, e in zip(tr["n_new"], tr["n"], tr["entropy"]):
        i = m - n_prompt
        if n_new == 1 and e is not None and 0 <= i < n and np.isnan(ent[i]):
            ent[i] = e
    return ent


def _pr(c: dict, which: str) -> tuple:
    prec = c[f"hit_{which}"] / c["spikes"] if c["spikes"] else float("nan")
    rec = c[f"hit_{which}"] / c[which] if c[which] else float("nan")
    return prec, rec, c[which] / c["n"]


def summarize(runs: Sequence[dict]) -> dict:
    """{(setting, budget): {kind or 'pooled': figures}}"""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["setting"], r["budget"])].append(r)
    out = {}
    for key, rs in groups.items():
        fig = {}
        for kind in KINDS + ["pooled"]:
            sel = [r for r in rs if kind == "pooled" or r["task"] == kind]
            if not sel:
                continue
            per_text = {_text(r): np.asarray(r["kl"], float) for r in sel}
            allkl = np.concatenate(list(per_text.values()))
            med, lo, hi = bootstrap_median(per_text)
            n_tok = sum(r["n_continuation"] for r in sel)
            log = [e for r in sel for e in r["recovery_log"]]
            trig = defaultdict(int)
            trig_act = defaultdict(int)
            for r in sel:
                for k, v in trigger_counts(r).items():
                    trig[k] += v
                for k, v in trigger_counts(r, ACTING).items():
                    trig_act[k] += v
            fig[kind] = {
                "texts": len(sel), "median": med, "ci": (lo, hi), "p95": float(np.percentile(allkl, 95)),
                "mean": float(allkl.mean()), "top1": float(np.mean([r["top1_agreement"] for r in sel])),
                "per_text_median": {f"{t}/{s}": float(np.median(v)) for (t, s), v in per_text.items()},
                "events_per_1k": 1000 * len(log) / n_tok,
                "acting_per_1k": 1000 * sum(e["level"] in ACTING for e in log) / n_tok,
                "restored_per_1k": 1000 * sum(e["restored"] for e in log) / n_tok,
                "restored_per_acting": (sum(e["restored"] for e in log if e["level"] in ACTING)
                                        / max(1, sum(e["level"] in ACTING for e in log))),
                "recovery_ms_per_1k": 1000 * sum(e["us"] for e in log) / 1e3 / n_tok,
                "rewalks_per_1k": 1000 * sum(r["rewalks"] for r in sel) / n_tok,
                "decode_s": float(np.mean([r["timing"]["decode_s"] for r in sel])),
                "trigger": dict(trig), "trigger_acting": dict(trig_act),
                # cells the model attended, averaged over the steps (what freezing saves, what recovery gives back)
                "attended_mean": float(np.mean([r["kv"]["active_cells_mean"] for r in sel])),
                "_shape": (sorted({r["n_continuation"] for r in sel}), sorted({r["ctx"] for r in sel})),
                "_per_text": per_text,
            }
        out[key] = fig
    return out


def _f(x: float) -> str:
    return f"{x:.4f}"


def tables(summary: dict) -> str:
    keys = sorted(summary, key=lambda k: (-k[1], ORDER.index(k[0]) if k[0] in ORDER else 99))
    shapes = [f["_shape"] for fig in summary.values() for f in fig.values() if "_shape" in f]
    n_cont = sorted({n for s, _ in shapes for n in s})
    ctxs = sorted({c for _, c in shapes for c in c})
    lines = [f"### KL against the full cache ({'/'.join(map(str, n_cont))} teacher-forced tokens a text, ctx "
             f"{'/'.join(map(str, ctxs))})", "",
             "Median of the pooled tokens with a 95% bootstrap interval over texts; Δ vs norec: the paired difference "
             "of pooled medians (texts resampled); wins: texts whose own median is below norec's.", "",
             "| budget | setting | kind | texts | KL median [95% CI] | Δ median vs norec [95% CI] | wins | p95 | mean "
             "| top-1 | cells attended (mean) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, budget in keys:
        base = summary.get(("asrkf-norec", budget), {})
        for kind, f in summary[(setting, budget)].items():
            delta, wins = "-", "-"
            if setting != "asrkf-norec" and kind in base:
                d, lo, hi = paired_delta(f["_per_text"], base[kind]["_per_text"])
                delta = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                common = set(f["_per_text"]) & set(base[kind]["_per_text"])
                w = sum(np.median(f["_per_text"][k]) < np.median(base[kind]["_per_text"][k]) for k in common)
                wins = f"{w}/{len(common)}"
            lines.append(f"| {budget:g} | {setting} | {KIND_NAME.get(kind, kind)} | {f['texts']} | {_f(f['median'])} "
                         f"[{_f(f['ci'][0])}, {_f(f['ci'][1])}] | {delta} | {wins} | {_f(f['p95'])} | {_f(f['mean'])} "
                         f"| {f['top1']:.3f} | {f['attended_mean']:.0f} |")
    lines += ["", "### Recovery events, tokens restored and their cost (pooled over texts)", "",
              "| budget | setting | events / 1k tokens | FR+RR / 1k | tokens restored / 1k | restored per FR/RR | "
              "rewalks / 1k (5 extra decodes each) | controller ms / 1k tokens in recovery | decode s (mean a run) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for setting, budget in keys:
        f = summary[(setting, budget)].get("pooled")
        if f and setting.startswith("asrkf"):
            lines.append(f"| {budget:g} | {setting} | {f['events_per_1k']:.1f} | {f['acting_per_1k']:.1f} | "
                         f"{f['restored_per_1k']:.0f} | {f['restored_per_acting']:.1f} | {f['rewalks_per_1k']:.1f} | "
                         f"{f['recovery_ms_per_1k']:.1f} | {f['decode_s']:.1f} |")
    lines += ["", "### The trigger: spike steps vs steps where the run disagrees with the full cache (pooled)", "",
              "All spikes (every level, acted on or not; norec: the would-be triggers) and the FR/RR ones. Precision: "
              "share of spike steps that disagree; recall: share of disagreeing steps that spiked; base: share of all "
              "steps that disagree (a trigger no better than chance has precision = base).", "",
              "Control: as many steps as spiked, taken by the highest entropy alone. Also in full: share of the spike "
              "steps where the full cache's own entropy spiked too (the text is hard there, whatever the cache).", "",
              "| budget | setting | spikes / 1k | top-1 differs: precision / recall / base | control precision | "
              "KL > p90: precision / recall / base | FR/RR only: spikes / 1k, top-1 precision / recall | "
              "also in full |", "|---|---|---|---|---|---|---|---|"]
    for setting, budget in keys:
        f = summary[(setting, budget)].get("pooled")
        if not f:
            continue
        c, ca = f["trigger"], f["trigger_acting"]
        p1, r1, b1 = _pr(c, "top1")
        p2, r2, b2 = _pr(c, "klhi")
        pa, ra, _ = _pr(ca, "top1")
        ctrl = c["hit_top1_entropy"] / c["spikes"] if c["spikes"] else float("nan")
        lines.append(f"| {budget:g} | {setting} | {1000 * c['spikes'] / c['n']:.1f} | {p1:.2f} / {r1:.2f} / {b1:.2f} "
                     f"| {ctrl:.2f} | {p2:.2f} / {r2:.2f} / {b2:.2f} | "
                     f"{1000 * ca['spikes'] / ca['n']:.1f}, {pa:.2f} / {ra:.2f} | "
                     f"{c['also_full'] / max(1, c['spikes']):.2f} |")
    return "\n".join(lines)


COLORS = {"h2o": "tab:red", "asrkf-norec": "tab:cyan", "asrkf-norec-q15": "tab:gray", "asrkf-paper": "tab:blue", "asrkf-fresh": "tab:green",
          "asrkf-fresh-all": "tab:olive", "asrkf-batch": "tab:brown", "asrkf": "tab:purple"}


def plot(summary: dict, runs: Sequence[dict], path: str) -> None:
    """Per budget: each setting's pooled-median KL minus asrkf-norec's, per kind and pooled, with the paired 95%
    interval over texts (below 0: better than no recovery). Last panel: the trigger's precision vs recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for _, b in summary}, reverse=True)
    settings = [s for s in ORDER if s != "asrkf-norec" and any(k[0] == s for k in summary)]
    fig, axes = plt.subplots(1, len(budgets) + 1, figsize=(5 * (len(budgets) + 1), 4.2))
    kinds = KINDS + ["pooled"]
    w = 0.8 / len(settings)
    for ax, b in zip(axes, budgets):
        base = summary.get(("asrkf-norec", b), {})
        for j, s in enumerate(settings):
            f = summary.get((s, b), {})
            xs, ys, lo, hi = [], [], [], []
            for i, k in enumerate(kinds):
                if k in f and k in base:
                    d, l, h = paired_delta(f[k]["_per_text"], base[k]["_per_text"])
                    xs.append(i + (j - (len(settings) - 1) / 2) * w)
                    ys.append(d)
                    lo.append(d - l)
                    hi.append(h - d)
            if xs:
                ax.bar(xs, ys, w, yerr=[lo, hi], color=COLORS.get(s, "gray"), label=s, capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(kinds)), [f"{KIND_NAME.get(k, k)}" for k in kinds])
        ax.set_ylabel("KL median minus asrkf-norec's (95% CI, texts resampled)")
        shape = base.get("pooled", {}).get("_shape", ([], []))
        n_texts = max((f2["texts"] for f2 in base.values() if "texts" in f2), default=0)
        ax.set_title(f"budget {100 * b:g}% of ctx {'/'.join(map(str, shape[1]))}, {n_texts} texts pooled", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for (s, b), f in summary.items():
        c = f["pooled"]["trigger"]
        p, r, base = _pr(c, "top1")
        m = "o" if b == budgets[0] else "^"
        ax.scatter(r, p, color=COLORS.get(s, "gray"), marker=m, s=40)
        ax.scatter(r, base, color=COLORS.get(s, "gray"), marker="_", s=120)
        if c["spikes"]:
            ax.scatter(r, c["hit_top1_entropy"] / c["spikes"], color=COLORS.get(s, "gray"), marker="x", s=30)
    ax.set_xlabel("recall (disagreeing steps that spiked)")
    ax.set_ylabel("precision (spike steps whose top-1 differs from full)")
    marks = ", ".join(f"{'o' if b == budgets[0] else '^'} {100 * b:g}%" for b in budgets[:2])
    ax.set_title(f"trigger ({marks}); x: top entropies; -: base", fontsize=9)
    ax.set_xlim(0, 0.25)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--json", help="write the summary figures here")
    ap.add_argument("--as-norec", metavar="SETTING",
                    help="count SETTING's runs as asrkf-norec's (the default asrkf under a binding budget, where "
                         "recovery watches but never acts); refused if one of them acted")
    a = ap.parse_args(argv)
    runs = load_runs(a.dirs)
    if a.as_norec:
        mine = [r for r in runs if r["setting"] == a.as_norec]
        if not mine or any(r["recovery_log"] for r in mine) or any(r["setting"] == "asrkf-norec" for r in runs):
            raise SystemExit(f"--as-norec {a.as_norec}: no such runs, one of them acted on a recovery, or "
                             "asrkf-norec ran too")
        for r in mine:
            r["setting"] = "asrkf-norec"
    summary = summarize(runs)
    print(tables(summary))
    if a.png:
        plot(summary, runs, a.png)
    if a.json:
        Path(a.json).write_text(json.dumps(
            {f"{s}|{b:g}": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in f.items()}
             for (s, b), f in summary.items()}, indent=1, default=float), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
