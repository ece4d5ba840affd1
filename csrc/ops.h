// Host entry points of the hybridops CUDA ops and the argument checks they share.
//
// Layouts (see kernels/packing.py): packed codes are uint8; <= 4 bits hold two codes per
// byte (even channel in the low nibble, signed codes as 4-bit two's complement), 5-8 bits one
// code per byte. Activations are NHWC (N, H, W, packed(C)); conv weights are
// (C_out, KH, KW, packed(C_in / groups)).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace hybridops {

// Bumped whenever a schema below changes, so that Python can tell a stale build from a current one.
constexpr int kOpsVersion = 3;

// fake_quantize(x, qparams[alpha, beta], bits, signed) -> code / levels, dtype and strides of x.
at::Tensor fake_quantize_cuda(const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed);

// quantize_activate: x (N, C, H, W) float, any strides -> (x_slice (N, H, W, K) or (0,),
// codes uint8 (N, H, W, packed(C))).
std::tuple<at::Tensor, at::Tensor> quantize_activate_cuda(
    const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed,
    const std::optional<at::Tensor>& bn_scale, const std::optional<at::Tensor>& bn_shift, bool relu,
    const std::optional<at::Tensor>& fp_in_idx, std::optional<at::ScalarType> slice_dtype);

// quantize_activate_flagged: quantize_activate's outputs and int32 (1,) nonfinite, 1 when an
// activated value was NaN or infinite (found in the same pass), else 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activate_flagged_cuda(
    const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed,
    const std::optional<at::Tensor>& bn_scale, const std::optional<at::Tensor>& bn_shift, bool relu,
    const std::optional<at::Tensor>& fp_in_idx, std::optional<at::ScalarType> slice_dtype);

// qconv2d: x_codes uint8 (N, H, W, packed(C_in)) x w_packed uint8 (C_out, KH, KW, packed(C_in/g))
// -> NHWC (N, Ho, Wo, C_out) in out_dtype, or packed codes (N, Ho, Wo, packed(C_out)) when
// requant_qparams is given.
at::Tensor qconv2d_cuda(
    const at::Tensor& x_codes, const at::Tensor& w_packed, int64_t in_channels, int64_t bits_a, bool a_signed,
    int64_t bits_w, const at::Tensor& scale, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    const std::optional<at::Tensor>& fp_out, const std::optional<at::Tensor>& fp_out_idx,
    const std::optional<at::Tensor>& requant_qparams, int64_t requant_bits, bool requant_signed,
    at::ScalarType out_dtype);

// Name of the qconv2d kernel that a problem of this shape runs on a GPU with `sm_count` SMs (one
// of qconv2d_kernels()); `s4`: the layer can run on 4-bit tensor cores (both operands packed, a
// compute capability 8.x GPU). Exposed so that tests and benchmarks can see which path ran.
std::string qconv2d_plan(int64_t m, int64_t cin_per_group, int64_t cout_per_group, int64_t groups,
                         bool packed_requant, int64_t sm_count, bool s4 = false);

// The qconv2d kernels: "mma_128x128", "mma_128x64", "mma_64x64", "mma_32x64" (int8 tensor-core
// tiles, BM x BN), the same tiles on the 4-bit tensor cores of sm_8x ("mma_s4_128x128", ...) and
// "direct" (CUDA cores).
const std::vector<std::string>& qconv2d_kernels();

// Makes qconv2d run `plan` (one of qconv2d_kernels()) instead of qconv2d_plan's choice wherever a
// tensor-core tile may run, so that tests and the GPU suite reach every kernel template on small
// shapes; "" restores the choice. Process-wide. While set, the cuda backend's qconv2d also skips
// the CUTLASS Hopper kernel (ops.cpp), so that the hand-written kernels are the ones checked.
void set_qconv2d_plan_override(const std::string& plan);
bool qconv2d_plan_forced();

inline int64_t packed_size(int64_t channels, int64_t bits) { return bits <= 4 ? (channels + 1) / 2 : channels; }

// ---------------------------------------------------------------------------- boundary checks
// One sentence per failure naming what was expected and what was passed (flash-attention style).
#define HYBRIDOPS_CHECK_DEVICE(t, name, like)                                                          \
  TORCH_CHECK((t).device() == (like).device(), name, " must be a CUDA tensor on ", (like).device(),   \
              " (the device of the input), got a tensor on ", (t).device(), ".")
#define HYBRIDOPS_CHECK_DTYPE(t, name, dtype) \
  TORCH_CHECK((t).scalar_type() == (dtype), name, " must have dtype ", (dtype), ", got ", (t).scalar_type(), ".")
#define HYBRIDOPS_CHECK_SHAPE(t, name, ...)                                                               \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), name, " must have shape ",                  \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes(), ".")
#define HYBRIDOPS_CHECK_BITS(b, name) \
  TORCH_CHECK((b) >= 2 && (b) <= 8, name, " must be an integer in [2, 8], got ", (b), ".")

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The float dtype code used by kernels (see DtypeCode in common.cuh).
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: return 0;
  }
}

inline void check_qparams(const at::Tensor& q, const char* name, const at::Tensor& like) {
  HYBRIDOPS_CHECK_DEVICE(q, name, like);
  HYBRIDOPS_CHECK_DTYPE(q, name, at::kFloat);
  TORCH_CHECK(q.dim() == 1 && q.size(0) == 2, name, " must be [alpha, beta] of shape (2,), got ", q.sizes(), ".");
}

// Optional per-channel float vector -> contiguous float32 (the reference converts with .to(float32)).
inline std::optional<at::Tensor> channel_vector(const std::optional<at::Tensor>& t, int64_t n, const char* name,
                                                const at::Tensor& like) {
  if (!t.has_value()) return std::nullopt;
  HYBRIDOPS_CHECK_DEVICE(*t, name, like);
  TORCH_CHECK(is_float_dtype(t->scalar_type()), name, " must be a float tensor, got ", t->scalar_type(), ".");
  HYBRIDOPS_CHECK_SHAPE(*t, name, n);
  return t->to(at::kFloat).contiguous();
}

inline at::Tensor index_vector(const at::Tensor& t, const char* name, const at::Tensor& like) {
  HYBRIDOPS_CHECK_DEVICE(t, name, like);
  TORCH_CHECK(t.dim() == 1 && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong), name,
              " must be a 1-D int32/int64 index tensor, got ", t.scalar_type(), " of shape ", t.sizes(), ".");
  return t.contiguous();
}

}  // namespace hybridops
