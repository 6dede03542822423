// CPU launcher of the fused top-k KD: rows are spread over threads; each row's z = s / T and
// its exponentials exp(z - max) stay in the thread's workspace (in cache) for the outside sum
// and the gradient sweep, which forms the probabilities from them instead of taking
// exponentials again. The gradient is computed in place of the exponentials.
#include "kd_topk.h"

#include "common/kd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kdfast {
namespace kd_topk {
namespace {

struct RowOut {
  float loss;
  bool defined;
};

// One row of z (n = vocab entries): `e` is scratch of n floats, left holding the gradient of
// the row with respect to z (times `scale`) when `grad` is set.
template <int L>
KD_CPU_INLINE RowOut row_topk(const Params& p, const float* z, const int64_t* ids, const float* lps, float* e,
                              bool grad, float scale) {
  const int64_t n = p.vocab, k = p.k;
  for (int64_t i = 0; i < k; ++i)
    if (!id_in_range(ids[i], n)) return RowOut{NAN, false};
  const cpu::RowExp x = cpu::row_exp<L>(z, n, e);
  Student st{x.m, x.log_z, -INFINITY, 1.f};  // (z is tempered already)
  if (!student_defined(st)) return RowOut{NAN, false};

  TeacherAcc acc{-INFINITY, 0.0, 0.f};
  for (int64_t i = 0; i < k; ++i) acc = teacher_push(acc, clamp_logprob(lps[i]));
  const float log_mass = teacher_log_mass(acc);
  const float log_r = log_remainder(p, log_mass, acc.rounding);

  // The student's mass outside the ids, summed directly (1 - the inside would lose what is below
  // the rounding of 1), only where a live remainder needs it. `e` is zeroed at the ids.
  bool rare = false;  // the outside sum was taken relative to its own maximum m_out: e holds exp(z - m_out)
  float m_out = x.m, inv_z_out = 0.f;
  if (expf(log_r) > 0.f) {
    for (int64_t i = 0; i < k; ++i) e[ids[i]] = 0.f;
    double z_out = cpu::row_sum(e, n);
    if (z_out < kTinyOutside) {
      rare = true;
      std::memcpy(e, z, sizeof(float) * size_t(n));
      for (int64_t i = 0; i < k; ++i) e[ids[i]] = -INFINITY;
      m_out = cpu::row_max<L>(e, n);
      z_out = 0.0;
      if (m_out > -INFINITY) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) e[j] = kd_exp(e[j] - m_out);
        z_out = cpu::row_sum(e, n);
      } else {
        std::fill(e, e + n, 0.f);
      }
    }
    st.log_q_rest = z_out > 0.0 ? (m_out - x.m) + (float(std::log(z_out)) - x.log_z) : -INFINITY;
    inv_z_out = z_out > 0.0 ? float(1.0 / z_out) : 0.f;
  }

  double loss = 0.0, weight_sum = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    float w;
    loss += entry_loss(teacher_log_weight(p, clamp_logprob(lps[i]), acc), z[ids[i]], st, w);
    weight_sum += w;
  }
  loss += remainder_loss(log_r, st);
  if (!grad) return RowOut{float(loss), true};

  const float b = remainder_weight(log_r, st), a = float(weight_sum) + b;
  const float bz = b * inv_z_out, inv_z = x.inv_z;
  if (rare) {  // e holds exp(z - m_out) outside the ids, 0 at them
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = grad_entry(a, kd_exp(z[j] - x.m) * inv_z, bz, e[j], scale);
  } else {  // e holds exp(z - m) (0 at the ids when the remainder is live)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = grad_entry(a, e[j] * inv_z, bz, e[j], scale);
  }
  // The ids: A q_id, less their weights (summed, so that a repeated id would count twice, as
  // autograd of the reference counts it).
  for (int64_t i = 0; i < k; ++i) e[ids[i]] = a * expf(student_log_prob(st, z[ids[i]])) * scale;
  for (int64_t i = 0; i < k; ++i) {
    float w;
    entry_loss(teacher_log_weight(p, clamp_logprob(lps[i]), acc), z[ids[i]], st, w);
    e[ids[i]] -= w * scale;
  }
  return RowOut{float(loss), true};
}

using RowFn = RowOut (*)(const Params&, const float*, const int64_t*, const float*, float*, bool, float);

RowOut row_baseline(const Params& p, const float* z, const int64_t* ids, const float* lps, float* e, bool grad,
                    float scale) {
  return row_topk<4>(p, z, ids, lps, e, grad, scale);
}

KD_AVX2_FMA RowOut row_avx2(const Params& p, const float* z, const int64_t* ids, const float* lps, float* e,
                            bool grad, float scale) {
  return row_topk<8>(p, z, ids, lps, e, grad, scale);
}

const RowFn row_fn = cpu::has_avx2_fma() ? row_avx2 : row_baseline;

void run_row(const Params& p, int64_t r, float* ws) {
  const int64_t n = p.vocab;
  const int64_t g_off = r * p.grad_stride;
  if (p.labels && p.labels[r] == p.ignore_index) {
    p.row_loss[r] = 0.f;
    if (p.grad) std::memset(static_cast<char*>(p.grad) + g_off * (p.grad_dtype == kFloat32 ? 4 : 2), 0,
                            size_t(n) * (p.grad_dtype == kFloat32 ? 4 : 2));
    return;
  }
  const float* z = cpu::tempered_row(cpu::load_floats(p.student, p.student_dtype, r * p.student_stride, n, ws), n,
                                     p.inv_temperature, ws);
  // The gradient is formed in place of the exponentials: straight in an fp32 gradient row.
  float* e = p.grad ? cpu::float_target(p.grad, p.grad_dtype, g_off, ws + n) : ws + n;
  const RowOut out = row_fn(p, z, p.ids + r * p.k, p.logprobs + r * p.k, e, p.grad != nullptr,
                            p.loss_scale * p.inv_temperature);
  p.row_loss[r] = out.defined ? out.loss * p.loss_scale : NAN;
  if (!p.grad) return;
  if (!out.defined) std::fill(e, e + n, NAN);
  cpu::store_floats(p.grad, p.grad_dtype, g_off, n, e);
}

}  // namespace

int kd_topk_cpu(const Params& p) {
  if (p.student_dtype < 0 || p.student_dtype > 2 || (p.grad && (p.grad_dtype < 0 || p.grad_dtype > 2)))
    return kBadDType;
  if (p.rows < 0 || p.vocab <= 0 || p.k <= 0 || p.k > p.vocab || !p.row_loss || !p.workspace || !p.ids ||
      !p.logprobs)
    return kBadArgument;
  // An entry costs about as much as kEntryCost elements of a streaming kernel (an exponential
  // and a few passes over the cached row), which is what threads_for's threshold is for.
  constexpr int64_t kEntryCost = 4;
  const int threads = cpu::threads_for(p.num_threads, p.rows, p.rows * (p.vocab + p.k) * kEntryCost);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < p.rows; ++r) {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    run_row(p, r, p.workspace + int64_t(tid) * workspace_floats_per_thread(p.vocab));
  }
  return kOk;
}

}  // namespace kd_topk
}  // namespace kdfast
