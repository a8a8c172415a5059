#!/usr/bin/env bash
# From a fresh clone: install dependencies, build, and run zinf's main job: `zinf train` on the
# embedded default (a small byte-level Llama on the corpus in configs/data/, the
# deepspeed_zero3_cpuoffload preset; a few minutes on 2 CPU cores). Extra arguments go to
# `zinf train` (e.g. --max-steps 50 --output-dir output/try).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build >/dev/null
build/tools/zinf --version
build/tools/zinf train "$@"
