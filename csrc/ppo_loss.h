// Interface between the operator layer (ppo_loss.cpp: tensors, checks, registration)
// and the row kernels (ppo_loss_kernels.h), which are compiled once per CPU
// instruction set (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp) and
// picked at run time from ATen's CPU capability. Plain structs, no tensors: the kernel
// translation units include only at::vec and at::parallel_for.
#pragma once

#include <cstdint>

namespace rlhf_fast {

enum class LogitsType : int { kFloat, kBFloat16, kHalf };

// logits as [B, T, V] with element strides (stride 1 on V); row r = b·T + t.
struct RowsLayout {
  const void* data;
  LogitsType type;
  int64_t batch;     // B
  int64_t seq;       // T
  int64_t vocab;     // V
  int64_t stride_b;  // elements between sequences
  int64_t stride_t;  // elements between tokens of a sequence
};

// Sanitised target ids [N], int32 or int64 (backward also takes −1: no one-hot term).
struct Targets {
  const void* data;
  bool is_int64;
};

// Per-token loss settings, already in the fp32 forms the math uses.
struct LossParams {
  float ratio_low;      // 1 − ε_low
  float ratio_high;     // 1 + ε_high
  float dual_clip;      // c; only read when has_dual_clip
  bool has_dual_clip;
  float kl_coef;        // β
  int kl_estimator;     // 0 k1, 1 k2, 2 k3, 3 k3+
  float entropy_coef;   // η
  float temperature;    // τ
  bool has_old;
  bool has_ref;
};

struct ForwardArgs {
  RowsLayout logits;
  Targets targets;
  const float* advantages;    // [N]
  const float* old_logprobs;  // [N] or nullptr
  const float* ref_logprobs;  // [N] or nullptr
  LossParams params;
  // outputs, fp32 [N] each (TokenResults order)
  float* logprobs;
  float* entropy;
  float* row_max;  // m = max_j x_j
  float* log_sum;  // log Σ_j exp(x_j − m)
  float* ratio;
  float* pg;
  float* kl;
  float* loss;
  float* dlogp;
  float* log_scale;     // s of pg, loss and dlogp (they are stored times e^−s)
  float* kl_log_scale;  // s of kl
};

struct BackwardArgs {
  RowsLayout logits;
  Targets targets;
  const float* row_max;       // [N] m
  const float* log_sum;       // [N] log s
  const float* entropy;       // [N]
  const float* coef_logprob;  // [N] d(loss)/d lp
  const float* coef_entropy;  // [N] η · aggregation weight · upstream grad
  float temperature;
  const float* outside;       // [N] probability on other vocabulary shards, or nullptr (whole rows)
  // d(loss)/d(logits), same dtype as logits, [B, T, V] with its own strides;
  // may be the logits' own memory (in-place backward)
  void* out;
  int64_t out_stride_b;
  int64_t out_stride_t;
};

struct LogprobsArgs {
  RowsLayout logits;
  Targets targets;
  float temperature;
  float* logprobs;  // [N]
  float* entropy;   // [N] or nullptr (not computed)
  float* row_max;   // [N]
  float* log_sum;   // [N]
};

// Each returns the number of rows whose target was outside [0, V) (their outputs are NaN).
struct KernelTable {
  const char* name;
  int64_t (*forward)(const ForwardArgs&);
  int64_t (*backward)(const BackwardArgs&);
  int64_t (*logprobs)(const LogprobsArgs&);
};

namespace DEFAULT { extern const KernelTable kKernels; }
#ifdef RLHF_FAST_HAVE_AVX2
namespace AVX2 { extern const KernelTable kKernels; }
#endif
#ifdef RLHF_FAST_HAVE_AVX512
namespace AVX512 { extern const KernelTable kKernels; }
#endif

}  // namespace rlhf_fast
