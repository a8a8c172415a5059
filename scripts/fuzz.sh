#!/usr/bin/env bash
# Builds the config-parser fuzzer with clang (libFuzzer + AddressSanitizer + UBSan) and runs it.
#   scripts/fuzz.sh [SECONDS]     (default 60; the corpus grows in build-fuzz/corpus)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  echo "fuzz.sh: needs clang and libFuzzer: sudo apt-get install clang libclang-rt-dev" >&2
  exit 1
fi
cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DZINF_CUDA=OFF \
  -DZINF_FUZZ=ON -DZINF_SANITIZE="address;undefined" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j2 --target zinf_config_fuzzer
mkdir -p build-fuzz/corpus
# Seeds: every preset and test config (selector byte 0x0e = JSON, 0x0f = YAML; see config_fuzzer.cpp)
# and every past finding. A new crash/timeout file lands in the current directory: move it to
# tests/fuzz/regressions/ with the fix.
for f in configs/presets/*.json tests/data/real_world/*.json tests/data/*.json tests/data/invalid/*; do
  { printf '\x0e'; cat "$f"; } >"build-fuzz/corpus/seed_$(basename "$f")"
done
for f in configs/presets/*.yaml tests/data/real_world/*.yaml tests/data/*.yaml; do
  { printf '\x0f'; cat "$f"; } >"build-fuzz/corpus/seed_$(basename "$f")"
done
cp tests/fuzz/regressions/* build-fuzz/corpus/
exec build-fuzz/tests/zinf_config_fuzzer -max_total_time="$seconds" -max_len=16384 -timeout=10 \
  -rss_limit_mb=2048 build-fuzz/corpus
