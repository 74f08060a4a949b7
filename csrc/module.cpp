// The Python extension module charmlp._C. Importing it loads this shared
// library, whose static initializers register the operators (ops.cpp and the
// backend files) with the PyTorch dispatcher. The module reports how it was built,
// so charmlp can refuse to run against a different torch, and has eager entry points
// for the layer ops (see below).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/python.h>  // at::Tensor <-> torch.Tensor for pybind11

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/context_grouping.h"
#include "cpu/cpu_dispatch.h"
#include "op_handles.h"
#include "cpu/embed_algorithm.h"
#include "cpu/output_gemm.h"
#include "kernel_impl.h"

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
  // The CPU kernels' instruction sets (cpu/capability.h); the one in use is added by
  // charmlp.build_info(), since it can change after import.
  info["cpu_capabilities"] = charmlp::compiled_cpu_capabilities();
  info["cpu_capabilities_supported"] = charmlp::supported_cpu_capabilities();
  info["cpu_capability_flags"] = CHARMLP_CPU_CAPABILITY_FLAGS;
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

// kernel_impl.h: the fast kernels or the kernel tour's naive ones.
void set_kernel_impl(const std::string& name) {
  if (name == "fast") {
    charmlp::set_kernel_impl(charmlp::KernelImpl::kFast);
  } else if (name == "naive") {
    charmlp::set_kernel_impl(charmlp::KernelImpl::kNaive);
  } else {
    throw py::value_error("charmlp: kernel implementation (name) must be 'fast' or 'naive', got '" +
                          name + "'");
  }
}

std::string get_kernel_impl() {
  return charmlp::get_kernel_impl() == charmlp::KernelImpl::kNaive ? "naive" : "fast";
}

std::string get_embed_algorithm() {
  switch (charmlp::get_embed_algorithm()) {
    case charmlp::EmbedAlgorithm::kDirect: return "direct";
    case charmlp::EmbedAlgorithm::kFolded: return "folded";
    default: return "auto";
  }
}

// Eager entry points: the very dispatcher ops of torch.ops.charmlp (so autocast, autograd,
// the CPU/CUDA kernels and dispatch-level transforms all apply), called through pybind11
// instead of torch.ops' schema-driven argument parsing, and returning only what the
// Python functions return. torch.ops costs 1.5-2 us a call, as much as a whole B = 32
// cross-entropy. python/charmlp/ops.py uses these outside torch.compile and without a
// __torch_function__ override or mode; everywhere else it calls torch.ops.
using OptTensor = std::optional<at::Tensor>;

at::Tensor eager_embed_linear_tanh(const at::Tensor& idx, const at::Tensor& table,
                                   const at::Tensor& weight, const OptTensor& bias) {
  static auto op = charmlp::op_handle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const OptTensor&)>(
      "charmlp::embed_linear_tanh");
  return op.call(idx, table, weight, bias);
}

at::Tensor eager_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                               int64_t reduction, int64_t ignore_index, double label_smoothing,
                               const OptTensor& weight) {
  static auto op = charmlp::op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, const OptTensor&)>(
      "charmlp::cross_entropy");
  return std::get<0>(op.call(logits, target, reduction, ignore_index, label_smoothing, weight));
}

at::Tensor eager_linear_cross_entropy(const at::Tensor& input, const at::Tensor& weight,
                                      const OptTensor& bias, const at::Tensor& target,
                                      int64_t reduction, int64_t ignore_index,
                                      double label_smoothing, const OptTensor& class_weight) {
  static auto op = charmlp::op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, int64_t, int64_t,
      double, const OptTensor&)>("charmlp::linear_cross_entropy");
  return std::get<0>(op.call(input, weight, bias, target, reduction, ignore_index,
                             label_smoothing, class_weight));
}

using TensorArg = const at::Tensor&;

at::Tensor eager_mlp_cross_entropy(TensorArg idx, TensorArg target, TensorArg table, TensorArg w1, TensorArg b1,
                                   TensorArg w2, TensorArg b2) {
  static auto op = charmlp::op_handle<at::Tensor(TensorArg, TensorArg, TensorArg, TensorArg, TensorArg, TensorArg, TensorArg)>(
      "charmlp::mlp_cross_entropy");
  return op.call(idx, target, table, w1, b1, w2, b2);
}

std::tuple<at::Tensor, at::Tensor> eager_mlp_logits_cross_entropy(TensorArg idx, TensorArg target,
                                                                  TensorArg table, TensorArg w1, TensorArg b1,
                                                                  TensorArg w2, TensorArg b2) {
  static auto op = charmlp::op_handle<std::tuple<at::Tensor, at::Tensor>(
      TensorArg, TensorArg, TensorArg, TensorArg, TensorArg, TensorArg, TensorArg)>("charmlp::mlp_logits_cross_entropy");
  return op.call(idx, target, table, w1, b1, w2, b2);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "charmlp native extension: registers the charmlp::* operators";
  m.def("build_info", &build_info,
        "How this extension was built: torch version, CUDA and arch list, OpenMP, compiler, SIMD.");
  m.def("_cpu_capability", &charmlp::cpu_capability,
        "The instruction set of the CPU kernels in use: 'default', 'avx2' or 'avx512'.");
  m.def("_set_cpu_capability", &charmlp::set_cpu_capability,
        "Run the CPU kernels compiled for this instruction set (ValueError if not compiled or "
        "not supported by this CPU).");
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
  m.def("_set_kernel_impl", &set_kernel_impl,
        "Run embed_linear_tanh and cross_entropy (forward and backward, CPU and CUDA) with the "
        "'fast' kernels (default) or the kernel tour's 'naive' ones.");
  m.def("_kernel_impl", &get_kernel_impl);
  // Errors reach Python as torch.ops would raise them (IndexError, ValueError, TypeError,
  // NotImplementedError, ...), not as pybind11's generic RuntimeError.
  py::register_local_exception_translator([](std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const c10::Error&) {
      torch::translate_exception_to_python(e);
    }  // anything else (pybind11's own value_error, ...) goes on to pybind11's translators
  });
  // The GIL is released while an op runs, as torch's own bindings do.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("_eager_embed_linear_tanh", &eager_embed_linear_tanh, release());
  m.def("_eager_cross_entropy", &eager_cross_entropy, release());
  m.def("_eager_linear_cross_entropy", &eager_linear_cross_entropy, release());
  m.def("_eager_mlp_cross_entropy", &eager_mlp_cross_entropy, release());
  m.def("_eager_mlp_logits_cross_entropy", &eager_mlp_logits_cross_entropy, release());
}
