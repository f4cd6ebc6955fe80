#!/usr/bin/env bash
# Build libllama (the patched llama.cpp + native/src) and libggml with AddressSanitizer + UndefinedBehaviorSanitizer
# into their own folder, then run the test suite against that build (docs/native.md, "Sanitizers").
#
#   scripts/sanitize.sh                      # build, then the whole tests/ folder
#   scripts/sanitize.sh tests/test_errors.py # build, then what pytest is given
#
# Environment: SANITIZE_BUILD_DIR (default build/sanitize), PYTHON (default python3; must have the project's test
# dependencies), JOBS (default nproc), ASRKF_LLAMA_CPP_SOURCE (as for the normal build), SANITIZE_SKIP_BUILD=1 (reuse
# the build as it is). Python itself is not instrumented, so libasan is preloaded into it (and its children).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build=${SANITIZE_BUILD_DIR:-$root/build/sanitize}
py=${PYTHON:-python3}
san="-fsanitize=address,undefined -fno-omit-frame-pointer"

if [ "${SANITIZE_SKIP_BUILD:-0}" != 1 ]; then
    # RelWithDebInfo: -O2 -g, so reports carry file:line; GGML_NATIVE as in the normal build
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGGML_NATIVE=ON \
        -DCMAKE_C_FLAGS="$san" -DCMAKE_CXX_FLAGS="$san" \
        -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
    cmake --build "$build" -j"${JOBS:-$(nproc)}"
fi

libdir="$build/bin"
if [ ! -f "$libdir/libllama.so" ]; then
    echo "sanitize.sh: no libllama.so in $libdir" >&2
    exit 1
fi
libasan=$(gcc -print-file-name=libasan.so)
# libstdc++ preloaded too: ASan resolves the real __cxa_throw when it starts, and Python loads libstdc++ only later
# with libllama, so without it the first C++ throw dies in ASan's CHECK "real___cxa_throw != 0"
libstdcxx=$(gcc -print-file-name=libstdc++.so.6)
for f in "$libasan" "$libstdcxx"; do
    if [ ! -f "$f" ]; then
        echo "sanitize.sh: gcc does not know where $(basename "$f") is ($f)" >&2
        exit 1
    fi
done

cd "$root"
if [ $# -eq 0 ]; then
    set -- tests
fi
# reports go to files as well as stderr: pytest captures a test's stderr, and a process the sanitizer stops takes
# that capture with it
reports="$build/reports"
mkdir -p "$reports"
find "$reports" -type f -name 'san.*' -delete
# detect_leaks=0: CPython and numpy keep allocations to exit, which LeakSanitizer would report from the preload
# halt_on_error: the first report fails the process (and so the test) instead of scrolling past
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:print_summary=1:log_path=$reports/san.asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/san.ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
rc=0
ASRKF_GGUF_LIB_DIR="$libdir" PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" LD_PRELOAD="$libasan $libstdcxx" \
    "$py" -m pytest -q -p no:cacheprovider "$@" || rc=$?
found=$(find "$reports" -type f -name 'san.*' | sort)
if [ -n "$found" ]; then
    echo "sanitize.sh: sanitizer reports:" >&2
    for f in $found; do
        echo "==== $f" >&2
        head -n 60 "$f" >&2
    done
    [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
