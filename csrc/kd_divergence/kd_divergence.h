// Fused knowledge-distillation divergences between a student's and a teacher's logits, one
// row (token) at a time: log-softmax of both at temperature T, the divergence of the row and
// its gradient with respect to the student's logits, without [rows, vocab] temporaries.
//
// With q = softmax(s / T) (student), p = softmax(t / T) (teacher), every divergence D(q, p)
// here has d D / d (s_k / T) = w_k - q_k * sum_j w_j, where w_k = q_k * dD/dq_k is a cheap
// per-element term (see divergence_term). So a row takes three sweeps over the vocabulary:
// the two log-sum-exps, then the loss and sum(w), then the gradient (two for forward KL on a
// GPU, whose sum(w) is known: see kForwardKLSumW).
//
// The per-element math below is shared by the CPU and CUDA launchers (and mirrored by the
// Triton kernel in kernels/kd_divergence.py and the torch reference in
// kdfast/reference/kd_divergence.py).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/kd_common.h"

namespace kdfast {
namespace kd_divergence {

// Same order as KINDS in kdfast/ops/kd_divergence.py.
enum Kind : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3, kSkewKL = 4 };
constexpr int kNumKinds = 5;

struct Params {
  int64_t rows = 0;
  int64_t vocab = 0;  // columns of the shared vocabulary read from each row
  const void* student = nullptr;
  int64_t student_stride = 0;  // elements between rows
  int student_dtype = kFloat32;
  const void* teacher = nullptr;
  int64_t teacher_stride = 0;
  int teacher_dtype = kFloat32;
  const int64_t* labels = nullptr;  // [rows] or null; rows whose label is ignore_index count 0
  int64_t ignore_index = -100;
  float* row_loss = nullptr;  // float32 [rows]
  void* grad = nullptr;       // d row_loss[r] / d student[r, :], or null for no gradient
  int64_t grad_stride = 0;
  int64_t grad_cols = 0;      // the student's row width; columns >= vocab get gradient 0
  int grad_dtype = kFloat32;
  int kind = kForwardKL;
  // JSD weight of the teacher / skew KL mixing weight, in double: 1 - beta is formed from it on
  // the host, where a float beta near 1 would have lost it (1 - 1e-6 rounds to 1 - 1.19e-6)
  double beta = 0.5;
  float inv_temperature = 1.f;
  float loss_scale = 1.f;     // e.g. T^2 for Hinton-style scaling
  float* workspace = nullptr; // CPU: workspace_floats_per_thread(vocab) per thread; unused on CUDA
  int num_threads = 1;
  void* stream = nullptr;
};

// CPU scratch of one thread: the widened student and teacher rows, a 16-bit gradient row and
// the exponentials exp(x - max) of both rows.
inline int64_t workspace_floats_per_thread(int64_t vocab) { return 5 * vocab; }

// Constants of one call, derived once on the host.
struct Consts {
  int kind;
  float beta, one_minus_beta, log_beta, log_one_minus_beta;
};

inline Consts make_consts(const Params& p) {
  Consts c;
  c.kind = p.kind;
  c.beta = static_cast<float>(p.beta);
  c.one_minus_beta = static_cast<float>(1.0 - p.beta);
  c.log_beta = p.beta > 0.0 ? static_cast<float>(std::log(p.beta)) : -INFINITY;
  c.log_one_minus_beta = p.beta < 1.0 ? static_cast<float>(std::log1p(-p.beta)) : -INFINITY;
  return c;
}

// log(1 + e) for e in [0, 1], via 2 atanh(e / (2 + e)) (the series converges for s <= 1/3).
KD_HD float kd_log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return log1pf(e);
#else
  const float s = e / (2.f + e), s2 = s * s;
  float a = 1.f / 13.f;
  a = a * s2 + 1.f / 11.f;
  a = a * s2 + 1.f / 9.f;
  a = a * s2 + 1.f / 7.f;
  a = a * s2 + 1.f / 5.f;
  a = a * s2 + 1.f / 3.f;
  a = a * s2 + 1.f;
  return 2.f * s * a;
#endif
}

// p * (a - b) with the convention 0 * log 0 = 0 (so -inf log-probabilities give no NaN).
KD_HD float weighted_log_ratio(float p, float a, float b) { return p > 0.f ? p * (a - b) : 0.f; }

