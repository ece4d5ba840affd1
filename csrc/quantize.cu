// Elementwise quantizers: fake_quantize (code / levels in the input dtype) and the fused
// quantize-activate pass (folded BN, ReLU, eq 8-9 or 6-7, nibble packing, channel slice).
// Both are memory-bound: they are written for wide loads and one pass over the input.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// CUDA toolkit (CI) may not ship.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"
#include "ops.h"

namespace hybridops {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct ComputeType { using type = float; };
template <>
struct ComputeType<double> { using type = double; };

template <typename scalar_t>
__device__ __forceinline__ typename ComputeType<scalar_t>::type to_compute(scalar_t v) {
  return static_cast<typename ComputeType<scalar_t>::type>(v);
}
__device__ __forceinline__ float to_compute(at::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_compute(at::BFloat16 v) { return static_cast<float>(v); }

// ---------------------------------------------------------------------------- fake_quantize
// code * (1 / levels), or NaN where t is NaN or infinite: an output that depends on a non-finite
// input stays non-finite, as in float PyTorch (a code would hide it).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t fake_code(acc_t t, acc_t alpha, acc_t beta, acc_t lv, acc_t inv, bool is_signed) {
  const acc_t r = t - t == acc_t(0) ? quant_code<acc_t>(t, alpha, beta, lv, is_signed) * inv
                                    : static_cast<acc_t>(NAN);
  return static_cast<scalar_t>(r);
}

// x and y share one dense memory layout, so the op runs over storage order. Each thread moves
// 16 bytes per step when VEC > 1 (128-bit accesses are what saturate HBM).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) fake_quantize_kernel(const scalar_t* __restrict__ x,
                                                                  scalar_t* __restrict__ y, int64_t n,
                                                                  const float* __restrict__ qparams, int bits,
                                                                  bool is_signed) {
  using acc_t = typename ComputeType<scalar_t>::type;
  const acc_t alpha = static_cast<acc_t>(qparams[0]);
  const acc_t beta = static_cast<acc_t>(qparams[1]);
  const acc_t lv = static_cast<acc_t>(quant_levels(bits, is_signed));
  // The reference computes q * (1 / levels), the reciprocal taken in double and rounded to the
  // math type (what torch does for a Python scalar divisor); this reproduces it bit for bit.
  const acc_t inv = static_cast<acc_t>(1.0 / static_cast<double>(quant_levels(bits, is_signed)));
  struct alignas(sizeof(scalar_t) * VEC) Pack { scalar_t v[VEC]; };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    if (VEC > 1 && i + VEC <= n) {
      Pack p = *reinterpret_cast<const Pack*>(x + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) p.v[k] = fake_code<scalar_t, acc_t>(to_compute(p.v[k]), alpha, beta, lv, inv, is_signed);
      *reinterpret_cast<Pack*>(y + i) = p;
    } else {
      for (int64_t k = i; k < i + VEC && k < n; ++k)
        y[k] = fake_code<scalar_t, acc_t>(to_compute(x[k]), alpha, beta, lv, inv, is_signed);
    }
  }
}

// ---------------------------------------------------------------------------- quantize_activate
struct QAParams {
  const void* x;
  int64_t s_n, s_c, s_h, s_w;  // element strides of x (N, C, H, W)
  int n, c, h, w;
  const float* qparams;
  int bits;
  bool is_signed, relu, channel_major;  // channel_major: x is channels_last (stride_c == 1)
  const float* bn_scale;                // (C,) or null
  const float* bn_shift;                // (C,) or null
  uint8_t* codes;                       // (N, H, W, packed(C))
  int packed_c;
  const void* fp_in_idx;                 // (K,) int32/int64 or null
  bool fp_in_idx64;
  int k;
  void* x_slice;                        // (N, H, W, K) in slice_dtype
  int slice_dtype;
  int* nonfinite;                       // (1,) set to 1 where an activated value is NaN or infinite, or null
};

