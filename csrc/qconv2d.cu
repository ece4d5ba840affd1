// Packed low-bit convolution as an implicit GEMM on int8 tensor cores, with the hybrid epilogue.
//
// GEMM view, per group g:  C[m, co] = sum_k A[m, k] * B[k, co]
//   m  = (n, oh, ow) output pixel           (M = N * Ho * Wo rows)
//   co = output channel of the group        (C_out / groups columns)
//   k  = (kh, kw, c) tap and input channel  (K = KH * KW * C_in / groups)
// A is gathered from the NHWC packed codes (zero codes outside the image: padding), B is the
// weight tensor (C_out, KH, KW, packed C_in/g), already K-major, which is the operand order
// mma.sync's .row.col integer shapes want.
//
// Hopper (sm_90) has no usable 4-bit MMA (it is emulated, ~20x slower than s8), so both operands
// travel packed through global and shared memory and are widened to int8 in registers right
// before mma.sync.m16n8k32.s8 (int32 accumulators, exact).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// CUDA toolkit (CI) may not ship.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <string>

#include "common.cuh"
#include "ops.h"

namespace hybridops {
namespace {

// Output kinds: the float ones share DtypeCode's values.
enum OutKind : int { kOutF32 = kF32, kOutF16 = kF16, kOutBF16 = kBF16, kOutF64 = kF64, kOutI32 = 4, kOutCodes = 5 };

struct ConvShape {
  const uint8_t* x;  // (N, H, W, x_row) packed activation codes
  const uint8_t* w;  // (C_out, KH, KW, w_row) packed weight codes
  int h, w_, ho, wo, kh, kw;
  int sh, sw, pt, pl, dh, dw;
  int groups, cin_g, cout_g, cout;
  int x_row, w_row;  // bytes per input pixel / per (co, kh, kw) tap
  int bits_a, bits_w;
  bool a_signed;
  int m;             // N * Ho * Wo
};

struct Epilogue {
  const float* scale;  // (C_out,)
  const float* bias;   // (C_out,) or null
  const void* fp_out;  // (M, fp_k) contiguous, DtypeCode fp_dtype, or null
  int fp_dtype, fp_k;
  const void* fp_idx;  // (fp_k,) int32/int64: output channel of each fp_out column
  bool fp_idx64;
  bool relu;
  const float* rq;     // requant [alpha, beta] or null
  int rq_bits;
  bool rq_signed;
  void* out;           // NHWC, out_row elements (bytes for codes) per pixel
  int out_kind;
  int64_t out_row;
  int cout;
};

// For the output channels [c_lo, c_lo + SPAN) a CTA writes: the first column j of fp_out that
// targets each channel and how many do. Building it per CTA from fp_idx (a few hundred ints,
// L2-resident) keeps the sliced add inside the epilogue without a dense scattered copy of the
// pruned branch and without an extra launch.
template <int SPAN>
struct FpMap {
  int first[SPAN];
  int count[SPAN];
};

template <int SPAN>
__device__ void build_fp_map(FpMap<SPAN>& map, const Epilogue& ep, int c_lo, int c_hi) {
  for (int i = threadIdx.x; i < SPAN; i += blockDim.x) {
    map.first[i] = INT_MAX;
    map.count[i] = 0;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < ep.fp_k; j += blockDim.x) {
    const int64_t c = load_index(ep.fp_idx, j, ep.fp_idx64);
    CUDA_KERNEL_ASSERT(c >= 0 && c < ep.cout);
    if (c >= c_lo && c < c_hi) {
      atomicMin(&map.first[c - c_lo], j);
      atomicAdd(&map.count[c - c_lo], 1);
    }
  }
  __syncthreads();
}

// y = acc * scale + bias, + fp_out at the channel's fp_idx columns, relu: reference.qconv2d's
// fp32 order, each operation rounded on its own (no FMA contraction).
template <int SPAN>
__device__ __forceinline__ float epilogue_value(const Epilogue& ep, const FpMap<SPAN>& map, int acc, int64_t m,
                                                int co, int local) {
  float y = __fmul_rn(static_cast<float>(acc), ep.scale[co]);
  if (ep.bias) y = __fadd_rn(y, ep.bias[co]);
  if (ep.fp_out) {
    int cnt = map.count[local];
    if (cnt > 0) {
      const int64_t row = m * ep.fp_k;
      const int j = map.first[local];
      y = __fadd_rn(y, load_as_float(ep.fp_out, row + j, ep.fp_dtype));
      // A repeated index adds its columns in index order, as index_add does on the CPU.
      for (int jj = j + 1; cnt > 1 && jj < ep.fp_k; ++jj) {
        if (load_index(ep.fp_idx, jj, ep.fp_idx64) == co) {
          y = __fadd_rn(y, load_as_float(ep.fp_out, row + jj, ep.fp_dtype));
          --cnt;
        }
      }
    }
  }
  if (ep.relu) y = y < 0.f ? 0.f : y;  // keeps NaN, like torch.relu
  return y;
}

// Stores output channels co and co + 1 (when has1) of pixel m. With packed requantization at
// <= 4 bits the pair is one byte, so co must be even there (the caller guarantees it).
template <int SPAN>
__device__ __forceinline__ void epilogue_store(const Epilogue& ep, const FpMap<SPAN>& map, int64_t m, int co,
                                               int local, int acc0, int acc1, bool has1) {
  if (ep.out_kind == kOutI32) {
    int* o = static_cast<int*>(ep.out) + m * ep.out_row + co;
    if (has1 && (reinterpret_cast<uintptr_t>(o) & 7) == 0) {
      *reinterpret_cast<int2*>(o) = make_int2(acc0, acc1);
    } else {
      o[0] = acc0;
      if (has1) o[1] = acc1;
    }
    return;
  }
  const float y0 = epilogue_value(ep, map, acc0, m, co, local);
  const float y1 = has1 ? epilogue_value(ep, map, acc1, m, co + 1, local + 1) : 0.f;
  if (ep.out_kind == kOutCodes) {
    const float alpha = ep.rq[0], beta = ep.rq[1];
    const float lv = static_cast<float>(quant_levels(ep.rq_bits, ep.rq_signed));
    const int q0 = static_cast<int>(quant_code<float>(y0, alpha, beta, lv, ep.rq_signed));
    const int q1 = has1 ? static_cast<int>(quant_code<float>(y1, alpha, beta, lv, ep.rq_signed)) : 0;
    uint8_t* o = static_cast<uint8_t*>(ep.out) + m * ep.out_row;
    if (ep.rq_bits <= 4) {
      o[co >> 1] = static_cast<uint8_t>((q0 & 0xF) | ((q1 & 0xF) << 4));
    } else {
      o[co] = static_cast<uint8_t>(q0);
      if (has1) o[co + 1] = static_cast<uint8_t>(q1);
    }
    return;
  }
  const int64_t i = m * ep.out_row + co;
  if (has1 && ep.out_kind == kOutF32 && (i & 1) == 0) {
    *reinterpret_cast<float2*>(static_cast<float*>(ep.out) + i) = make_float2(y0, y1);
    return;
  }
  store_from_float(ep.out, i, ep.out_kind, y0);
  if (has1) store_from_float(ep.out, i + 1, ep.out_kind, y1);
}

// ---------------------------------------------------------------------------- direct path
// CUDA-core convolution for shapes the tensor-core tiles would mostly waste (depthwise and
// other tiny groups, C_in < 16) and for packed requantization of odd per-group channel counts
// (two channels of different threads would share a byte). One thread = one pixel x one pair
// of output channels, so a packed output byte has a single writer.
constexpr int kDirectPairs = 32;  // channel pairs per CTA (warp-wide, coalesced stores)
constexpr int kDirectPixels = 8;  // pixels per CTA

__device__ __forceinline__ int code_at(const uint8_t* row, int ch, int bits, bool is_signed) {
  if (bits <= 4) {
    const int v = (row[ch >> 1] >> ((ch & 1) * 4)) & 0xF;
    return is_signed ? (v ^ 8) - 8 : v;
  }
  return is_signed ? static_cast<int>(static_cast<int8_t>(row[ch])) : static_cast<int>(row[ch]);
}

__device__ int direct_dot(const ConvShape& s, int nimg, int oh, int ow, int c) {
  const int g = c / s.cout_g;
  int acc = 0;
  for (int kh = 0; kh < s.kh; ++kh) {
    const int ih = oh * s.sh - s.pt + kh * s.dh;
    if (ih < 0 || ih >= s.h) continue;
    for (int kw = 0; kw < s.kw; ++kw) {
      const int iw = ow * s.sw - s.pl + kw * s.dw;
      if (iw < 0 || iw >= s.w_) continue;
      const uint8_t* px = s.x + (static_cast<int64_t>(nimg * s.h + ih) * s.w_ + iw) * s.x_row;
      const uint8_t* wr = s.w + (static_cast<int64_t>(c * s.kh + kh) * s.kw + kw) * s.w_row;
      for (int ci = 0; ci < s.cin_g; ++ci)
        acc += code_at(px, g * s.cin_g + ci, s.bits_a, s.a_signed) * code_at(wr, ci, s.bits_w, true);
    }
  }
  return acc;
}

__global__ void __launch_bounds__(kDirectPairs * kDirectPixels) qconv_direct_kernel(ConvShape s, Epilogue ep) {
  __shared__ FpMap<2 * kDirectPairs> fpmap;
  const int c_lo = blockIdx.y * 2 * kDirectPairs;
  if (ep.fp_out) build_fp_map(fpmap, ep, c_lo, min(c_lo + 2 * kDirectPairs, s.cout));
  const int pair = threadIdx.x % kDirectPairs;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kDirectPixels + threadIdx.x / kDirectPairs;
  const int co = c_lo + 2 * pair;
  if (m >= s.m || co >= s.cout) return;
  const int hw = s.ho * s.wo;
  const int nimg = static_cast<int>(m / hw), r = static_cast<int>(m % hw);
  const int oh = r / s.wo, ow = r % s.wo;
  const bool has1 = co + 1 < s.cout;
  const int acc0 = direct_dot(s, nimg, oh, ow, co);
  const int acc1 = has1 ? direct_dot(s, nimg, oh, ow, co + 1) : 0;
  epilogue_store(ep, fpmap, m, co, 2 * pair, acc0, acc1, has1);
}

// ---------------------------------------------------------------------------- tensor-core path
constexpr int kChunk = 64;  // input channels per pipeline stage (two m16n8k32 k-steps)
constexpr int kStages = 3;  // cp.async ring depth: two tiles in flight while one is consumed

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid, bool keep_in_l1) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0 -> the 16 bytes are zero-filled (padding, K tail)
  if (keep_in_l1)  // activations: neighbouring taps re-read the same pixels
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Operand fragments. Per 64-channel chunk, lane (group id, tig = lane % 4) of a row owns the
// 16 channels [16 tig, 16 tig + 16) and splits them over the two k-steps s: step s covers
// channels 16 tig + 8 s + [0, 8), its "low" register (k slots 4 tig + [0,4)) the even ones and its
// "high" register (k slots 16 + 4 tig + [0,4)) the odd ones. Any bijection from channels to k
// slots gives the same dot product as long as A and B use the same one, and this one makes the
// nibble widening a mask and a shift: the low nibbles of a packed word are channels 0,2,4,6 and
// the high nibbles 1,3,5,7 — no interleave. One-byte operands meeting a packed partner are
// deinterleaved with prmt; when both operands are one-byte codes the channels stay in order.
__device__ __forceinline__ uint32_t sext4(uint32_t v, uint32_t sign_mask) {
  // Bit 3 of a byte set -> OR 0xF0 (8 * 0x1E = 0xF0, so no byte carries into its neighbour).
  return v | ((v & sign_mask) * 0x1Eu);
}

template <bool PACKED, bool INTERLEAVE>
__device__ __forceinline__ void load_fragment(const uint8_t* row, int tig, uint32_t sign_mask, uint32_t (&lo)[2],
                                              uint32_t (&hi)[2]) {
  if (PACKED) {
    const uint2 v = *reinterpret_cast<const uint2*>(row + tig * 8);
    lo[0] = sext4(v.x & 0x0F0F0F0Fu, sign_mask);
    hi[0] = sext4((v.x >> 4) & 0x0F0F0F0Fu, sign_mask);
    lo[1] = sext4(v.y & 0x0F0F0F0Fu, sign_mask);
    hi[1] = sext4((v.y >> 4) & 0x0F0F0F0Fu, sign_mask);
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(row + tig * 16);
    if (INTERLEAVE) {
      lo[0] = __byte_perm(v.x, v.y, 0x6420);
      hi[0] = __byte_perm(v.x, v.y, 0x7531);
      lo[1] = __byte_perm(v.z, v.w, 0x6420);
      hi[1] = __byte_perm(v.z, v.w, 0x7531);
    } else {
      lo[0] = v.x;
      hi[0] = v.y;
      lo[1] = v.z;
      hi[1] = v.w;
    }
  }
}

// 16 shared-memory bytes of one operand row for a chunk, gathered code by code from global
// memory into the canonical packed layout (chunk channel i at nibble/byte i). Used when rows are
// not 16-byte aligned or a group starts mid-byte (odd C_in / groups), where cp.async cannot.
template <bool PACKED>
__device__ __forceinline__ uint4 gather16(const uint8_t* row, int ch_base, int ch0, int ch_end) {
  uint32_t word[4] = {0u, 0u, 0u, 0u};
  if (PACKED) {
#pragma unroll 4
    for (int i = 0; i < 32; ++i) {
      const int ch = ch0 + i;
      if (ch < ch_end) {
        const int gc = ch_base + ch;
        const uint32_t nib = (row[gc >> 1] >> ((gc & 1) * 4)) & 0xFu;
        word[i >> 3] |= nib << (4 * (i & 7));
      }
    }
  } else {
#pragma unroll 4
    for (int i = 0; i < 16; ++i) {
      const int ch = ch0 + i;
      if (ch < ch_end) word[i >> 2] |= static_cast<uint32_t>(row[ch_base + ch]) << (8 * (i & 3));
    }
  }
  return make_uint4(word[0], word[1], word[2], word[3]);
}

// BM x BN output tile per CTA, WARPS_M x WARPS_N warps; A4/W4: activations/weights packed two
// codes per byte (<= 4 bits) or one per byte.
template <int BM, int BN, int WARPS_M, int WARPS_N, bool A4, bool W4>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    qconv_mma_kernel(ConvShape s, Epilogue ep, bool aligned) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  constexpr int A_ROW = A4 ? kChunk / 2 : kChunk;  // smem bytes per tile row and stage
  constexpr int B_ROW = W4 ? kChunk / 2 : kChunk;
  constexpr int A_UPR = A_ROW / 16, B_UPR = B_ROW / 16;  // 16-byte units per row
  constexpr int A_UNITS = BM * A_UPR, B_UNITS = BN * B_UPR;
  constexpr int A_ITERS = (A_UNITS + kThreads - 1) / kThreads;
  constexpr int B_ITERS = (B_UNITS + kThreads - 1) / kThreads;
  constexpr bool INTERLEAVE = A4 || W4;
  static_assert(MT >= 1 && NT >= 1 && WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of 16x8");

  // Rows of 32 or 64 bytes with 8- or 16-byte fragment loads: each quarter/half warp reads
  // 128 contiguous bytes, so shared memory serves fragments without bank conflicts.
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* s_a = smem;
  uint8_t* s_b = smem + kStages * BM * A_ROW;
  __shared__ FpMap<BN> fpmap;

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, g = blockIdx.z;
  const int co_base = g * s.cout_g;

  if (ep.fp_out) build_fp_map(fpmap, ep, co_base + n0, co_base + min(n0 + BN, s.cout_g));

  // Per-thread load assignments, resolved once: the output pixel of each A unit, the weight row
  // of each B unit.
  const int hw_out = s.ho * s.wo;
  int64_t a_img[A_ITERS];
  int a_ih0[A_ITERS], a_iw0[A_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int m = m0 + (tid + i * kThreads) / A_UPR;
    if (m < s.m) {
      const int nimg = m / hw_out, r = m % hw_out;
      a_img[i] = static_cast<int64_t>(nimg) * s.h * s.w_;
      a_ih0[i] = (r / s.wo) * s.sh - s.pt;
      a_iw0[i] = (r % s.wo) * s.sw - s.pl;
    } else {  // rows past M read padding
      a_img[i] = 0;
      a_ih0[i] = INT_MIN / 2;
      a_iw0[i] = INT_MIN / 2;
    }
  }
  int64_t b_row[B_ITERS];
  bool b_ok[B_ITERS];
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int col = n0 + (tid + i * kThreads) / B_UPR;
    b_ok[i] = col < s.cout_g;
    b_row[i] = static_cast<int64_t>(co_base + (b_ok[i] ? col : 0)) * s.kh * s.kw;
  }
  // Bytes of one group's channels inside a pixel row (aligned path: whole bytes).
  const int a_gbytes = A4 ? s.cin_g / 2 : s.cin_g;
  const int w_gbytes = W4 ? s.cin_g / 2 : s.cin_g;

  auto load_tile = [&](int stage, int kh, int kw, int chunk) {
    uint8_t* sa = s_a + stage * BM * A_ROW;
    uint8_t* sb = s_b + stage * BN * B_ROW;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      const int u = tid + i * kThreads;
      if (A_UNITS % kThreads == 0 || u < A_UNITS) {
        const int sub = u % A_UPR;
        const int ih = a_ih0[i] + kh * s.dh, iw = a_iw0[i] + kw * s.dw;
        const bool pix_ok = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w_;
        const uint8_t* px = s.x + (a_img[i] + static_cast<int64_t>(pix_ok ? ih : 0) * s.w_ + (pix_ok ? iw : 0)) *
                                      s.x_row;
        if (aligned) {
          const int off = chunk * A_ROW + sub * 16;
          const bool ok = pix_ok && off < a_gbytes;
          cp_async16(sa + u * 16, ok ? px + g * a_gbytes + off : s.x, ok, true);
        } else {
          const int per_unit = A4 ? 32 : 16;
          *reinterpret_cast<uint4*>(sa + u * 16) =
              pix_ok ? gather16<A4>(px, g * s.cin_g, chunk * kChunk + sub * per_unit, s.cin_g)
                     : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int u = tid + i * kThreads;
      if (B_UNITS % kThreads == 0 || u < B_UNITS) {
        const int sub = u % B_UPR;
        const uint8_t* wr = s.w + (b_row[i] + kh * s.kw + kw) * s.w_row;
        if (aligned) {
          const int off = chunk * B_ROW + sub * 16;
          const bool ok = b_ok[i] && off < w_gbytes;
          cp_async16(sb + u * 16, ok ? wr + off : s.w, ok, false);
        } else {
          const int per_unit = W4 ? 32 : 16;
          *reinterpret_cast<uint4*>(sb + u * 16) =
              b_ok[i] ? gather16<W4>(wr, 0, chunk * kChunk + sub * per_unit, s.cin_g)
                      : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
  };

  const int nchunk = (s.cin_g + kChunk - 1) / kChunk;
  const int ktiles = s.kh * s.kw * nchunk;
  int l_kh = 0, l_kw = 0, l_ch = 0;  // next k tile to load
  auto advance = [&]() {
    if (++l_ch == nchunk) {
      l_ch = 0;
      if (++l_kw == s.kw) {
        l_kw = 0;
        ++l_kh;
      }
    }
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ktiles) {
      load_tile(st, l_kh, l_kw, l_ch);
      advance();
    }
    cp_async_commit();
  }

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0;

  const uint32_t a_sign = s.a_signed ? 0x08080808u : 0u;
  for (int t = 0; t < ktiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t landed for every thread; stage (t - 1) % kStages is free again
    if (t + kStages - 1 < ktiles) {
      load_tile((t + kStages - 1) % kStages, l_kh, l_kw, l_ch);
      advance();
    }
    cp_async_commit();

    const uint8_t* sa = s_a + (t % kStages) * BM * A_ROW + (wm * WM + gid) * A_ROW;
    const uint8_t* sb = s_b + (t % kStages) * BN * B_ROW + (wn * WN + gid) * B_ROW;
    uint32_t b_lo[NT][2], b_hi[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j) load_fragment<W4, INTERLEAVE>(sb + j * 8 * B_ROW, tig, 0x08080808u, b_lo[j], b_hi[j]);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      uint32_t lo0[2], hi0[2], lo1[2], hi1[2];  // rows gid and gid + 8 of the 16-row slice
      load_fragment<A4, INTERLEAVE>(sa + i * 16 * A_ROW, tig, a_sign, lo0, hi0);
      load_fragment<A4, INTERLEAVE>(sa + (i * 16 + 8) * A_ROW, tig, a_sign, lo1, hi1);
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_s8(acc[i][j], lo0[ks], lo1[ks], hi0[ks], hi1[ks], b_lo[j][ks], b_hi[j][ks]);
    }
  }
  cp_async_wait<0>();

  // Accumulator layout of m16n8: c0,c1 = row gid, columns 2 tig + {0, 1}; c2,c3 = row gid + 8.
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = n0 + wn * WN + j * 8 + tig * 2;
    if (col >= s.cout_g) continue;
    const bool has1 = col + 1 < s.cout_g;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = m0 + wm * WM + i * 16 + gid + half * 8;
        if (m < s.m)
          epilogue_store(ep, fpmap, m, co_base + col, col - n0, acc[i][j][2 * half], acc[i][j][2 * half + 1], has1);
      }
    }
  }
}

template <int BM, int BN, int WARPS_M, int WARPS_N>
void launch_mma(const ConvShape& s, const Epilogue& ep, bool aligned, cudaStream_t stream) {
  const bool a4 = s.bits_a <= 4, w4 = s.bits_w <= 4;
  const int smem = kStages * (BM * (a4 ? kChunk / 2 : kChunk) + BN * (w4 ? kChunk / 2 : kChunk));
  const dim3 grid((s.m + BM - 1) / BM, (s.cout_g + BN - 1) / BN, s.groups);
  const dim3 block(WARPS_M * WARPS_N * 32);
  auto run = [&](auto kernel) {
    // Past 48 KB of shared memory per CTA a kernel must opt in explicitly.
    if (smem > 40 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, block, smem, stream>>>(s, ep, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (a4 && w4) run(qconv_mma_kernel<BM, BN, WARPS_M, WARPS_N, true, true>);
  else if (a4) run(qconv_mma_kernel<BM, BN, WARPS_M, WARPS_N, true, false>);
  else if (w4) run(qconv_mma_kernel<BM, BN, WARPS_M, WARPS_N, false, true>);
  else run(qconv_mma_kernel<BM, BN, WARPS_M, WARPS_N, false, false>);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::string qconv2d_plan(int64_t m, int64_t cin_per_group, int64_t cout_per_group, int64_t groups,
                         bool packed_requant, int64_t sm_count) {
  // Tensor-core tiles waste most of a 64-channel chunk or 16x8 fragment on tiny groups.
  if (cin_per_group < 16 || cout_per_group < 16 || (packed_requant && groups > 1 && cout_per_group % 2 != 0))
    return "direct";
  auto ctas = [&](int64_t bm, int64_t bn) { return ceil_div(m, bm) * ceil_div(cout_per_group, bn) * groups; };
  // Big tiles reuse each loaded byte more but only pay when they fill the GPU twice over; at
  // batch 1 (M ~ 1000) smaller tiles keep every SM busy.
  if (ctas(128, 128) >= 2 * sm_count) return "mma_128x128";
  if (ctas(64, 64) >= sm_count) return "mma_64x64";
  return "mma_32x64";
}

at::Tensor qconv2d_cuda(
    const at::Tensor& x_codes, const at::Tensor& w_packed, int64_t in_channels, int64_t bits_a, bool a_signed,
    int64_t bits_w, const at::Tensor& scale, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    const std::optional<at::Tensor>& fp_out, const std::optional<at::Tensor>& fp_idx,
    const std::optional<at::Tensor>& requant_qparams, int64_t requant_bits, bool requant_signed,
    at::ScalarType out_dtype) {
  TORCH_CHECK(x_codes.is_cuda(), "cuda_qconv2d: x_codes must be a CUDA tensor, got a tensor on ", x_codes.device(),
              ".");
  HYBRIDOPS_CHECK_DTYPE(x_codes, "cuda_qconv2d: x_codes", at::kByte);
  TORCH_CHECK(x_codes.dim() == 4 && x_codes.is_contiguous(),
              "cuda_qconv2d: x_codes must be contiguous packed codes of shape (N, H, W, packed C_in) (NHWC), got "
              "shape ",
              x_codes.sizes(), " with strides ", x_codes.strides(), ".");
  HYBRIDOPS_CHECK_DEVICE(w_packed, "cuda_qconv2d: w_packed", x_codes);
  HYBRIDOPS_CHECK_DTYPE(w_packed, "cuda_qconv2d: w_packed", at::kByte);
  TORCH_CHECK(w_packed.dim() == 4 && w_packed.is_contiguous(),
              "cuda_qconv2d: w_packed must be contiguous packed weights of shape (C_out, KH, KW, packed C_in/groups), "
              "got shape ",
              w_packed.sizes(), " with strides ", w_packed.strides(), ".");
  HYBRIDOPS_CHECK_BITS(bits_a, "cuda_qconv2d: bits_a");
  HYBRIDOPS_CHECK_BITS(bits_w, "cuda_qconv2d: bits_w");
  TORCH_CHECK(!(bits_a == 8 && !a_signed),
              "cuda_qconv2d: unsigned 8-bit activation codes (0..255) do not fit the int8 tensor-core kernels; use "
              "bits_a <= 7 or the torch backend.");
  const int64_t n = x_codes.size(0), h = x_codes.size(1), w = x_codes.size(2);
  const int64_t cout = w_packed.size(0), kh = w_packed.size(1), kw = w_packed.size(2);
  TORCH_CHECK(groups >= 1 && in_channels >= 1 && in_channels % groups == 0 && cout % groups == 0,
              "cuda_qconv2d: groups=", groups, " must divide in_channels=", in_channels, " and C_out=", cout, ".");
  const int64_t cin_g = in_channels / groups, cout_g = cout / groups;
  TORCH_CHECK(x_codes.size(3) == packed_size(in_channels, bits_a), "cuda_qconv2d: x_codes has ", x_codes.size(3),
              " bytes per pixel, expected ", packed_size(in_channels, bits_a), " for in_channels=", in_channels,
              " at ", bits_a, " bits (NHWC packed layout).");
  TORCH_CHECK(w_packed.size(3) == packed_size(cin_g, bits_w), "cuda_qconv2d: w_packed has ", w_packed.size(3),
              " bytes per tap, expected ", packed_size(cin_g, bits_w), " for ", cin_g, " input channels per group at ",
              bits_w, " bits.");
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
              "cuda_qconv2d: stride must be two positive ints, got ", stride, ".");
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "cuda_qconv2d: dilation must be two positive ints, got ", dilation, ".");
  TORCH_CHECK(padding.size() == 4 && *std::min_element(padding.begin(), padding.end()) >= 0,
              "cuda_qconv2d: padding must be four non-negative ints (top, bottom, left, right), got ", padding, ".");
  const int64_t ho = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t wo = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(h + padding[0] + padding[1] >= dilation[0] * (kh - 1) + 1 &&
                  w + padding[2] + padding[3] >= dilation[1] * (kw - 1) + 1,
              "cuda_qconv2d: the convolution has an empty output: input ", h, "x", w,
              " is smaller than the dilated kernel after padding.");

  const bool raw = out_dtype == at::kInt;
  if (raw) {
    TORCH_CHECK(!bias.has_value() && !relu && !fp_out.has_value() && !requant_qparams.has_value(),
                "cuda_qconv2d: out_dtype=torch.int32 returns raw accumulators; bias, relu, fp_out and "
                "requantization need a float out_dtype.");
  } else {
    TORCH_CHECK(is_float_dtype(out_dtype), "cuda_qconv2d: out_dtype must be int32 or a float dtype, got ", out_dtype,
                ".");
  }
  const auto scale_f = channel_vector(scale, cout, "cuda_qconv2d: scale", x_codes);
  const auto bias_f = channel_vector(bias, cout, "cuda_qconv2d: bias", x_codes);
  TORCH_CHECK(fp_out.has_value() == fp_idx.has_value(), "cuda_qconv2d: fp_out and fp_idx must be given together.");
  at::Tensor fp, idx;
  if (fp_out.has_value()) {
    idx = index_vector(*fp_idx, "cuda_qconv2d: fp_idx", x_codes);
    HYBRIDOPS_CHECK_DEVICE(*fp_out, "cuda_qconv2d: fp_out", x_codes);
    TORCH_CHECK(is_float_dtype(fp_out->scalar_type()), "cuda_qconv2d: fp_out must be a float tensor, got ",
                fp_out->scalar_type(), ".");
    HYBRIDOPS_CHECK_SHAPE(*fp_out, "cuda_qconv2d: fp_out (NHWC, kept channels)", n, ho, wo, idx.size(0));
    fp = fp_out->contiguous();
  }
  if (requant_qparams.has_value()) {
    check_qparams(*requant_qparams, "cuda_qconv2d: requant_qparams", x_codes);
    HYBRIDOPS_CHECK_BITS(requant_bits, "cuda_qconv2d: requant_bits");
  }
  const bool codes_out = requant_qparams.has_value();
  TORCH_CHECK(n * ho * wo < (int64_t(1) << 31) && n * h * w < (int64_t(1) << 31) && kh * kw * cout < (int64_t(1) << 31),
              "cuda_qconv2d: problem too large for 32-bit pixel indexing (", n, "x", ho, "x", wo, " outputs).");

  const c10::cuda::CUDAGuard guard(x_codes.device());
  const int64_t out_c = codes_out ? packed_size(cout, requant_bits) : cout;
  at::Tensor out = at::empty({n, ho, wo, out_c}, x_codes.options().dtype(codes_out ? at::kByte : out_dtype));
  if (out.numel() == 0) return out;

  ConvShape s{};
  s.x = x_codes.data_ptr<uint8_t>();
  s.w = w_packed.data_ptr<uint8_t>();
  s.h = static_cast<int>(h); s.w_ = static_cast<int>(w);
  s.ho = static_cast<int>(ho); s.wo = static_cast<int>(wo);
  s.kh = static_cast<int>(kh); s.kw = static_cast<int>(kw);
  s.sh = static_cast<int>(stride[0]); s.sw = static_cast<int>(stride[1]);
  s.pt = static_cast<int>(padding[0]); s.pl = static_cast<int>(padding[2]);
  s.dh = static_cast<int>(dilation[0]); s.dw = static_cast<int>(dilation[1]);
  s.groups = static_cast<int>(groups);
  s.cin_g = static_cast<int>(cin_g); s.cout_g = static_cast<int>(cout_g); s.cout = static_cast<int>(cout);
  s.x_row = static_cast<int>(x_codes.size(3)); s.w_row = static_cast<int>(w_packed.size(3));
  s.bits_a = static_cast<int>(bits_a); s.bits_w = static_cast<int>(bits_w);
  s.a_signed = a_signed;
  s.m = static_cast<int>(n * ho * wo);

  Epilogue ep{};
  ep.scale = scale_f->data_ptr<float>();
  ep.bias = bias_f ? bias_f->data_ptr<float>() : nullptr;
  ep.fp_out = fp.defined() ? fp.data_ptr() : nullptr;
  ep.fp_dtype = fp.defined() ? dtype_code(fp.scalar_type()) : 0;
  ep.fp_k = fp.defined() ? static_cast<int>(idx.size(0)) : 0;
  ep.fp_idx = fp.defined() ? idx.data_ptr() : nullptr;
  ep.fp_idx64 = fp.defined() && idx.scalar_type() == at::kLong;
  ep.relu = relu;
  ep.rq = codes_out ? requant_qparams->data_ptr<float>() : nullptr;
  ep.rq_bits = static_cast<int>(requant_bits);
  ep.rq_signed = requant_signed;
  ep.out = out.data_ptr();
  ep.out_kind = codes_out ? kOutCodes : (raw ? kOutI32 : dtype_code(out_dtype));
  ep.out_row = out_c;
  ep.cout = s.cout;

  auto stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x_codes.get_device()));
  const std::string plan = qconv2d_plan(s.m, cin_g, cout_g, groups, codes_out && requant_bits <= 4, sms);
  if (plan == "direct") {
    // CUDA's grid limits: x < 2^31 (m < 2^31 is checked above), y <= 65535.
    TORCH_CHECK(ceil_div(cout, 2 * kDirectPairs) <= 65535, "cuda_qconv2d: ", cout,
                " output channels need a launch grid y of ", ceil_div(cout, 2 * kDirectPairs),
                " on the direct path, past CUDA's limit of 65535.");
    const dim3 grid(static_cast<unsigned>(ceil_div(s.m, kDirectPixels)),
                    static_cast<unsigned>(ceil_div(cout, 2 * kDirectPairs)));
    qconv_direct_kernel<<<grid, kDirectPairs * kDirectPixels, 0, stream>>>(s, ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  TORCH_CHECK(groups <= 65535, "cuda_qconv2d: at most 65535 groups on the tensor-core path, got ", groups, ".");
  // cp.async moves 16-byte units: every row start and every group's channel range must be
  // 16-byte aligned; otherwise the same kernel gathers codes one by one.
  const auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool aligned = s.x_row % 16 == 0 && s.w_row % 16 == 0 && (bits_a <= 4 ? cin_g % 32 : cin_g % 16) == 0 &&
                       al16(s.x) && al16(s.w);
  if (plan == "mma_128x128") launch_mma<128, 128, 2, 4>(s, ep, aligned, stream);
  else if (plan == "mma_64x64") launch_mma<64, 64, 2, 2>(s, ep, aligned, stream);
  else launch_mma<32, 64, 1, 4>(s, ep, aligned, stream);
  return out;
}

}  // namespace hybridops
