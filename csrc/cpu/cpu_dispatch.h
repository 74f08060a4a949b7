// Which capability's CPU kernels (cpu/capability.h) the ops run.
#pragma once

#include <string>
#include <vector>

namespace charmlp {

// The capabilities this library was built with, baseline first ("default", "avx2", ...).
std::vector<std::string> compiled_cpu_capabilities();
// Those of them this CPU (and its OS) can run.
std::vector<std::string> supported_cpu_capabilities();
// The one in use: at load, the last supported one.
std::string cpu_capability();
// Switches every op's CPU kernels to `name`; a ValueError (c10::ValueError) names the
// value when it was not compiled or this CPU cannot run it. The Python package applies
// CHARMLP_CPU_CAPABILITY through this at import.
void set_cpu_capability(const std::string& name);

}  // namespace charmlp
