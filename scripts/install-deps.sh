#!/usr/bin/env bash
# Installs every Debian package zinf builds with, idempotently (nothing is fetched when all are
# present). The CUDA Toolkit is not a Debian package: zinf finds it under /usr/local/cuda or on PATH
# and builds the CPU backend alone without it.
#   scripts/install-deps.sh [--fuzz]    (--fuzz adds clang + libFuzzer for scripts/fuzz.sh)
set -euo pipefail

packages=(
  build-essential cmake pkg-config git python3
  libfmt-dev libspdlog-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev
  libtbb-dev liburing-dev libdnnl-dev libxxhash-dev libsentencepiece-dev libgloo-dev
  libgtest-dev libgmock-dev
  python3-torch   # PyTorch reference tests (tests/reference/), run with /usr/bin/python3
  python3-matplotlib  # training_curves.png (tools/plot_training.py)
)
if [[ ${1:-} == --fuzz ]]; then
  packages+=(clang libclang-rt-dev)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
