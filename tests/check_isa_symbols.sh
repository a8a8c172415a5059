#!/usr/bin/env bash
# The per-ISA kernel objects (compiled with -mavx2/-mavx512*) must define no weak or unique
# symbols: the linker keeps one copy of such a symbol for the whole program, and if it kept the
# copy compiled with AVX flags, code meant for any x86-64 CPU would run AVX instructions.
# Usage: check_isa_symbols.sh OBJECT... (the objects of zinf_kernels; others are ignored)
set -u
status=0
checked=0
for o in "$@"; do
  case "$o" in
    *optim_avx2*|*optim_avx512*) ;;
    *) continue ;;
  esac
  checked=$((checked + 1))
  shared=$(nm "$o" | awk 'NF == 3 && $2 ~ /^[WVu]$/ { print $3 }' | c++filt)
  if [[ -n $shared ]]; then
    echo "FAIL: $o defines symbols the linker may share with other files:"
    echo "$shared"
    status=1
  fi
done
if [[ $checked -eq 0 ]]; then echo "FAIL: no per-ISA objects given"; exit 1; fi
echo "checked $checked per-ISA object(s)"
exit $status
