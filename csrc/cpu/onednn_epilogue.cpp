// CPU kernels of the onednn backend (hybridops._C_cpu): the passes oneDNN's post-ops cannot do
// bit-exactly.
//
// * quantize_activate: one pass over x that writes the u8 activation codes (one code per byte,
//   code + zero point, NHWC) and the float slice of the kept channels (NHWC);
// * fake_quantize: code / levels (training path);
// * epilogue: y = y0 + bias; y[..., idx[j]] += fp[..., j]; (+ residual); relu; then the u8 codes
//   of y (re-quantization for the next layer) or y in fp32 / bf16. y0 = acc * scale comes from
//   oneDNN's int8 convolution with fp32 output (one IEEE multiply, equal to the reference's).
//
// Exactness: the quantizer arithmetic is the reference's fp32 operation order
// (hybridops/ops/reference.py: codes_from_qparams) with no fused multiply-add: setup.py builds
// this file with -ffp-contract=off, and the code spells every rounding step. floor() of the
// non-negative value u * lv + 0.5 is a truncating conversion (exact for values < 2^31), which
// vectorises on every x86 ISA (floorf needs SSE4.1). A NaN fails every comparison below and
// ends as code 0, which is what the reference's nan_to_num gives.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

struct QP {
  float alpha, beta, lv;
  bool is_signed;
  int zp;
};

// Code of the fp32 value t, as a float (an integer below 2^8, exact in fp32); see
// reference.codes_from_qparams. Spelled with float selects only, so that the row loops below
// vectorise: -fno-trapping-math (setup.py) lets the compiler if-convert the comparisons into
// max / min / blend instructions, which changes no result. Scalars by value: the callers' uint8
// stores may alias anything, so fields read through a reference would be reloaded per element.
template <bool SIGNED>
static inline float code_v(float t, float alpha, float beta, float lv) {
  const float mag = SIGNED ? (t < 0.0f ? -t : t) : t;
  float u = mag * alpha;
  u = u + beta;
  // clamp(u, 0, 1); a NaN u fails (u > 0) and becomes 0, whose code is 0 (reference: NaN -> 0).
  u = (u > 0.0f) ? u : 0.0f;
  u = (u < 1.0f) ? u : 1.0f;
  float v = u * lv;
  v = v + 0.5f;
  const float q = static_cast<float>(static_cast<int>(v));  // floor of a non-negative value
  return SIGNED ? ((t > 0.0f) ? q : ((t < 0.0f) ? -q : 0.0f)) : q;  // q * sign(t); sign(0) = 0
}

static inline float code_of(float t, const QP& q) {
  return q.is_signed ? code_v<true>(t, q.alpha, q.beta, q.lv) : code_v<false>(t, q.alpha, q.beta, q.lv);
}

// out[c] = code(t[c]) + zp for a row of n values: the hot loop of quantize-activate and of the
// re-quantizing epilogue. One clone per ISA, chosen at load time: AVX-512, AVX2, or the baseline
// x86-64 (SSE2). Returns whether the row held a NaN or an infinity (t - t is 0 exactly for finite
// t): a code cannot carry it, so the caller propagates it (hybridops/ops/layer_op.py); the test
// rides in the same vector loop.
template <bool SIGNED>
__attribute__((target_clones("avx512f", "avx2", "default")))
bool codes_row_v(const float* __restrict t, uint8_t* __restrict out, int64_t n, float alpha, float beta, float lv,
                 int zp) {
  const float fzp = static_cast<float>(zp);
  int nonfinite = 0;
  for (int64_t c = 0; c < n; ++c) {
    out[c] = static_cast<uint8_t>(static_cast<int>(code_v<SIGNED>(t[c], alpha, beta, lv) + fzp));
    nonfinite |= !(t[c] - t[c] == 0.0f);
  }
  return nonfinite != 0;
}

static bool codes_row(const float* t, uint8_t* out, int64_t n, const QP& q) {
  return q.is_signed ? codes_row_v<true>(t, out, n, q.alpha, q.beta, q.lv, q.zp)
                     : codes_row_v<false>(t, out, n, q.alpha, q.beta, q.lv, q.zp);
}

