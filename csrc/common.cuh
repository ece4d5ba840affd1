// Shared device helpers of the hybridops CUDA kernels: the quantizer arithmetic (the contract
// of hybridops/ops/reference.py, bit for bit) and small dtype utilities.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace hybridops {

// Runtime dtype codes passed to kernels whose outputs or side inputs may take several float
// dtypes: a uniform switch costs less than multiplying template instantiations (build time).
enum DtypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// The quantizer math must not be contracted into FMAs: the reference computes
// u = mag * alpha + beta with two roundings, and codes must match it bitwise.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Largest code magnitude: 2^(b-1) - 1 for signed codes (eq 7), 2^b - 1 unsigned (eq 9).
__host__ __device__ __forceinline__ int quant_levels(int bits, bool is_signed) {
  return is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

// Integer code of t as a float (eq 6-7 if signed, else eq 8-9), in the reference's order:
// mag = |t| or t; u = clamp(mag * alpha + beta, 0, 1); q = floor(u * levels + 0.5); q *= sign(t).
// A NaN input ends as code 0, the reference's nan_to_num result (see the clamp below).
template <typename T>
__device__ __forceinline__ T quant_code(T t, T alpha, T beta, T lv, bool is_signed) {
  T mag = is_signed ? fabs(t) : t;
  T u = add_rn(mul_rn(mag, alpha), beta);
  // Written so that NaN fails the first test and becomes code 0, as in the reference.
  u = u > T(0) ? (u < T(1) ? u : T(1)) : T(0);
  T q = floor(add_rn(mul_rn(u, lv), T(0.5)));
  if (is_signed) q = t > T(0) ? q : (t < T(0) ? -q : T(0));
  return q;
}

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Round-to-nearest conversion from fp32, as tensor.to(dtype) does.
__device__ __forceinline__ void store_from_float(void* p, int64_t i, int dtype, float v) {
  switch (dtype) {
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

__device__ __forceinline__ int64_t load_index(const void* p, int64_t j, bool is64) {
  return is64 ? static_cast<const int64_t*>(p)[j] : static_cast<int64_t>(static_cast<const int32_t*>(p)[j]);
}

}  // namespace hybridops
