// Row kernels of the fused PPO loss (the per-token math and gradient of docs/contract.md) on at::vec, one row per task of
// at::parallel_for. Included by kernels_<isa>.cpp, each of which defines CPU_CAPABILITY
// (and CPU_CAPABILITY_<ISA>) first, so every instruction set gets its own namespace,
// exactly like ATen's own per-ISA kernels.
//
// Accuracy: fp32 math for every logits dtype, exp from at::vec (Sleef u10 on AVX2/AVX-512,
// std::exp otherwise), x = logit / τ with a true division (the reference's rounding).
// Every log-probability subtracts the row max first: lp = (x_y − m) − log s and
// p_j = exp((x_j − m) − log s), never x − (m + log s), whose rounding of m + log s loses
// |m|·ulp (all of log s at |m| = 1e30). Banned tokens (x = −inf) never form 0·(−inf):
// differences x − m are clamped to the lowest finite float before they multiply a
// probability. NaN anywhere in a row reaches every output of that row through the
// NaN-propagating max.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including ppo_loss_kernels.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ppo_loss.h"

namespace rlhf_fast {
namespace CPU_CAPABILITY {

using VecF = at::vec::Vectorized<float>;
constexpr int64_t kVec = VecF::size();
constexpr int64_t kChunk = 2 * kVec;  // logits per load: one Vectorized<bf16|fp16> = two float vectors
// Logits of one row held in an L1 buffer between the two sweeps of a block (8 KiB).
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kChunk == 0, "a block holds whole chunks");

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline float nan_max(float a, float b) {
  return (std::isnan(a) || a > b) ? a : b;  // b wins ties and carries its own NaN
}

inline float nan_min(float a, float b) {
  return (std::isnan(a) || a < b) ? a : b;
}

inline float reduce_max(const VecF& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kVec; ++i) m = nan_max(lanes[i], m);
  return m;
}

inline float reduce_sum(const VecF& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kVec; ++i) s += lanes[i];
  return s;
}

// A compensated (Kahan) sum per lane: `lost` keeps the low-order part each addition rounds
// away. A row's softmax sum adds thousands of terms far below the largest (e^0 = 1), each
// add rounding at the running sum's ulp the same way; plain lanes then drift by up to
// n·ulp/2 (about 5e-6 for 2k equal terms of 1e-5), compensated ones by a few ulps in all.
struct CompensatedSum {
  VecF sum{0.f};
  VecF lost{0.f};
  void add(const VecF& x) {
    const VecF y = x - lost;
    const VecF t = sum + y;
    lost = (t - sum) - y;
    sum = t;
  }
  VecF value() const { return sum - lost; }
  void reset(const VecF& v) {  // the running value becomes v, nothing lost
    sum = v;
    lost = VecF(0.f);
  }
};

// Loads and stores of kChunk logits as two fp32 vectors.
template <typename T>
struct Io {
  static_assert(at::vec::Vectorized<T>::size() == kChunk, "one reduced vector is two float vectors");
  static void load(const T* p, VecF& a, VecF& b) { at::vec::load_to_float<T>(p, a, b); }
  static void store(T* p, const VecF& a, const VecF& b) { at::vec::convert_from_float<T>(a, b).store(p); }
};

template <>
struct Io<float> {
  static void load(const float* p, VecF& a, VecF& b) {
    a = VecF::loadu(p);
    b = VecF::loadu(p + kVec);
  }
  static void store(float* p, const VecF& a, const VecF& b) {
    a.store(p);
    b.store(p + kVec);
  }
};

inline int64_t row_offset(int64_t row, int64_t seq, int64_t stride_b, int64_t stride_t) {
  return (row / seq) * stride_b + (row % seq) * stride_t;  // int64: N·V exceeds 2^31
}

inline int64_t rows_grain(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / vocab);  // ~32k logits per task at least
}

template <typename scalar_t, bool kScaled>
inline float load_x(const scalar_t* p, float tau) {
  const float x = static_cast<float>(*p);
  return kScaled ? x / tau : x;
}

// ---------------------------------------------------------------------------------
// The online-softmax step, written once: m = max x, s = Σ e^(x−m), t = Σ e^(x−m)·(x−m)
// in one streaming pass over a row. lp = (x_y − m) − log s, H = log s − t/s.
// ---------------------------------------------------------------------------------

