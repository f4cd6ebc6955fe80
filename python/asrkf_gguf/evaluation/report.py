"""DIR/results.json -> DIR/report.md (tables) and DIR/*.png (plots, when matplotlib is installed).

    python -m asrkf_gguf eval-report DIR
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .grid import RESULTS, GridError
from .runner import SETTINGS
from .tasks import KL_TASKS, MULTI_TURN, TASKS

ORDER = list(SETTINGS)  # full, full-q8_0, full-q4_0, window, h2o, asrkf-norec, asrkf
TASK_ORDER = ["passkey", "passkey-mt", "niah", "niah-mt", "multikey", "vartrack", "kl", "kl-code", "kl-docs"]
TASK_ORDER += [t for t in TASKS if t not in TASK_ORDER]  # the needle-* and RULER-style tasks
COLORS = {"full": "black", "full-q8_0": "gray", "full-q4_0": "silver", "window": "tab:orange", "h2o": "tab:red",
          "asrkf-norec": "tab:cyan", "asrkf": "tab:blue", "asrkf-nopool": "tab:purple",
          "asrkf-l4": "tab:olive", "asrkf-paper": "tab:green", "asrkf-fresh": "tab:brown",
          "asrkf-fresh-all": "tab:pink"}


def load(out_dir) -> Tuple[dict, List[dict]]:
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        raise GridError(f"no {RESULTS} in {out_dir}: run `python -m asrkf_gguf eval ... --out {out_dir}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise GridError(f"{path} is not valid JSON: {err}") from None
    return data["meta"], data["records"]


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


def _settings(records: Sequence[dict]) -> List[str]:
    present = {r["setting"] for r in records}
    return [s for s in ORDER if s in present]


def _budget_columns(records: Sequence[dict]) -> List[float]:
    return sorted({r["budget"] for r in records if SETTINGS[r["setting"]].budgeted}, reverse=True)


def _tasks(records: Sequence[dict]) -> List[str]:
    present = {r["task"] for r in records}
    return [t for t in TASK_ORDER if t in present]


# ---- tables


def _chat_groups(records: Sequence[dict]):
    """(task, ctx, records) of every chat task and context, in report order."""
    chat = [r for r in records if r["task"] not in KL_TASKS]
    for task in _tasks(chat):
        for ctx in sorted({r["ctx"] for r in chat if r["task"] == task}):
            yield task, ctx, [r for r in chat if r["task"] == task and r["ctx"] == ctx]


def accuracy_tables(records: Sequence[dict]) -> str:
    """One table per task and context: passed/total per setting (rows) and budget (columns)."""
    out = []
    for task, ctx, rs in _chat_groups(records):
        budgets = _budget_columns(rs)
        depths = sorted({r["depth"] for r in rs if r["depth"] is not None})
        seeds = sorted({r["seed"] for r in rs})
        where = [f"depths {', '.join(f'{d:g}' for d in depths)}"] if depths else []
        where.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
        out.append(f"**{task}, {ctx} tokens** ({'; '.join(where)})\n")
        out.append("| policy | " + " | ".join(["full cache"] + [f"budget {_pct(b)}" for b in budgets]) + " |")
        out.append("|---" * (len(budgets) + 2) + "|")
        for s in _settings(rs):
            cells = []
            for col, b in [(False, 1.0)] + [(True, b) for b in budgets]:
                sel = [r for r in rs if r["setting"] == s and r["budget"] == b]
                ok = sel and SETTINGS[s].budgeted == col  # full caches in the first column only
                cells.append(f"{sum(r['passed'] for r in sel)}/{len(sel)}" if ok else "")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def depth_tables(records: Sequence[dict]) -> str:
    """Per case: pass (+) or fail (-) for every setting and budget, one column per depth, one sign per seed
    (seeds in increasing order; a blank where that seed did not run). Depthless tasks: one column."""
    out = []
    for task, ctx, rs in _chat_groups(records):
        depths = sorted({r["depth"] for r in rs}, key=lambda d: -1 if d is None else d)
        seeds = sorted({r["seed"] for r in rs})
        out.append(f"**{task}, {ctx} tokens**" + (f" (seeds {', '.join(map(str, seeds))})" if len(seeds) > 1
                                                  else "") + "\n")
        out.append("| policy | budget | " + " | ".join("cases" if d is None else f"depth {d:g}" for d in depths)
                   + " |")
        out.append("|---|---|" + "---|" * len(depths))
        for s in _settings(rs):
            for b in sorted({r["budget"] for r in rs if r["setting"] == s}, reverse=True):
                got = {(r["depth"], r["seed"]): r["passed"] for r in rs if r["setting"] == s and r["budget"] == b}
                cells = ["".join(" " if (d, sd) not in got else "+" if got[(d, sd)] else "-" for sd in seeds).rstrip()
                         for d in depths]
                out.append(f"| {s} | {_pct(b) if SETTINGS[s].budgeted else '-'} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def wilson(k: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95% Wilson score interval of k successes in n (reads sensibly at 0/n and n/n, unlike k/n +- 2 SE)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_table(records: Sequence[dict]) -> str:
    """Per task x context x policy x budget: passed / cases, the 95% Wilson interval of the pass rate and, for
    tasks with several answers (partial credit: niah-multivalue/-multiquery, cwe, fwe, vartrack), the mean
    score (fraction of the answers found)."""
    out = ["| task | context | policy | budget | passed / cases | 95% Wilson interval | mean score |",
           "|---|---|---|---|---|---|---|"]
    for task, ctx, rs in _chat_groups(records):
        partial = any(len(r["expected"]) > 1 for r in rs)
        for s in _settings(rs):
            for b in sorted({r["budget"] for r in rs if r["setting"] == s}, reverse=True):
                sel = [r for r in rs if r["setting"] == s and r["budget"] == b]
                k, n = sum(bool(r["passed"]) for r in sel), len(sel)
                lo, hi = wilson(k, n)
                score = f"{np.mean([r['score'] for r in sel]):.3f}" if partial else "-"
                out.append(f"| {task} | {ctx} | {s} | {_pct(b) if SETTINGS[s].budgeted else '-'} | {k} / {n} | "
                           f"{100 * lo:.0f}-{100 * hi:.0f}% | {score} |")
    return "\n".join(out) if len(out) > 2 else "(no chat runs)"


def plan_lines(meta: dict, records: Sequence[dict]) -> List[str]:
    """What the last `eval` call planned and did not run (a time limit), per task and context."""
    plan = meta.get("plan")
    if not plan:
        return []
    lines = [f"- last call ({plan['started']}): {plan['planned']} planned runs, {plan['done_before']} done before, "
             f"{plan['ran']} ran, **{plan['not_run']} did not run**" +
             (f" (stopped: {plan['stopped']})" if plan.get("stopped") else "")]
    if plan["not_run"]:
        cells = ", ".join(f"{c}: {k}" for c, k in plan.get("not_run_by_cell", {}).items())
        lines.append(f"- not run, per task and context: {cells}")
    return lines


def _logical(trace: dict) -> np.ndarray:
    return sum(np.asarray(trace[k]) for k in ("active", "frozen", "offloaded", "dropped"))


def active_share(r: dict) -> float:
    """Mean over the generation steps of active (attended) cells / logical tokens; prefill chunks excluded."""
    t = r["trace"]
    gen = np.asarray(t["n_new"]) == 1
    if not gen.any():
        return float("nan")
    return float(np.mean(np.asarray(t["active"])[gen] / _logical(t)[gen]))


def kv_table(records: Sequence[dict]) -> str:
    """Device KV actually used: resident cells at the peak, as a share of the logical tokens, active cells while
    generating, and the device KV bytes (the quantized full caches are memory-matched alternatives)."""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in records:
        groups[(r["setting"], r["budget"])].append(r)
    out = ["| policy | budget | runs | device cells, peak / logical tokens | active (attended) cells / logical, "
           "mean over generated tokens | device KV MiB per 1k logical tokens |", "|---|---|---|---|---|---|"]
    for s in _settings(records):
        for b in sorted({b for (ss, b) in groups if ss == s}, reverse=True):
            rs = groups[(s, b)]
            peak = np.mean([r["kv"]["resident_fraction_peak"] for r in rs])
            active = np.nanmean([active_share(r) for r in rs])
            mib = np.mean([r["kv"]["device_kv_bytes"] / max(1, r["kv"]["logical_tokens"]) * 1000 / 2**20 for r in rs])
            out.append(f"| {s} | {_pct(b) if SETTINGS[s].budgeted else '-'} | {len(rs)} | {100 * peak:.1f}% | "
                       f"{100 * active:.1f}% | {mib:.2f} |")
    return "\n".join(out)


def kl_table(records: Sequence[dict]) -> str:
    rs = [r for r in records if r["task"] in KL_TASKS]
    if not rs:
        return ""
    out = ["| task | context (prompt + continuation) | policy | budget | KL median | KL p95 | KL mean | "
           "top-1 agreement | NLL of the real text | recoveries |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, ctx in sorted({(r["task"], r["ctx"]) for r in rs}, key=lambda tc: (TASK_ORDER.index(tc[0]), tc[1])):
        for s in _settings(rs):
            for r in sorted((r for r in rs if r["ctx"] == ctx and r["task"] == task and r["setting"] == s),
                            key=lambda r: -r["budget"]):
                rec = sum(r["events"]["recoveries"].values())
                out.append(f"| {task} | {ctx} ({r['n_prompt']} + {r['n_continuation']}) | {s} | "
                           f"{_pct(r['budget']) if SETTINGS[s].budgeted else '-'} | {r['kl_median']:.4f} | "
                           f"{r['kl_p95']:.4f} | {r['kl_mean']:.4f} | {r['top1_agreement']:.3f} | "
                           f"{r['nll_mean']:.3f} | {rec} |")
    return "\n".join(out)


def target_check(records: Sequence[dict], budget: float = 0.25) -> str:
    """The issue's targets, read off the records (reported, not asserted)."""
    lines = []
    chat = [r for r in records if r["task"] not in KL_TASKS]
    by_case = defaultdict(dict)
    for r in chat:
        by_case[r["case"]][(r["setting"], r["budget"])] = r
    single = [c for c, d in by_case.items() if ("full", 1.0) in d and ("asrkf", budget) in d
              and d[("full", 1.0)]["task"] not in MULTI_TURN]
    full_pass = [c for c in single if by_case[c][("full", 1.0)]["passed"]]
    lost = [c for c in full_pass if not by_case[c][("asrkf", budget)]["passed"]]
    lines.append(f"- Single-turn, asrkf at {_pct(budget)}: {len(full_pass) - len(lost)}/{len(full_pass)} of the cases "
                 f"the full cache passes" + (f"; lost: {', '.join(lost)}" if lost else "") + ".")
    multi = [c for c, d in by_case.items() if d and next(iter(d.values()))["task"] in MULTI_TURN]
    for s in ("asrkf", "asrkf-norec", "asrkf-nopool", "asrkf-l4", "h2o", "window"):
        sel = [by_case[c][(s, budget)] for c in multi if (s, budget) in by_case[c]]
        if sel:
            lines.append(f"- Multi-turn, {s} at {_pct(budget)}: {sum(r['passed'] for r in sel)}/{len(sel)}.")
    sel = [r for r in chat if r["setting"] == "asrkf" and r["budget"] == budget]
    if sel:
        red = 1 - np.mean([r["kv"]["resident_fraction_peak"] for r in sel])
        red_a = 1 - np.nanmean([active_share(r) for r in sel])
        lines.append(f"- Device KV reduction of asrkf at {_pct(budget)} (peak resident cells vs logical tokens): "
                     f"{100 * red:.1f}%; active (attended) cells while generating: {100 * red_a:.1f}%.")
    kl = [r for r in records if r["task"] in KL_TASKS]
    for b in sorted({r["budget"] for r in kl if SETTINGS[r["setting"]].budgeted}, reverse=True):
        a = {r["setting"]: r for r in kl if r["budget"] == b}
        if "asrkf" in a and "h2o" in a:
            lines.append(f"- KL at {_pct(b)}: asrkf median {a['asrkf']['kl_median']:.4f} / p95 "
                         f"{a['asrkf']['kl_p95']:.4f} vs h2o {a['h2o']['kl_median']:.4f} / {a['h2o']['kl_p95']:.4f}.")
    return "\n".join(lines)


