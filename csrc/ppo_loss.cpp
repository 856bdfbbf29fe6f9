// The rlhf_fast CPU operators: argument checks and the CPU implementations, which hand raw
// pointers to the row kernels of the best instruction set that this build, the CPU itself and
// ATen's CPU capability allow (cpu_isa.h). The schemas and their fake implementations are
// defined in Python, in one place for every backend (rlhf_fast/backends/ops.py), before this
// library loads; here only implementations are registered (TORCH_LIBRARY_IMPL).
#include <Python.h>

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "ppo_loss.h"

namespace rlhf_fast {
namespace {

using at::Tensor;

const KernelTable& kernels() {
  static const KernelTable* table = [] {
    const std::string build = choose_build(at::get_cpu_capability(), runnable_builds());
#ifdef RLHF_FAST_HAVE_AVX512
    if (build == "AVX512") return &AVX512::kKernels;
#endif
#ifdef RLHF_FAST_HAVE_AVX2
    if (build == "AVX2") return &AVX2::kKernels;
#endif
    return &DEFAULT::kKernels;
  }();
  return *table;
}

RowsLayout rows_layout(const Tensor& logits, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be a [B, T, V] view, got ", logits.dim(), " dims");
  TORCH_CHECK(logits.size(2) > 0, op, ": logits has an empty vocabulary dimension");
  TORCH_CHECK(logits.stride(2) == 1 || logits.size(2) == 1 || logits.numel() == 0, op,
              ": logits must have stride 1 on the vocabulary dimension, got strides ", logits.strides());
  LogitsType type;
  switch (logits.scalar_type()) {
    case at::kFloat: type = LogitsType::kFloat; break;
    case at::kBFloat16: type = LogitsType::kBFloat16; break;
    case at::kHalf: type = LogitsType::kHalf; break;
    default: TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return {logits.data_ptr(), type, logits.size(0), logits.size(1), logits.size(2), logits.stride(0),
          logits.stride(1)};
}

Targets targets_of(const Tensor& targets, int64_t rows, const char* op) {
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
              ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK(targets.device().is_cpu() && targets.is_contiguous() && targets.numel() == rows, op,
              ": targets must be a contiguous CPU tensor of ", rows, " ids, got shape ", targets.sizes());
  return {targets.data_ptr(), targets.scalar_type() == at::kLong};
}

const float* row_vector(const Tensor& t, int64_t rows, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() && t.numel() == rows,
              op, ": ", name, " must be a contiguous float32 CPU tensor of ", rows, " values, got ",
              t.scalar_type(), " ", t.sizes());
  return t.const_data_ptr<float>();
}

// Elements from the first to the last that t addresses.
int64_t storage_span(const Tensor& t) {
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  return span;
}

// Whether two elements of t may share memory: conservative, as may_overlap_itself in
// rlhf_fast/backends/rows.py (dims sorted by stride must each step over what the smaller ones span).
bool may_overlap_itself(const Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += (size - 1) * stride;
  }
  return false;
}

// out, which the backward writes, must be the logits' own memory in the same layout (in place) or memory
// provably disjoint from them, and own its elements; what cannot be proven disjoint is refused (ValueError),
// as check_gradient_out in rlhf_fast/backends/rows.py does for the other backends.
void check_gradient_out(const Tensor& logits, const Tensor& out, const char* op) {
  if (out.numel() == 0 || logits.numel() == 0) return;
  TORCH_CHECK_VALUE(!may_overlap_itself(out), op, ": out: elements of the gradient buffer share memory (strides ",
                    out.strides(), ", e.g. an expanded tensor), so the gradient cannot be written into it; pass a "
                    "buffer that owns its memory (torch.empty_like(logits))");
  const auto out_begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const auto logits_begin = reinterpret_cast<uintptr_t>(logits.data_ptr());
  if (out_begin == logits_begin && out.sizes() == logits.sizes() && out.strides() == logits.strides()) return;
  const uintptr_t out_end = out_begin + storage_span(out) * out.element_size();
  const uintptr_t logits_end = logits_begin + storage_span(logits) * logits.element_size();
  TORCH_CHECK_VALUE(out_end <= logits_begin || logits_end <= out_begin, op,
                    ": out: the gradient buffer overlaps the logits' memory without being the logits themselves "
                    "(out starts ", static_cast<int64_t>(out_begin - logits_begin), " bytes after them, strides ",
                    out.strides(), " against ", logits.strides(), "), so writing it could overwrite logits not yet "
                    "read; pass the logits themselves (in place) or a separate buffer");
}

void check_targets(int64_t bad_rows, int64_t vocab, const char* op) {
  TORCH_CHECK(bad_rows == 0, op, ": ", bad_rows, " target ids outside [0, ", vocab, ")");
}

// What every row op checks and reads first: τ > 0, the logits' layout and the target ids, into a
// (ForwardArgs, BackwardArgs or LogprobsArgs). Returns the number of rows.
template <typename Args>
int64_t read_rows(Args& a, const Tensor& logits, const Tensor& targets, double temperature, const char* op) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  a.logits = rows_layout(logits, op);
  const int64_t rows = a.logits.batch * a.logits.seq;
  a.targets = targets_of(targets, rows, op);
  return rows;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ppo_forward(
    const Tensor& logits, const Tensor& targets, const Tensor& advantages,
    const std::optional<Tensor>& old_logprobs, const std::optional<Tensor>& ref_logprobs,
    double ratio_low, double ratio_high, double dual_clip, double kl_coef, int64_t kl_estimator,
    double entropy_coef, double temperature) {
  constexpr const char* op = "rlhf_fast::ppo_forward";
  ForwardArgs a{};
  const int64_t rows = read_rows(a, logits, targets, temperature, op);
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 3, op, ": kl_estimator must be 0..3, got ", kl_estimator);
  a.advantages = row_vector(advantages, rows, "advantages", op);
  a.old_logprobs = old_logprobs.has_value() ? row_vector(*old_logprobs, rows, "old_logprobs", op) : nullptr;
  a.ref_logprobs = ref_logprobs.has_value() ? row_vector(*ref_logprobs, rows, "ref_logprobs", op) : nullptr;
  // Thresholds rounded to fp32 as the reference's tensor-vs-scalar comparisons do.
  a.params.ratio_low = static_cast<float>(ratio_low);
  a.params.ratio_high = static_cast<float>(ratio_high);
  a.params.dual_clip = static_cast<float>(dual_clip);
  a.params.has_dual_clip = dual_clip > 0.0;
  a.params.kl_coef = static_cast<float>(kl_coef);
  a.params.kl_estimator = static_cast<int>(kl_estimator);
  a.params.entropy_coef = static_cast<float>(entropy_coef);
  a.params.temperature = static_cast<float>(temperature);
  a.params.has_old = a.old_logprobs != nullptr;
  a.params.has_ref = a.ref_logprobs != nullptr;