struct SoftmaxStats {
  float max;   // m: −inf when every logit is −inf, NaN when any is NaN
  float sum;   // s
  float dsum;  // t (0 unless requested)
};

// Each block of kBlock logits is converted (x = logit/τ) into `buf` while its max is
// taken, then swept once from L1 for Σ exp and Σ exp·(x − m); the running sums are
// rescaled by e^(m_old − m_new) only when a block raises the max. When that factor
// underflows to 0 (the max jumps by more than ~104, e.g. from −1e36 to 1e36) the earlier
// terms vanish exactly: the sums are reset, never formed as 0·(t + s·shift), where s·shift
// overflows to −inf and 0·(−inf) is NaN.
template <typename scalar_t, bool kScaled, bool kEntropy>
SoftmaxStats softmax_stats(const scalar_t* row, int64_t vocab, float tau, float* buf) {
  float m = kNegInf;
  CompensatedSum sum, dsum;
  const VecF vtau(tau), lowest(kLowest);
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const scalar_t* src = row + start;
    VecF vmax(kNegInf);
    int64_t j = 0;
    for (; j + kChunk <= n; j += kChunk) {
      VecF a, b;
      Io<scalar_t>::load(src + j, a, b);
      if constexpr (kScaled) {
        a = a / vtau;
        b = b / vtau;
      }
      a.store(buf + j);
      b.store(buf + j + kVec);
      vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
    }
    float block_max = reduce_max(vmax);
    for (; j < n; ++j) {
      buf[j] = load_x<scalar_t, kScaled>(src + j, tau);
      block_max = nan_max(buf[j], block_max);
    }
    const int64_t padded = (n + kVec - 1) / kVec * kVec;
    for (int64_t k = n; k < padded; ++k) buf[k] = kNegInf;  // e^(−inf) = 0: padding adds nothing

    const float m_new = nan_max(block_max, m);
    if (!(m_new == m)) {  // the max grew, or turned NaN
      if (m != kNegInf) {
        const float shift = m - m_new;  // < 0; −inf when the jump overflows; NaN with a NaN logit
        const float factor = std::exp(shift);
        if (factor == 0.f) {  // every earlier term is below fp32's smallest number: exactly 0
          sum.reset(VecF(0.f));
          dsum.reset(VecF(0.f));
        } else {  // shift ∈ (−104, 0), so s·shift is finite (or NaN, which must spread)
          const VecF scale(factor), s_old = sum.value();
          dsum.reset((dsum.value() + s_old * VecF(shift)) * scale);  // Σ e'(x − m_new) = e^shift·(t + s·shift)
          sum.reset(s_old * scale);
        }
      }
      m = m_new;
    }
    if (m == kNegInf) continue;  // every logit so far is −inf (banned): nothing to add

    const VecF vm(m);
    for (int64_t k = 0; k < padded; k += kVec) {
      const VecF d = at::vec::clamp_min(VecF::loadu(buf + k) - vm, lowest);
      const VecF e = d.exp();
      sum.add(e);
      if constexpr (kEntropy) dsum.add(e * d);
    }
  }
  return {m, reduce_sum(sum.value()), kEntropy ? reduce_sum(dsum.value()) : 0.f};
}

struct RowLogprob {
  float lp;
  float entropy;
  float row_max;  // m
  float log_sum;  // log s
};

// lp = (x_y − m) − log s: the max is subtracted first, so a large m costs no digits.
template <typename scalar_t, bool kScaled, bool kEntropy>
inline RowLogprob row_logprob(const scalar_t* row, int64_t vocab, int64_t target, float tau, float* buf) {
  const SoftmaxStats st = softmax_stats<scalar_t, kScaled, kEntropy>(row, vocab, tau, buf);
  const float log_s = std::log(st.sum);
  const float x_y = load_x<scalar_t, kScaled>(row + target, tau);
  const float entropy = kEntropy ? log_s - st.dsum / st.sum : 0.f;
  return {(x_y - st.max) - log_s, entropy, st.max, log_s};
}

// ---------------------------------------------------------------------------------
// Per-token loss and g = dℓ/d lp (docs/contract.md), in the reference's fp32 order.
// ---------------------------------------------------------------------------------

struct TokenLoss {
  float ratio, pg, kl, loss, dlogp, log_scale, kl_log_scale;
};

