// The Python extension module charmlp._C. Importing it loads this shared
// library, whose static initializers register the operators (ops.cpp and the
// backend files) with the PyTorch dispatcher. The module itself only reports
// how it was built, so charmlp can refuse to run against a different torch.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <string>

#include "cpu/context_grouping.h"
#include "cpu/embed_algorithm.h"
#include "cpu/output_gemm.h"

#ifndef CHARMLP_TORCH_VERSION
#error "CMake must define CHARMLP_TORCH_VERSION"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = CHARMLP_TORCH_VERSION;
#ifdef CHARMLP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_arch_list"] = CHARMLP_CUDA_ARCH_LIST;
  info["cuda_version"] = CHARMLP_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_arch_list"] = "";
  info["cuda_version"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = CHARMLP_COMPILER;
  info["cxx_flags"] = CHARMLP_CXX_FLAGS;
  py::list simd;
#ifdef __AVX2__
  simd.append("avx2");
#endif
#ifdef __FMA__
  simd.append("fma");
#endif
#ifdef __AVX512F__
  simd.append("avx512f");
#endif
#ifdef __ARM_NEON
  simd.append("neon");
#endif
  info["simd"] = simd;
  info["parallel"] = at::get_parallel_info();
  return info;
}

void set_embed_algorithm(const std::string& name) {
  using charmlp::EmbedAlgorithm;
  if (name == "auto") {
    charmlp::set_embed_algorithm(EmbedAlgorithm::kAuto);
  } else if (name == "direct") {
    charmlp::set_embed_algorithm(EmbedAlgorithm::kDirect);
  } else if (name == "folded") {
    charmlp::set_embed_algorithm(EmbedAlgorithm::kFolded);
  } else {
    throw py::value_error("charmlp: algorithm must be 'auto', 'direct' or 'folded', got '" + name +
                          "'");
  }
}

void set_output_gemm(const std::string& name) {
  using charmlp::OutputGemm;
  if (name == "auto") {
    charmlp::set_output_gemm(OutputGemm::kAuto);
  } else if (name == "small") {
    charmlp::set_output_gemm(OutputGemm::kSmall);
  } else if (name == "aten") {
    charmlp::set_output_gemm(OutputGemm::kAten);
  } else {
    throw py::value_error("charmlp: output GEMM must be 'auto', 'small' or 'aten', got '" + name +
                          "'");
  }
}

std::string get_output_gemm() {
  switch (charmlp::get_output_gemm()) {
    case charmlp::OutputGemm::kSmall: return "small";
    case charmlp::OutputGemm::kAten: return "aten";
    default: return "auto";
  }
}

std::string get_embed_algorithm() {
  switch (charmlp::get_embed_algorithm()) {
    case charmlp::EmbedAlgorithm::kDirect: return "direct";
    case charmlp::EmbedAlgorithm::kFolded: return "folded";
    default: return "auto";
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "charmlp native extension: registers the charmlp::* operators";
  m.def("build_info", &build_info,
        "How this extension was built: torch version, CUDA and arch list, OpenMP, compiler, SIMD.");
  m.def("_set_embed_algorithm", &set_embed_algorithm,
        "Force the CPU embed_linear_tanh algorithm: 'auto' (cost model), 'direct' or 'folded'.");
  m.def("_get_embed_algorithm", &get_embed_algorithm);
  m.def("_set_context_grouping", &charmlp::set_context_grouping,
        "Switch the CPU mlp_sgd_step's grouping of rows by context on (default) or off.");
  m.def("_get_context_grouping", &charmlp::get_context_grouping);
  m.def("_set_output_gemm", &set_output_gemm,
        "Force the CPU linear_cross_entropy GEMMs: 'auto' (by head size), 'small' (the fused "
        "chunk loop) or 'aten' (row blocks through ATen's GEMMs).");
  m.def("_get_output_gemm", &get_output_gemm);
}
