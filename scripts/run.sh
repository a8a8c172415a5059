#!/usr/bin/env bash
# From a fresh clone: install dependencies, build, and run zinf's main job. Until `zinf train`
# lands this validates and summarises the default preset (the config `zinf train` will use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build >/dev/null
build/tools/zinf --version
build/tools/zinf config check deepspeed_zero3_cpuoffload --micro-batch 4 --grad-accum 2 --lr 3e-4 --bf16 --hidden-size 768