// Exponentials above e^kScaleFrom are carried as e^(x − s) and a log scale s ≤ kScaleMax (the same
// constants as SCALE_FROM and SCALE_MAX in rlhf_fast/backends/rows.py, which say why).
constexpr float kScaleFrom = 64.f;
constexpr float kScaleMax = 87.f;

inline float log_scale_of(float exponent) {
  return exponent > kScaleFrom ? std::min(exponent - kScaleFrom, kScaleMax) : 0.f;  // 0 for NaN too
}

// Finite inputs give finite results wherever the math is finite, and NaN inputs give NaN:
// a zero advantage contributes −0·r = 0 and no gradient even when r = e^(lp − old)
// overflows (never 0·inf); a clipped token (r = inf included) has no gradient; β = 0 adds
// nothing even when k3 overflows, while a NaN KL (a NaN reference log-prob) still spreads.
// pg, the loss and g come out times e^−s, kl times e^−s_kl, where s > 0 only when an unclipped
// ratio, or (β ≠ 0) k3's e^δ, exceeds e^64: a value beyond fp32 stays finite until the caller has
// weighed it. With s = s_kl = 0 every factor below is exactly 1: the plain formulas, bit for bit.
inline TokenLoss token_loss(float lp, float entropy, float adv, float old_lp, float ref_lp, const LossParams& p) {
  const float log_ratio = lp - old_lp;
  const float ratio = std::exp(log_ratio);
  const bool no_advantage = adv == 0.f && !std::isnan(ratio);  // −A·r = 0 for every r, inf included
  const bool inactive = (adv > 0.f && ratio > p.ratio_high) || (adv < 0.f && ratio < p.ratio_low) ||
                        (p.has_dual_clip && adv < 0.f && ratio > p.dual_clip);
  const bool active = !(inactive || no_advantage);

  const float delta = p.has_ref ? ref_lp - lp : 0.f;
  const bool exp_kl = p.has_ref && p.kl_estimator >= 2;  // k3, k3+: e^δ
  const float kl_scale = exp_kl ? log_scale_of(delta) : 0.f;
  float scale = active ? log_scale_of(log_ratio) : 0.f;
  if (p.kl_coef != 0.f) scale = std::max(scale, kl_scale);
  const float unit = std::exp(-scale);  // 1 when s = 0
  const float ratio_s = std::exp(log_ratio - scale);
  const float low = p.ratio_low * unit, high = p.ratio_high * unit;
  const float clipped = ratio_s < low ? low : (ratio_s > high ? high : ratio_s);
  float pg = nan_max(no_advantage ? 0.f : -adv * ratio_s, -adv * clipped);
  if (p.has_dual_clip && adv < 0.f) pg = nan_min(pg, -p.dual_clip * adv * unit);

  float kl = 0.f, kl_grad = 0.f;  // times e^−s_kl
  if (p.has_ref) {
    const float kl_unit = std::exp(-kl_scale);
    const float k2 = 0.5f * delta * delta * kl_unit;
    const float exp_delta = std::exp(delta - kl_scale);
    const float k3 = exp_delta - delta * kl_unit - kl_unit;
    switch (p.kl_estimator) {
      case 0: kl = -delta * kl_unit; kl_grad = kl_unit; break;
      case 1: kl = k2; kl_grad = (lp - ref_lp) * kl_unit; break;
      case 2: kl = k3; kl_grad = kl_unit - exp_delta; break;
      default: kl = k2 + (k3 - k2); kl_grad = (lp - ref_lp) * kl_unit; break;  // k3+: value of k3, gradient of k2
    }
  }
  const float kl_to_loss = std::exp(kl_scale - scale);
  const float kl_term = (p.kl_coef != 0.f || std::isnan(kl)) ? p.kl_coef * kl * kl_to_loss : 0.f;  // never 0·inf
  const float loss = pg + kl_term - p.entropy_coef * entropy * unit;

  float dlogp = active ? -adv * ratio_s : 0.f;
  if (p.has_ref && p.kl_coef != 0.f) dlogp = dlogp + p.kl_coef * kl_grad * kl_to_loss;
  return {ratio, pg, kl, loss, dlogp, scale, kl_scale};
}

// ---------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------

