#include "dnnl_gemm.h"

#include "qaengine/error.h"

#ifdef QAENGINE_HAVE_DNNL
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <dnnl.hpp>
#include <mutex>
#include <string>
#include <vector>
#endif

namespace qaengine {

#ifdef QAENGINE_HAVE_DNNL
namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
constexpr auto f32 = dnnl::memory::data_type::f32;
constexpr int64_t kLayoutRows = 64;   // row count whose primitive picks the weight layout (the encoder's chunk)
constexpr size_t kMaxPrimitives = 64;  // row counts kept per GEMM (a batch of ragged windows has many)

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// OpenMP at one thread for the calling thread while a primitive is created outside run_items (at load), so that
// it is the single-threaded primitive the pool's items will run.
class OneThread {
 public:
  OneThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

}  // namespace

struct DnnlGemm::Impl {
  int64_t out = 0, in = 0;
  std::optional<Activation> act;
  memory::desc weights_md, bias_md;
  memory weights, bias;
  std::mutex mutex;
  struct Entry {
    int64_t rows;
    bool accumulate;
    dnnl::matmul primitive;
    size_t scratch_bytes;
  };
  std::vector<Entry> entries;  // most recently created last

  dnnl::matmul::primitive_desc describe(int64_t rows, bool accumulate, const memory::desc& weights_desc) const {
    dnnl::post_ops ops;
    if (act) {
      switch (*act) {
        case Activation::Gelu: ops.append_eltwise(dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f); break;
        case Activation::GeluTanh: ops.append_eltwise(dnnl::algorithm::eltwise_gelu_tanh, 0.f, 0.f); break;
        case Activation::Relu: ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f); break;
      }
    }
    if (accumulate) ops.append_sum(1.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per calling thread, so threads can share a primitive
    const memory::desc src({rows, in}, f32, tag::ab), dst({rows, out}, f32, tag::ab);
    return dnnl::matmul::primitive_desc(cpu_engine(), src, weights_desc, bias_md, dst, attr);
  }

  // A copy (primitives are reference-counted handles): another thread may evict the entry meanwhile.
  Entry entry(int64_t rows, bool accumulate) {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = entries.rbegin(); it != entries.rend(); ++it)
      if (it->rows == rows && it->accumulate == accumulate) return *it;
    if (entries.size() >= kMaxPrimitives) entries.erase(entries.begin());
    try {
      const auto pd = describe(rows, accumulate, weights_md);
      entries.push_back({rows, accumulate, dnnl::matmul(pd), pd.scratchpad_desc().get_size()});
    } catch (const dnnl::error& e) {
      throw Error("oneDNN cannot create the fp32 matmul [" + std::to_string(rows) + ", " + std::to_string(in) +
                  "] x [" + std::to_string(in) + ", " + std::to_string(out) + "]: " + e.what() +
                  " (load the engine with gemm='onednn' or 'aten' to avoid libdnnl)");
    }
    return entries.back();
  }
};

bool dnnl_available() { return true; }

DnnlGemm::DnnlGemm(const float* weight, const float* bias, int64_t out, int64_t in, std::optional<Activation> act)
    : impl_(std::make_unique<Impl>()) {
  if (out <= 0 || in <= 0) throw Error("DnnlGemm needs a non-empty weight, got [" + std::to_string(out) + ", " +
                                       std::to_string(in) + "]");
  Impl& m = *impl_;
  m.out = out;
  m.in = in;
  m.act = act;
  m.bias_md = memory::desc({1, out}, f32, tag::ab);
  OneThread one;
  try {
    // The layout brgemm picks for the encoder's row chunk; primitives for other row counts take the same layout.
    const memory::desc any({in, out}, f32, tag::any);
    m.weights_md = m.describe(kLayoutRows, false, any).weights_desc();
    m.weights = memory(m.weights_md, cpu_engine());
    m.bias = memory(m.bias_md, cpu_engine());
    std::copy(bias, bias + out, static_cast<float*>(m.bias.get_data_handle()));
    // W `[out, in]` row-major is Wᵀ `[in, out]` in layout `ba`.
    memory plain(memory::desc({in, out}, f32, tag::ba), cpu_engine(), const_cast<float*>(weight));
    dnnl::stream& s = thread_stream();
    dnnl::reorder(plain, m.weights).execute(s, plain, m.weights);
    s.wait();
  } catch (const dnnl::error& e) {
    throw Error(std::string("oneDNN cannot set up an fp32 matmul: ") + e.what());
  }
}

DnnlGemm::~DnnlGemm() = default;

void DnnlGemm::run(const float* x, int64_t rows, float* y, bool accumulate) const {
  if (rows <= 0) return;
  const Impl::Entry e = impl_->entry(rows, accumulate);
  thread_local std::vector<uint8_t> scratch;  // 64-byte aligned below
  if (scratch.size() < e.scratch_bytes + 64) scratch.resize(e.scratch_bytes + 64);
  void* scratch_data = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
  const dnnl::engine& engine = cpu_engine();
  memory src({{rows, impl_->in}, f32, tag::ab}, engine, const_cast<float*>(x));
  memory dst({{rows, impl_->out}, f32, tag::ab}, engine, y);
  const memory::dim pad_bytes = static_cast<memory::dim>(std::max<size_t>(e.scratch_bytes, 1));
  memory pad({{pad_bytes}, memory::data_type::u8, tag::a}, engine, scratch_data);
  dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, src.get()},
                            {DNNL_ARG_WEIGHTS, impl_->weights.get()},
                            {DNNL_ARG_BIAS, impl_->bias.get()},
                            {DNNL_ARG_DST, dst.get()},
                            {DNNL_ARG_SCRATCHPAD, pad.get()}};
  dnnl::stream& s = thread_stream();
  const int nargs = e.scratch_bytes > 0 ? 5 : 4;
  const dnnl_status_t status = dnnl_primitive_execute(e.primitive.get(), s.get(), nargs, args);
  if (status != dnnl_success) throw Error("oneDNN matmul failed (status " + std::to_string(status) + ")");
}

#else  // built without libdnnl

struct DnnlGemm::Impl {};

bool dnnl_available() { return false; }

DnnlGemm::DnnlGemm(const float*, const float*, int64_t, int64_t, std::optional<Activation>) {
  throw Error("libqaengine was built without oneDNN's library (libdnnl); use gemm='onednn' or 'aten'");
}

DnnlGemm::~DnnlGemm() = default;

void DnnlGemm::run(const float*, int64_t, float*, bool) const {}

#endif

}  // namespace qaengine
