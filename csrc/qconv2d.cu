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
// travel packed through global and shared memory and are widened to int8 once per CTA, in
// shared memory, before mma.sync.m16n8k32.s8 (int32 accumulators, exact); see MmaLayout. On
// Hopper the one-byte ungrouped layers go to the CUTLASS kernel of csrc/sm90/ instead (ops.cpp).
// Ampere and Ada (sm_8x) have 4-bit tensor cores at twice the int8 rate: there layers with both
// operands packed run qconv_mma_s4_kernel, which feeds the packed bytes as stored to
// mma.sync.m16n8k64 u4/s4 x s4 (no widening at all).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// CUDA toolkit (CI) may not ship.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <string>
#include <type_traits>
#include <vector>

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
  const void* fp_out_idx;  // (fp_k,) int32/int64: output channel of each fp_out column
  bool fp_out_idx64;
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
// targets each channel and how many do. Building it per CTA from fp_out_idx (a few hundred ints,
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
    const int64_t c = load_index(ep.fp_out_idx, j, ep.fp_out_idx64);
    CUDA_KERNEL_ASSERT(c >= 0 && c < ep.cout);
    if (c >= c_lo && c < c_hi) {
      atomicMin(&map.first[c - c_lo], j);
      atomicAdd(&map.count[c - c_lo], 1);
    }
  }
  __syncthreads();
}

// y = acc * scale + bias, + fp_out at the channel's fp_out_idx columns, relu: reference.qconv2d's
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
        if (load_index(ep.fp_out_idx, jj, ep.fp_out_idx64) == co) {
          y = __fadd_rn(y, load_as_float(ep.fp_out, row + jj, ep.fp_dtype));
          --cnt;
        }
      }
    }
  }
  if (ep.relu) y = y < 0.f ? 0.f : y;  // keeps NaN, like torch.relu
  return y;
}

// Stores of up to V consecutive output channels [co, co + n) of output pixel m, in the widest
// vector stores their bytes allow: one 16-byte store per 8 bf16/fp16 channels, per 4 fp32/int32
// channels, per 32 packed 4-bit codes. The words are built in registers (compile-time indices:
// no stack) and written with 16/8/4/2/1-byte stores.
template <int NB, int NW>
__device__ __forceinline__ void store_bytes(void* dst, const uint32_t (&w)[NW]) {
  static_assert(NB <= 4 * NW, "more bytes than words");
  if constexpr (NB >= 16) {
#pragma unroll
    for (int k = 0; k < NB / 16; ++k)
      reinterpret_cast<uint4*>(dst)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
  } else if constexpr (NB == 8) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  } else if constexpr (NB == 4) {
    *reinterpret_cast<uint32_t*>(dst) = w[0];
  } else if constexpr (NB == 2) {
    *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(w[0]);
  } else {
    static_assert(NB == 1, "store sizes are powers of two");
    *reinterpret_cast<uint8_t*>(dst) = static_cast<uint8_t>(w[0]);
  }
}

// Whether all V channels exist and their NB bytes at dst can be written with aligned vector stores.
template <int NB>
__device__ __forceinline__ bool vector_ok(const void* dst, bool full) {
  return full && reinterpret_cast<uintptr_t>(dst) % (NB < 16 ? NB : 16) == 0;
}

// Output channels [co, co + n) (n <= V) of pixel m from their accumulators. Packed codes at
// <= 4 bits need co even: the V / 2 bytes then hold these channels only (one writer per byte).
template <int V, int SPAN>
__device__ __forceinline__ void store_channels(const Epilogue& ep, const FpMap<SPAN>& map, int64_t m, int co,
                                               int local, const int (&acc)[V], int n) {
  static_assert(V % 2 == 0, "channel pairs share a packed byte");
  const bool full = n == V;
  if (ep.out_kind == kOutI32) {
    int* o = static_cast<int*>(ep.out) + m * ep.out_row + co;
    if (vector_ok<4 * V>(o, full)) {
      uint32_t w[V];
#pragma unroll
      for (int e = 0; e < V; ++e) w[e] = static_cast<uint32_t>(acc[e]);
      store_bytes<4 * V>(o, w);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e)
        if (e < n) o[e] = acc[e];
    }
    return;
  }
  float y[V];