// bf16 of a row of n fp32 values, rounded to nearest even as c10::BFloat16(float) rounds (a NaN
// becomes 0x7fc0, as there), spelled in integer operations so that the loop vectorises: the
// element-wise c10 conversion does not, and made the bf16 slice and the bf16 epilogue output
// 2-3x slower than their fp32 forms.
__attribute__((target_clones("avx512f", "avx2", "default")))
void bf16_row(const float* __restrict t, uint16_t* __restrict out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t u;
    std::memcpy(&u, t + c, sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    out[c] = static_cast<uint16_t>(((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : rounded);
  }
}

template <typename T>
static inline float to_f(T v) { return static_cast<float>(v); }

// v rounded to bf16 and back to fp32, as bf16_row rounds (to nearest even; a NaN stays a NaN).
static inline float bf16_rounded(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t r = ((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc00000u : ((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
  float out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

QP make_qp(const at::Tensor& qparams, int64_t bits, bool is_signed, int64_t zp) {
  TORCH_CHECK(qparams.dtype() == at::kFloat && qparams.numel() == 2, "qparams must be float32 [alpha, beta].");
  auto q = qparams.contiguous();
  const float* p = q.data_ptr<float>();
  QP r;
  r.alpha = p[0];
  r.beta = p[1];
  r.lv = static_cast<float>(is_signed ? ((1 << (bits - 1)) - 1) : ((1 << bits) - 1));
  r.is_signed = is_signed;
  r.zp = static_cast<int>(zp);
  return r;
}

// The channels fp_in_idx lists, of one NHWC row of W pixels, into row r of the (N*H, W, n_in) slice.
// in_idx == nullptr: every channel in order (the row itself, converted or copied).
static void gather_slice(const float* t, int64_t W, int64_t C, const int64_t* in_idx, int64_t n_in, void* slice,
                         int64_t r, bool slice_bf16) {
  if (!in_idx) {
    if (slice_bf16) bf16_row(t, static_cast<uint16_t*>(slice) + r * W * C, W * C);
    else std::memcpy(static_cast<float*>(slice) + r * W * C, t, sizeof(float) * W * C);
    return;
  }
  std::vector<float> picked(slice_bf16 ? static_cast<size_t>(n_in) : 0);
  for (int64_t w = 0; w < W; ++w) {
    const float* tw = t + w * C;
    if (slice_bf16) {
      for (int64_t j = 0; j < n_in; ++j) picked[j] = tw[in_idx[j]];
      bf16_row(picked.data(), static_cast<uint16_t*>(slice) + (r * W + w) * n_in, n_in);
    } else {
      float* s = static_cast<float*>(slice) + (r * W + w) * n_in;
      for (int64_t j = 0; j < n_in; ++j) s[j] = tw[in_idx[j]];
    }
  }
}

// x: (N, C, H, W) float32 or bfloat16, any strides. Writes the slice (N, H, W, K) in slice_dtype
// (float32 or bfloat16) and the codes uint8 (N, H, W, C); returns whether x held a NaN or an
// infinity.
template <typename T>
bool qa_kernel(const at::Tensor& x, const QP& q, const float* bn_s, const float* bn_b, bool relu,
               const int64_t* in_idx, int64_t n_in, uint8_t* codes, void* slice, bool slice_bf16) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const T* xp = x.data_ptr<T>();
  const int64_t rows = N * H;
  // A few rows per task: at batch 1 a layer has only tens of rows and a task must amortise the
  // thread wake-up.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * C));
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    bool bad = false;
    std::vector<float> t(static_cast<size_t>(W * C));  // one row of t, NHWC
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, h = r % H;
      const T* xr = xp + n * sN + h * sH;
      uint8_t* cr = codes + r * W * C;
      // (W == 1: a Linear's rows, (M, C, 1, 1), whose W stride is 1.)
      const bool direct = std::is_same<T, float>::value && sC == 1 && (sW == C || W == 1) && !bn_s && !bn_b && !relu;
      if (direct) {
        // NHWC fp32 row used as is: one read of x, one write of codes (and the slice)
        const float* xf = reinterpret_cast<const float*>(xr);
        bad |= codes_row(xf, cr, W * C, q);
        if (n_in) gather_slice(xf, W, C, in_idx, n_in, slice, r, slice_bf16);
        continue;
      }
      if (sC == 1) {
        for (int64_t w = 0; w < W; ++w) {
          const T* xw = xr + w * sW;
          float* tw = t.data() + w * C;
          for (int64_t c = 0; c < C; ++c) tw[c] = to_f(xw[c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = xr + c * sC;
          for (int64_t w = 0; w < W; ++w) t[w * C + c] = to_f(xc[w * sW]);
        }
      }
      for (int64_t w = 0; w < W; ++w) {
        float* tw = t.data() + w * C;
        // Reference order: t = x * bn_scale; t = t + bn_shift; t = relu(t).
        if (bn_s) for (int64_t c = 0; c < C; ++c) tw[c] = tw[c] * bn_s[c];
        if (bn_b) for (int64_t c = 0; c < C; ++c) tw[c] = tw[c] + bn_b[c];
        // relu keeps NaN (torch.relu(nan) is nan), so the slice carries it like the reference.
        if (relu) for (int64_t c = 0; c < C; ++c) tw[c] = (tw[c] < 0.0f) ? 0.0f : tw[c];
      }
      bad |= codes_row(t.data(), cr, W * C, q);
      if (n_in) gather_slice(t.data(), W, C, in_idx, n_in, slice, r, slice_bf16);
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  });
  return nonfinite.load();
}

const float* opt_f32(const c10::optional<at::Tensor>& t, at::Tensor& hold) {
  if (!t.has_value() || !t->defined()) return nullptr;
  hold = t->to(at::kFloat).contiguous();
  return hold.data_ptr<float>();
}

// (slice, codes, whether x held a NaN or an infinity)
std::tuple<at::Tensor, at::Tensor, bool> quantize_activate(const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed,
                                          int64_t zp, const c10::optional<at::Tensor>& bn_scale,
                                          const c10::optional<at::Tensor>& bn_shift, bool relu,
                                          const c10::optional<at::Tensor>& fp_in_idx, bool slice_bf16) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "quantize_activate kernel: x must be a 4-D float32 or bfloat16 tensor.");
  const QP q = make_qp(qparams, bits, is_signed, zp);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto codes = at::empty({N, H, W, C}, x.options().dtype(at::kByte));
  at::Tensor hs, hb, hk;
  const float* s = opt_f32(bn_scale, hs);
  const float* b = opt_f32(bn_shift, hb);
  const int64_t* in_idx = nullptr;
  int64_t n_in = 0;
  at::Tensor slice;
  if (fp_in_idx.has_value() && fp_in_idx->defined()) {
    hk = fp_in_idx->to(at::kLong).contiguous();
    in_idx = hk.data_ptr<int64_t>();
    n_in = hk.numel();
    // The slice is gathered through fp_in_idx: an index outside [0, C) would read out of bounds.
    bool identity = n_in == C;
    for (int64_t j = 0; j < n_in; ++j) {
      TORCH_CHECK(in_idx[j] >= 0 && in_idx[j] < C, "fp_in_idx must index channels in [0, ", C, ").");
      identity = identity && in_idx[j] == j;
    }
    if (identity) in_idx = nullptr;  // the whole row, in order: copied or converted without a gather
    slice = at::empty({N, H, W, n_in}, x.options().dtype(slice_bf16 ? at::kBFloat16 : at::kFloat));
  } else {
    slice = at::empty({0}, x.options().dtype(slice_bf16 ? at::kBFloat16 : at::kFloat));
  }
  if (N * H * W * C == 0) return {slice, codes, false};
  void* sp = n_in ? slice.data_ptr() : nullptr;
  const bool nonfinite =
      x.scalar_type() == at::kFloat
          ? qa_kernel<float>(x, q, s, b, relu, in_idx, n_in, codes.data_ptr<uint8_t>(), sp, slice_bf16)
          : qa_kernel<c10::BFloat16>(x, q, s, b, relu, in_idx, n_in, codes.data_ptr<uint8_t>(), sp, slice_bf16);
  return {slice, codes, nonfinite};
}

// fake_quantize of a contiguous float32 tensor: code * (1 / levels), in fp32; NaN where x is NaN
// or infinite (t - t is 0 exactly for finite t), so that float PyTorch's propagation survives it.
at::Tensor fake_quantize_f32(const at::Tensor& x, const at::Tensor& qparams, int64_t bits, bool is_signed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "fake_quantize kernel: contiguous float32 x.");
  const QP q = make_qp(qparams, bits, is_signed, 0);
  auto out = at::empty_like(x);
  const float inv = 1.0f / q.lv;  // reference: q * (1.0 / levels), the reciprocal rounded to fp32
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 32768, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) op[i] = xp[i] - xp[i] == 0.0f ? code_of(xp[i], q) * inv : NAN;
  });
  return out;
}

