// Spike (issue 20 item 3): a persistent oneDNN u8 x s8 convolution primitive, made once per
// shape with its exact post-op chain and executed per call on torch tensors' data pointers.
//
// Links against the oneDNN 3.2 wheel `onednn-cpu-gomp` (libdnnl.so.3, GNU OpenMP runtime), not
// against torch's statically linked oneDNN (libtorch_cpu exports no dnnl_* symbols). Built by
// bench/onednn_spike/spike.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <dlfcn.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One convolution: NHWC u8 codes (byte = code + src_zp) x s8 weights (Cout, Cin, KH, KW),
// s32 accumulation, then in f32: acc * w_scale[oc] + bias[oc] (+ residual) -> relu ->
// (requant) linear(alpha, beta) -> clip(0, 1) -> linear(levels, 0) -> dst (f32 / u8 / s32).
//
// residual: 0 none, 1 `sum` post-op (the f32 dst holds the residual before the call, overwritten
// in place), 2 `binary_add` post-op with a separate NHWC f32 tensor (works with a u8 dst).
class PersistentConv {
 public:
  PersistentConv(std::vector<int64_t> x_nhwc, torch::Tensor w_oihw, torch::Tensor w_scale,
                 c10::optional<torch::Tensor> bias, std::vector<int64_t> stride, std::vector<int64_t> padding_tblr,
                 std::vector<int64_t> dilation, int64_t src_zp, std::string out, bool relu, int64_t residual,
                 std::vector<double> requant, int64_t dst_zp)
      : strm_(cpu_engine()) {
    double t0 = now_us();
    TORCH_CHECK(x_nhwc.size() == 4, "x shape must be NHWC");
    TORCH_CHECK(w_oihw.scalar_type() == torch::kInt8 && w_oihw.dim() == 4, "weights: int8 (Cout, Cin, KH, KW)");
    const int64_t n = x_nhwc[0], h = x_nhwc[1], w = x_nhwc[2], c = x_nhwc[3];
    const int64_t oc = w_oihw.size(0), kh = w_oihw.size(2), kw = w_oihw.size(3);
    TORCH_CHECK(w_oihw.size(1) == c, "groups are not part of the spike");
    const int64_t top = padding_tblr[0], bottom = padding_tblr[1], left = padding_tblr[2], right = padding_tblr[3];
    oh_ = (h + top + bottom - (kh - 1) * dilation[0] - 1) / stride[0] + 1;
    ow_ = (w + left + right - (kw - 1) * dilation[1] - 1) / stride[1] + 1;
    n_ = n; oc_ = oc; h_ = h; w_ = w; c_ = c;
    out_ = out;
    residual_ = residual;
    dt dst_dt = out == "f32" ? dt::f32 : out == "u8" ? dt::u8 : out == "s32" ? dt::s32 : dt::undef;
    TORCH_CHECK(dst_dt != dt::undef, "out must be f32, u8 or s32");
    TORCH_CHECK(residual != 1 || out == "f32", "the sum post-op is used with an f32 dst only");

    src_md_ = memory::desc({n, c, h, w}, dt::u8, tag::nhwc);
    memory::desc wei_any({oc, c, kh, kw}, dt::s8, tag::any);
    dst_md_ = memory::desc({n, oc, oh_, ow_}, dst_dt, tag::nhwc);
    has_bias_ = bias.has_value() && out != "s32";
    memory::desc bias_md = has_bias_ ? memory::desc({oc}, dt::f32, tag::a) : memory::desc();

    dnnl::primitive_attr attr;
    has_scale_ = out != "s32";
    if (has_scale_) attr.set_scales_mask(DNNL_ARG_WEIGHTS, 1 << 0);  // per output channel
    if (src_zp != 0) attr.set_zero_points_mask(DNNL_ARG_SRC, 0);     // one zero point, given at run time
    if (dst_zp != 0) attr.set_zero_points_mask(DNNL_ARG_DST, 0);
    dnnl::post_ops po;
    if (residual == 1) po.append_sum(1.0f);
    if (residual == 2) {
      res_md_ = memory::desc({n, oc, oh_, ow_}, dt::f32, tag::nhwc);
      po.append_binary(dnnl::algorithm::binary_add, res_md_);
    }
    if (relu) po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    if (!requant.empty()) {  // the reference's codes_from_qparams for unsigned codes, up to rounding
      TORCH_CHECK(requant.size() == 3, "requant = (alpha, beta, levels)");
      po.append_eltwise(dnnl::algorithm::eltwise_linear, (float)requant[0], (float)requant[1]);
      po.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 1.f);
      po.append_eltwise(dnnl::algorithm::eltwise_linear, (float)requant[2], 0.f);
    }
    attr.set_post_ops(po);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

