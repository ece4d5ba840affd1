// Interface between the host op of hybridops._C_sm90 (qconv2d_sm90_op.cu) and the CUTLASS kernel
// instantiations (qconv2d_sm90_t*.cu): plain structs and one function template, no CUTLASS or
// torch types, so that the op's translation unit does not parse CUTLASS's conv headers and each
// instantiation compiles in its own nvcc process (in parallel under ninja).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>

namespace hybridops::sm90 {

// 2-D conv geometry in the order torch spells it: (h, w) pairs, padding (top, bottom, left, right).
struct ConvGeometry {
  int n, h, w, c;  // input NHWC
  int k, r, s;     // filters KRSC (C as above)
  int pad_top, pad_bottom, pad_left, pad_right;
  int stride_h, stride_w, dil_h, dil_w;
};

// The sliced FP branch and its inverse channel map (see Sm90FpBranchAdd in hybrid_epilogue.cuh).
struct FpBranchArgs {
  const void* fp_out = nullptr;  // (M, fp_k) contiguous, DtypeCode fp_dtype (common.cuh); null: none
  int fp_dtype = 0;
  int64_t fp_k = 0;
  const int32_t* first = nullptr;  // (C_out,): first column j of fp_out feeding channel co, or -1
  const int32_t* next = nullptr;   // (fp_k,): next column feeding the same channel, or -1
};

// Re-quantization to one code per byte (eq 6-9).
struct QuantArgs {
  const float* qparams = nullptr;  // device [alpha, beta]
  float levels = 0.f;              // 2^(b-1) - 1 signed, 2^b - 1 unsigned
  bool is_signed = false;
};

struct HybridConvArgs {
  ConvGeometry geo;
  const int8_t* x;      // (N, H, W, C) codes, one per byte
  const int8_t* w;      // (K, R, S, C) codes, one per byte
  const float* scale;   // (K,)
  const float* bias;    // (K,) or null
  FpBranchArgs fp;
  bool relu;
  QuantArgs quant;      // read when the output is codes
  void* out;            // (N, P, Q, K) contiguous
};

enum class OutKind : int { kF32, kBF16, kCodes };

// Outcome of a launch: on failure, the step that failed and CUTLASS's status string.
struct LaunchResult {
  bool ok;
  const char* step;
  const char* status;
};

// CTA tiles M x 128 x 128 (N x K): TileM 128 for large problems, 64 when 128-row tiles would
// leave SMs idle (see tile_m_for in eligible.h).
template <int TileM, OutKind Out>
LaunchResult run_hybrid_conv(const HybridConvArgs& args, const std::function<void*(size_t)>& alloc,
                             cudaStream_t stream);

}  // namespace hybridops::sm90
