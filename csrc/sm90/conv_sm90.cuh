// CUTLASS 3 int8 implicit-GEMM conv fprop for Hopper (sm_90a), with the epilogue as a parameter:
// the one place that assembles CUTLASS's collectives, shared by the hybrid conv of hybridops._C_sm90
// (csrc/sm90/) and the stock baseline of the benchmarks (bench/cutlass_conv/).
//
// The mainloop is what CUTLASS's collective builders make of an int8 fprop: TMA im2col loads of
// the activations, TMA tiled loads of the filters, wgmma with int32 accumulators, the
// warp-specialized producer/consumer schedule. GEMM view: M = N*P*Q output pixels, N = K output
// channels, K = R*S*C filter taps. Layouts (channel-minor, contiguous): activations NHWC int8,
// filters KRSC int8, output NPQK. TMA needs 16-byte rows: C % 16 == 0, and K * sizeof(out) a
// multiple of 16 bytes (checked by can_implement).
//
// Needs the headers of the nvidia-cutlass wheel (cutlass_library/source/include) and
// -gencode=arch=compute_90a,code=sm_90a: wgmma and TMA im2col exist only under the "a" target.
#pragma once

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

#include <cstdint>

#include "qconv2d_sm90.h"  // ConvGeometry, LaunchResult

namespace hybridops::sm90 {

using ElementAct = int8_t;
using ElementFlt = int8_t;
using ElementAcc = int32_t;
using ElementCompute = float;
// One tag for all three tensors: the builders read NHWC for activations, KRSC for filters and
// NPQK for the output (each "channels last").
using LayoutTag = cutlass::layout::TensorNHWC;
constexpr int kAlignIn = 128 / cutlass::sizeof_bits<ElementAct>::value;  // 16 int8 = 16 bytes

// One kernel per CTA tile (M x N x K; K is nested because conv's reduction mode is (C,S,R)),
// output element type and epilogue visitor tree. Cluster 1x1x1.
template <int TileM, int TileN, int TileK, class ElementOut, class EpilogueTree>
struct S8ConvFprop {
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Shape<cute::Int<TileK>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;

  // No source tensor C (ElementC = void): nothing is read but the accumulators and what the tree
  // loads itself.
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
  using StrideD = typename Kernel::StrideD;
};

// CUTLASS's problem shape (packed NHWC / KRSC / NPQK strides, derived by this constructor).
template <class Cfg>
typename Cfg::ProblemShape make_problem(const ConvGeometry& g) {
  return typename Cfg::ProblemShape(cutlass::conv::Mode::kCrossCorrelation, {g.n, g.h, g.w, g.c}, {g.k, g.r, g.s, g.c},
                                    {g.pad_top, g.pad_left}, {g.pad_bottom, g.pad_right}, {g.stride_h, g.stride_w},
                                    {g.dil_h, g.dil_w}, 1);
}

// The epilogue addresses the output through GEMM M = (Q, P, N) (innermost first) and N = K: the
// packed NPQK strides, reversed into that nested M mode.
template <class Cfg>
typename Cfg::StrideD output_stride(const typename Cfg::ProblemShape& problem) {
  typename Cfg::StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Cfg::StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = problem.stride_C[Cfg::ProblemShape::RankT - 2 - i];
  });
  return stride_d;
}

// can_implement, workspace, initialize (builds the TMA descriptors on the host: im2col corners
// depend on the shape), run on `stream`. `alloc(bytes)` returns device memory that outlives the
// launch (the caller's allocator: torch's caching one in both users).
template <class Conv, class Alloc>
LaunchResult launch(const typename Conv::Arguments& args, Alloc&& alloc, cudaStream_t stream) {
  Conv conv;
  cutlass::Status st = conv.can_implement(args);
  if (st != cutlass::Status::kSuccess) return {false, "can_implement", cutlass::cutlassGetStatusString(st)};
  const size_t ws_bytes = Conv::get_workspace_size(args);
  void* workspace = ws_bytes ? alloc(ws_bytes) : nullptr;
  st = conv.initialize(args, workspace, stream);
  if (st != cutlass::Status::kSuccess) return {false, "initialize", cutlass::cutlassGetStatusString(st)};
  st = conv.run(stream);
  if (st != cutlass::Status::kSuccess) return {false, "run", cutlass::cutlassGetStatusString(st)};
  return {true, nullptr, nullptr};
}

}  // namespace hybridops::sm90