// n pixels' rows (C values each, contiguous) of the epilogue without a pruned branch, one loop per
// row: v = y0 + bias (+ residual, after rounding to bf16 for a bf16 output: RES 2), ReLU. y may be
// src itself (an fp32 output is written in place). Compile-time flags, so that each combination
// is one branch-free loop that vectorises; one call per block of pixels.
template <bool BIAS, int RES, bool RELU>
static void fused_rows(const float* src, float* y, const float* __restrict bias, const void* res, int64_t C,
                       int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    const float* s = src + p * C;
    float* d = y + p * C;
    // (offsets taken only for the residual's own dtype: none is made from a null pointer)
    const float* r32 = RES == 1 ? static_cast<const float*>(res) + p * C : nullptr;
    const c10::BFloat16* r16 = RES == 2 ? static_cast<const c10::BFloat16*>(res) + p * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      float v = s[c];
      if (BIAS) v = v + bias[c];
      if (RES == 1) v = v + r32[c];
      if (RES == 2) v = bf16_rounded(v) + static_cast<float>(r16[c]);
      if (RELU) v = (v < 0.0f) ? 0.0f : v;
      d[c] = v;
    }
  }
}

using FusedRow = void (*)(const float*, float*, const float*, const void*, int64_t, int64_t);

template <bool BIAS, int RES>
static FusedRow pick_relu(bool relu) { return relu ? &fused_rows<BIAS, RES, true> : &fused_rows<BIAS, RES, false>; }