// t = relu?(x * bn_scale[c] + bn_shift[c]) in fp32, each operation rounded on its own.
__device__ __forceinline__ float qa_activate(const QAParams& p, float v, int ch) {
  if (p.bn_scale) v = __fmul_rn(v, p.bn_scale[ch]);
  if (p.bn_shift) v = __fadd_rn(v, p.bn_shift[ch]);
  if (p.relu) v = v < 0.f ? 0.f : v;
  return v;
}

// Loads channels [c0, c0 + 8) of one pixel as fp32. Channels-last rows use 16-byte loads when
// the 8 values are aligned; NCHW falls back to strided scalar loads, which are still coalesced
// because consecutive threads then own consecutive pixels.
template <typename scalar_t>
__device__ __forceinline__ void qa_load8(const QAParams& p, const scalar_t* base, int c0, float (&v)[8]) {
  const scalar_t* ptr = base + c0 * p.s_c;
  const bool full = c0 + 8 <= p.c;
  if (p.s_c == 1 && full && (reinterpret_cast<uintptr_t>(ptr) % 16) == 0) {
    constexpr int kPer = 16 / sizeof(scalar_t);
    struct alignas(16) Pack { scalar_t v[kPer]; };
#pragma unroll
    for (int b = 0; b < 8 / kPer; ++b) {
      Pack pk = reinterpret_cast<const Pack*>(ptr)[b];
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[b * kPer + k] = static_cast<float>(pk.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (c0 + k < p.c) ? static_cast<float>(ptr[k * p.s_c]) : 0.f;
  }
}

// One thread = one pixel x 8 channels (4 packed bytes at <= 4 bits, 8 bytes otherwise), plus
// every G-th entry of the channel slice of that pixel (G = ceil(C / 8)), so that codes and
// slice leave in the same pass.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) quantize_activate_kernel(QAParams p) {
  const int groups8 = (p.c + 7) / 8;
  const int64_t pixels = static_cast<int64_t>(p.n) * p.h * p.w;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= pixels * groups8) return;
  // Consecutive threads walk the contiguous dimension of x so that loads coalesce.
  const int64_t pix = p.channel_major ? idx / groups8 : idx % pixels;
  const int cg = static_cast<int>(p.channel_major ? idx % groups8 : idx / pixels);
  const int hw = p.h * p.w;
  const int nn = static_cast<int>(pix / hw);
  const int rem = static_cast<int>(pix % hw);
  const int hh = rem / p.w, ww = rem % p.w;
  const scalar_t* base = static_cast<const scalar_t*>(p.x) + nn * p.s_n + hh * p.s_h + ww * p.s_w;

  const float alpha = p.qparams[0], beta = p.qparams[1];
  const float lv = static_cast<float>(quant_levels(p.bits, p.is_signed));
  const int c0 = cg * 8;
  float v[8];
  qa_load8(p, base, c0, v);
  int q[8];
  bool nonfinite = false;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int ch = c0 + k;
    // Channels past C become the zero code that pads an odd channel count.
    const float t = ch < p.c ? qa_activate(p, v[k], ch) : 0.f;
    nonfinite |= !(t - t == 0.f);
    q[k] = ch < p.c ? static_cast<int>(quant_code<float>(t, alpha, beta, lv, p.is_signed)) : 0;
  }
  // A code cannot carry a NaN or an infinity: the caller is told (one atomic, only when it happens).
  if (nonfinite && p.nonfinite) atomicOr(p.nonfinite, 1);
  uint8_t* out = p.codes + pix * p.packed_c;
  if (p.bits <= 4) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) word |= static_cast<uint32_t>(q[k] & 0xF) << (4 * k);
    const int b0 = c0 / 2;
    if (b0 + 4 <= p.packed_c && (reinterpret_cast<uintptr_t>(out + b0) % 4) == 0) {
      *reinterpret_cast<uint32_t*>(out + b0) = word;
    } else {
      for (int b = 0; b < 4 && b0 + b < p.packed_c; ++b) out[b0 + b] = static_cast<uint8_t>(word >> (8 * b));
    }
  } else {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      lo |= static_cast<uint32_t>(q[k] & 0xFF) << (8 * k);
      hi |= static_cast<uint32_t>(q[k + 4] & 0xFF) << (8 * k);
    }
    if (c0 + 8 <= p.packed_c && (reinterpret_cast<uintptr_t>(out + c0) % 8) == 0) {
      *reinterpret_cast<uint2*>(out + c0) = make_uint2(lo, hi);
    } else {
      for (int b = 0; b < 8 && c0 + b < p.packed_c; ++b)
        out[c0 + b] = static_cast<uint8_t>((b < 4 ? lo : hi) >> (8 * (b & 3)));
    }
  }
  if (p.fp_in_idx) {
    for (int j = cg; j < p.k; j += groups8) {
      const int64_t ch = load_index(p.fp_in_idx, j, p.fp_in_idx64);
      CUDA_KERNEL_ASSERT(ch >= 0 && ch < p.c);
      if (ch < 0 || ch >= p.c) continue;  // never read out of bounds where device asserts are compiled out
      const float t = qa_activate(p, static_cast<float>(base[ch * p.s_c]), static_cast<int>(ch));
      store_from_float(p.x_slice, pix * p.k + j, p.slice_dtype, t);
    }
  }
}

// fake_quantize is a grid-stride loop, so its grid may be capped; quantize_activate checks its
// size on the host instead.
int grid_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 30));
}

}  // namespace

at::Tensor fake_quantize_cuda(const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed) {
  TORCH_CHECK(x.is_cuda(), "cuda_fake_quantize: x must be a CUDA tensor, got a tensor on ", x.device(), ".");
  TORCH_CHECK(is_float_dtype(x.scalar_type()),
              "cuda_fake_quantize: x must be float32/float16/bfloat16/float64, got ", x.scalar_type(), ".");
  check_qparams(qparams, "cuda_fake_quantize: qparams", x);
  HYBRIDOPS_CHECK_BITS(bits, "cuda_fake_quantize: bits");
  const c10::cuda::CUDAGuard guard(x.device());
  // A dense layout (contiguous, channels_last, ...) is processed in storage order and kept.
  const at::Tensor xin = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  at::Tensor y = at::empty_like(xin);
  const int64_t n = xin.numel();
  if (n == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xin.scalar_type(), "cuda_fake_quantize", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = reinterpret_cast<uintptr_t>(xin.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0;
    const float* qp = qparams.data_ptr<float>();
    if (aligned) {
      fake_quantize_kernel<scalar_t, kVec><<<grid_for((n + kVec - 1) / kVec), kThreads, 0, stream>>>(
          xin.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, qp, static_cast<int>(bits), is_signed);
    } else {
      fake_quantize_kernel<scalar_t, 1><<<grid_for(n), kThreads, 0, stream>>>(
          xin.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, qp, static_cast<int>(bits), is_signed);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

namespace {

// Both quantize_activate ops; nonfinite, when given, is a zeroed int32 (1,) the kernel sets to 1
// if an activated value is NaN or infinite.
std::tuple<at::Tensor, at::Tensor> quantize_activate_impl(
    const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed,
    const std::optional<at::Tensor>& bn_scale, const std::optional<at::Tensor>& bn_shift, bool relu,
    const std::optional<at::Tensor>& fp_in_idx, std::optional<at::ScalarType> slice_dtype, int* nonfinite) {
  TORCH_CHECK(x.is_cuda(), "cuda_quantize_activate: x must be a CUDA tensor, got a tensor on ", x.device(), ".");
  TORCH_CHECK(x.dim() == 4, "cuda_quantize_activate: x must have shape (N, C, H, W) (any memory format), got ",
              x.sizes(), ".");
  TORCH_CHECK(is_float_dtype(x.scalar_type()),
              "cuda_quantize_activate: x must be float32/float16/bfloat16/float64, got ", x.scalar_type(), ".");
  check_qparams(qparams, "cuda_quantize_activate: qparams", x);
  HYBRIDOPS_CHECK_BITS(bits, "cuda_quantize_activate: bits");
  TORCH_CHECK(!(bits == 8 && !is_signed),
              "cuda_quantize_activate: unsigned 8-bit codes (0..255) do not fit the int8 tensor-core kernels; "
              "use bits <= 7 or the torch backend.");
  const at::ScalarType sdt = slice_dtype.value_or(x.scalar_type());
  TORCH_CHECK(is_float_dtype(sdt), "cuda_quantize_activate: slice_dtype must be a float dtype, got ", sdt, ".");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const auto scale = channel_vector(bn_scale, c, "cuda_quantize_activate: bn_scale", x);
  const auto shift = channel_vector(bn_shift, c, "cuda_quantize_activate: bn_shift", x);
  std::optional<at::Tensor> in_idx;
  if (fp_in_idx.has_value()) in_idx = index_vector(*fp_in_idx, "cuda_quantize_activate: fp_in_idx", x);

  const int64_t pc = packed_size(c, bits);
  at::Tensor codes = at::empty({n, h, w, pc}, x.options().dtype(at::kByte));
  at::Tensor x_slice = in_idx.has_value() ? at::empty({n, h, w, in_idx->size(0)}, x.options().dtype(sdt))
                                        : at::empty({0}, x.options().dtype(sdt));
  const int64_t work = n * h * w * ((c + 7) / 8);
  if (work == 0) return {x_slice, codes};
  TORCH_CHECK(n * h * w < (int64_t(1) << 31) && work / kThreads < (int64_t(1) << 30),
              "cuda_quantize_activate: tensor too large for 32-bit pixel indexing, got ", x.sizes(), ".");

  QAParams p{};
  p.x = x.data_ptr();
  p.s_n = x.stride(0); p.s_c = x.stride(1); p.s_h = x.stride(2); p.s_w = x.stride(3);
  p.n = static_cast<int>(n); p.c = static_cast<int>(c); p.h = static_cast<int>(h); p.w = static_cast<int>(w);
  p.qparams = qparams.data_ptr<float>();
  p.bits = static_cast<int>(bits);
  p.is_signed = is_signed;
  p.relu = relu;
  p.channel_major = x.stride(1) == 1 && c > 1;
  p.bn_scale = scale ? scale->data_ptr<float>() : nullptr;
  p.bn_shift = shift ? shift->data_ptr<float>() : nullptr;
  p.codes = codes.data_ptr<uint8_t>();
  p.packed_c = static_cast<int>(pc);
  p.fp_in_idx = in_idx ? in_idx->data_ptr() : nullptr;
  p.fp_in_idx64 = in_idx && in_idx->scalar_type() == at::kLong;
  p.k = in_idx ? static_cast<int>(in_idx->size(0)) : 0;
  p.x_slice = x_slice.data_ptr();
  p.slice_dtype = dtype_code(sdt);
  p.nonfinite = nonfinite;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cuda_quantize_activate", [&] {
    quantize_activate_kernel<scalar_t><<<grid_for(work), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_slice, codes};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_activate_cuda(
    const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed,
    const std::optional<at::Tensor>& bn_scale, const std::optional<at::Tensor>& bn_shift, bool relu,
    const std::optional<at::Tensor>& fp_in_idx, std::optional<at::ScalarType> slice_dtype) {
  return quantize_activate_impl(x, qparams, bits, is_signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype,
                                nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activate_flagged_cuda(
    const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed,
    const std::optional<at::Tensor>& bn_scale, const std::optional<at::Tensor>& bn_shift, bool relu,
    const std::optional<at::Tensor>& fp_in_idx, std::optional<at::ScalarType> slice_dtype) {
  TORCH_CHECK(x.is_cuda(), "cuda_quantize_activate_flagged: x must be a CUDA tensor, got a tensor on ", x.device(),
              ".");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor flag = at::zeros({1}, x.options().dtype(at::kInt));
  auto [x_slice, codes] = quantize_activate_impl(x, qparams, bits, is_signed, bn_scale, bn_shift, relu, fp_in_idx,
                                                 slice_dtype, flag.data_ptr<int>());
  return {x_slice, codes, flag};
}

}  // namespace hybridops