  const auto options = logits.options().dtype(at::kFloat);
  Tensor out[11];
  for (auto& t : out) t = at::empty({rows}, options);
  a.logprobs = out[0].data_ptr<float>();
  a.entropy = out[1].data_ptr<float>();
  a.row_max = out[2].data_ptr<float>();
  a.log_sum = out[3].data_ptr<float>();
  a.ratio = out[4].data_ptr<float>();
  a.pg = out[5].data_ptr<float>();
  a.kl = out[6].data_ptr<float>();
  a.loss = out[7].data_ptr<float>();
  a.dlogp = out[8].data_ptr<float>();
  a.log_scale = out[9].data_ptr<float>();
  a.kl_log_scale = out[10].data_ptr<float>();
  check_targets(kernels().forward(a), a.logits.vocab, op);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9], out[10]};
}

void ppo_backward(const Tensor& logits, const Tensor& targets, const Tensor& row_max, const Tensor& log_sum,
                  const Tensor& entropy, const Tensor& coef_logprob, const Tensor& coef_entropy, double temperature,
                  const Tensor& out, const std::optional<Tensor>& outside) {
  constexpr const char* op = "rlhf_fast::ppo_backward";
  BackwardArgs a{};
  const int64_t rows = read_rows(a, logits, targets, temperature, op);
  a.row_max = row_vector(row_max, rows, "row_max", op);
  a.log_sum = row_vector(log_sum, rows, "log_sum", op);
  a.entropy = row_vector(entropy, rows, "entropy", op);
  a.coef_logprob = row_vector(coef_logprob, rows, "coef_logprob", op);
  a.coef_entropy = row_vector(coef_entropy, rows, "coef_entropy", op);
  a.outside = outside.has_value() ? row_vector(*outside, rows, "outside", op) : nullptr;
  a.temperature = static_cast<float>(temperature);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() && out.device().is_cpu(),
              op, ": out must be a CPU tensor like logits (", logits.sizes(), ", ", logits.scalar_type(),
              "), got ", out.sizes(), ", ", out.scalar_type());
  TORCH_CHECK(out.stride(2) == 1 || out.size(2) == 1 || out.numel() == 0, op,
              ": out must have stride 1 on the vocabulary dimension");
  check_gradient_out(logits, out, op);
  a.out = out.data_ptr();
  a.out_stride_b = out.stride(0);
  a.out_stride_t = out.stride(1);
  check_targets(kernels().backward(a), a.logits.vocab, op);
}

