// Which qconv2d calls the CUTLASS Hopper kernel of hybridops._C_sm90 takes, shared by the cuda
// backend's dispatch (csrc/ops.cpp, in hybridops._C) and the op itself (qconv2d_sm90_op.cu).
//
// Everything not listed here stays on the hand-written kernel of csrc/qconv2d.cu, which also
// reports every invalid argument: a call is eligible only when its arguments are valid and of
// the one-byte, ungrouped, TMA-aligned kind, so that this path needs no error messages of its own.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <optional>

namespace hybridops::sm90 {

// An sm_90 device (H100 / H200): the kernels are built for sm_90a only.
inline bool is_sm90_device(int device) {
  static int cached[64] = {};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= 64) return false;
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
    cached[device] = ok && major == 9 && minor == 0 ? 1 : 2;
  }
  return cached[device] == 1;
}

// TMA im2col limits of a 2-D conv along one spatial axis (CUTLASS 4.2's can_implement, plus the
// traversal stride, which the im2col descriptor's element strides cap at 8): padding at most 128
// before (the lower corner is an int8 offset), the far corner pad_hi - (R-1)*dil in [-128, 127],
// the dilated filter extent (R-1)*dil under 255.
inline bool im2col_axis_ok(int64_t pad_lo, int64_t pad_hi, int64_t r, int64_t stride, int64_t dil) {
  const int64_t extent = (r - 1) * dil, upper = pad_hi - extent;
  return stride >= 1 && stride <= 8 && dil >= 1 && pad_lo >= 0 && pad_lo <= 128 && pad_hi >= 0 && pad_hi <= 256 &&
         extent < 255 && upper >= -128 && upper <= 127;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

inline bool float_vector(const std::optional<at::Tensor>& t, int64_t n, const at::Tensor& like) {
  return t.has_value() && t->device() == like.device() && t->dim() == 1 && t->size(0) == n &&
         (t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16 ||
          t->scalar_type() == at::kDouble);
}

inline bool qconv2d_eligible(const at::Tensor& x_codes, const at::Tensor& w_packed, int64_t in_channels, int64_t bits_a,
                             bool a_signed, int64_t bits_w, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& fp_out,
                             const std::optional<at::Tensor>& fp_out_idx, const std::optional<at::Tensor>& requant_qparams,
                             int64_t requant_bits, at::ScalarType out_dtype) {
  // Operands: one code per byte (Hopper has no int4 MMA; nibble-packed codes stay on the
  // hand-written kernel), int8-representable (unsigned 8-bit codes reach 255), contiguous NHWC /
  // KRSC with 16-byte aligned rows and bases (TMA).
  if (!x_codes.is_cuda() || x_codes.scalar_type() != at::kByte || x_codes.dim() != 4 || !x_codes.is_contiguous())
    return false;
  if (w_packed.device() != x_codes.device() || w_packed.scalar_type() != at::kByte || w_packed.dim() != 4 ||
      !w_packed.is_contiguous())
    return false;
  if (groups != 1 || bits_a < 5 || bits_a > 8 || bits_w < 5 || bits_w > 8 || (bits_a == 8 && !a_signed)) return false;
  const int64_t c = in_channels, cout = w_packed.size(0), r = w_packed.size(1), s = w_packed.size(2);
  // C_out % 16: 16-byte output rows for every output element (uint8 codes the narrowest).
  if (c % 16 != 0 || x_codes.size(3) != c || w_packed.size(3) != c || cout % 16 != 0 || cout == 0) return false;
  if (!aligned16(x_codes) || !aligned16(w_packed)) return false;
  if (stride.size() != 2 || dilation.size() != 2 || padding.size() != 4) return false;
  if (!im2col_axis_ok(padding[0], padding[1], r, stride[0], dilation[0]) ||
      !im2col_axis_ok(padding[2], padding[3], s, stride[1], dilation[1]))
    return false;
  const int64_t n = x_codes.size(0), h = x_codes.size(1), w = x_codes.size(2);
  const int64_t hp = h + padding[0] + padding[1] - dilation[0] * (r - 1) - 1;
  const int64_t wp = w + padding[2] + padding[3] - dilation[1] * (s - 1) - 1;
  if (hp < 0 || wp < 0 || n == 0) return false;
  const int64_t ho = hp / stride[0] + 1, wo = wp / stride[1] + 1;
  if (n * ho * wo >= (int64_t(1) << 31) || n * h * w >= (int64_t(1) << 31)) return false;
  // Epilogue: a float scale and bias per output channel, the FP branch as the op takes it, and
  // an output of fp32, bf16 or one-byte codes.
  if (!float_vector(scale, cout, x_codes) || (bias.has_value() && !float_vector(bias, cout, x_codes))) return false;
  if (fp_out.has_value() != fp_out_idx.has_value()) return false;
  if (fp_out.has_value()) {
    const auto& f = *fp_out;
    const auto& j = *fp_out_idx;
    if (f.device() != x_codes.device() || j.device() != x_codes.device() || j.dim() != 1 ||
        (j.scalar_type() != at::kInt && j.scalar_type() != at::kLong) ||
        f.sizes() != at::IntArrayRef({n, ho, wo, j.size(0)}) ||
        !(f.scalar_type() == at::kFloat || f.scalar_type() == at::kHalf || f.scalar_type() == at::kBFloat16 ||
          f.scalar_type() == at::kDouble))
      return false;
  }
  if (requant_qparams.has_value()) {
    const auto& q = *requant_qparams;
    if (q.device() != x_codes.device() || q.scalar_type() != at::kFloat || q.dim() != 1 || q.size(0) != 2 ||
        requant_bits < 5 || requant_bits > 8 || !(out_dtype == at::kFloat || out_dtype == at::kBFloat16 ||
                                                  out_dtype == at::kHalf || out_dtype == at::kDouble))
      return false;
  } else if (out_dtype != at::kFloat && out_dtype != at::kBFloat16) {
    return false;
  }
  return is_sm90_device(x_codes.get_device());
}

// CTA tile rows: 128 x 128 tiles reuse each loaded byte more but pay only when they fill every SM;
// under that (batch 1, small feature maps) 64 x 128 tiles keep more SMs busy. Measured with the
// stock kernel on an H100 (docs/gpu.md): 64x128 won at batch 1 and on the 7x7 layer at batch 32,
// 128x128 on the 28x28-56x56 layers at batch 32.
inline int tile_m_for(int64_t m, int64_t cout, int64_t sm_count) {
  const int64_t ctas128 = ((m + 127) / 128) * ((cout + 127) / 128);
  return ctas128 >= sm_count ? 128 : 64;
}

}  // namespace hybridops::sm90
