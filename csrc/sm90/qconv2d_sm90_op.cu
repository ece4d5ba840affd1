// hybridops._C_sm90: the Hopper qconv2d built on CUTLASS 3's conv mainloop with the hybrid
// epilogue tree (qconv2d_sm90.cuh), registered as torch.ops.hybridops.cuda_qconv2d_sm90.
//
// The cuda backend does not call this op by name: hybridops._C's cuda_qconv2d kernel (csrc/ops.cpp)
// redispatches to it when the extension is loaded and the call is eligible (eligible.h), and runs
// the hand-written kernel otherwise. Calling it directly (tests, the GPU suite) forces the path
// and, with tile_m, the CTA tile.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "../common.cuh"
#include "../ops.h"
#include "eligible.h"
#include "qconv2d_sm90.h"

namespace hybridops::sm90 {
namespace {

// first[co] = smallest j with idx[j] == co, else -1; next[j] = smallest j' > j with
// idx[j'] == idx[j], else -1. Threads [0, cout) fill first, [cout, cout + fp_k) fill next; each
// scans idx from shared memory, chunk by chunk (fp_k is at most C_out in practice, a few
// thousand ints: one small launch, no host sync, deterministic).
constexpr int kMapThreads = 256;
constexpr int kMapChunk = 2048;

__global__ void __launch_bounds__(kMapThreads)
fp_chain_kernel(const void* idx, bool idx64, int fp_k, int cout, int32_t* first, int32_t* next) {
  __shared__ int32_t chunk[kMapChunk];
  const int t = blockIdx.x * kMapThreads + threadIdx.x;
  const bool is_first = t < cout;
  const int j0 = is_first ? -1 : t - cout;  // scan columns after j0
  const int want = is_first ? t : (j0 < fp_k ? static_cast<int>(load_index(idx, j0, idx64)) : -1);
  int found = -1;
  for (int base = 0; base < fp_k; base += kMapChunk) {
    const int len = min(kMapChunk, fp_k - base);
    __syncthreads();
    for (int i = threadIdx.x; i < len; i += kMapThreads) {
      const int64_t v = load_index(idx, base + i, idx64);
      CUDA_KERNEL_ASSERT(v >= 0 && v < cout);
      chunk[i] = static_cast<int32_t>(v);
    }
    __syncthreads();
    for (int i = max(0, j0 + 1 - base); found < 0 && i < len; ++i)
      if (chunk[i] == want) found = base + i;
  }
  if (is_first) first[t] = found;
  else if (j0 < fp_k) next[j0] = found;
}

template <OutKind Out>
LaunchResult run_tile(int tile_m, const HybridConvArgs& a, const std::function<void*(size_t)>& alloc,
                      cudaStream_t stream) {
  return tile_m == 128 ? run_hybrid_conv<128, Out>(a, alloc, stream) : run_hybrid_conv<64, Out>(a, alloc, stream);
}

}  // namespace

// Same arguments as cuda_qconv2d (hybridops/ops/reference.py qconv2d), plus tile_m: 0 picks the
// CTA tile (tile_m_for), 64 or 128 forces one.
at::Tensor qconv2d_sm90(const at::Tensor& x_codes, const at::Tensor& w_packed, int64_t in_channels, int64_t bits_a,
                        bool a_signed, int64_t bits_w, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        bool relu, const std::optional<at::Tensor>& fp_out, const std::optional<at::Tensor>& fp_out_idx,
                        const std::optional<at::Tensor>& requant_qparams, int64_t requant_bits, bool requant_signed,
                        at::ScalarType out_dtype, int64_t tile_m) {
  TORCH_CHECK(qconv2d_eligible(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                               dilation, groups, fp_out, fp_out_idx, requant_qparams, requant_bits, out_dtype),
              "cuda_qconv2d_sm90: this call is not one the CUTLASS Hopper kernel takes (an sm_90 GPU, groups=1, 5-8 bit "
              "codes one per byte, C_in and C_out multiples of 16, TMA im2col limits, fp32/bf16 or one-byte code "
              "output); cuda_qconv2d runs every call and picks this kernel where it applies.");
  TORCH_CHECK(tile_m == 0 || tile_m == 64 || tile_m == 128, "cuda_qconv2d_sm90: tile_m must be 0 (auto), 64 or 128, got ",
              tile_m, ".");
  const c10::cuda::CUDAGuard guard(x_codes.device());
  const int64_t n = x_codes.size(0), h = x_codes.size(1), w = x_codes.size(2), c = in_channels;
  const int64_t cout = w_packed.size(0), r = w_packed.size(1), s = w_packed.size(2);
  const int64_t ho = (h + padding[0] + padding[1] - dilation[0] * (r - 1) - 1) / stride[0] + 1;
  const int64_t wo = (w + padding[2] + padding[3] - dilation[1] * (s - 1) - 1) / stride[1] + 1;
  const bool codes_out = requant_qparams.has_value();
  at::Tensor out = at::empty({n, ho, wo, cout}, x_codes.options().dtype(codes_out ? at::kByte : out_dtype));
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();

  const auto scale_f = channel_vector(scale, cout, "cuda_qconv2d_sm90: scale", x_codes);
  const auto bias_f = channel_vector(bias, cout, "cuda_qconv2d_sm90: bias", x_codes);
  HybridConvArgs a{};
  a.geo = {static_cast<int>(n), static_cast<int>(h), static_cast<int>(w), static_cast<int>(c),
           static_cast<int>(cout), static_cast<int>(r), static_cast<int>(s),
           static_cast<int>(padding[0]), static_cast<int>(padding[1]), static_cast<int>(padding[2]),
           static_cast<int>(padding[3]), static_cast<int>(stride[0]), static_cast<int>(stride[1]),
           static_cast<int>(dilation[0]), static_cast<int>(dilation[1])};
  // Unsigned codes of up to 7 bits and signed ones are the same bytes read as int8.
  a.x = reinterpret_cast<const int8_t*>(x_codes.data_ptr<uint8_t>());
  a.w = reinterpret_cast<const int8_t*>(w_packed.data_ptr<uint8_t>());
  a.scale = scale_f->data_ptr<float>();
  a.bias = bias_f ? bias_f->data_ptr<float>() : nullptr;
  a.relu = relu;
  at::Tensor fp, chain;
  if (fp_out.has_value()) {
    fp = fp_out->contiguous();
    const at::Tensor idx = fp_out_idx->contiguous();
    const int64_t fp_k = idx.size(0);
    chain = at::empty({cout + fp_k}, x_codes.options().dtype(at::kInt));
    const int threads = static_cast<int>(cout + fp_k);
    fp_chain_kernel<<<(threads + kMapThreads - 1) / kMapThreads, kMapThreads, 0, stream>>>(
        idx.data_ptr(), idx.scalar_type() == at::kLong, static_cast<int>(fp_k), static_cast<int>(cout),
        chain.data_ptr<int32_t>(), chain.data_ptr<int32_t>() + cout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.fp = {fp.data_ptr(), dtype_code(fp.scalar_type()), fp_k, chain.data_ptr<int32_t>(),
            chain.data_ptr<int32_t>() + cout};
  }
  if (codes_out) {
    a.quant = {requant_qparams->data_ptr<float>(), static_cast<float>(quant_levels(static_cast<int>(requant_bits),
                                                                                    requant_signed)),
               requant_signed};
  }
  a.out = out.data_ptr();

  if (tile_m == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x_codes.get_device()));
    tile_m = tile_m_for(n * ho * wo, cout, sms);
  }
  // The workspace (if the kernel asks for one) comes from torch's caching allocator and lives
  // until this call returns: the launch is stream-ordered, so the block is reused only after it.
  std::vector<at::Tensor> workspaces;
  const std::function<void*(size_t)> alloc = [&](size_t bytes) {
    workspaces.push_back(at::empty({static_cast<int64_t>(bytes)}, x_codes.options().dtype(at::kByte)));
    return workspaces.back().data_ptr();
  };
  const int tm = static_cast<int>(tile_m);
  LaunchResult res = codes_out                     ? run_tile<OutKind::kCodes>(tm, a, alloc, stream)
                     : out_dtype == at::kBFloat16 ? run_tile<OutKind::kBF16>(tm, a, alloc, stream)
                                                  : run_tile<OutKind::kF32>(tm, a, alloc, stream);
  TORCH_CHECK(res.ok, "cuda_qconv2d_sm90: CUTLASS ", res.step, " failed (", res.status, ") for input ", x_codes.sizes(),
              ", filters ", w_packed.sizes(), ", stride ", stride, ", padding ", padding, ", dilation ", dilation, ".");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace hybridops::sm90

TORCH_LIBRARY_FRAGMENT(hybridops, m) {
  m.def(
      "cuda_qconv2d_sm90(Tensor x_codes, Tensor w_packed, int in_channels, int bits_a, bool a_signed, int bits_w, "
      "Tensor scale, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, bool relu, "
      "Tensor? fp_out, Tensor? fp_out_idx, Tensor? requant_qparams, int requant_bits, bool requant_signed, "
      "ScalarType out_dtype, int tile_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(hybridops, CUDA, m) { m.impl("cuda_qconv2d_sm90", &hybridops::sm90::qconv2d_sm90); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridops' CUTLASS Hopper qconv2d; importing it registers torch.ops.hybridops.cuda_qconv2d_sm90, "
            "which the cuda backend's qconv2d then uses where it applies.";
  m.def("tile_m_for", &hybridops::sm90::tile_m_for, pybind11::arg("m"), pybind11::arg("cout"),
        pybind11::arg("sm_count"), "CTA tile rows (64 or 128) the kernel picks for m = N*Ho*Wo output pixels.");
  m.attr("ops_version") = hybridops::kOpsVersion;
  m.attr("tiles") = pybind11::make_tuple("128x128", "64x128");
}