// The same kernel writing into the logits' own memory (a separate op: see rlhf_fast/backends/ops.py).
void ppo_backward_inplace(const Tensor& logits, const Tensor& targets, const Tensor& row_max, const Tensor& log_sum,
                          const Tensor& entropy, const Tensor& coef_logprob, const Tensor& coef_entropy,
                          double temperature, const std::optional<Tensor>& outside) {
  TORCH_CHECK_VALUE(!may_overlap_itself(logits), "rlhf_fast::ppo_backward_inplace: logits: elements share memory "
                    "(strides ", logits.strides(), ", e.g. an expanded tensor), so the gradient cannot be written "
                    "into them; pass logits that own their memory (logits.contiguous())");
  ppo_backward(logits, targets, row_max, log_sum, entropy, coef_logprob, coef_entropy, temperature, logits, outside);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> logprobs(const Tensor& logits, const Tensor& targets, double temperature,
                                                    bool with_entropy) {
  constexpr const char* op = "rlhf_fast::logprobs";
  LogprobsArgs a{};
  const int64_t rows = read_rows(a, logits, targets, temperature, op);
  a.temperature = static_cast<float>(temperature);
  const auto options = logits.options().dtype(at::kFloat);
  Tensor lp = at::empty({rows}, options);
  Tensor entropy = at::empty({with_entropy ? rows : 0}, options);
  Tensor row_max = at::empty({rows}, options);
  Tensor log_sum = at::empty({rows}, options);
  a.logprobs = lp.data_ptr<float>();
  a.entropy = with_entropy ? entropy.data_ptr<float>() : nullptr;
  a.row_max = row_max.data_ptr<float>();
  a.log_sum = log_sum.data_ptr<float>();
  check_targets(kernels().logprobs(a), a.logits.vocab, op);
  return {lp, entropy, row_max, log_sum};
}

std::string cpu_capability() {
  return kernels().name;
}

// For tests: the choice rule of kernels() with an injected ATen capability and runnable set.
std::string choose_kernel_build(const std::string& aten_capability, const std::vector<std::string>& runnable) {
  return choose_build(aten_capability, runnable);
}

}  // namespace

// Diagnostics without tensors: catch-all kernels.
TORCH_LIBRARY_FRAGMENT(rlhf_fast, m) {
  m.impl("cpu_capability", &cpu_capability);
  m.impl("runnable_builds", &runnable_builds);
  m.impl("choose_kernel_build", &choose_kernel_build);
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("ppo_forward", &ppo_forward);
  m.impl("ppo_backward", &ppo_backward);
  m.impl("ppo_backward_inplace", &ppo_backward_inplace);
  m.impl("logprobs", &logprobs);
}

}  // namespace rlhf_fast

// `import rlhf_fast._C` loads this library, which registers the implementations above
// (rlhf_fast/backends/cpp.py defines the schemas first).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rlhf_fast CPU operators", -1, nullptr};
  return PyModule_Create(&module);
}
