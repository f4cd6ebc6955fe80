#!/usr/bin/env bash
# One command for a CUDA machine with no network: build the project with CUDA, run the test suite on the GPU,
# write the benchmark model and run every benchmark (scripts/gpu_bench.py), printing a table and writing JSON.
#
#   bash scripts/gpu_bench.sh [build] [test] [bench] [user] [sessions] [eval]  # no argument: build test bench user
#
# test: the suite on the GPU (GPU_TEST_ARGS: other pytest arguments than `tests`, e.g. one file).
# sessions: scripts/bench_sessions.py on the model with a vocabulary, 8k and 30k tokens, full cache and 25%:
# switching back to a parked chat vs prefilling it again.
# eval: the quality evaluation (python -m asrkf_gguf eval) on the GPU with a real model that the caller put there
# (GPU_EVAL_MODEL: a GGUF path, e.g. Qwen2.5-Coder-0.5B-Instruct Q4_K_M; the essays, if a task needs them, in
# $ASRKF_GPU_WORK/cache/paul_graham_essays), every layer on the GPU; GPU_EVAL_ARGS: the grid (tasks, ctx, budgets,
# depths, seeds, policies, --time-limit); results in $ASRKF_GPU_WORK/eval (resumed when it holds results.json),
# copied to $OUT/eval_results.json and $OUT/eval_report.md.
# user: the user's path (scripts/gpu_user_path.py): `run --json` with the full cache and at a 25% budget on the
# benchmark model written with a real vocabulary and chat template (.device/vocab-qwen2.json.gz, from
# prepare_device_carry.sh), a 30k-token prompt, 3 interleaved rounds; GPU_USER_ARGS adds arguments.
#
# Needs, in $ASRKF_DEVICE_CARRY (default .device), from scripts/prepare_device_carry.sh (run where pip can download):
#   .device/llama.cpp : the unpatched llama.cpp of llama-cpp-python 0.3.36, trimmed to the CPU and CUDA backends
#   .device/whl       : wheels the GPU image lacks (cffi, pycparser, gguf, diskcache, llama-cpp-python built pure)
# Everything it builds or writes stays under $ASRKF_GPU_WORK (default build/gpu, ignored by git); results go to $OUT
# (default $ASRKF_GPU_WORK/out). ASRKF_GPU_STOCK=0 skips the stock libllama (the decode comparison then runs
# without it), for a quicker build when only the other sections are wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${ASRKF_GPU_WORK:-$root/build/gpu}
carry=${ASRKF_DEVICE_CARRY:-$root/.device}
OUT=${OUT:-$work/out}
mkdir -p "$work" "$OUT"
phases=${*:-build test bench user}
export PYTHONUNBUFFERED=1