def failures(records: Sequence[dict]) -> str:
    out = ["| run | expected | answer |", "|---|---|---|"]
    for r in records:
        if r["task"] not in KL_TASKS and not r["passed"]:
            ans = r["answer"].replace("|", "\\|").replace("\n", " ")[:60]
            out.append(f"| {r['key'].replace('|', ' ')} | {' '.join(r['expected'])} | {ans} |")
    return "\n".join(out) if len(out) > 2 else "(none)"


def kvpress_table(out_dir: Path, records: Sequence[dict]) -> str:
    """scripts/kvpress_side_by_side.py's results next to ours, on the cases kvpress ran."""
    path = out_dir / "kvpress-results.json"
    if not path.is_file():
        return ("kvpress not run: skipped (scripts/kvpress_side_by_side.py writes kvpress-results.json; it needs "
                "torch, transformers, kvpress and gguf)")
    peer = json.loads(path.read_text(encoding="utf-8"))
    prs = peer["records"]
    cases = {r["case"] for r in prs}
    ours = [r for r in records if r["case"] in cases]
    out = [f"kvpress {peer['meta'].get('kvpress', '?')}, transformers {peer['meta'].get('transformers', '?')}, "
           f"torch {peer['meta'].get('torch', '?')}, on {len(cases)} cases; passed/total\n"]
    rows = sorted({(r["setting"], r["budget"]) for r in prs}) + \
        [(s, b) for s in _settings(ours) for b in sorted({r["budget"] for r in ours if r["setting"] == s})]
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in prs)]
    ctxs = sorted({r["ctx"] for r in prs})
    cols = [(t, c) for t in tasks for c in ctxs]
    out.append("| setting | budget | " + " | ".join(f"{t} {c}" for t, c in cols) + " |")
    out.append("|---|---|" + "---|" * len(cols))
    for s, b in rows:
        cells = []
        for t, c in cols:
            sel = [r for r in (*prs, *ours) if r["setting"] == s and r["budget"] == b and r["task"] == t
                   and r["ctx"] == c]
            cells.append(f"{sum(r['passed'] for r in sel)}/{len(sel)}" if sel else "")
        out.append(f"| {s} | {_pct(b)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---- plots


def plot_accuracy(records: Sequence[dict], path: Path) -> Optional[Path]:
    import matplotlib.pyplot as plt

    chat = [r for r in records if r["task"] not in KL_TASKS]
    panels = [(t, c) for t in _tasks(chat) for c in sorted({r["ctx"] for r in chat if r["task"] == t})]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (task, ctx) in zip(axes.flat, panels):
        rs = [r for r in chat if r["task"] == task and r["ctx"] == ctx]
        for s in _settings(rs):
            sel = [r for r in rs if r["setting"] == s]
            if SETTINGS[s].budgeted:
                bs = sorted({r["budget"] for r in sel})
                acc = [np.mean([r["passed"] for r in sel if r["budget"] == b]) for b in bs]
                ax.plot([100 * b for b in bs], acc, "o-", color=COLORS.get(s), label=s)
            else:
                ax.axhline(np.mean([r["passed"] for r in sel]), color=COLORS.get(s), ls="--", lw=1, label=s)
        ax.set_title(f"{task}, {ctx} tok", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("device budget (% of context)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _trace_run(records: Sequence[dict], setting: str, budget: float) -> Optional[dict]:
    """The longest-decoding run of a setting at a budget (KL runs first: they decode hundreds of tokens)."""
    sel = [r for r in records if r["setting"] == setting and r["budget"] == budget and r.get("trace")]
    return max(sel, key=lambda r: (r["task"] in KL_TASKS, r["ctx"], r["n_generated_tokens"]), default=None)


def _steps(trace: dict) -> Tuple[np.ndarray, dict]:
    """Per-step columns with the logical length as x (prefill chunks advance it by their size; a rewalk steps back)."""
    return _logical(trace), {k: np.asarray(v) for k, v in trace.items()}


def plot_active(records: Sequence[dict], budget: float, path: Path) -> Optional[Path]:
    import matplotlib.pyplot as plt

    runs = {s: _trace_run(records, s, budget if SETTINGS[s].budgeted else 1.0) for s in ("full", "h2o", "asrkf")}
    runs = {s: r for s, r in runs.items() if r is not None}
    if "asrkf" not in runs:
        return None
    ref = runs["asrkf"]
    runs = {s: r for s, r in runs.items() if r["case"] == ref["case"]}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for s, r in runs.items():
        x, t = _steps(r["trace"])
        ax.plot(x, t["active"], color=COLORS.get(s), lw=1, label=f"{s}: active (attended) cells")
        if s == "asrkf":
            ax.plot(x, t["active"] + t["frozen"], color=COLORS.get(s), lw=0.8, ls=":",
                    label="asrkf: resident cells (active + frozen)")
    ax.axhline(ref["budget_cells"], color="gray", lw=0.6, ls="--", label=f"budget {ref['budget_cells']} cells")
    ax.set_xlabel("logical tokens (prompt chunks, then one token per step)")
    ax.set_ylabel("KV cells")
    ax.set_title(f"{ref['case']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_entropy(records: Sequence[dict], budget: float, path: Path) -> Optional[Path]:
    import matplotlib.pyplot as plt

    r = _trace_run(records, "asrkf", budget)
    if r is None:
        return None
    x, t = _steps(r["trace"])
    has = np.array([e is not None for e in t["entropy"]])
    if not has.any():
        return None
    fig, ax = plt.subplots(figsize=(7, 3.0))
    ent = np.array([e if e is not None else np.nan for e in t["entropy"]], float)
    ax.plot(x[has], ent[has], lw=0.7, color="tab:blue", label="next-token entropy (nats)")
    for level, color in (("SR", "gold"), ("WR", "orange"), ("FR", "red"), ("RR", "purple")):
        at = np.array([v == level for v in t["recovery"]])
        if at.any():
            ax.scatter(x[at], ent[at], s=14, color=color, zorder=3, label=f"{level} ({int(at.sum())})")
    ax.set_xlabel("logical tokens")
    ax.set_ylabel("entropy")
    ax.set_title(f"asrkf, {r['case']}, budget {_pct(budget)}: recovery events", fontsize=8)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(records: Sequence[dict], out_dir: Path, budget: float = 0.25) -> Tuple[List[Path], str]:
    try:
        import matplotlib
    except ImportError:
        return [], "matplotlib not installed: plots skipped (pip install 'asrkf-gguf[eval]')"
    matplotlib.use("Agg")
    made = [plot_accuracy(records, out_dir / "accuracy.png"),
            plot_active(records, budget, out_dir / "active_kv.png"),
            plot_entropy(records, budget, out_dir / "entropy.png")]
    return [p for p in made if p is not None], ""


# ---- report


def write_report(out_dir, budget: float = 0.25) -> Path:
    out_dir = Path(out_dir)
    meta, records = load(out_dir)
    plots, note = write_plots(records, out_dir, budget)
    wall = sum(r["timing"]["wall_s"] for r in records)
    parts = [
        f"# Evaluation report: {meta['model']}",
        "",
        f"- model sha256 `{meta['model_sha256']}`, commit `{meta['git_commit']}`, seeds "
        f"{', '.join(map(str, meta.get('seeds', [meta.get('seed', 0)])))}",
        f"- machine: {meta['machine']['processor']}, {meta['machine']['cpu_count']} CPUs, "
        f"{meta['machine']['platform']}",
        f"- {len(records)} runs, {wall / 60:.0f} min of run time" +
        ("; n_gpu_layers " + ", ".join(map(str, sorted({r.get("n_gpu_layers", 0) for r in records})))
         if records else ""),
        *plan_lines(meta, records),
        "",
        "## Targets (issue 4)",
        "",
        target_check(records, budget),
        "",
        "## Accuracy",
        "",
        accuracy_tables(records),
        "## Pass rates with 95% intervals (and the mean score of the partial-credit tasks)",
        "",
        interval_table(records),
        "",
        "## Per depth (+ pass, - fail; one sign per seed)",
        "",
        depth_tables(records),
        "## Device KV",
        "",
        kv_table(records),
        "",
    ]
    kl = kl_table(records)
    if kl:
        parts += ["## Next-token distributions vs the full cache (teacher-forced real continuation)", "", kl, ""]
    parts += ["## kvpress side by side", "", kvpress_table(out_dir, records), ""]
    parts += ["## Plots", ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots] or [note]
    parts += ["", "## Failed runs", "", failures(records), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
