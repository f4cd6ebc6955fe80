"""A quick multi-turn passkey check of the CLI (the full evaluation harness is issue 4).

Turn 1 gives a filler document with a pass key at some depth and asks something unrelated; turn 2 asks for the
key, after the freeze/offload/eviction decisions were made. Each policy runs through `python -m asrkf_gguf run`.

  python scripts/multiturn_passkey.py [--model GGUF] [--repeats 60] [--budget 384] [--policies full,asrkf,h2o,window]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CASES = [(68421, 0.1), (30517, 0.3), (92844, 0.5), (17203, 0.7), (55190, 0.9)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="GGUF (default: the demo model)")
    ap.add_argument("--repeats", type=int, default=60, help="filler sentences groups (60: ~1.5k tokens)")
    ap.add_argument("--budget", default="384", help="--kv-budget for the budgeted policies")
    ap.add_argument("--policies", default="full,asrkf,h2o,window")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        turns_path = os.path.join(tmp, "turns.json")
        for key, depth in CASES:
            parts = [FILLER] * args.repeats
            parts.insert(int(args.repeats * depth), f"The pass key is {key}. Remember it. {key} is the pass key. ")
            turns = ["".join(parts) + "\nWhat color is the sky? Answer in one word.",
                     "What is the pass key? Answer with the number only."]
            with open(turns_path, "w") as f:
                json.dump(turns, f)
            for policy in args.policies.split(","):
                cmd = [sys.executable, "-m", "asrkf_gguf", "run", *([args.model] if args.model else []),
                       "--turns-file", turns_path, "--max-tokens", "12", "--temp", "0", "--json", "--policy", policy,
                       "--ctx", "4096"]
                if policy != "full":
                    cmd += ["--kv-budget", args.budget]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    print(f"{policy}: {r.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                    results.setdefault(policy, []).append(False)
                    continue
                out = json.loads(r.stdout)
                results.setdefault(policy, []).append(str(key) in out["turns"][1])
                print(f"depth {depth:.1f} {policy:7s} logical {out['kv']['logical_tokens']:5d} "
                      f"resident peak {out['kv']['resident_cells_peak']:4d}  answer: {out['turns'][1][:40]!r}")
    print("\n| policy | keys found |\n|---|---|")
    for policy, ok in results.items():
        print(f"| {policy} | {sum(ok)}/{len(ok)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
