#!/usr/bin/env bash
# The CPU's user path (issue 11, item 6): `run --json` with the full cache and at a 25% budget, side by side in one
# run, on Qwen2.5-Coder-0.5B-Instruct Q4_K_M (fetched by the project's own code) with a 4k-token prompt of Python's
# docs and source, 256 generated tokens, 3 interleaved rounds, on --threads ${THREADS:-2}. Run it on quiet cores:
# a machine busy with other work measured 0.58x where a quiet one measured 1.44x (docs/gpu.md, the CPU section).
#
#   bash scripts/cpu_user_path.sh [OUT.json]     # extra arguments for gpu_user_path.py: CPU_USER_ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(python -c "from asrkf_gguf.models import fetch_qwen_coder_model; print(fetch_qwen_coder_model(progress=False))")
python scripts/gpu_user_path.py --model "$model" --tokens 4000 --ctx 8192 --max-tokens 256 --n-gpu-layers 0 \
    --threads "${THREADS:-2}" --rounds 3 --settings full,asrkf-25% ${1:+--json "$1"} ${CPU_USER_ARGS:-}