#pragma unroll
  for (int e = 0; e < V; ++e) y[e] = e < n ? epilogue_value(ep, map, acc[e], m, co + e, local + e) : 0.f;
  if (ep.out_kind == kOutCodes) {
    const float alpha = ep.rq[0], beta = ep.rq[1];
    const float lv = static_cast<float>(quant_levels(ep.rq_bits, ep.rq_signed));
    uint32_t q[V];
#pragma unroll
    for (int e = 0; e < V; ++e)
      q[e] = e < n ? static_cast<uint32_t>(static_cast<int>(quant_code<float>(y[e], alpha, beta, lv, ep.rq_signed)))
                   : 0u;
    uint8_t* row = static_cast<uint8_t*>(ep.out) + m * ep.out_row;
    if (ep.rq_bits <= 4) {
      uint8_t* o = row + (co >> 1);
      uint32_t w[(V / 2 + 3) / 4] = {};
#pragma unroll
      for (int k = 0; k < V / 2; ++k) w[k / 4] |= ((q[2 * k] & 0xFu) | ((q[2 * k + 1] & 0xFu) << 4)) << (8 * (k % 4));
      if (vector_ok<V / 2>(o, full)) {
        store_bytes<V / 2>(o, w);
      } else {
#pragma unroll
        for (int k = 0; k < V / 2; ++k)
          if (2 * k < n) o[k] = static_cast<uint8_t>(w[k / 4] >> (8 * (k % 4)));
      }
    } else {
      uint8_t* o = row + co;
      uint32_t w[(V + 3) / 4] = {};
#pragma unroll
      for (int e = 0; e < V; ++e) w[e / 4] |= (q[e] & 0xFFu) << (8 * (e % 4));
      if (vector_ok<V>(o, full)) {
        store_bytes<V>(o, w);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (e < n) o[e] = static_cast<uint8_t>(q[e]);
      }
    }
    return;
  }
  const int64_t i = m * ep.out_row + co;
  switch (ep.out_kind) {
    case kOutF16:
    case kOutBF16: {
      const bool bf = ep.out_kind == kOutBF16;
      uint16_t h[V];
#pragma unroll
      for (int e = 0; e < V; ++e)
        h[e] = bf ? __bfloat16_as_ushort(__float2bfloat16_rn(y[e])) : __half_as_ushort(__float2half_rn(y[e]));
      uint16_t* o = static_cast<uint16_t*>(ep.out) + i;
      if (vector_ok<2 * V>(o, full)) {
        uint32_t w[V / 2];
#pragma unroll
        for (int k = 0; k < V / 2; ++k) w[k] = h[2 * k] | (static_cast<uint32_t>(h[2 * k + 1]) << 16);
        store_bytes<2 * V>(o, w);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (e < n) o[e] = h[e];
      }
      break;
    }
    case kOutF64: {
      double* o = static_cast<double*>(ep.out) + i;
      if (vector_ok<8 * V>(o, full)) {
        uint32_t w[2 * V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(static_cast<double>(y[e])));
          w[2 * e] = static_cast<uint32_t>(b);
          w[2 * e + 1] = static_cast<uint32_t>(b >> 32);
        }
        store_bytes<8 * V>(o, w);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (e < n) o[e] = static_cast<double>(y[e]);
      }
      break;
    }
    default: {
      float* o = static_cast<float*>(ep.out) + i;
      if (vector_ok<4 * V>(o, full)) {
        uint32_t w[V];
#pragma unroll
        for (int e = 0; e < V; ++e) w[e] = __float_as_uint(y[e]);
        store_bytes<4 * V>(o, w);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (e < n) o[e] = y[e];
      }
    }
  }
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
  const int acc[2] = {direct_dot(s, nimg, oh, ow, co), has1 ? direct_dot(s, nimg, oh, ow, co + 1) : 0};
  store_channels<2>(ep, fpmap, m, co, 2 * pair, acc, has1 ? 2 : 1);
}

// ---------------------------------------------------------------------------- tensor-core path
// Template parameters: the tile (BM x BN outputs per CTA, WARPS_M x WARPS_N warps) and the
// operand formats: A_BITS / W_BITS are the code containers, 4 (codes of <= 4 bits, two per
// byte) or 8 (5-8 bits, one per byte), and A_SIGNED whether 4-bit activation codes are signed.
// Weights are always signed. One-byte codes are the int8 MMA operand as stored (signed 5-8-bit
// codes are two's complement bytes, unsigned ones are <= 7 bits: 0..127), so A_SIGNED only
// exists for packed activations: unsigned post-ReLU nibbles are widened with a mask alone.
// Bytes of an MMA operand row in shared memory per pipeline stage: 64 int8 channels (two
// m16n8k32 k-steps), or 128 packed channels on the 4-bit tensor cores (two m16n8k64 k-steps).
constexpr int kChunk = 64;

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