site=$work/site
if [ ! -d "$site/llama_cpp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry"/whl/*.whl
fi
export PYTHONPATH=$work/asrkf:$site ASRKF_GGUF_CACHE=$work/cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
lib=$work/asrkf/asrkf_gguf/lib
stock=$work/stock-lib

# The image's default compiler (/opt/gcc) built a libggml-cuda whose libstdc++ instances libllama bound to, and
# model loading crashed; the system compiler plus the version script in CMakeLists.txt keep the backends' symbols
# their own. ASRKF_CUDA_CMAKE_ARGS overrides the compiler choice.
cmake_args=${ASRKF_CUDA_CMAKE_ARGS:-"-DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++"}

build_stock() {
    # the unpatched libllama of the same commit, same compiler; it runs on the CUDA build's ggml libraries
    # (llama.cpp's src/ has no backend-specific code, so one libllama serves every ggml build of its commit)
    cmake -S "$carry/llama.cpp" -B "$work/stock-build" -G Ninja -DCMAKE_BUILD_TYPE=Release $cmake_args \
        -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' > "$OUT/stock-build.log" 2>&1
    cmake --build "$work/stock-build" --target llama -j 4 >> "$OUT/stock-build.log" 2>&1
}

if [[ " $phases " == *" build "* ]]; then
    t0=$(date +%s)
    stock_pid=
    if [ "${ASRKF_GPU_STOCK:-1}" != 0 ]; then build_stock & stock_pid=$!; fi
    rm -rf "$work/asrkf"
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90} $cmake_args" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    ASRKF_LLAMA_CPP_SOURCE="$carry/llama.cpp" \
        python3 -m pip install -q --no-build-isolation --no-deps --target "$work/asrkf" . > "$OUT/build.log" 2>&1 \
        || { tail -40 "$OUT/build.log"; exit 1; }
    echo "patched CUDA build: $(( $(date +%s) - t0 )) s"
    if [ -n "$stock_pid" ]; then
        wait $stock_pid || { tail -20 "$OUT/stock-build.log"; exit 1; }
        rm -rf "$stock" && mkdir -p "$stock"
        cp -P "$work"/stock-build/bin/libllama.so* "$stock/"
        for f in "$lib"/libggml*; do ln -s "$f" "$stock/"; done
        echo "stock libllama: $(( $(date +%s) - t0 )) s"
    fi
    # exported C++ symbols of the CUDA backend: 0 expected with the version script
    echo "libggml-cuda exports $(nm -D --defined-only "$lib"/libggml-cuda.so* | grep -c ' _Z' || true) C++ symbols"
fi

if [[ " $phases " == *" test "* ]]; then
    # the models that must be downloaded are skipped; the written tiny models cover the GPU paths
    ASRKF_TEST_NO_FETCH=1 ASRKF_TEST_N_GPU_LAYERS=99 python3 -m pytest -q ${GPU_TEST_ARGS:-tests} -p no:cacheprovider \
        2>&1 | tee "$OUT/tests.log" | tail -15
    grep -qE "[0-9]+ passed" "$OUT/tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/tests.log"
fi

if [[ " $phases " == *" bench "* ]]; then
    model=$work/llama3-8b-shape-q4_k_m.gguf
    if [ ! -f "$model" ]; then
        t0=$(date +%s)
        python3 scripts/write_bench_model.py "$model.tmp" && mv "$model.tmp" "$model"
        echo "benchmark model: $(( $(date +%s) - t0 )) s"
    fi
    nproc; lscpu | grep -m1 "Model name" || true
    stock_arg=(); [ -d "$stock" ] && stock_arg=(--stock-lib "$stock")
    python3 scripts/gpu_bench.py --model "$model" ${stock_arg[@]+"${stock_arg[@]}"} --json "$OUT/gpu_bench.json" ${GPU_BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log"
    # the final tables (docs/gpu.md shows them for the H200)
    python3 scripts/gpu_report.py "$OUT/gpu_bench.json" | tee "$OUT/report.md"
fi

vmodel=$work/llama3-8b-shape-vocab-q4_k_m.gguf
write_vocab_model() {
    if [ ! -f "$vmodel" ]; then
        t0=$(date +%s)
        python3 scripts/write_bench_model.py "$vmodel.tmp" --vocab "$carry/vocab-qwen2.json.gz" && mv "$vmodel.tmp" "$vmodel"
        echo "benchmark model with a vocabulary: $(( $(date +%s) - t0 )) s"
    fi
}

if [[ " $phases " == *" user "* ]]; then
    write_vocab_model
    python3 scripts/gpu_user_path.py --model "$vmodel" --json "$OUT/gpu_user_path.json" ${GPU_USER_ARGS:-} \
        2>&1 | tee "$OUT/user_path.log"
fi

if [[ " $phases " == *" sessions "* ]]; then
    write_vocab_model
    for n in ${GPU_SESSION_TOKENS:-8000 30000}; do
        for budget in full 0.25; do
            b=(); [ "$budget" != full ] && b=(--kv-budget "$budget")
            python3 scripts/bench_sessions.py --model "$vmodel" --tokens "$n" ${b[@]+"${b[@]}"} --n-gpu-layers 99 \
                --text stdlib --json "$OUT/sessions_${n}_${budget}.json" > "$OUT/sessions_${n}_${budget}.log" 2>&1 \
                || { tail -20 "$OUT/sessions_${n}_${budget}.log"; exit 1; }
            python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], {k: d[k] for k in
                ('prefill_s', 'park_ms', 'switch_ms', 'switch_speedup', 'save_ms', 'load_ms', 'file_bytes')})" \
                "$OUT/sessions_${n}_${budget}.json" "$n" "$budget"
        done
    done
fi

if [[ " $phases " == *" eval "* ]]; then
    [ -f "${GPU_EVAL_MODEL:-}" ] || { echo "eval: GPU_EVAL_MODEL must name a GGUF file"; exit 1; }
    # the cases and plots stay on the machine ($ASRKF_GPU_WORK/eval, resumed by a later call): only the results
    # and the report come back
    python3 -m asrkf_gguf eval --model "$GPU_EVAL_MODEL" --n-gpu-layers 99 --out "$work/eval" ${GPU_EVAL_ARGS:-} \
        > "$work/eval.log" 2>&1 || { tail -30 "$work/eval.log"; exit 1; }
    tail -25 "$work/eval.log"
    cp "$work/eval/results.json" "$OUT/eval_results.json"
    [ -f "$work/eval/report.md" ] && cp "$work/eval/report.md" "$OUT/eval_report.md"
fi
