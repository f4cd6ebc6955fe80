#!/usr/bin/env bash
# The subset of the issue-4 grid run on the project's 2-core CPU machine (docs/evaluation.md), in priority order.
# Each stage adds to the same resumable results file; re-running skips what is done.
#   OUT=/path/to/dir scripts/eval_cpu_subset.sh
set -euo pipefail
OUT=${OUT:?set OUT to the results directory}
EVAL="python -m asrkf_gguf eval --model qwen --threads ${THREADS:-2} --out $OUT --no-report"

# A: passkey single- and multi-turn at 2k, three budgets, three depths
$EVAL --tasks passkey,passkey-mt --ctx 2048 --budgets 0.5,0.25,0.125 --depths 0.1,0.5,0.9 \
      --policies full,full-q8_0,full-q4_0,window,h2o,asrkf
# B: asrkf without entropy recovery at 25%
$EVAL --tasks passkey,passkey-mt --ctx 2048 --budgets 0.25 --depths 0.1,0.5,0.9 --policies asrkf-norec
# C: KL / top-1 agreement: a 1,536-token prose prompt + 512 teacher-forced tokens of its real continuation
$EVAL --tasks kl --ctx 2048 --kl-tokens 512 --budgets 0.25 \
      --policies full,full-q8_0,full-q4_0,window,h2o,asrkf-norec,asrkf
$EVAL --tasks kl --ctx 2048 --kl-tokens 512 --budgets 0.125 --policies window,h2o,asrkf
# D: passkey single- and multi-turn at 4k, 25%
$EVAL --tasks passkey,passkey-mt --ctx 4096 --budgets 0.25 --depths 0.1,0.5,0.9 --policies full,window,h2o,asrkf
# E: needles in prose at 4k, 25%
$EVAL --tasks niah,niah-mt --ctx 4096 --budgets 0.25 --depths 0.1,0.5 --policies full,h2o,asrkf
$EVAL --tasks multikey,vartrack --ctx 4096 --budgets 0.25 --depths 0.5 --policies full,h2o,asrkf
# F (if time allows): the memory-matched quantized caches and asrkf-norec at 4k, 8k multi-turn
$EVAL --tasks passkey,passkey-mt --ctx 4096 --budgets 0.25 --depths 0.1,0.5,0.9 \
      --policies full-q8_0,full-q4_0,asrkf-norec
$EVAL --tasks passkey-mt --ctx 8192 --budgets 0.25 --depths 0.5 --policies full,h2o,asrkf
# G: ablation, recall without pooling (the first version's recall)
$EVAL --tasks passkey,passkey-mt --ctx 2048 --budgets 0.25,0.125 --depths 0.1,0.5,0.9 --policies asrkf-nopool
$EVAL --tasks niah,niah-mt --ctx 4096 --budgets 0.25 --depths 0.1,0.5 --policies asrkf-nopool
# H: the GPU setting (every 4th layer scored, docs/gpu.md) beside the default at 25%
$EVAL --tasks passkey,passkey-mt --ctx 2048,4096 --budgets 0.25 --depths 0.1,0.5,0.9 --policies asrkf-l4
$EVAL --tasks kl --ctx 2048 --kl-tokens 512 --budgets 0.25 --policies asrkf-l4
$EVAL --tasks niah,niah-mt --ctx 4096 --budgets 0.25 --depths 0.1,0.5 --policies asrkf-l4
$EVAL --tasks multikey,vartrack --ctx 4096 --budgets 0.25 --depths 0.5 --policies asrkf-l4
python -m asrkf_gguf eval-report "$OUT"
