#!/usr/bin/env bash
# From a fresh clone: install dependencies, build, run the whole test suite.
#   scripts/test.sh              the README's test command (GPU tests skip without a GPU)
#   scripts/test.sh --sanitize   host-only tests under AddressSanitizer + UBSan (build-asan/, no CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if [[ ${1:-} == --sanitize ]]; then
  BUILD_TYPE=Debug ZINF_CUDA=OFF scripts/build.sh build-asan -DZINF_SANITIZE="address;undefined" -DZINF_WERROR=ON
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  ctest --test-dir build-asan -L host --output-on-failure -j 2
else
  scripts/build.sh build -DZINF_WERROR=ON
  ctest --test-dir build --output-on-failure -j 2
fi