// The mixture m = beta p + (1 - beta) q of JSD and skew KL: log m and the student's share
// (1 - beta) q / m. log m = hi + log1p(lo / hi), with hi the larger of the two weighted log
// terms and the ratio taken from the probabilities (no exp). Where both weighted
// probabilities underflow to 0, log m falls back to hi: those entries add nothing, as their
// terms are weighted by p and q.
KD_HD float log_mixture(const Consts& c, float ls, float lt, float q, float p, float& student_share) {
  const float a = c.log_beta + lt, b = c.log_one_minus_beta + ls;
  const float va = c.beta * p, vb = c.one_minus_beta * q;
  const float hi = a > b ? a : b;
  const float big = va > vb ? va : vb, small = va > vb ? vb : va;
  const float m = va + vb;
  // Where both weighted probabilities underflow the share is 0, except at beta = 0: then m is q
  // itself and the share is 1 for every q (skew KL is the forward KL, whose w is -p).
  student_share = m > 0.f ? vb / m : (c.beta > 0.f ? 0.f : 1.f);
  const float lm = hi + kd_log1p_unit(big > 0.f ? small / big : 0.f);
  return hi == -INFINITY ? -INFINITY : lm;
}

// One vocabulary entry: ls = log q (student), lt = log p (teacher), and q, p themselves (each
// launcher forms them once: the CPU one from the exponentials of its log-sum-exp sweep, the
// CUDA one with kd_exp). Returns the entry's contribution to the divergence and sets
// w = q * dD/dq. KIND is a template argument so that the CPU row loops compile to
// straight-line, vectorisable code.
template <int KIND>
KD_HD float divergence_term(const Consts& c, float ls, float lt, float q, float p, float& w) {
  if constexpr (KIND == kForwardKL) {  // KL(p || q)
    w = -p;
    return weighted_log_ratio(p, lt, ls);
  } else if constexpr (KIND == kReverseKL) {  // KL(q || p); the +q in dD/dq cancels in the gradient
    const float v = weighted_log_ratio(q, ls, lt);
    w = v;
    return v;
  } else if constexpr (KIND == kJSD) {  // beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    // The weights go inside the 0 log 0 convention: at beta = 0 (or 1) an entry with p > 0
    // and q = 0 (or the reverse) has lm = -inf, and beta * inf would be NaN; the term is 0.
    float share;
    const float lm = log_mixture(c, ls, lt, q, p, share);
    const float student_part = weighted_log_ratio(c.one_minus_beta * q, ls, lm);
    w = student_part;
    return weighted_log_ratio(c.beta * p, lt, lm) + student_part;
  } else if constexpr (KIND == kTVD) {  // 0.5 sum |p - q|
    // The sign by comparison, not from the sign of q - p: compilers fuse the product that
    // formed q or p into that subtraction (FMA), leaving a rounding residual where q == p.
    w = q > p ? 0.5f * q : (q < p ? -0.5f * q : 0.f);
    return 0.5f * (q > p ? q - p : p - q);
  } else {  // kSkewKL: KL(p || beta p + (1 - beta) q)
    float share;
    const float lm = log_mixture(c, ls, lt, q, p, share);
    // w = -(1 - beta) q p / m = -p * share: both factors in [0, 1], nothing overflows.
    w = -p * share;
    return weighted_log_ratio(p, lt, lm);
  }
}

// A row's log-normaliser log(sum exp(x / T)) = m / T + log_z, kept as its two parts with the
// row's max m in logit units: log-probabilities are formed as tempered_shift(x, m) - log_z
// (kd_common.h), so large logits (1e4) keep their small differences, which
// x / T - (m / T + log_z) would round away at the precision of m, and logits of 1e38 at T < 1
// do not overflow. A row without a finite normaliser (every entry -inf, or an inf or NaN entry)
// has no distribution: its loss and gradient are NaN for every kind.
struct LogNorm {
  float m, log_z;
};

// The CPU launcher passes rows it has already tempered (cpu::tempered_row) with inv_t = 1.
KD_HD float log_prob(float x, LogNorm n, float inv_t) { return tempered_shift(x, n.m, inv_t) - n.log_z; }

KD_HD bool is_distribution(LogNorm n) {
  return n.m > -INFINITY && n.m < INFINITY && n.log_z > -INFINITY && n.log_z < INFINITY;
}

// Gradient of the row's loss with respect to the student logit of entry k.
KD_HD float divergence_grad(float w, float q, float sum_w, float scale) { return (w - q * sum_w) * scale; }

// Forward KL's w is -p, so sum(w) = -1 on every row with a distribution, known before the loss
// sweep: the GPU kernels write its gradient (q - p) in that sweep and skip the third. (The CPU
// launcher, which keeps the row in cache, sums w as for the other kinds.)
constexpr float kForwardKLSumW = -1.f;

int kd_divergence_cpu(const Params& p);
int kd_divergence_cuda(const Params& p);

}  // namespace kd_divergence
}  // namespace kdfast
