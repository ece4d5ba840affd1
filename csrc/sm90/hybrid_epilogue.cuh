// The hybrid epilogue of qconv2d as a CUTLASS 3 epilogue visitor tree (EVT) for Hopper:
//
//   y = float(acc) * scale[co]            (Sm90RowBroadcast + MulRn)
//   y = y + bias[co]                      (Sm90RowBroadcast + AddRnIf; skipped without a bias)
//   y = y + fp_out[m, j], j along the     (Sm90FpBranchAdd, a custom node: the sliced FP branch
//       chain of columns that feed co      added through the inverse channel map)
//   y = relu(y)                           (ReluIf)
//   out = bf16/fp32(y), or the code of y  (the tree's last conversion, or QuantCodes)
//
// in hybridops/ops/reference.py qconv2d's fp32 order, each operation rounded on its own: the
// functors call __fmul_rn / __fadd_rn, which nvcc never contracts into an FMA (a plain a * b + c
// across two EVT nodes would be contracted once inlined, and codes at rounding boundaries would
// differ from the reference).
#pragma once

#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"

#include "../common.cuh"
#include "qconv2d_sm90.h"  // FpBranchArgs, QuantArgs

namespace hybridops::sm90 {

namespace fusion = cutlass::epilogue::fusion;

// A switch carried as the Arguments of a compute node: Sm90Compute hands a functor's Arguments
// to it on every call. Shared by the scalar and array instantiations of a functor (Sm90Compute
// builds the Arguments type from ComputeFn<float> and calls ComputeFn<Array<float, N>>).
struct Switch {
  bool on = false;
};

template <class T>
struct MulRn {
  CUTLASS_DEVICE T operator()(T const& a, T const& b) const {
    T r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) r[i] = __fmul_rn(a[i], b[i]);
    return r;
  }
};

// a + b, or a unchanged when off: adding the zeros that a missing bias broadcasts would turn a
// -0.0 into +0.0, which the reference (no add at all) keeps.
template <class T>
struct AddRnIf {
  using Arguments = Switch;
  CUTLASS_DEVICE T operator()(T const& a, T const& b, Arguments const& args) const {
    if (!args.on) return a;
    T r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) r[i] = __fadd_rn(a[i], b[i]);
    return r;
  }
};

// torch.relu: negative values to 0, NaN kept (y < 0 is false for NaN).
template <class T>
struct ReluIf {
  using Arguments = Switch;
  CUTLASS_DEVICE T operator()(T const& a, Arguments const& args) const {
    if (!args.on) return a;
    T r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i) r[i] = a[i] < 0.f ? 0.f : a[i];
    return r;
  }
};

// Re-quantization to one code per byte (5-8 bits; eq 6-9, quant_code of common.cuh): signed codes
// as int8 bit patterns, unsigned ones up to 255, as kernels/packing.py stores them.
template <class T>
struct QuantCodes {
  using Arguments = QuantArgs;
  // auto: Sm90Compute also instantiates QuantCodes<float> (for Arguments), where T::kElements
  // does not exist.
  CUTLASS_DEVICE auto operator()(T const& y, Arguments const& args) const {
    const float alpha = args.qparams[0], beta = args.qparams[1];
    cutlass::Array<uint8_t, T::kElements> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < T::kElements; ++i)
      r[i] = static_cast<uint8_t>(static_cast<int>(quant_code<float>(y[i], alpha, beta, args.levels, args.is_signed)));
    return r;
  }
};

// A custom EVT node with one child (the scaled, biased value): adds the FP branch's outputs
// through the inverse channel map built per call from fp_out_idx (qconv2d_sm90_op.cu): first[co] is
// the first column j of fp_out with fp_out_idx[j] == co (or -1), next[j] the following column with the
// same channel (or -1). A channel fed by several columns (fp_out_idx may repeat; reference.qconv2d's
// index_add then adds each in index order) walks its chain; distinct indices give chains of one.
// It reads global memory directly in visit(): each element needs its own (pixel, column) of
// fp_out, a gather no broadcast node expresses, and fp_k is usually a small fraction of C_out.
struct Sm90FpBranchAdd {
  struct SharedStorage {};
  using Arguments = FpBranchArgs;
  using Params = FpBranchArgs;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE Sm90FpBranchAdd() {}
  CUTLASS_HOST_DEVICE Sm90FpBranchAdd(Params const& params, SharedStorage const&) : params(params) {}

  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::detail::ProducerLoadArgs<Args...> const&) {
    return fusion::detail::EmptyProducerLoadCallbacks{};
  }

  template <class CTensor, class Bound>
  struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCc_, Bound bound_, Params const& params_)
        : tCc(tCc_), bound(bound_), params(params_) {}

    CTensor tCc;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) absolute (m, n, l) of each accumulator
    Bound bound;  // (M, N, L)
    Params const& params;

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<float, FragmentSize> const& frg_y) {
      cutlass::Array<float, FragmentSize> y = frg_y;
      if (params.fp_out == nullptr) return y;
      auto c_mn = tCc(cute::_, cute::_, cute::_, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        auto crd = c_mn(epi_v * FragmentSize + i);
        // Tile residue: rows past M and columns past C_out are computed but never stored.
        if (!cute::elem_less(crd, bound)) continue;
        const int64_t row = static_cast<int64_t>(cute::get<0>(crd)) * params.fp_k;
        for (int j = params.first[cute::get<1>(crd)]; j >= 0; j = params.next[j])
          y[i] = __fadd_rn(y[i], load_as_float(params.fp_out, row + j, params.fp_dtype));
      }
      return y;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    // For the im2col fprop the epilogue's M is the linearized pixel index n*P*Q + p*Q + q, the
    // row of fp_out (N, P, Q, fp_k); partitioned like the accumulators, as Sm90ColBroadcast does.
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto mCrd = cute::make_identity_tensor(cute::make_shape(M, N, L));
    auto tCc = fusion::detail::sm90_partition_for_epilogue<ReferenceSrc>(
        mCrd, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
    auto bound = cute::make_coord(M, N, L);
    return ConsumerStoreCallbacks<decltype(tCc), decltype(bound)>(tCc, bound, params);
  }
};

// The tree for a CTA tile shape and output element: float (bf16, fp32) outputs convert y with
// round-to-nearest (tensor.to(dtype)); uint8 outputs are requantized codes.
template <class TileShape, class ElementOut>
struct HybridEpilogue {
  static constexpr bool kCodes = std::is_same_v<ElementOut, uint8_t>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  // Per-output-channel vectors vary along GEMM N: row vectors broadcast down the M rows,
  // stride (0, 1, 0), staged through shared memory once per CTA tile.
  using ChannelVector = fusion::Sm90RowBroadcast<0, TileShape, float, float, cute::Stride<cute::_0, cute::_1, int64_t>>;
  using Scaled = fusion::Sm90EVT<fusion::Sm90Compute<MulRn, float, float, kRound>, fusion::Sm90AccFetch, ChannelVector>;
  using Biased = fusion::Sm90EVT<fusion::Sm90Compute<AddRnIf, float, float, kRound>, Scaled, ChannelVector>;
  using WithFp = fusion::Sm90EVT<Sm90FpBranchAdd, Biased>;
  using Activated =
      fusion::Sm90EVT<fusion::Sm90Compute<ReluIf, std::conditional_t<kCodes, float, ElementOut>, float, kRound>, WithFp>;
  using Tree = std::conditional_t<kCodes, fusion::Sm90EVT<fusion::Sm90Compute<QuantCodes, uint8_t, float, kRound>, Activated>,
                                  Activated>;
};

}  // namespace hybridops::sm90