// The row loop of the kernels that read each row's log-prob: every row r whose target y is in [0, V) gets
// row_logprob (with the entropy when kEntropy) and goes to on_row(r, rl); every other row goes to on_bad(r),
// which writes its NaNs, and is counted. Returns that count.
template <typename scalar_t, typename index_t, bool kScaled, bool kEntropy, typename OnRow, typename OnBad>
inline int64_t for_each_row_logprob(const RowsLayout& L, const Targets& target_ids, float tau,
                                    const OnRow& on_row, const OnBad& on_bad) {
  const auto* logits = static_cast<const scalar_t*>(L.data);
  const auto* targets = static_cast<const index_t*>(target_ids.data);
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, L.batch * L.seq, rows_grain(L.vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = static_cast<int64_t>(targets[r]);
      if (y < 0 || y >= L.vocab) {
        bad.fetch_add(1, std::memory_order_relaxed);
        on_bad(r);
        continue;
      }
      const scalar_t* row = logits + row_offset(r, L.seq, L.stride_b, L.stride_t);
      on_row(r, row_logprob<scalar_t, kScaled, kEntropy>(row, L.vocab, y, tau, buf));
    }
  });
  return bad.load();
}

template <typename scalar_t, typename index_t, bool kScaled>
int64_t forward_rows(const ForwardArgs& a) {
  const auto on_row = [&a](int64_t r, const RowLogprob& rl) {
    const float old_lp = a.old_logprobs != nullptr ? a.old_logprobs[r] : rl.lp;
    const float ref_lp = a.ref_logprobs != nullptr ? a.ref_logprobs[r] : 0.f;
    const TokenLoss t = token_loss(rl.lp, rl.entropy, a.advantages[r], old_lp, ref_lp, a.params);
    a.logprobs[r] = rl.lp;
    a.entropy[r] = rl.entropy;
    a.row_max[r] = rl.row_max;
    a.log_sum[r] = rl.log_sum;
    a.ratio[r] = t.ratio;
    a.pg[r] = t.pg;
    a.kl[r] = t.kl;
    a.loss[r] = t.loss;
    a.dlogp[r] = t.dlogp;
    a.log_scale[r] = t.log_scale;
    a.kl_log_scale[r] = t.kl_log_scale;
  };
  const auto on_bad = [&a](int64_t r) {
    a.logprobs[r] = a.entropy[r] = a.row_max[r] = a.log_sum[r] = a.ratio[r] = kNaN;
    a.pg[r] = a.kl[r] = a.loss[r] = a.dlogp[r] = a.log_scale[r] = a.kl_log_scale[r] = kNaN;
  };
  const float tau = a.params.temperature;
  return for_each_row_logprob<scalar_t, index_t, kScaled, true>(a.logits, a.targets, tau, on_row, on_bad);
}

template <typename scalar_t, typename index_t, bool kScaled>
int64_t logprobs_rows(const LogprobsArgs& a) {
  const auto on_row = [&a](int64_t r, const RowLogprob& rl) {
    a.logprobs[r] = rl.lp;
    a.row_max[r] = rl.row_max;
    a.log_sum[r] = rl.log_sum;
    if (a.entropy != nullptr) a.entropy[r] = rl.entropy;
  };
  const auto on_bad = [&a](int64_t r) {
    a.logprobs[r] = a.row_max[r] = a.log_sum[r] = kNaN;
    if (a.entropy != nullptr) a.entropy[r] = kNaN;
  };
  const float tau = a.temperature;
  return a.entropy != nullptr
             ? for_each_row_logprob<scalar_t, index_t, kScaled, true>(a.logits, a.targets, tau, on_row, on_bad)
             : for_each_row_logprob<scalar_t, index_t, kScaled, false>(a.logits, a.targets, tau, on_row, on_bad);
}