// m16n8k64 on 4-bit codes, eight per register (element e at bits 4e..4e+3): unsigned (post-ReLU
// codes 0..15, .u4) or signed activations times signed weights. Only compiled into sm_8x code
// (qconv_mma_s4_kernel): sm_90 runs it emulated at ~1/20 of its int8 rate.
template <bool A_SIGNED>
__device__ __forceinline__ void mma_4bit(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (A_SIGNED)
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Shared-memory layout of one tile configuration, in bytes (host and device).
//
// Operands arrive through a ring of STAGES cp.async stages as stored: packed rows of 32 bytes
// per 64-channel chunk, one-byte rows of 64. The MMAs read int8 rows of 64 bytes, so a packed
// operand is first widened, once per CTA and k tile, into a double-buffered int8 copy (WIDE_A /
// WIDE_B); every warp then loads ready operands with ldmatrix and no ALU work (before, each of
// the WARPS_N warps sharing A rows widened them again in registers).
//
// int8 rows: 64 bytes = four 16-byte units; k-step s of a chunk reads units 2s and 2s + 1. With
// ldmatrix.x4 (four 8x8 b16 matrices, lane 8q + r giving the address of row r of matrix q) lane
// (gid = lane / 4, tig = lane % 4) receives bytes [4 tig, 4 tig + 4) of row gid of each matrix:
//   A, 16 rows x k-step s: matrices (rows 0-7, unit 2s), (rows 8-15, 2s), (rows 0-7, 2s+1),
//      (rows 8-15, 2s+1) = a0..a3 of mma.m16n8k32 (a0/a2: row gid, k slots 4 tig + [0,4) and
//      16 + 4 tig + [0,4); a1/a3: row gid + 8);
//   B, 8 columns: matrices (units 0, 1, 2, 3) = b0, b1 of k-step 0 and b0, b1 of k-step 1.
// So k slot 16 h + 4 tig + e of k-step s is byte 4 tig + e of unit 2 s + h for A and B alike.
// Units are stored at unit ^ ((row >> 1) & 3): rows are 64 bytes, so rows 2 apart share banks
// when stored plainly; swizzled, the 8 rows of one matrix fall on the 8 distinct 16-byte bank
// groups (conflict-free ldmatrix), for one-byte rings and widened copies alike.
// Any channel -> byte map gives the same dot product as long as A and B share it:
//  * both packed (IN_ORDER false): per 16 channels the words hold channels {0,2,4,6}, {1,3,5,7},
//    {8,...,14}, {9,...,15}: the low and the high nibbles of a packed word, a mask and a shift each;
//  * otherwise channel order, the layout of a one-byte row as loaded: a packed operand facing a
//    one-byte one is put back in order with two byte permutes per word.
// S4 (4-bit tensor cores, sm_8x; both operands packed): the ring rows are the MMA operand rows,
// 64 bytes = 128 packed channels, read with the same ldmatrix addresses and swizzle. A 32-bit
// fragment register of m16n8k64 holds 8 codes where m16n8k32's holds 4 bytes, so the k slots of
// k-step s double: slot 32 h + 8 tig + e is nibble e of bytes [4 tig, 4 tig + 4) of unit 2 s + h,
// i.e. (low nibble first, as format.md packs) chunk channel 64 s + 32 h + 8 tig + e: channel
// order, no widening. (Even a different nibble order inside the register would give the same
// sums: A and B registers come from identically laid out rows. tests/test_mma_s4_model.py
// checks this data path bit by bit.)
// After the mainloop the same memory stages the int32 accumulators (ACC_PITCH words per row)
// for the vectorised epilogue (m16n8k64's accumulator layout is m16n8k32's).
template <int BM, int BN, int A_BITS, int W_BITS, bool S4 = false>
struct MmaLayout {
  static_assert((A_BITS == 4 || A_BITS == 8) && (W_BITS == 4 || W_BITS == 8), "code containers are 4 or 8 bits");
  static_assert(!S4 || (A_BITS == 4 && W_BITS == 4), "the 4-bit tensor cores take packed operands only");
  static constexpr bool WIDE_A = A_BITS == 4 && !S4, WIDE_B = W_BITS == 4 && !S4, WIDEN = WIDE_A || WIDE_B;
  static constexpr bool IN_ORDER = !(WIDE_A && WIDE_B);
  static constexpr int CH = S4 ? 2 * kChunk : kChunk;  // input channels per k tile
  static_assert(WIDEN || IN_ORDER, "unwidened operands are read in channel order");
  // Loads run STAGES - 1 tiles ahead of the MMAs; widening runs one tile ahead of them, so it
  // takes a stage of its own to keep two tiles' loads in flight.
  static constexpr int STAGES = WIDEN ? 4 : 3;
  static constexpr int A_ROW = A_BITS * CH / 8, B_ROW = W_BITS * CH / 8;  // ring bytes per row
  static constexpr int RING_B = STAGES * BM * A_ROW;
  static constexpr int WIDE_A_AT = RING_B + STAGES * BN * B_ROW;
  static constexpr int WIDE_B_AT = WIDE_A_AT + (WIDE_A ? 2 * BM * kChunk : 0);
  static constexpr int MAIN_BYTES = WIDE_B_AT + (WIDE_B ? 2 * BN * kChunk : 0);
  // + 8 words: the int2 accumulator stores of a half warp (rows gid, columns 2 tig) hit 32
  // distinct banks.
  static constexpr int ACC_PITCH = BN + 8;
  static constexpr int EPI_BYTES = BM * ACC_PITCH * 4;
  static constexpr int BYTES = MAIN_BYTES > EPI_BYTES ? MAIN_BYTES : EPI_BYTES;
};

// 0xFF in each byte of v whose bit 7 is set, else 0x00: prmt with the sign flag (bit 3) set in
// every selector replicates the selected byte's bit 7 (CUDA's __byte_perm ignores that flag).
__device__ __forceinline__ uint32_t byte_signs(uint32_t v) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, 0xBA98;" : "=r"(r) : "r"(v));
  return r;
}

