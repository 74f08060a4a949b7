// Process-wide switch for the CPU mlp_sgd_step's context grouping (on by default):
// the step runs once per distinct context of the batch, with the rows' target
// histograms, when that pays (see mlp_cpu.cpp). Off runs every row; the
// switch exists for the tests (both paths on the same batches) and the benchmark
// that measures what grouping buys (charmlp._C._set_context_grouping).
#pragma once

namespace charmlp {

void set_context_grouping(bool enabled);
bool get_context_grouping();

}  // namespace charmlp
