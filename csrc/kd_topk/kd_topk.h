// Fused KD from a teacher known only by its top-k log-probabilities, one row (token) at a
// time: the student's log-softmax at temperature T, the row's forward KL against the stored
// teacher and its gradient with respect to the student's logits, without [rows, vocab]
// temporaries.
//
// Per row, with z = s / T, q = softmax(z), the k stored ids and log-probabilities lp_i
// (clamped to <= 0) and p_i = exp(lp_i):
//   renormalize: p^_i = p_i / sum(p), loss = sum_i p^_i (log p^_i - log q_id_i)
//   bucket:      loss = sum_i p_i (lp_i - log q_id_i) + r (log r - log Q)
// where r = 1 - sum(p) is the teacher's remaining mass (0 when within the rounding of the
// stored log-probabilities, and absent when k == vocab) and Q = sum of q outside the ids. The
// gradient with respect to z is
//   g_j = A q_j - B [j not an id] exp(z_j - m_out) / Z_out - sum_i [id_i == j] w_i
// with w_i the teacher weight of entry i (p_i or p^_i, 0 where it is 0 or NaN), A = sum(w) (+ r
// when the remainder term is live) and B = r when it is live (Q = Z_out e^(m_out - m) / Z).
//
// A row takes three sweeps over the vocabulary (log-sum-exp, outside sum, gradient) and k-long
// loops over the stored entries; the per-row math below is shared by the CPU and CUDA
// launchers (and mirrored by kernels/kd_topk.py and the torch reference in
// kdfast/reference/kd_topk.py, which is the spec).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/kd_common.h"