// Packed word v (codes 0-7 at nibbles 0-7) -> int8 bytes: lo = codes 0, 2, 4, 6, hi = 1, 3, 5, 7.
// Unsigned codes are a mask (and a shift) from int8; signed ones also take their byte's upper
// half from the nibble's sign bit, moved to bit 7 of the byte (v << 4 for the low nibbles).
template <bool SIGNED>
__device__ __forceinline__ void split_nibbles(uint32_t v, uint32_t& lo, uint32_t& hi) {
  lo = v & 0x0F0F0F0Fu;
  hi = (v >> 4) & 0x0F0F0F0Fu;
  if (SIGNED) {
    lo |= byte_signs(v << 4) & 0xF0F0F0F0u;
    hi |= byte_signs(v) & 0xF0F0F0F0u;
  }
}

// 16 packed codes (8 bytes, channel i at nibble i) -> 16 int8 bytes in the layout MmaLayout
// describes (IN_ORDER or nibble order).
template <bool SIGNED, bool IN_ORDER>
__device__ __forceinline__ uint4 widen16(uint2 p) {
  uint32_t x0, y0, x1, y1;
  split_nibbles<SIGNED>(p.x, x0, y0);
  split_nibbles<SIGNED>(p.y, x1, y1);
  if (IN_ORDER)  // x holds channels 0,2,4,6 of its word and y 1,3,5,7: interleave them
    return make_uint4(__byte_perm(x0, y0, 0x5140), __byte_perm(x0, y0, 0x7362), __byte_perm(x1, y1, 0x5140),
                      __byte_perm(x1, y1, 0x7362));
  return make_uint4(x0, y0, x1, y1);
}

// Byte offset of 16-byte unit `unit` (0-3) of int8 row `row` (see MmaLayout: swizzled).
__host__ __device__ constexpr int unit_offset(int row, int unit) {
  return row * kChunk + ((unit ^ ((row >> 1) & 3)) << 4);
}

