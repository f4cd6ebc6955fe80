#!/usr/bin/env bash
# Fill .device/ (ignored by git) with what scripts/gpu_bench.sh needs on a GPU machine that cannot download:
# the unpatched llama.cpp source of llama-cpp-python 0.3.36, trimmed to the CPU, CUDA and RPC backends and the RPC server (~22 MB), and
# the wheels missing from that machine's Python 3.12 image. Run from the repository root, with network access.
set -euo pipefail
cache=${ASRKF_GGUF_CACHE:-$HOME/.cache/asrkf-gguf}/src
sdist=$cache/llama_cpp_python-0.3.36.tar.gz
mkdir -p "$cache" .device/whl
[ -f "$sdist" ] || python3 -m pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$cache"
echo "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e  $sdist" | sha256sum -c -

rm -rf .device/llama.cpp
tmp=$(mktemp -d)
tar -xzf "$sdist" -C "$tmp" llama_cpp_python-0.3.36/vendor/llama.cpp
src=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
mkdir -p .device/llama.cpp
for x in CMakeLists.txt LICENSE cmake include src ggml vendor common; do cp -r "$src/$x" .device/llama.cpp/; done
# the RPC server's source (the build's ggml-rpc-server, tests/test_rpc.py)
mkdir -p .device/llama.cpp/tools
cp -r "$src/tools/rpc" .device/llama.cpp/tools/
find .device/llama.cpp/ggml/src -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu ! -name ggml-cuda ! -name ggml-rpc \
    -exec rm -rf {} +
rm -rf "$tmp"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/whl cffi pycparser gguf diskcache
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python3 -m pip wheel -q --no-deps -w .device/whl "$sdist"
# the tokenizer of Qwen2.5-Coder-0.5B (fetched by the project's own code): the benchmark model's vocabulary
qwen=$(python3 -c "from asrkf_gguf.models import fetch_qwen_coder_model; print(fetch_qwen_coder_model(progress=False))")
python3 scripts/extract_vocab.py "$qwen" .device/vocab-qwen2.json.gz
du -sh .device
