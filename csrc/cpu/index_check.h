// Range checks for index tensors on CPU. Never skipped: an out-of-range index
// would otherwise read or write outside a parameter table.
#pragma once

#include "cpu/capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>

#include "checks.h"

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Returns idx as a contiguous int64 tensor (a no-op for contiguous int64 input)
// after checking that every value lies in [0, bound) or equals `allowed`.
inline at::Tensor checked_indices_cpu(const at::Tensor& idx, int64_t bound, const char* name,
                                      std::optional<int64_t> allowed = std::nullopt) {
  // (The common case, contiguous int64 already, skips the dispatcher call of .to().)
  at::Tensor out =
      idx.scalar_type() == at::kLong ? idx.contiguous() : idx.to(at::kLong).contiguous();
  const int64_t* p = out.const_data_ptr<int64_t>();
  const int64_t skip = allowed.value_or(-1);
  const bool has_skip = allowed.has_value();
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = p[i];
      if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(bound) && !(has_skip && v == skip)) {
        throw_index_out_of_range(name, v, bound, i);
      }
    }
  });
  return out;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