namespace kdfast {
namespace kd_topk {

struct Params {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t k = 0;                  // stored entries per row, 1 <= k <= vocab
  const void* student = nullptr;  // [rows, vocab], rows strided, entries adjacent
  int64_t student_stride = 0;
  int student_dtype = kFloat32;
  const int64_t* ids = nullptr;   // [rows, k] contiguous, distinct within a row; one outside the vocabulary: NaN row
  const float* logprobs = nullptr;  // [rows, k] contiguous float32
  const int64_t* labels = nullptr;  // [rows] or null; rows whose label is ignore_index count 0
  int64_t ignore_index = -100;
  float* row_loss = nullptr;      // float32 [rows]
  void* grad = nullptr;           // d row_loss[r] / d student[r, :] (row stride grad_stride), or null
  int64_t grad_stride = 0;
  int grad_dtype = kFloat32;
  int renormalize = 0;            // 1: renormalise the stored mass; 0: the remainder bucket
  float inv_temperature = 1.f;
  float loss_scale = 1.f;         // e.g. T^2
  float stored_eps = 0.f;         // machine epsilon of the dtype the log-probabilities were stored in
  float* workspace = nullptr;     // CPU: workspace_floats_per_thread(vocab) per thread; unused on CUDA
  int num_threads = 1;
  void* stream = nullptr;
};

// CPU scratch of one thread: the row of z = s / T, and the exponentials exp(z - max).
inline int64_t workspace_floats_per_thread(int64_t vocab) { return 2 * vocab; }

// An outside sum below this, taken relative to the row's maximum, is summed again relative to
// the largest outside entry: entries more than ~87 below the maximum are subnormal or 0 there.
// At or above it, what those entries lose (at most ~1.4e-45 each) is below 1e-9 relative.
constexpr float kTinyOutside = 1e-30f;

// Ids are checked on the host only where that costs no device sync (the CPU): a kernel meeting
// one outside the vocabulary reads and writes nothing there and makes its row NaN.
KD_HD bool id_in_range(int64_t id, int64_t vocab) { return id >= 0 && id < vocab; }

// log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012).
KD_HD float log1mexp(float a) {
  return a > -0.693147180559945f ? logf(-expm1f(a)) : log1pf(-expf(a));
}

// p * (a - b) with 0 log 0 = 0, and NaN where p is NaN.
KD_HD float xlogy_ratio(float p, float a, float b) { return p > 0.f ? p * (a - b) : (p == 0.f ? 0.f : p); }

// A stored log-probability as the math takes it: at most 0 (an entry above 0 within the stored
// dtype's rounding, which topk_kd_loss's checks let through, is clamped), NaN kept.
KD_HD float clamp_logprob(float lp) { return lp > 0.f ? 0.f : lp; }

// What the k stored entries give before the student is known: the log of their total mass
// (NaN if any is NaN, -inf if all are -inf) and the sum behind the rounding bound of the mass
// test, accumulated in any order (CUDA: across threads) with these helpers.
// The sum is kept in double: a float one, pushed entry by entry, drifted by 1e-6 relative over
// 256 bfloat16-stored entries (a bias that renormalised weights and remainders inherit).
struct TeacherAcc {
  float m;
  double z;        // running max of lp, sum exp(lp - m)
  float rounding;  // sum p |lp| (stored_rounding in kdfast/reference/kd_topk.py)
};

KD_HD TeacherAcc teacher_push(TeacherAcc a, float lp) {
  const float p = expf(lp);
  if (p > 0.f) a.rounding -= p * lp;
  if (lp != lp || a.m != a.m) return TeacherAcc{NAN, NAN, a.rounding};
  if (lp == -INFINITY) return a;
  if (lp <= a.m) return TeacherAcc{a.m, a.z + expf(lp - a.m), a.rounding};
  const double z = a.m == -INFINITY ? 0.0 : a.z * expf(a.m - lp);
  return TeacherAcc{lp, z + 1.0, a.rounding};
}

KD_HD TeacherAcc teacher_merge(TeacherAcc a, TeacherAcc b) {
  const float rounding = a.rounding + b.rounding;
  if (a.m != a.m || b.m != b.m) return TeacherAcc{NAN, NAN, rounding};
  if (a.m < b.m) { const TeacherAcc t = a; a = b; b = t; }
  if (b.m == -INFINITY) return TeacherAcc{a.m, a.z, rounding};
  return TeacherAcc{a.m, a.z + b.z * expf(b.m - a.m), rounding};
}

KD_HD float teacher_log_mass(TeacherAcc a) { return a.m == -INFINITY ? -INFINITY : a.m + float(log(a.z)); }

// The teacher's remaining mass r as log r (-inf when there is none: k == vocab, renormalize,
// or within the rounding of the stored entries; NaN when their mass is NaN).
KD_HD float log_remainder(const Params& p, float log_mass, float rounding_terms) {
  if (p.renormalize || p.k >= p.vocab) return -INFINITY;
  const float rounding = p.stored_eps * rounding_terms + float(p.k) * 1.1920929e-07f;
  const bool real = (-expm1f(log_mass) > rounding) || log_mass != log_mass;
  return real ? log1mexp(log_mass) : -INFINITY;
}

// Entry i's teacher weight w_i and log-weight: p_i and lp_i, or renormalised by the stored
// entries' mass, (lp_i - max) - log z with the max taken off first (lp - (max + log z) rounds
// log z away where lp is -1e8); a mass of 0 has nothing to renormalise, nor a NaN one: NaN.
KD_HD float teacher_log_weight(const Params& p, float lp, TeacherAcc t) {
  if (!p.renormalize) return lp;
  return t.m > -INFINITY ? (lp - t.m) - float(log(t.z)) : NAN;  // (a NaN max fails the test too)
}

// The student's side of a row, after the vocabulary sweeps: its log-normaliser m / T + log_z
// with the row's max m in logit units (kept apart, as in kd_divergence.h: tempered_shift(x, m)
// - log_z keeps the small differences of large logits and does not overflow at T < 1), log Q
// of the mass outside the ids (-inf if every outside logit is -inf), and the 1 / T the logits
// are divided by (1 for the CPU launcher's rows, which are tempered up front).
struct Student {
  float m, log_z;
  float log_q_rest;
  float inv_t;
};

KD_HD bool student_defined(const Student& s) {
  return s.m > -INFINITY && s.m < INFINITY && s.log_z > -INFINITY && s.log_z < INFINITY;
}

KD_HD float student_log_prob(const Student& s, float x) { return tempered_shift(x, s.m, s.inv_t) - s.log_z; }

// One stored entry's share of the loss, and of A (its weight w_i, 0 where 0 or NaN).
KD_HD float entry_loss(float log_w, float x_id, const Student& s, float& weight) {
  const float w = expf(log_w);
  weight = w > 0.f ? w : 0.f;
  return xlogy_ratio(w, log_w, student_log_prob(s, x_id));
}

// The remainder term r (log r - log Q): a live remainder (r > 0) against a student with no
// mass outside gives +inf (with no gradient through Q), as the reference.
KD_HD float remainder_loss(float log_r, const Student& s) { return xlogy_ratio(expf(log_r), log_r, s.log_q_rest); }

// The remainder's coefficient B (and its share of A): r where the term has a gradient.
KD_HD float remainder_weight(float log_r, const Student& s) {
  const float r = expf(log_r);
  return (r > 0.f && s.log_q_rest > -INFINITY) ? r : 0.f;
}

// Gradient of the row loss with respect to the student logit j outside the ids (inside, the
// launchers subtract w_i * scale after): A q_j - B exp(z_j - m_out) / Z_out, times scale.
// `out_prob` is exp(z_j - m_out) / Z_out (0 for an id).
KD_HD float grad_entry(float a, float q, float b, float out_prob, float scale) { return (a * q - b * out_prob) * scale; }

int kd_topk_cpu(const Params& p);
int kd_topk_cuda(const Params& p);

}  // namespace kd_topk
}  // namespace kdfast