// d(loss)/d x_j / τ for a non-target j, as p·((c_H/τ)·log p_j + (c_H·H − c_lp)/τ), with
// log p_j = (x_j − m) − log s (the max subtracted first):
// `ch_p = (c_H/τ)·p` multiplies the clamped log p, so a banned token gives 0·finite = 0.
// A row with c_lp = c_H = 0 (masked, or of weight 0) gets exact zeros without reading its
// logits, which may be anything there (all −inf, NaN).
//
// The sweep also sums Σ_{j≠y} p_j: for a confident target (that sum, plus the probability on other
// vocabulary shards, below 1/2) it is the one-hot factor 1 − p_y, which 1 − p_y itself would lose to
// cancellation (A = 1e6 at p_y = 0.99993 would keep three digits).
//
// kGuard: a row whose coefficients divided by τ are not finite (a term beyond fp32, or c_lp close to
// FLT_MAX with τ < 1) divides by τ after the product instead and gives p_j = 0 a 0, never 0·inf;
// other rows take the plain sweep.
template <typename scalar_t, bool kScaled, bool kGuard>
inline float backward_sweep(const scalar_t* in_row, scalar_t* out_row, int64_t vocab, int64_t y, float tau, float m,
                            float log_s, float ch, float k, float post) {
  const VecF vm(m), vlog_s(log_s), vch(ch), vk(k), vtau(tau), lowest(kLowest);
  VecF others(0.f);  // Σ_{j≠y} p_j
  // One chunk: its gradient stored, its probabilities returned.
  auto chunk = [&](int64_t j, VecF& pa, VecF& pb) {
    VecF xa, xb;
    Io<scalar_t>::load(in_row + j, xa, xb);
    if constexpr (kScaled) {
      xa = xa / vtau;
      xb = xb / vtau;
    }
    const VecF la = (xa - vm) - vlog_s, lb = (xb - vm) - vlog_s;
    pa = la.exp();
    pb = lb.exp();
    VecF ga = at::vec::fmadd(vch * pa, at::vec::clamp_min(la, lowest), pa * vk);
    VecF gb = at::vec::fmadd(vch * pb, at::vec::clamp_min(lb, lowest), pb * vk);
    if constexpr (kGuard) {
      const VecF vpost(post), zero(0.f);
      ga = VecF::blendv(ga * vpost, zero, pa == zero);
      gb = VecF::blendv(gb * vpost, zero, pb == zero);
    }
    Io<scalar_t>::store(out_row + j, ga, gb);
  };
  const int64_t whole = vocab / kChunk * kChunk;
  const int64_t target_chunk = y >= 0 && y < whole ? y / kChunk * kChunk : whole;  // none: past the last
  VecF pa, pb;
  int64_t j = 0;
  for (; j < target_chunk; j += kChunk) {
    chunk(j, pa, pb);
    others = others + pa + pb;
  }
  if (j < whole) {  // the target's chunk: its own probability stays out of the sum
    chunk(j, pa, pb);
    alignas(64) float lanes[kChunk];
    pa.store(lanes);
    pb.store(lanes + kVec);
    lanes[y - j] = 0.f;
    others = others + VecF::loadu(lanes) + VecF::loadu(lanes + kVec);
    for (j += kChunk; j < whole; j += kChunk) {
      chunk(j, pa, pb);
      others = others + pa + pb;
    }
  }
  float others_sum = reduce_sum(others);
  for (; j < vocab; ++j) {
    const float lpj = (load_x<scalar_t, kScaled>(in_row + j, tau) - m) - log_s;
    const float p = std::exp(lpj);
    float g = (ch * p) * std::max(lpj, kLowest) + p * k;
    if constexpr (kGuard) g = p == 0.f ? 0.f : g * post;
    out_row[j] = static_cast<scalar_t>(g);
    if (j != y) others_sum += p;
  }
  return others_sum;
}