// Widens one ring stage of a packed operand (ROWS rows of 32 bytes) into ROWS int8 rows of 64.
// Thread tid widens units tid + i * THREADS (unit u = row u / 4, 16 channels u % 4): THREADS / 4
// rows apart, a multiple of 8, so the swizzle of its destinations is its first unit's.
template <int ROWS, int THREADS, bool SIGNED, bool IN_ORDER>
__device__ __forceinline__ void widen_rows(uint8_t* dst, const uint8_t* src, int tid) {
  static_assert(THREADS % 32 == 0, "whole warps");
  constexpr int UNITS = ROWS * kChunk / 16;
  dst += unit_offset(tid >> 2, tid & 3);
  src += tid * 8;
#pragma unroll
  for (int i = 0; i < (UNITS + THREADS - 1) / THREADS; ++i)
    if (UNITS % THREADS == 0 || tid + i * THREADS < UNITS)
      *reinterpret_cast<uint4*>(dst + i * THREADS * 16) =
          widen16<SIGNED, IN_ORDER>(*reinterpret_cast<const uint2*>(src + i * THREADS * 8));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint8_t* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ uint32_t nibble_at(const uint8_t* row, int ch) {
  return (row[ch >> 1] >> ((ch & 1) * 4)) & 0xFu;
}

// 16 shared-memory bytes of one operand row for a chunk, gathered code by code from global
// memory into the canonical packed layout (chunk channel i at nibble/byte i, zero from ch_end
// on). Used when rows are not 16-byte aligned or a group starts mid-byte (odd C_in / groups),
// where cp.async cannot. Each byte is shifted in at the top of a four-register window: no array
// indexed at run time, so no stack frame, and the loop unrolls by 4 to keep loads in flight.
template <bool PACKED>
__device__ __forceinline__ uint4 gather16(const uint8_t* row, int ch_base, int ch0, int ch_end) {
  uint32_t w0 = 0u, w1 = 0u, w2 = 0u, w3 = 0u;
#pragma unroll 4
  for (int b = 0; b < 16; ++b) {
    uint32_t byte;
    if (PACKED) {
      const int c = ch0 + 2 * b;
      byte = (c < ch_end ? nibble_at(row, ch_base + c) : 0u) |
             ((c + 1 < ch_end ? nibble_at(row, ch_base + c + 1) : 0u) << 4);
    } else {
      const int c = ch0 + b;
      byte = c < ch_end ? static_cast<uint32_t>(row[ch_base + c]) : 0u;
    }
    w0 = __funnelshift_r(w0, w1, 8);
    w1 = __funnelshift_r(w1, w2, 8);
    w2 = __funnelshift_r(w2, w3, 8);
    w3 = (w3 >> 8) | (byte << 24);
  }
  return make_uint4(w0, w1, w2, w3);
}

// The body of both tensor-core kernels; S4: m16n8k64 on the 4-bit tensor cores (packed operands
// as stored) instead of m16n8k32 s8.
template <int BM, int BN, int WARPS_M, int WARPS_N, int A_BITS, bool A_SIGNED, int W_BITS, bool S4>
__device__ __forceinline__ void qconv_mma(ConvShape s, Epilogue ep, bool aligned) {
  using L = MmaLayout<BM, BN, A_BITS, W_BITS, S4>;
  static_assert(A_BITS == 4 || !A_SIGNED, "one-byte activation codes need no sign handling");
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  constexpr int S = L::STAGES;
  constexpr int A_UPR = L::A_ROW / 16, B_UPR = L::B_ROW / 16;  // 16-byte units per ring row
  static_assert(MT >= 1 && NT >= 1 && WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of 16x8");

  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ FpMap<BN> fpmap;

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, g = blockIdx.z;
  const int co_base = g * s.cout_g;

  if (ep.fp_out) build_fp_map(fpmap, ep, co_base + n0, co_base + min(n0 + BN, s.cout_g));

  // Load assignments: each thread copies UPT consecutive 16-byte units of one A row (an output
  // pixel, located once here) and of one B row (an output channel), so that it keeps one pixel's
  // state in registers however many units a row has. Rows past the tile (32x64's packed A) idle.
  // Pixel and weight-row indices fit int32 (qconv2d_cuda checks N*H*W and KH*KW*C_out).
  constexpr int A_TPR = kThreads / BM < A_UPR ? kThreads / BM : A_UPR, A_UPT = A_UPR / A_TPR;
  constexpr int B_TPR = kThreads / BN < B_UPR ? kThreads / BN : B_UPR, B_UPT = B_UPR / B_TPR;
  static_assert(kThreads % BM == 0 && kThreads % BN == 0 && A_TPR >= 1 && B_TPR >= 1, "a row per thread at most");
  const int a_r = tid / A_TPR, a_u0 = (tid % A_TPR) * A_UPT;
  const int b_r = tid / B_TPR, b_u0 = (tid % B_TPR) * B_UPT;
  int a_pix = 0, a_ih0 = INT_MIN / 2, a_iw0 = INT_MIN / 2;  // rows past M read padding
  if (m0 + a_r < s.m) {
    const int hw_out = s.ho * s.wo, m = m0 + a_r;
    const int nimg = m / hw_out, r = m % hw_out;
    a_pix = nimg * s.h * s.w_;
    a_ih0 = (r / s.wo) * s.sh - s.pt;
    a_iw0 = (r % s.wo) * s.sw - s.pl;
  }
  const bool b_ok = n0 + b_r < s.cout_g;
  const int b_row = (co_base + (b_ok ? n0 + b_r : 0)) * s.kh * s.kw;
  // Bytes of one group's channels inside a pixel row (aligned path: whole bytes).
  const int a_gbytes = s.cin_g * A_BITS / 8;
  const int w_gbytes = s.cin_g * W_BITS / 8;

  // Where unit `unit` of row `row` goes: packed rows as loaded (widen_rows reads them in order),
  // int8 rows swizzled as the MMAs' ldmatrix reads them.
  auto ring_at = [](int row, int unit, int upr) { return upr == 4 ? unit_offset(row, unit) : (row * upr + unit) * 16; };
  auto load_tile = [&](int stage, int kh, int kw, int chunk) {
    uint8_t* sa = smem + stage * BM * L::A_ROW;
    uint8_t* sb = smem + L::RING_B + stage * BN * L::B_ROW;
    if (a_r < BM) {
      const int ih = a_ih0 + kh * s.dh, iw = a_iw0 + kw * s.dw;
      const bool pix_ok = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w_;
      const uint8_t* px = s.x + static_cast<int64_t>(a_pix + (pix_ok ? ih * s.w_ + iw : 0)) * s.x_row;
#pragma unroll
      for (int k = 0; k < A_UPT; ++k) {
        const int unit = a_u0 + k;
        uint8_t* dst = sa + ring_at(a_r, unit, A_UPR);
        if (aligned) {
          const int off = chunk * L::A_ROW + unit * 16;
          const bool ok = pix_ok && off < a_gbytes;
          cp_async16(dst, ok ? px + g * a_gbytes + off : s.x, ok, true);
        } else {
          constexpr int per_unit = 128 / A_BITS;  // channels per 16 bytes
          *reinterpret_cast<uint4*>(dst) =
              pix_ok ? gather16<A_BITS == 4>(px, g * s.cin_g, chunk * L::CH + unit * per_unit, s.cin_g)
                     : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    if (b_r < BN) {
      const uint8_t* wr = s.w + static_cast<int64_t>(b_row + kh * s.kw + kw) * s.w_row;
#pragma unroll
      for (int k = 0; k < B_UPT; ++k) {
        const int unit = b_u0 + k;
        uint8_t* dst = sb + ring_at(b_r, unit, B_UPR);
        if (aligned) {
          const int off = chunk * L::B_ROW + unit * 16;
          const bool ok = b_ok && off < w_gbytes;
          cp_async16(dst, ok ? wr + off : s.w, ok, false);
        } else {
          constexpr int per_unit = 128 / W_BITS;
          *reinterpret_cast<uint4*>(dst) = b_ok ? gather16<W_BITS == 4>(wr, 0, chunk * L::CH + unit * per_unit, s.cin_g)
                                                : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
  };
  // Ring stage t % S -> the int8 buffers (t & 1) of the packed operands.
  auto widen = [&](int t) {
    if constexpr (L::WIDE_A)
      widen_rows<BM, kThreads, A_SIGNED, L::IN_ORDER>(smem + L::WIDE_A_AT + (t & 1) * BM * kChunk,
                                                      smem + (t % S) * BM * L::A_ROW, tid);
    if constexpr (L::WIDE_B)
      widen_rows<BN, kThreads, true, L::IN_ORDER>(smem + L::WIDE_B_AT + (t & 1) * BN * kChunk,
                                                  smem + L::RING_B + (t % S) * BN * L::B_ROW, tid);
  };

  const int nchunk = (s.cin_g + L::CH - 1) / L::CH;
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
#pragma unroll 1
  for (int st = 0; st < S - 1; ++st) {
    if (st < ktiles) {
      load_tile(st, l_kh, l_kw, l_ch);
      advance();
    }
    cp_async_commit();
  }
  if constexpr (L::WIDEN) {
    cp_async_wait<S - 2>();  // tile 0 landed
    __syncthreads();
    widen(0);
  }

  // This lane's ldmatrix row addresses (see MmaLayout), relative to a buffer: A row r = lane % 16
  // of the warp's 16-row slice, unit 2 ks + lane / 16; B row lane % 8 of an 8-column slice, unit
  // lane / 8. Rows are multiples of 8 apart, so the swizzle term is the lane's own.
  int a_lane[2];
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) a_lane[ks] = unit_offset(wm * WM + (lane & 15), 2 * ks + (lane >> 4));
  const int b_lane = unit_offset(wn * WN + (lane & 7), lane >> 3);

  int acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0;

  // The MMAs of one k tile, KS of its two k-steps (the B fragments hold both).
  auto tile_mmas = [&](int t, auto ksteps) {
    constexpr int KS = decltype(ksteps)::value;
    const uint8_t* sa = L::WIDE_A ? smem + L::WIDE_A_AT + (t & 1) * BM * kChunk : smem + (t % S) * BM * kChunk;
    const uint8_t* sb =
        L::WIDE_B ? smem + L::WIDE_B_AT + (t & 1) * BN * kChunk : smem + L::RING_B + (t % S) * BN * kChunk;
    uint32_t b[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) ldmatrix_x4(b[j], sb + b_lane + j * 8 * kChunk);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, sa + a_lane[ks] + i * 16 * kChunk);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if constexpr (S4)
            mma_4bit<A_SIGNED>(acc[i][j], a[0], a[1], a[2], a[3], b[j][2 * ks], b[j][2 * ks + 1]);
          else
            mma_s8(acc[i][j], a[0], a[1], a[2], a[3], b[j][2 * ks], b[j][2 * ks + 1]);
        }
      }
    }
  };
  // S4: a last chunk of at most 64 channels (C_in / groups = 64, 192, ...) fills k-step 0 only;
  // its k-step 1 would multiply the zero fill. The branch is uniform over the CTA.
  const bool half_last = S4 && s.cin_g % L::CH != 0 && s.cin_g % L::CH <= L::CH / 2;
  int c_ch = 0;  // chunk of the tile being multiplied

  for (int t = 0; t < ktiles; ++t) {
    // One commit per tile so far: S - 1 + t groups. Tile t (and, when widening, t + 1) landed
    // for this thread; after the barrier for every thread, every warp has finished the MMAs of
    // tile t - 1 (its ring stage and int8 buffers are free again) and widened tile t.
    cp_async_wait<L::WIDEN ? S - 3 : S - 2>();
    __syncthreads();
    if (t + S - 1 < ktiles) {
      load_tile((t + S - 1) % S, l_kh, l_kw, l_ch);
      advance();
    }
    cp_async_commit();
    if constexpr (L::WIDEN) {
      if (t + 1 < ktiles) widen(t + 1);
    }
    if constexpr (S4) {
      if (half_last && c_ch == nchunk - 1)
        tile_mmas(t, std::integral_constant<int, 1>{});
      else
        tile_mmas(t, std::integral_constant<int, 2>{});
      if (++c_ch == nchunk) c_ch = 0;
    } else {
      tile_mmas(t, std::integral_constant<int, 2>{});
    }
  }
  cp_async_wait<0>();  // only empty groups remain; none may be pending when the CTA exits
  __syncthreads();     // every warp is done with the operand buffers the accumulators now overwrite

  // Accumulator layout of m16n8: c0,c1 = row gid, columns 2 tig + {0, 1}; c2,c3 = row gid + 8.
  int* stage = reinterpret_cast<int*>(smem);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        *reinterpret_cast<int2*>(stage + (wm * WM + i * 16 + gid + half * 8) * L::ACC_PITCH + wn * WN + j * 8 +
                                 tig * 2) = make_int2(acc[i][j][2 * half], acc[i][j][2 * half + 1]);
  __syncthreads();

  // Each thread stores 8 consecutive channels of one pixel at a time; consecutive threads take
  // consecutive channel groups of a pixel, so a warp writes whole rows (coalesced).
  constexpr int VPR = BN / 8;
#pragma unroll 1
  for (int e = tid; e < BM * VPR; e += kThreads) {
    const int r = e / VPR, c = (e % VPR) * 8;
    const int m = m0 + r, col = n0 + c;
    if (m >= s.m || col >= s.cout_g) continue;
    const int4 lo = *reinterpret_cast<const int4*>(stage + r * L::ACC_PITCH + c);
    const int4 hi = *reinterpret_cast<const int4*>(stage + r * L::ACC_PITCH + c + 4);
    const int v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    store_channels<8>(ep, fpmap, m, co_base + col, c, v, min(8, s.cout_g - col));
  }
}

// At most 128 registers a thread (16 warps per SM: two 8-warp or four 4-warp CTAs): a bound
// ptxas is held to. Without one it picks its own register targets per kernel, down to 48 for
// the 4-warp tiles, and spills.
template <int BM, int BN, int WARPS_M, int WARPS_N, int A_BITS, bool A_SIGNED, int W_BITS>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32, 16 / (WARPS_M * WARPS_N))
    qconv_mma_kernel(ConvShape s, Epilogue ep, bool aligned) {
  qconv_mma<BM, BN, WARPS_M, WARPS_N, A_BITS, A_SIGNED, W_BITS, false>(s, ep, aligned);
}

// Both operands packed, on the 4-bit tensor cores of sm_80 / sm_86 / sm_89 (qconv2d_cuda launches
// it only on compute capability 8.x). An sm_90 build keeps a trapping body: Hopper would run the
// 4-bit MMAs emulated, so its code must not contain them.
template <int BM, int BN, int WARPS_M, int WARPS_N, bool A_SIGNED>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32, 16 / (WARPS_M * WARPS_N))
    qconv_mma_s4_kernel(ConvShape s, Epilogue ep, bool aligned) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __trap();
#else
  qconv_mma<BM, BN, WARPS_M, WARPS_N, 4, A_SIGNED, 4, true>(s, ep, aligned);
#endif
}

