#!/usr/bin/env bash
# Configures and builds zinf (2 parallel jobs by default).
#   scripts/build.sh [BUILD_DIR] [extra cmake -D options...]
# Environment: ZINF_CUDA=AUTO|ON|OFF (default AUTO), JOBS (default 2), BUILD_TYPE (default Release).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build}
shift || true
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" -DZINF_CUDA="${ZINF_CUDA:-AUTO}" "$@"
cmake --build "$build_dir" -j "${JOBS:-2}"
echo "build: $build_dir/tools/zinf"
