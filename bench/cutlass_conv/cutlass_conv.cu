// Stock CUTLASS 3 int8 conv fprop for Hopper, as a torch extension: the baseline our own kernels
// are measured against in bench/bench_kernels.py (providers cutlass_s8_<tile>).
//
// Nothing here is tuned: the kernel is what CUTLASS's collective builders make of an int8
// implicit-GEMM fprop (TMA im2col loads of the activations, TMA tiled loads of the filters,
// wgmma with int32 accumulators, warp-specialized producer/consumer schedule), with an epilogue
// visitor tree that scales each output channel in fp32 and rounds to bf16. GEMM view of fprop:
// M = N*P*Q output pixels, N = K output channels, K = R*S*C filter taps.
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

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
// Included first because CUTLASS 4.2's conv collective headers use KernelHardwareInfo without
// including its header themselves.
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"

namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

using ElementAct = int8_t;
using ElementFlt = int8_t;
using ElementAcc = int32_t;
using ElementCompute = float;
using ElementOut = cutlass::bfloat16_t;
// One tag for all three tensors: the builders read NHWC for activations, KRSC for filters and
// NPQK for the output (each "channels last").
using LayoutTag = cutlass::layout::TensorNHWC;
constexpr int kAlignIn = 128 / cutlass::sizeof_bits<ElementAct>::value;    // 16 int8 = 16 bytes
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;   // 8 bf16 = 16 bytes

// One kernel per CTA tile (M x N x K; K is nested because conv's reduction mode is (C,S,R)).
// Cluster 1x1x1, the configurations measured in docs/gpu.md.
template <int TileM, int TileN, int TileK>
struct S8ConvFprop {
  using TileShape = Shape<Int<TileM>, Int<TileN>, Shape<Int<TileK>>>;
  using ClusterShape = Shape<_1, _1, _1>;

  // out[m, k] = bf16_rn(scale[k] * float(acc[m, k])). The scale varies along GEMM N (output
  // channels), i.e. it is a row vector broadcast down the M rows: Sm90RowBroadcast, stride
  // (0, 1, 0). There is no source tensor C (ElementC = void), so nothing is read but the
  // accumulators and the scale.
  using ScaleBroadcast =
      fusion::Sm90RowBroadcast<0, TileShape, ElementCompute, ElementCompute, Stride<_0, _1, int64_t>>;
  using EpilogueTree = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::multiplies, ElementOut, ElementCompute, cutlass::FloatRoundStyle::round_to_nearest>,
      ScaleBroadcast, fusion::Sm90AccFetch>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutTag, kAlignOut,
      ElementOut, LayoutTag, kAlignOut,
      cutlass::epilogue::TmaWarpSpecialized, EpilogueTree>::CollectiveOp;

  // The plain warp-specialized schedule: it is what KernelScheduleAuto picks for conv on sm90,
  // and the only one ConvUniversal specializes for Hopper in CUTLASS 4.2. Stages fill the
  // shared memory the epilogue leaves free.
  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      ElementAct, LayoutTag, kAlignIn,
      ElementFlt, LayoutTag, kAlignIn,
      ElementAcc, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<CollectiveMainloop::DispatchPolicy::ConvOp,
                                                       CollectiveMainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <class Cfg>
void run_conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, torch::Tensor& out,
              const std::vector<int64_t>& stride, const std::vector<int64_t>& pad,
              const std::vector<int64_t>& dilation) {
  using Conv = typename Cfg::Conv;
  using ProblemShape = typename Cfg::ProblemShape;
  const int n = x.size(0), h = x.size(1), wd = x.size(2), c = x.size(3);
  const int k = w.size(0), r = w.size(1), s = w.size(2);

  // Packed NHWC / KRSC strides are derived by this constructor; symmetric padding.
  ProblemShape problem(cutlass::conv::Mode::kCrossCorrelation, {n, h, wd, c}, {k, r, s, c},
                       {int(pad[0]), int(pad[1])}, {int(pad[0]), int(pad[1])},
                       {int(stride[0]), int(stride[1])}, {int(dilation[0]), int(dilation[1])}, 1);

  // The epilogue addresses the output through GEMM M = (Q, P, N) (innermost first) and N = K:
  // copy the packed NPQK strides into that nested M mode, reversed.
  using StrideD = typename Cfg::Kernel::StrideD;
  StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = problem.stride_C[ProblemShape::RankT - 2 - i];
  });

  typename Conv::Arguments args{
      problem,
      {reinterpret_cast<const ElementAct*>(x.data_ptr<int8_t>()),
       reinterpret_cast<const ElementFlt*>(w.data_ptr<int8_t>())},
      {// Epilogue tree arguments, children first: scale vector, accumulator fetch, multiply.
       {{scale.data_ptr<float>(), 0.f, {}}, {}, {}},
       nullptr, stride_d,  // no source C
       reinterpret_cast<ElementOut*>(out.data_ptr<at::BFloat16>()), stride_d}};

  Conv conv;
  cutlass::Status st = conv.can_implement(args);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "CUTLASS conv cannot run this problem (",
              cutlass::cutlassGetStatusString(st), "): it needs C % 16 == 0, K % 8 == 0 and padding within TMA im2col limits.");
  auto workspace = torch::empty({static_cast<int64_t>(Conv::get_workspace_size(args))},
                                x.options().dtype(torch::kUInt8));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  // initialize() builds the TMA descriptors on the host (im2col corners depend on the shape),
  // then run() launches on torch's current stream.
  st = conv.initialize(args, workspace.data_ptr(), stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "CUTLASS conv initialize failed: ", cutlass::cutlassGetStatusString(st));
  st = conv.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "CUTLASS conv launch failed: ", cutlass::cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using Tile128x128 = S8ConvFprop<128, 128, 128>;
using Tile64x128 = S8ConvFprop<64, 128, 128>;

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
