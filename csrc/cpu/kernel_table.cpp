// One capability's CPU kernels as a table (compiled once per capability, like the
// kernels; cpu_dispatch.cpp chooses among the tables).
#include "cpu/kernels.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

const CpuKernels& kernel_table() {
  static const CpuKernels table{
#define CHARMLP_CPU_KERNEL_ENTRY(op) &op##_cpu,
      CHARMLP_FOR_EACH_CPU_OP(CHARMLP_CPU_KERNEL_ENTRY)
#undef CHARMLP_CPU_KERNEL_ENTRY
  };
  return table;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
