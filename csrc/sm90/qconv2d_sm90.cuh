// Definition of run_hybrid_conv (qconv2d_sm90.h): CUTLASS's Hopper int8 conv mainloop
// (conv_sm90.cuh) with the hybrid epilogue tree (hybrid_epilogue.cuh). Included only by the
// instantiation files qconv2d_sm90_t<tile>_<out>.cu, one kernel each.
#pragma once

#include "conv_sm90.cuh"
#include "hybrid_epilogue.cuh"
#include "qconv2d_sm90.h"

namespace hybridops::sm90 {

template <OutKind Out>
using OutElement = std::conditional_t<Out == OutKind::kF32, float,
                                      std::conditional_t<Out == OutKind::kBF16, cutlass::bfloat16_t, uint8_t>>;

template <int TileM, OutKind Out>
LaunchResult run_hybrid_conv(const HybridConvArgs& a, const std::function<void*(size_t)>& alloc,
                             cudaStream_t stream) {
  using ElementOut = OutElement<Out>;
  using Tile = cute::Shape<cute::Int<TileM>, cute::_128, cute::Shape<cute::_128>>;
  using Epi = HybridEpilogue<Tile, ElementOut>;
  using Cfg = S8ConvFprop<TileM, 128, 128, ElementOut, typename Epi::Tree>;
  using Conv = typename Cfg::Conv;

  const auto problem = make_problem<Cfg>(a.geo);
  const auto stride_d = output_stride<Cfg>(problem);
  // Epilogue tree arguments, children first, each node's own last.
  const typename Epi::Activated::Arguments activated{
      {                                          // WithFp
       {                                         // Biased
        {{}, {a.scale, 0.f, {}}, {}},            // Scaled: acc, scale, MulRn
        {a.bias, 0.f, {}},                       // bias (zeros when null, and AddRnIf is off)
        {a.bias != nullptr}},
       a.fp},
      {a.relu}};
  typename Epi::Tree::Arguments tree{};
  if constexpr (Epi::kCodes) {
    tree = {activated, a.quant};
  } else {
    tree = activated;
  }
  const typename Conv::Arguments args{
      problem,
      {a.x, a.w},
      {tree, nullptr, stride_d, static_cast<ElementOut*>(a.out), stride_d}};
  return launch<Conv>(args, alloc, stream);
}

}  // namespace hybridops::sm90
