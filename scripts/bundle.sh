#!/usr/bin/env bash
# A relocatable zinf for GPU hosts: bin/zinf (and, with --tests, the GoogleTest binaries) plus
# lib/ with every shared library they need except the C/C++ runtime and the CUDA/NVIDIA ones, which
# the GPU host provides (driver, CUDA runtime libraries with cuBLASLt, NCCL). The binaries carry
# RPATH $ORIGIN/../lib, so the folder runs from anywhere: copy it over and run bin/zinf.
#   scripts/bundle.sh [--tests] [BUILD_DIR] [OUT_DIR]     (defaults: build, dist/zinf-<version>)
# Needs a configured and built BUILD_DIR (scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
if [[ ${1:-} == --tests ]]; then tests=1; shift; fi
build=${1:-build}
[[ -f $build/CMakeCache.txt ]] || { echo "bundle: $build is not a configured build directory; run scripts/build.sh first" >&2; exit 1; }
version=$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$build/CMakeCache.txt")
out=${2:-dist/zinf-${version:-dev}}
rm -rf "$out"
cmake --install "$build" --prefix "$out" --strip >/dev/null
if [[ $tests == 1 ]]; then
  cmake --build "$build" -j "${JOBS:-2}" --target zinf_runtime_tests zinf_offload_tests zinf_io_tests zinf_kernels_cpu_tests zinf_model_reference_tests >/dev/null
  cmake --install "$build" --prefix "$out" --strip --component tests >/dev/null
fi
mkdir -p "$out/lib"
# Libraries the host provides: glibc, the compiler runtime, and everything CUDA/NVIDIA.
keep_out='^(libc|libm|libdl|librt|libpthread|ld-linux[^ ]*|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvidia[^ ]*|linux-vdso)\.so'
for bin in "$out"/bin/*; do
  ldd "$bin" | awk '/=> \//{print $1, $3}' | while read -r name path; do
    if [[ $name =~ $keep_out ]]; then continue; fi
    [[ -e $out/lib/$name ]] || cp -L "$path" "$out/lib/$name"
  done
done
# The bundled libraries' own dependencies are bundled too (the binaries' DT_RPATH, unlike a
# RUNPATH, also serves the libraries they load).
for lib in "$out"/lib/*; do
  ldd "$lib" 2>/dev/null | awk '/=> \//{print $1, $3}' | while read -r name path; do
    if [[ $name =~ $keep_out ]]; then continue; fi
    [[ -e $out/lib/$name ]] || cp -L "$path" "$out/lib/$name"
  done
done
cat > "$out/README.txt" <<TXT
zinf ${version} bundle. Run bin/zinf (see 'bin/zinf --help'). On a GPU host it needs an NVIDIA
driver, the CUDA 13 runtime libraries with cuBLASLt (found in /usr/local/cuda/lib64 or through
LD_LIBRARY_PATH), and NCCL (libnccl.so.2, or the file ZINF_NCCL_LIBRARY names) for NCCL ranks.
Everything else is in lib/.
TXT
echo "bundle: $out ($(du -sh "$out" | cut -f1)); bin: $(ls "$out/bin" | tr '\n' ' ')"