template <int BM, int BN, int WARPS_M, int WARPS_N>
void launch_mma(const ConvShape& s, const Epilogue& ep, bool aligned, bool s4, cudaStream_t stream) {
  const dim3 grid((s.m + BM - 1) / BM, (s.cout_g + BN - 1) / BN, s.groups);
  const dim3 block(WARPS_M * WARPS_N * 32);
  auto run = [&](auto kernel, int smem) {
    // Past 48 KB of shared memory per CTA a kernel must opt in explicitly.
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, block, smem, stream>>>(s, ep, aligned);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (s4) {
    constexpr int smem = MmaLayout<BM, BN, 4, 4, true>::BYTES;
    if (s.a_signed) run(qconv_mma_s4_kernel<BM, BN, WARPS_M, WARPS_N, true>, smem);
    else run(qconv_mma_s4_kernel<BM, BN, WARPS_M, WARPS_N, false>, smem);
    return;
  }
#define HYBRIDOPS_RUN_MMA(AB, AS, WB) \
  run(qconv_mma_kernel<BM, BN, WARPS_M, WARPS_N, AB, AS, WB>, MmaLayout<BM, BN, AB, WB>::BYTES)
  const bool a4 = s.bits_a <= 4, w4 = s.bits_w <= 4;
  if (a4 && s.a_signed) {
    if (w4) HYBRIDOPS_RUN_MMA(4, true, 4);
    else HYBRIDOPS_RUN_MMA(4, true, 8);
  } else if (a4) {
    if (w4) HYBRIDOPS_RUN_MMA(4, false, 4);
    else HYBRIDOPS_RUN_MMA(4, false, 8);
  } else {
    if (w4) HYBRIDOPS_RUN_MMA(8, false, 4);
    else HYBRIDOPS_RUN_MMA(8, false, 8);
  }
#undef HYBRIDOPS_RUN_MMA
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Index into qconv2d_kernels() of the kernel set_qconv2d_plan_override forces, or -1.
std::atomic<int> plan_override{-1};

}  // namespace

const std::vector<std::string>& qconv2d_kernels() {
  static const std::vector<std::string> names{"mma_128x128",    "mma_128x64",    "mma_64x64",    "mma_32x64",
                                              "mma_s4_128x128", "mma_s4_128x64", "mma_s4_64x64", "mma_s4_32x64",
                                              "direct"};
  return names;
}

void set_qconv2d_plan_override(const std::string& plan) {
  if (plan.empty()) {
    plan_override = -1;
    return;
  }
  const auto& names = qconv2d_kernels();
  const auto it = std::find(names.begin(), names.end(), plan);
  TORCH_CHECK(it != names.end(), "set_qconv2d_plan_override: unknown kernel '", plan, "'; choose one of ",
              at::ArrayRef<std::string>(names), " or '' (qconv2d_plan's choice).");
  plan_override = static_cast<int>(it - names.begin());
}

bool qconv2d_plan_forced() { return plan_override.load() >= 0; }

std::string qconv2d_plan(int64_t m, int64_t cin_per_group, int64_t cout_per_group, int64_t groups,
                         bool packed_requant, int64_t sm_count, bool s4) {
  // Tensor-core tiles waste most of a 64-channel chunk or 16x8 fragment on tiny groups.
  if (cin_per_group < 16 || cout_per_group < 16 || (packed_requant && groups > 1 && cout_per_group % 2 != 0))
    return "direct";
  auto ctas = [&](int64_t bm, int64_t bn) { return ceil_div(m, bm) * ceil_div(cout_per_group, bn) * groups; };
  // The same tiles on the 4-bit tensor cores (same occupancy: as many warps and registers).
  const std::string mma = s4 ? "mma_s4_" : "mma_";
  // By M and C_out: big tiles reuse each loaded byte more but only pay when they fill the GPU
  // twice over (two CTAs per SM fit); at batch 1 (M ~ 1000) smaller tiles keep every SM busy. A
  // 128-wide N tile only for more than 64 channels per group: at C_out = 64 (ResNet-50 layer1)
  // half of its MMAs would multiply zero columns, so large M gets 128x64 there.
  if (cout_per_group > 64 && ctas(128, 128) >= 2 * sm_count) return mma + "128x128";
  if (ctas(128, 64) >= 2 * sm_count) return mma + "128x64";
  if (ctas(64, 64) >= sm_count) return mma + "64x64";
  return mma + "32x64";
}

at::Tensor qconv2d_cuda(
    const at::Tensor& x_codes, const at::Tensor& w_packed, int64_t in_channels, int64_t bits_a, bool a_signed,
    int64_t bits_w, const at::Tensor& scale, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
    const std::optional<at::Tensor>& fp_out, const std::optional<at::Tensor>& fp_out_idx,
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
  TORCH_CHECK(fp_out.has_value() == fp_out_idx.has_value(), "cuda_qconv2d: fp_out and fp_out_idx must be given together.");
  at::Tensor fp, idx;
  if (fp_out.has_value()) {
    idx = index_vector(*fp_out_idx, "cuda_qconv2d: fp_out_idx", x_codes);
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
  ep.fp_out_idx = fp.defined() ? idx.data_ptr() : nullptr;
  ep.fp_out_idx64 = fp.defined() && idx.scalar_type() == at::kLong;
  ep.relu = relu;
  ep.rq = codes_out ? requant_qparams->data_ptr<float>() : nullptr;
  ep.rq_bits = static_cast<int>(requant_bits);
  ep.rq_signed = requant_signed;
  ep.out = out.data_ptr();
  ep.out_kind = codes_out ? kOutCodes : (raw ? kOutI32 : dtype_code(out_dtype));
  ep.out_row = out_c;
  ep.cout = s.cout;

  auto stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0, cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x_codes.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, x_codes.get_device()));
  // 4-bit tensor cores: both operands packed, on compute capability 8.x (sm_80 / 86 / 87 / 89,
  // which run this build's sm_8x code, where qconv_mma_s4_kernel is compiled). Not on Hopper.
  const bool s4_ok = bits_a <= 4 && bits_w <= 4 && cc_major == 8;
  std::string plan = qconv2d_plan(s.m, cin_g, cout_g, groups, codes_out && requant_bits <= 4, sms, s4_ok);
  // A forced tensor-core tile applies only where qconv2d_plan picks one (the direct path is the
  // only kernel for tiny groups and odd packed outputs); the direct path can be forced anywhere.
  const int forced = plan_override.load();
  if (forced >= 0 && (plan != "direct" || qconv2d_kernels()[forced] == "direct")) plan = qconv2d_kernels()[forced];
  const bool s4 = plan.compare(0, 7, "mma_s4_") == 0;
  TORCH_CHECK(!s4 || s4_ok, "cuda_qconv2d: kernel '", plan, "' (forced) needs 4-bit tensor cores, which only compute "
              "capability 8.x has (this GPU: ", cc_major, ".x), and codes of at most 4 bits on both operands (got ",
              bits_a, "-bit activations, ", bits_w, "-bit weights).");
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
  const std::string tile = plan.substr(s4 ? 7 : 4);
  if (tile == "128x128") launch_mma<128, 128, 2, 4>(s, ep, aligned, s4, stream);
  else if (tile == "128x64") launch_mma<128, 64, 2, 2>(s, ep, aligned, s4, stream);
  else if (tile == "64x64") launch_mma<64, 64, 2, 2>(s, ep, aligned, s4, stream);
  else launch_mma<32, 64, 1, 4>(s, ep, aligned, s4, stream);
  return out;
}

}  // namespace hybridops