    memory::dims strides = {stride[0], stride[1]}, dil = {dilation[0] - 1, dilation[1] - 1};
    memory::dims pl = {top, left}, pr = {bottom, right};
    double t1 = now_us();
    auto pd = has_bias_
        ? dnnl::convolution_forward::primitive_desc(cpu_engine(), dnnl::prop_kind::forward_inference,
                                                    dnnl::algorithm::convolution_direct, src_md_, wei_any, bias_md,
                                                    dst_md_, strides, dil, pl, pr, attr)
        : dnnl::convolution_forward::primitive_desc(cpu_engine(), dnnl::prop_kind::forward_inference,
                                                    dnnl::algorithm::convolution_direct, src_md_, wei_any, dst_md_,
                                                    strides, dil, pl, pr, attr);
    double t2 = now_us();
    impl_ = pd.impl_info_str();
    prim_ = dnnl::convolution_forward(pd);
    double t3 = now_us();

    // Weights: reordered once into the layout the primitive chose.
    auto w_c = w_oihw.contiguous();
    memory w_user({{oc, c, kh, kw}, dt::s8, tag::oihw}, cpu_engine(), w_c.data_ptr());
    wei_ = memory(pd.weights_desc(), cpu_engine());
    dnnl::reorder(w_user, wei_).execute(strm_, w_user, wei_);
    strm_.wait();
    double t4 = now_us();

    if (has_scale_) {
      scale_t_ = w_scale.to(torch::kFloat32).contiguous().clone();
      scale_ = memory({{oc}, dt::f32, tag::a}, cpu_engine(), scale_t_.data_ptr());
    }
    if (has_bias_) {
      bias_t_ = bias->to(torch::kFloat32).contiguous().clone();
      bias_m_ = memory(bias_md, cpu_engine(), bias_t_.data_ptr());
    }
    src_zp_ = (int32_t)src_zp;
    dst_zp_ = (int32_t)dst_zp;
    if (src_zp != 0) zp_src_ = memory({{1}, dt::s32, tag::x}, cpu_engine(), &src_zp_);
    if (dst_zp != 0) zp_dst_ = memory({{1}, dt::s32, tag::x}, cpu_engine(), &dst_zp_);
    scratch_t_ = torch::empty({(int64_t)pd.scratchpad_desc().get_size() + 64}, torch::kUInt8);
    scratch_ = memory(pd.scratchpad_desc(), cpu_engine(), scratch_t_.data_ptr());
    // Memory objects for the per-call tensors: made once, pointed at each call's data.
    src_m_ = memory(src_md_, cpu_engine(), DNNL_MEMORY_NONE);
    dst_m_ = memory(dst_md_, cpu_engine(), DNNL_MEMORY_NONE);
    if (residual == 2) res_m_ = memory(res_md_, cpu_engine(), DNNL_MEMORY_NONE);
    args_ = {{DNNL_ARG_SRC, src_m_}, {DNNL_ARG_WEIGHTS, wei_}, {DNNL_ARG_DST, dst_m_},
             {DNNL_ARG_SCRATCHPAD, scratch_}};
    if (has_bias_) args_[DNNL_ARG_BIAS] = bias_m_;
    if (has_scale_) args_[DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS] = scale_;
    if (src_zp != 0) args_[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC] = zp_src_;
    if (dst_zp != 0) args_[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST] = zp_dst_;
    if (residual == 2) args_[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = res_m_;  // binary is post-op 0
    out_dtype_ = out == "f32" ? torch::kFloat32 : out == "u8" ? torch::kUInt8 : torch::kInt32;
    double t5 = now_us();
    create_us_ = {t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0};
  }

  void check_x(const torch::Tensor& x) const {
    TORCH_CHECK(x.scalar_type() == torch::kUInt8 && x.is_contiguous() && x.dim() == 4 && x.size(0) == n_ &&
                    x.size(1) == h_ && x.size(2) == w_ && x.size(3) == c_,
                "x: contiguous uint8 NHWC of the primitive's shape");
  }

  void exec(const torch::Tensor& x, const torch::Tensor& out, const c10::optional<torch::Tensor>& res) {
    src_m_.set_data_handle(x.data_ptr());
    dst_m_.set_data_handle(out.data_ptr());
    if (residual_ == 2) {
      TORCH_CHECK(res.has_value() && res->scalar_type() == torch::kFloat32 && res->is_contiguous() &&
                      res->numel() == n_ * oh_ * ow_ * oc_,
                  "residual: contiguous f32 NHWC");
      res_m_.set_data_handle(res->data_ptr());
    }
    prim_.execute(strm_, args_);
    strm_.wait();
  }