template <bool BIAS>
static FusedRow pick_res(int res, bool relu) {
  return res == 0 ? pick_relu<BIAS, 0>(relu) : (res == 1 ? pick_relu<BIAS, 1>(relu) : pick_relu<BIAS, 2>(relu));
}

// y0: fp32 (P, C) contiguous (oneDNN's acc * scale, NHWC). fp: (P, K) float32 / bfloat16,
// fp_out_idx: K distinct channels. mode 0: fp32 output written into y0 (returned); 1: bf16; 2: u8
// codes with rq (re-quantization). res: (P, C) residual in the output dtype (fp32 in mode 0, bf16
// in mode 1) or null; it is added to y rounded to the output dtype, in fp32, before the ReLU, which
// is what the unfused model's add of two tensors of that dtype computes (bitwise).
template <typename F>
at::Tensor epilogue_impl(at::Tensor& y0, const float* bias, const F* fp, const int64_t* idx, int64_t K, bool relu,
                         int mode, const QP* rq, const void* res) {
  const int64_t C = y0.size(-1), P = y0.numel() / std::max<int64_t>(C, 1);
  at::Tensor out;
  if (mode == 0) out = y0;
  else out = at::empty(y0.sizes(), y0.options().dtype(mode == 1 ? at::kBFloat16 : at::kByte));
  float* yp = y0.data_ptr<float>();
  void* op = out.data_ptr();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  const FusedRow row_op = fp ? nullptr : (bias ? pick_res<true>(res ? mode + 1 : 0, relu)
                                                : pick_res<false>(res ? mode + 1 : 0, relu));
  // bf16 and codes outputs are made in blocks of pixels in an L1 buffer and converted with one
  // call per block: writing the fp32 rows back to y0 stores what nothing reads, and a conversion
  // call per pixel (C values) cost more than the conversion (measured on a 64x56x56 layer: the
  // codes epilogue took 1.9x the time of a quantize pass over the same values).
  const int64_t block = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(mode == 0 ? 0 : static_cast<size_t>(block * C));
    for (int64_t pb = p0; pb < p1; pb += block) {
      const int64_t pe = std::min(p1, pb + block);
      float* out_rows = mode == 0 ? yp + pb * C : buf.data();
      if (row_op) {
        const void* r = res ? static_cast<const char*>(res) + pb * C * (mode == 1 ? 2 : 4) : nullptr;
        row_op(yp + pb * C, out_rows, bias, r, C, pe - pb);
      }
      for (int64_t p = pb; p < pe && !row_op; ++p) {
        const float* src = yp + p * C;
        float* y = out_rows + (p - pb) * C;
        // Reference order: y = acc * scale (done by oneDNN); y = y + bias; y[idx] += fp; relu.
        if (bias) for (int64_t c = 0; c < C; ++c) y[c] = src[c] + bias[c];
        else if (y != src) std::memcpy(y, src, sizeof(float) * C);
        const F* f = fp + p * K;
        for (int64_t j = 0; j < K; ++j) y[idx[j]] = y[idx[j]] + static_cast<float>(f[j]);
        if (res && mode == 1) {
          const c10::BFloat16* r = static_cast<const c10::BFloat16*>(res) + p * C;
          for (int64_t c = 0; c < C; ++c) y[c] = bf16_rounded(y[c]) + static_cast<float>(r[c]);
        } else if (res) {
          const float* r = static_cast<const float*>(res) + p * C;
          for (int64_t c = 0; c < C; ++c) y[c] = y[c] + r[c];
        }
        if (relu) for (int64_t c = 0; c < C; ++c) y[c] = (y[c] < 0.0f) ? 0.0f : y[c];
      }
      if (mode == 1) bf16_row(buf.data(), static_cast<uint16_t*>(op) + pb * C, (pe - pb) * C);
      else if (mode == 2) codes_row(buf.data(), static_cast<uint8_t*>(op) + pb * C, (pe - pb) * C, *rq);
    }
  });
  return out;
}

