#!/usr/bin/env bash
# On a CUDA machine with no network: build with CUDA from a carried llama.cpp source, run the test suite with the
# model and KV cache on the GPU, and measure offload/thaw throughput between device and pinned host memory.
#   .device/llama.cpp : unpatched llama.cpp of llama-cpp-python 0.3.36 (vendor/llama.cpp, trimmed)
#   .device/whl       : wheels missing there (cffi, pycparser, gguf, diskcache, llama-cpp-python built pure)
# scripts/prepare_device_carry.sh fills both; then call the device tool with carry [".device"].
set -euo pipefail
OUT=${OUT:-/tmp/asrkf-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi -L

# The image's default C++ compiler (/opt/gcc) gives a libggml-cuda that exports thousands of libstdc++ template
# instances; libllama then binds std::ostream calls to them and crashes in llama_model_load (seen 2026-11-28).
# The system compiler, which matches the system libstdc++, builds a working library.
ASRKF_CUDA_CMAKE_ARGS=${ASRKF_CUDA_CMAKE_ARGS:-"-DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++"}

t0=$(date +%s)
rm -rf /tmp/asrkf
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 $ASRKF_CUDA_CMAKE_ARGS" ASRKF_LLAMA_CPP_SOURCE="$PWD/.device/llama.cpp" \
    python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/asrkf . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PYTHONPATH=/tmp/asrkf:/tmp/site ASRKF_GGUF_CACHE=/tmp/cache
ls /tmp/asrkf/asrkf_gguf/lib

# the demo and Gemma models cannot be fetched there: the tiny written models cover the GPU paths
ASRKF_TEST_N_GPU_LAYERS=99 python3 -m pytest -q -x tests -k "not demo_model and not iswa" -p no:cacheprovider \
    2>&1 | tee "$OUT/tests.log" | tail -5

python3 - <<'PY' 2>&1 | tee "$OUT/moves.log"
import sys
sys.path.insert(0, "scripts")
import asrkf_gguf
from asrkf_gguf.testmodels import TinyModelSpec, tiny_model
import bench_native as b
spec = TinyModelSpec(arch="llama", n_layer=8, n_embd=1024, n_head=8, n_head_kv=8, head_dim=128, n_ff=1024,
                     n_vocab=512, dtype="f16")
path = str(tiny_model(spec))
# f16 with flash attention off stores V transposed: a copy per channel and run, too slow for this size
for kv, fa in (("f16", "on"), ("q8_0", "on"), ("q4_0", "on")):
    r = b.bench_moves(path, kv, fa, 8192, 2048, 5, n_gpu_layers=99)
    print(kv, fa, {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}, "bytes/token", r["bytes_per_token"])
PY
