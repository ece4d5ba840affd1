// Registration of the hybridops CUDA ops and the hybridops._C Python module.
//
// The schemas are declared once here with TORCH_LIBRARY_FRAGMENT because the Python side
// (hybridops/ops/custom_ops.py) defines other ops of the same `hybridops` namespace through
// torch.library; the CUDA kernels are then registered for the CUDA dispatch key. Fake (shape)
// implementations live in Python (hybridops/ops/cuda_ext.py). Argument order and meaning follow
// hybridops/ops/reference.py exactly.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>
#include <cuda_runtime_api.h>

#include "ops.h"

#ifndef HYBRIDOPS_CUDA_ARCHS
#define HYBRIDOPS_CUDA_ARCHS "unknown"
#endif

TORCH_LIBRARY_FRAGMENT(hybridops, m) {
  m.def("cuda_fake_quantize(Tensor x, Tensor qparams, int bits, bool signed) -> Tensor");
  m.def(
      "cuda_quantize_activate(Tensor x, Tensor qparams, int bits, bool signed, Tensor? bn_scale, "
      "Tensor? bn_shift, bool relu, Tensor? keep_idx, ScalarType? slice_dtype) -> (Tensor, Tensor)");
  m.def(
      "cuda_qconv2d(Tensor x_codes, Tensor w_packed, int in_channels, int bits_a, bool a_signed, int bits_w, "
      "Tensor scale, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
      "Tensor? fp_out, Tensor? fp_idx, Tensor? requant_qparams, int requant_bits, bool requant_signed, "
      "ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridops, CUDA, m) {
  m.impl("cuda_fake_quantize", &hybridops::fake_quantize_cuda);
  m.impl("cuda_quantize_activate", &hybridops::quantize_activate_cuda);
  m.impl("cuda_qconv2d", &hybridops::qconv2d_cuda);
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
        info["qconv2d_kernels"] = py::make_tuple("mma_128x128", "mma_64x64", "mma_32x64", "direct");
        return info;
      },
      "Versions and GPU architectures this extension was built for (a dict).");
  m.def("qconv2d_plan", &hybridops::qconv2d_plan, py::arg("m"), py::arg("cin_per_group"),
        py::arg("cout_per_group"), py::arg("groups"), py::arg("packed_requant"), py::arg("sm_count"),
        "Kernel qconv2d runs for an implicit GEMM with m = N*Ho*Wo rows on a GPU with sm_count SMs.");
}
