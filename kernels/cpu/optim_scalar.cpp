// Optimizer kernels, scalar build (no ISA flags): the reference the SIMD builds match bit for bit.
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "optim_tables.hpp"

namespace zinf::kernels::cpu::detail {
namespace {
#include "zinf/kernels/half_impl.inc"
#include "optim_scalar_traits.inc"
#include "optim_generic.inc"
}  // namespace

const KernelTable& scalar_table() {
  static const KernelTable table = TableBuilder<ScalarV, ScalarV>::build();
  return table;
}

}  // namespace zinf::kernels::cpu::detail
