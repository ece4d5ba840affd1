// Stock CUTLASS 3 int8 conv fprop for Hopper, as a torch extension: the baseline our own kernels
// are measured against in bench/bench_kernels.py (providers cutlass_s8_<tile>).
//
// Nothing here is tuned: the kernel is what CUTLASS's collective builders make of an int8
// implicit-GEMM fprop (TMA im2col loads of the activations, TMA tiled loads of the filters,
// wgmma with int32 accumulators, warp-specialized producer/consumer schedule), with an epilogue
// visitor tree that scales each output channel in fp32 and rounds to bf16 (CUTLASS's own
// multiply node). GEMM view of fprop: M = N*P*Q output pixels, N = K output channels,
// K = R*S*C filter taps.
//
// Layouts (all channel-minor, contiguous): activations NHWC int8, filters KRSC int8, output
// NPQK bf16, scale fp32[K]. TMA needs 16-byte rows, so C % 16 == 0 and K % 8 == 0 (checked by
// the kernel's can_implement, reported as an error).

#include <torch/extension.h>
// c10's stream and guard headers rather than ATen/cuda/CUDAContext.h, which pulls in cuSPARSE
// and cuBLAS headers that the development machines' minimal CUDA toolkit lacks (and this file
// does not use).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// The CUTLASS conv assembly (collective builders, problem shape, output strides, launch) is the
// one hybridops' own Hopper kernel uses: csrc/sm90/conv_sm90.cuh. Only the epilogue differs.
#include "sm90/conv_sm90.cuh"

namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
namespace sm90 = hybridops::sm90;

using ElementOut = cutlass::bfloat16_t;

// Cluster 1x1x1, the configurations measured in docs/gpu.md. out[m, k] =
// bf16_rn(scale[k] * float(acc[m, k])): the scale varies along GEMM N (output channels), a row
// vector broadcast down the M rows (Sm90RowBroadcast, stride (0, 1, 0)).
template <int TileM, int TileN, int TileK>
struct Stock {
  using TileShape = Shape<Int<TileM>, Int<TileN>, Shape<Int<TileK>>>;
  using ScaleBroadcast =
      fusion::Sm90RowBroadcast<0, TileShape, sm90::ElementCompute, sm90::ElementCompute, Stride<_0, _1, int64_t>>;
  using EpilogueTree = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::multiplies, ElementOut, sm90::ElementCompute, cutlass::FloatRoundStyle::round_to_nearest>,
      ScaleBroadcast, fusion::Sm90AccFetch>;
  using Cfg = sm90::S8ConvFprop<TileM, TileN, TileK, ElementOut, EpilogueTree>;
};

template <class Cfg>
void run_conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, torch::Tensor& out,
              const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
              const std::vector<int64_t>& dilation) {
  using Conv = typename Cfg::Conv;
  // Symmetric padding.
  const sm90::ConvGeometry geo{int(x.size(0)), int(x.size(1)), int(x.size(2)), int(x.size(3)),
                               int(w.size(0)), int(w.size(1)), int(w.size(2)),
                               int(pad[0]), int(pad[0]), int(pad[1]), int(pad[1]),
                               int(stride[0]), int(stride[1]), int(dilation[0]), int(dilation[1])};
  const auto problem = sm90::make_problem<Cfg>(geo);
  const auto stride_d = sm90::output_stride<Cfg>(problem);
  typename Conv::Arguments args{
      problem,
      {reinterpret_cast<const sm90::ElementAct*>(x.data_ptr<int8_t>()),
       reinterpret_cast<const sm90::ElementFlt*>(w.data_ptr<int8_t>())},
      {// Epilogue tree arguments, children first: scale vector, accumulator fetch, multiply.
       {{scale.data_ptr<float>(), 0.f, {}}, {}, {}},
       nullptr, stride_d,  // no source C
       reinterpret_cast<ElementOut*>(out.data_ptr<at::BFloat16>()), stride_d}};
  std::vector<torch::Tensor> workspaces;
  auto alloc = [&](size_t bytes) {
    workspaces.push_back(torch::empty({static_cast<int64_t>(bytes)}, x.options().dtype(torch::kUInt8)));
    return workspaces.back().data_ptr();
  };
  const sm90::LaunchResult res = sm90::launch<Conv>(args, alloc, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(res.ok, "CUTLASS conv ", res.step, " failed (", res.status,
              "): it needs C % 16 == 0, K % 8 == 0 and padding within TMA im2col limits.");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using Tile128x128 = Stock<128, 128, 128>::Cfg;
using Tile64x128 = Stock<64, 128, 128>::Cfg;

}  // namespace

// x: (N, H, W, C) int8 contiguous; w: (K, R, S, C) int8 contiguous; scale: (K,) fp32;
// stride, pad, dilation: [h, w]; tile_m: 128 or 64 (CTA tile 128x128x128 or 64x128x128).
// Returns (N, P, Q, K) bf16 contiguous.
torch::Tensor conv2d_s8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                        std::vector<int64_t> stride, std::vector<int64_t> pad, std::vector<int64_t> dilation,
                        int64_t tile_m) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && scale.is_cuda(), "conv2d_s8: all tensors must be on the GPU");
  TORCH_CHECK(x.scalar_type() == torch::kInt8 && w.scalar_type() == torch::kInt8, "conv2d_s8: x and w must be int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32, "conv2d_s8: scale must be float32");
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && x.is_contiguous() && w.is_contiguous(),
              "conv2d_s8: x must be contiguous (N, H, W, C) and w contiguous (K, R, S, C)");
  TORCH_CHECK(w.size(3) == x.size(3), "conv2d_s8: groups == 1 only (w's C must equal x's C)");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0) && scale.is_contiguous(),
              "conv2d_s8: scale must be a contiguous vector of K output-channel scales");
  TORCH_CHECK(stride.size() == 2 && pad.size() == 2 && dilation.size() == 2,
              "conv2d_s8: stride, pad and dilation are [h, w] pairs");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t p = (x.size(1) + 2 * pad[0] - dilation[0] * (w.size(1) - 1) - 1) / stride[0] + 1;
  const int64_t q = (x.size(2) + 2 * pad[1] - dilation[1] * (w.size(2) - 1) - 1) / stride[1] + 1;
  auto out = torch::empty({x.size(0), p, q, w.size(0)}, x.options().dtype(torch::kBFloat16));
  if (tile_m == 128) {
    run_conv<Tile128x128>(x, w, scale, out, stride, pad, dilation);
  } else {
    TORCH_CHECK(tile_m == 64, "conv2d_s8: tile_m must be 128 or 64, got ", tile_m);
    run_conv<Tile64x128>(x, w, scale, out, stride, pad, dilation);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv2d_s8", &conv2d_s8,
        "Stock CUTLASS 3 Hopper int8 conv fprop: x NHWC int8, w KRSC int8, per-channel fp32 scale -> NPQK bf16",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("stride"), py::arg("pad"), py::arg("dilation"),
        py::arg("tile_m"));
}