at::Tensor epilogue(at::Tensor y0, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& fp_out,
                    const c10::optional<at::Tensor>& fp_out_idx, bool relu, int64_t mode,
                    const c10::optional<at::Tensor>& rq_qparams, int64_t rq_bits, bool rq_signed, int64_t rq_zp,
                    const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(y0.scalar_type() == at::kFloat && y0.is_contiguous(), "epilogue kernel: y0 must be contiguous float32.");
  TORCH_CHECK(mode >= 0 && mode <= 2, "epilogue kernel: mode must be 0, 1 or 2.");
  const void* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(mode != 2, "epilogue kernel: a residual layer writes floats, not codes.");
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == y0.sizes() &&
                    residual->scalar_type() == (mode == 1 ? at::kBFloat16 : at::kFloat),
                "epilogue kernel: the residual must be contiguous NHWC of y0's shape in the output dtype.");
    res = residual->data_ptr();
  }
  at::Tensor hb, hf, hi;
  const float* b = opt_f32(bias, hb);
  QP rq{};
  if (mode == 2) {
    TORCH_CHECK(rq_qparams.has_value(), "epilogue kernel: mode 2 needs qparams.");
    rq = make_qp(*rq_qparams, rq_bits, rq_signed, rq_zp);
  }
  if (fp_out.has_value() && fp_out->defined() && fp_out->numel()) {
    hi = fp_out_idx->to(at::kLong).contiguous();
    const int64_t K = hi.numel();
    if (fp_out->scalar_type() == at::kBFloat16) {
      hf = fp_out->contiguous();
      return epilogue_impl<c10::BFloat16>(y0, b, hf.data_ptr<c10::BFloat16>(), hi.data_ptr<int64_t>(), K, relu,
                                          static_cast<int>(mode), &rq, res);
    }
    hf = fp_out->to(at::kFloat).contiguous();
    return epilogue_impl<float>(y0, b, hf.data_ptr<float>(), hi.data_ptr<int64_t>(), K, relu, static_cast<int>(mode),
                                &rq, res);
  }
  return epilogue_impl<float>(y0, b, nullptr, nullptr, 0, relu, static_cast<int>(mode), &rq, res);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridops CPU kernels for the onednn backend (quantize-activate, fake-quantize, epilogue)";
  m.def("quantize_activate", &quantize_activate);
  m.def("fake_quantize_f32", &fake_quantize_f32);
  m.def("epilogue", &epilogue);
}
