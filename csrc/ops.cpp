// Registration of the hybridops CUDA ops and the hybridops._C Python module.
//
// The schemas are declared once here with TORCH_LIBRARY_FRAGMENT because the Python side
// (hybridops/ops/custom_ops.py) defines other ops of the same `hybridops` namespace through
// torch.library; the CUDA kernels are then registered for the CUDA dispatch key. Fake (shape)
// implementations live in Python (hybridops/ops/cuda_ext.py). Argument order and meaning follow
// hybridops/ops/reference.py exactly.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>
#include <cuda_runtime_api.h>

#include <atomic>

#include "ops.h"
#include "sm90/eligible.h"

#ifndef HYBRIDOPS_CUDA_ARCHS
#define HYBRIDOPS_CUDA_ARCHS "unknown"
#endif

TORCH_LIBRARY_FRAGMENT(hybridops, m) {
  m.def("cuda_fake_quantize(Tensor x, Tensor qparams, int bits, bool signed) -> Tensor");
  m.def(
      "cuda_quantize_activate(Tensor x, Tensor qparams, int bits, bool signed, Tensor? bn_scale, "
      "Tensor? bn_shift, bool relu, Tensor? fp_in_idx, ScalarType? slice_dtype) -> (Tensor, Tensor)");
  m.def(
      "cuda_quantize_activate_flagged(Tensor x, Tensor qparams, int bits, bool signed, Tensor? bn_scale, "
      "Tensor? bn_shift, bool relu, Tensor? fp_in_idx, ScalarType? slice_dtype) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_qconv2d(Tensor x_codes, Tensor w_packed, int in_channels, int bits_a, bool a_signed, int bits_w, "
      "Tensor scale, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
      "Tensor? fp_out, Tensor? fp_out_idx, Tensor? requant_qparams, int requant_bits, bool requant_signed, "
      "ScalarType out_dtype) -> Tensor");
}

namespace hybridops {
namespace {

// torch.ops.hybridops.cuda_qconv2d_sm90, registered by the optional extension hybridops._C_sm90
// (csrc/sm90/: CUTLASS's Hopper conv mainloop with the hybrid epilogue, built only when the
// CUTLASS headers are present and 9.0a is among the archs). Looked up through the dispatcher
// rather than linked, so that this extension builds and loads without it; null until that
// module is imported (hybridops/ops/cuda_ext.py imports it next to this one).
using Sm90Qconv = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, int64_t, const at::Tensor&,
                             const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                             int64_t, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, int64_t, bool, at::ScalarType, int64_t);

const c10::TypedOperatorHandle<Sm90Qconv>* sm90_qconv() {
  // Published once found, atomically (calls may come from several threads); the handle is
  // deliberately never freed, as operator registrations live for the process.
  static std::atomic<const c10::TypedOperatorHandle<Sm90Qconv>*> handle{nullptr};
  if (auto* h = handle.load(std::memory_order_acquire)) return h;
  auto op = c10::Dispatcher::singleton().findSchema({"hybridops::cuda_qconv2d_sm90", ""});
  if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return nullptr;
  auto* fresh = new c10::TypedOperatorHandle<Sm90Qconv>(op->typed<Sm90Qconv>());
  const c10::TypedOperatorHandle<Sm90Qconv>* expected = nullptr;
  if (!handle.compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) {
    delete fresh;
    return expected;
  }
  return fresh;
}

// The cuda backend's qconv2d: the CUTLASS Hopper kernel where it applies (sm_90, one-byte codes,
// TMA-aligned channels; sm90/eligible.h) unless a test forces a hand-written kernel
// (set_qconv2d_plan_override), the hand-written kernels of qconv2d.cu otherwise.
at::Tensor qconv2d_dispatch(
    const at::Tensor& x_codes, const at::Tensor& w_packed, int64_t in_channels, int64_t bits_a, bool a_signed,
    int64_t bits_w, const at::Tensor& scale, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    const std::optional<at::Tensor>& fp_out, const std::optional<at::Tensor>& fp_out_idx,
    const std::optional<at::Tensor>& requant_qparams, int64_t requant_bits, bool requant_signed,
    at::ScalarType out_dtype) {
  if (!qconv2d_plan_forced() &&
      sm90::qconv2d_eligible(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                             dilation, groups, fp_out, fp_out_idx, requant_qparams, requant_bits, out_dtype)) {
    if (auto op = sm90_qconv()) {
      // Straight to its CUDA kernel: this call is already past autograd and the other keys.
      return op->redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), x_codes, w_packed, in_channels, bits_a,
                            a_signed, bits_w, scale, bias, stride, padding, dilation, groups, relu, fp_out, fp_out_idx,
                            requant_qparams, requant_bits, requant_signed, out_dtype, /*tile_m=*/0);
    }
  }
  return qconv2d_cuda(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                      dilation, groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed,
                      out_dtype);
}

}  // namespace
}  // namespace hybridops

TORCH_LIBRARY_IMPL(hybridops, CUDA, m) {
  m.impl("cuda_fake_quantize", &hybridops::fake_quantize_cuda);
  m.impl("cuda_quantize_activate", &hybridops::quantize_activate_cuda);
  m.impl("cuda_quantize_activate_flagged", &hybridops::quantize_activate_flagged_cuda);
  m.impl("cuda_qconv2d", &hybridops::qconv2d_dispatch);
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridops CUDA kernels; importing this module registers the torch.ops.hybridops.cuda_* ops.";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["ops_version"] = hybridops::kOpsVersion;
        info["cuda_archs"] = HYBRIDOPS_CUDA_ARCHS;
        info["cuda_runtime"] = CUDART_VERSION;
        info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                        std::to_string(TORCH_VERSION_PATCH);
        py::list kernels;
        for (const auto& k : hybridops::qconv2d_kernels()) kernels.append(k);
        info["qconv2d_kernels"] = py::tuple(kernels);
        // Whether hybridops._C_sm90 has registered its kernel in this process (it is a separate,
        // optional extension; see qconv2d_dispatch).
        info["qconv2d_sm90"] = hybridops::sm90_qconv() != nullptr;
        return info;
      },
      "Versions and GPU architectures this extension was built for (a dict).");
  m.def("qconv2d_plan", &hybridops::qconv2d_plan, py::arg("m"), py::arg("cin_per_group"),
        py::arg("cout_per_group"), py::arg("groups"), py::arg("packed_requant"), py::arg("sm_count"),
        py::arg("s4") = false,
        "Kernel qconv2d runs for an implicit GEMM with m = N*Ho*Wo rows on a GPU with sm_count SMs; s4: both "
        "operands packed on a GPU with 4-bit tensor cores (compute capability 8.x).");
  m.def("set_qconv2d_plan_override", &hybridops::set_qconv2d_plan_override, py::arg("plan"),
        "Force the qconv2d kernel (a name of build_info()['qconv2d_kernels']) where a tensor-core tile may run; "
        "'' restores qconv2d_plan's choice. For tests and the GPU suite's per-template checks.");
  m.def("qconv2d_plan_forced", &hybridops::qconv2d_plan_forced,
        "Whether set_qconv2d_plan_override currently forces a qconv2d kernel.");
}