template <typename scalar_t, typename index_t, bool kScaled>
int64_t backward_rows(const BackwardArgs& a) {
  const RowsLayout& L = a.logits;
  const auto* logits = static_cast<const scalar_t*>(L.data);
  auto* out = static_cast<scalar_t*>(a.out);
  const auto* targets = static_cast<const index_t*>(a.targets.data);
  const float tau = a.temperature;
  const float inv_tau = kScaled ? 1.0f / tau : 1.0f;
  std::atomic<int64_t> bad{0};
  at::parallel_for(0, L.batch * L.seq, rows_grain(L.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* in_row = logits + row_offset(r, L.seq, L.stride_b, L.stride_t);
      scalar_t* out_row = out + row_offset(r, L.seq, a.out_stride_b, a.out_stride_t);
      const int64_t y = static_cast<int64_t>(targets[r]);  // −1: target on another vocabulary shard
      if (y < -1 || y >= L.vocab) {
        bad.fetch_add(1, std::memory_order_relaxed);
        for (int64_t j = 0; j < L.vocab; ++j) out_row[j] = static_cast<scalar_t>(kNaN);
        continue;
      }
      const float c_lp = a.coef_logprob[r], c_h = a.coef_entropy[r];
      if (c_lp == 0.f && c_h == 0.f) {
        std::fill(out_row, out_row + L.vocab, static_cast<scalar_t>(0.f));
        continue;
      }
      const float m = a.row_max[r], log_s = a.log_sum[r], entropy = a.entropy[r];
      const float x_y = y >= 0 ? load_x<scalar_t, kScaled>(in_row + y, tau) : 0.f;  // before an in-place sweep
      const float ch_tau = c_h * inv_tau;
      const float k_tau = (c_h * entropy - c_lp) * inv_tau;
      float others;  // Σ_{j≠y} p_j over these logits
      if (std::isfinite(ch_tau) && std::isfinite(k_tau)) {
        others = backward_sweep<scalar_t, kScaled, false>(in_row, out_row, L.vocab, y, tau, m, log_s, ch_tau, k_tau,
                                                          1.f);
      } else {
        others = backward_sweep<scalar_t, kScaled, true>(in_row, out_row, L.vocab, y, tau, m, log_s, c_h,
                                                         c_h * entropy - c_lp, inv_tau);
      }
      if (y < 0) continue;
      // The target's entry, in the reference's form: (c_lp·(1 − p) + c_H·p·(log p + H)) / τ.
      const float lp_y = (x_y - m) - log_s;
      const float p_y = std::exp(lp_y);
      const float rest = others + (a.outside != nullptr ? a.outside[r] : 0.f);
      const float one_minus_p_y = rest < 0.5f ? rest : 1.0f - p_y;
      const float ent_y = p_y > 0.f ? p_y * (lp_y + entropy) : 0.f;
      const float g_y = (one_minus_p_y == 0.f ? 0.f : c_lp * one_minus_p_y) + c_h * ent_y;
      out_row[y] = static_cast<scalar_t>(kScaled ? g_y / tau : g_y);
    }
  });
  return bad.load();
}

// ---------------------------------------------------------------------------------
// Dtype / index / temperature dispatch and the table the operator layer picks from.
// ---------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

template <template <typename, typename, bool> class Kernel, typename Args>
int64_t dispatch(const Args& a, float temperature) {
  const bool scaled = temperature != 1.0f;
  auto with_index = [&](auto scalar_tag) -> int64_t {
    using scalar_t = typename decltype(scalar_tag)::type;
    if (a.targets.is_int64) {
      return scaled ? Kernel<scalar_t, int64_t, true>::run(a) : Kernel<scalar_t, int64_t, false>::run(a);
    }
    return scaled ? Kernel<scalar_t, int32_t, true>::run(a) : Kernel<scalar_t, int32_t, false>::run(a);
  };
  switch (a.logits.type) {
    case LogitsType::kBFloat16: return with_index(TypeTag<c10::BFloat16>{});
    case LogitsType::kHalf: return with_index(TypeTag<c10::Half>{});
    default: return with_index(TypeTag<float>{});
  }
}

template <typename S, typename I, bool kScaled>
struct ForwardKernel {
  static int64_t run(const ForwardArgs& a) { return forward_rows<S, I, kScaled>(a); }
};
template <typename S, typename I, bool kScaled>
struct BackwardKernel {
  static int64_t run(const BackwardArgs& a) { return backward_rows<S, I, kScaled>(a); }
};
template <typename S, typename I, bool kScaled>
struct LogprobsKernel {
  static int64_t run(const LogprobsArgs& a) { return logprobs_rows<S, I, kScaled>(a); }
};

inline int64_t forward(const ForwardArgs& a) {
  return dispatch<ForwardKernel>(a, a.params.temperature);
}
inline int64_t backward(const BackwardArgs& a) {
  return dispatch<BackwardKernel>(a, a.temperature);
}
inline int64_t logprobs(const LogprobsArgs& a) {
  return dispatch<LogprobsKernel>(a, a.temperature);
}

extern const KernelTable kKernels;
const KernelTable kKernels = {C10_STRINGIZE(CPU_CAPABILITY), &forward, &backward, &logprobs};

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast
