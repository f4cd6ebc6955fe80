"""Tables (markdown) and the memory-curve plot of a scripts/gpu_bench.py results file.

  python scripts/gpu_report.py docs/data/gpu_bench_h200.json --plot docs/img/gpu_long_context.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

MiB = 2 ** 20


N_BOOT = 2000  # bootstrap resamples for the decode confidence intervals
BOOT_SEED = 0


def _pooled_median_s(rounds: list, rng=None, pick_round=None) -> np.ndarray | float:
    """Median step time over all rounds' steps pooled; with rng, N_BOOT medians of two-level resamples: the
    rounds pick_round (drawn with replacement, shared by the variants compared, whose rounds ran side by side),
    then steps within each drawn round."""
    if rng is None:
        return float(np.median(np.concatenate(rounds)))
    n = min(len(r) for r in rounds)
    steps = np.stack([np.asarray(r[:n]) for r in rounds])                      # [rounds, steps]
    pick_step = rng.integers(0, n, size=(N_BOOT, pick_round.shape[1], n))
    draws = steps[pick_round[:, :, None], pick_step]                          # [N_BOOT, rounds, steps]
    return np.median(draws.reshape(N_BOOT, -1), axis=1)


def _decode_table_steps(res: dict) -> str:
    """Pooled per-step times: median t/s per variant and patched vs stock with a 95% bootstrap interval."""
    steps, per = defaultdict(list), defaultdict(list)
    for r in res.get("decode", []):
        for depth, v in r.get("depths", {}).items():
            steps[(r["variant"], int(depth))].append(np.asarray(v["step_s"], dtype=float))
            per[(r["variant"], int(depth))].append(v["tokens_per_s"])
    variants = [v for v in ("stock", "patched", "patched+handle") if any(k[0] == v for k in steps)]
    depths = sorted({k[1] for k in steps})
    rng = np.random.default_rng(BOOT_SEED)
    out = ["| depth | " + " | ".join(f"{v} t/s pooled (rounds)" for v in variants)
           + " | patched vs stock [95% CI] |", "|---" * (len(variants) + 2) + "|"]
    within = []
    for d in depths:
        cells = [f"{1.0 / _pooled_median_s(steps[(v, d)]):.1f} ({', '.join(f'{x:.1f}' for x in per[(v, d)])})"
                 for v in variants]
        if ("stock", d) in steps and ("patched", d) in steps:
            # t/s ratio = stock median step time / patched median step time
            rel = _pooled_median_s(steps[("stock", d)]) / _pooled_median_s(steps[("patched", d)]) - 1
            # paired by round: a round of each variant ran back to back, so drifts of the machine between rounds
            # hit both, while the spread between rounds still widens the interval
            n_r = min(len(steps[("stock", d)]), len(steps[("patched", d)]))
            pick_round = rng.integers(0, n_r, size=(N_BOOT, n_r))
            boot = (_pooled_median_s(steps[("stock", d)][:n_r], rng, pick_round)
                    / _pooled_median_s(steps[("patched", d)][:n_r], rng, pick_round) - 1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            within.append(-0.01 <= lo and hi <= 0.01)
            rel_s = f"{100 * rel:+.1f}% [{100 * lo:+.1f}%, {100 * hi:+.1f}%]"
        else:
            within.append(False)
            rel_s = "n/a"
        out.append(f"| {d} | " + " | ".join(cells) + f" | {rel_s} |")
    n_rounds = max((len(x) for x in steps.values()), default=0)
    n_steps = sorted({len(s) for x in steps.values() for s in x})
    out += ["", f"t/s = 1 / median step time, steps pooled over {n_rounds} round(s) of "
            f"{'/'.join(map(str, n_steps))} timed steps; CI: {N_BOOT} two-level bootstrap resamples (rounds, "
            f"paired across variants, then steps within them; seed {BOOT_SEED}), percentile interval.",
            f"Patched vs stock within 1% (95% CI inside \u00b11% at every depth): "
            f"{'shown' if within and all(within) else 'not shown'}."]
    return "\n".join(out)


def decode_table(res: dict) -> str:
    runs = [r for r in res.get("decode", []) if r.get("depths")]
    if runs and all("step_s" in v for r in runs for v in r["depths"].values()):
        return _decode_table_steps(res)
    # results without per-step times (older files): means of the round medians
    per = defaultdict(list)
    for r in res.get("decode", []):
        for depth, v in r.get("depths", {}).items():
            per[(r["variant"], int(depth))].append(v["tokens_per_s"])
    variants = [v for v in ("stock", "patched", "patched+handle") if any(k[0] == v for k in per)]
    depths = sorted({k[1] for k in per})
    out = ["| depth | " + " | ".join(f"{v} t/s (rounds)" for v in variants) + " | patched vs stock |",
           "|---" * (len(variants) + 2) + "|"]
    for d in depths:
        cells = [f"{np.mean(per[(v, d)]):.1f} ({', '.join(f'{x:.1f}' for x in per[(v, d)])})" for v in variants]
        rel = (f"{100 * (np.mean(per[('patched', d)]) / np.mean(per[('stock', d)]) - 1):+.1f}%"
               if ("stock", d) in per else "n/a")
        out.append(f"| {d} | " + " | ".join(cells) + f" | {rel} |")
    return "\n".join(out)


def budget_table(res: dict) -> str:
    runs = res.get("budget", [])
    full = next((r for r in runs if r.get("policy") == "full"), None)
    out = ["| policy | budget | controller settings | decode t/s | end-to-end t/s | vs full (decode / end-to-end) "
           "| controller ms/step (median / mean) | device KV MiB | host MiB | GPU memory MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            out.append(f"| {r['error']} |")
            continue
        frac = r["budget_cells"] / r["logical"]
        settings = ", ".join(f"{k}={('every 4th' if len(v) > 1 else 'last') if k == 'importance_layers' else v}"
                             for k, v in r["controller_params"].items()) or "defaults"
        vs = (f"{r['decode_tokens_per_s'] / full['decode_tokens_per_s']:.2f}x / "
              f"{r['end_to_end_tokens_per_s'] / full['end_to_end_tokens_per_s']:.2f}x") if full else "n/a"
        out.append(f"| {r['policy']} | {frac:.1%} ({r['budget_cells']} cells) | {settings} "
                   f"| {r['decode_tokens_per_s']:.1f} | {r['end_to_end_tokens_per_s']:.1f} | {vs} "
                   f"| {r['controller_ms']:.2f} / {r['controller_ms_mean']:.2f} | {r['device_kv_bytes'] / MiB:.0f} "
                   f"| {r['host_bytes_used'] / MiB:.0f} | {r['gpu_memory_used_mib'] or 'n/a'} |")
    return "\n".join(out)


def moves_table(res: dict) -> str:
    bw = res.get("copy_bandwidth", {})
    ceiling = min(bw.get("h2d_GBps", np.nan), bw.get("d2h_GBps", np.nan))
    out = [f"Pinned host <-> device copy bandwidth (PyTorch): H2D {bw.get('h2d_GBps', float('nan')):.1f} GB/s, "
           f"D2H {bw.get('d2h_GBps', float('nan')):.1f} GB/s.", "",
           "| KV | FA | bytes/token | layout | offload GB/s | thaw GB/s | share of copy bandwidth (offload / thaw) "
           "| host checksum GB/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res.get("moves", []):
        for layout in ("contiguous", "scattered"):
            if f"{layout}_offload_GBps" not in r:
                continue
            off, thaw = r[f"{layout}_offload_GBps"], r[f"{layout}_thaw_GBps"]
            hash_gbps = f"{r['hash_GBps']:.1f}" if r.get("hash_GBps") else "n/a"
            out.append(f"| {r['kv_type']} | {r['flash_attn']} | {r['bytes_per_token']} | {layout} | {off:.2f} "
                       f"| {thaw:.2f} | {off / ceiling:.0%} / {thaw / ceiling:.0%} | {hash_gbps} |")
    return "\n".join(out)


def importance_table(res: dict) -> str:
    out = ["| depth | importance layers | decode ms/step | cost vs off |", "|---|---|---|---|"]
    for depth, sel in res.get("importance", {}).items():
        off = sel["off"]["ms"]
        for name, v in sel.items():
            out.append(f"| {depth} | {name} ({v['n_layers']}) | {v['ms']:.2f} | {100 * (v['ms'] / off - 1):+.1f}% |")
    return "\n".join(out)


def exactness_table(res: dict) -> str:
    out = ["| KV | FA | tokens | moved | offload -> thaw logits bit-identical | freeze vs seq_rm max abs diff |",
           "|---|---|---|---|---|---|"]
    for r in res.get("exactness", []):
        out.append(f"| {r['kv_type']} | {r['flash_attn']} | {r['n_tokens']} | {r['n_moved']} "
                   f"| {r['roundtrip_bit_identical']} | {r['freeze_vs_seq_rm_max_abs']:g} |")
    return "\n".join(out)


def long_summary(res: dict) -> str:
    r = res.get("long")
    if not r or "error" in r:
        return "long-context run: " + (r or {}).get("error", "not run")
    return (f"{r['logical']} logical tokens through a {r['budget_cells']}-cell device budget: prefill {r['prefill_s']:.1f} s, "
            f"decode {r['decode_ms']:.2f} ms/step + controller {r['controller_ms']:.2f} ms/step (medians); device KV "
            f"{r['device_kv_bytes'] / MiB:.0f} MiB, host {r['host_bytes_used'] / MiB:.0f} MiB, the full cache would be "
            f"{r['full_cache_kv_bytes'] / MiB:.0f} MiB; every position accounted for: {r['nothing_lost']}; final counts "
            f"{r['counts']}; whole-GPU memory in use {r['gpu_memory_used_mib']} MiB.")


def plot_long(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = res["long"]["curve"]
    x = np.array([c["logical"] for c in curve])
    per_token = res["long"]["full_cache_kv_bytes"] / res["long"]["logical"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, x * per_token / 2**30, "k--", label="full cache would need")
    ax.plot(x, np.array([c["device_kv_bytes"] for c in curve]) / 2**30, label="device KV (allocated)")
    ax.plot(x, np.array([c["resident"] for c in curve]) * per_token / 2**30, label="device KV (in use)")
    ax.plot(x, np.array([c["host_bytes_used"] for c in curve]) / 2**30, label="host (offloaded)")
    ax.set_xlabel("logical tokens")
    ax.set_ylabel("GiB")
    ax.set_title("64k tokens through a 16k-cell budget (Llama-3-8B shape, f16 KV, H200)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--plot", help="write the memory curve of the long-context run here (PNG, needs matplotlib)")
    args = ap.parse_args()
    with open(args.results) as f:
        res = json.load(f)
    for title, table in (("Exactness", exactness_table), ("Decode: stock vs patched", decode_table),
                         ("Device budgets at 32k logical tokens", budget_table), ("Offload / thaw", moves_table),
                         ("Importance node", importance_table), ("Memory-constrained run", long_summary)):
        print(f"### {title}\n\n{table(res)}\n")
    if args.plot:
        plot_long(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