  // x: NHWC u8; returns a new NHWC output (for residual == 1 pass the residual: it is copied into
  // the new output, the sum post-op adds to it).
  torch::Tensor forward(const torch::Tensor& x, c10::optional<torch::Tensor> res) {
    check_x(x);
    torch::Tensor out;
    if (residual_ == 1) {
      TORCH_CHECK(res.has_value(), "sum post-op: pass the residual");
      out = res->to(torch::kFloat32).contiguous().clone();
    } else {
      out = torch::empty({n_, oh_, ow_, oc_}, torch::TensorOptions().dtype(out_dtype_));
    }
    exec(x, out, res);
    return out;
  }

  // Into a caller's output (residual == 1: `out` holds the residual and is overwritten).
  torch::Tensor forward_into(const torch::Tensor& x, torch::Tensor out, c10::optional<torch::Tensor> res) {
    check_x(x);
    TORCH_CHECK(out.scalar_type() == out_dtype_ && out.is_contiguous() && out.numel() == n_ * oh_ * ow_ * oc_,
                "out: contiguous NHWC of the output dtype");
    exec(x, out, res);
    return out;
  }

  // Per-call times of `iters` executes inside C++ (no Python, no allocation), in microseconds.
  std::vector<double> loop_us(const torch::Tensor& x, torch::Tensor out, c10::optional<torch::Tensor> res,
                              int64_t iters) {
    check_x(x);
    std::vector<double> ts;
    ts.reserve(iters);
    for (int64_t i = 0; i < iters; ++i) {
      double t0 = now_us();
      exec(x, out, res);
      ts.push_back(now_us() - t0);
    }
    return ts;
  }

  // The same arguments, no work: the fixed cost of a call into the extension.
  torch::Tensor noop(const torch::Tensor& x, c10::optional<torch::Tensor> res) { return x; }

  std::vector<double> create_us() const { return create_us_; }
  std::string impl() const { return impl_; }

 private:
  int64_t n_, h_, w_, c_, oc_, oh_, ow_;
  int64_t residual_;
  std::string out_, impl_;
  torch::Dtype out_dtype_;
  bool has_bias_, has_scale_;
  int32_t src_zp_ = 0, dst_zp_ = 0;
  dnnl::stream strm_;
  dnnl::convolution_forward prim_;
  memory::desc src_md_, dst_md_, res_md_;
  memory wei_, scale_, bias_m_, zp_src_, zp_dst_, scratch_, src_m_, dst_m_, res_m_;
  torch::Tensor scale_t_, bias_t_, scratch_t_;
  std::unordered_map<int, memory> args_;
  std::vector<double> create_us_;
};

// omp_get_max_threads as the OpenMP runtime that libdnnl bound to reports it (looked up through
// libdnnl's own link map: the libgomp.so.1 it resolved).
int64_t omp_max_threads() {
  void* h = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_NOLOAD);
  TORCH_CHECK(h, "libdnnl.so.3 is not loaded");
  void* f = dlsym(h, "omp_get_max_threads");
  TORCH_CHECK(f, "omp_get_max_threads not found");
  return ((int (*)())f)();
}

std::string gomp_path() {
  void* h = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_NOLOAD);
  void* f = h ? dlsym(h, "omp_get_max_threads") : nullptr;
  Dl_info info;
  if (f && dladdr(f, &info)) return info.dli_fname;
  return "?";
}

int64_t effective_isa() { return (int64_t)dnnl_get_effective_cpu_isa(); }

std::string version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) + " (" +
         v->hash + ", cpu_runtime " + std::to_string(v->cpu_runtime) + ")";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<PersistentConv>(m, "PersistentConv")
      .def(pybind11::init<std::vector<int64_t>, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t, std::string, bool,
                          int64_t, std::vector<double>, int64_t>())
      .def("forward", &PersistentConv::forward, pybind11::arg("x"), pybind11::arg("res") = pybind11::none())
      .def("forward_into", &PersistentConv::forward_into, pybind11::arg("x"), pybind11::arg("out"),
           pybind11::arg("res") = pybind11::none())
      .def("loop_us", &PersistentConv::loop_us)
      .def("noop", &PersistentConv::noop, pybind11::arg("x"), pybind11::arg("res") = pybind11::none())
      .def("create_us", &PersistentConv::create_us)
      .def("impl", &PersistentConv::impl);
  m.def("omp_max_threads", &omp_max_threads);
  m.def("gomp_path", &gomp_path);
  m.def("effective_isa", &effective_isa);
  m.def("version", &version);
}
