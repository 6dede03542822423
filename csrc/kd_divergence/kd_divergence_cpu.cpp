// CPU launcher of the fused KD divergences: rows are spread over threads; each row is
// widened to fp32 (and divided by T) into the thread's workspace, which then stays in cache
// for the max, log-sum-exp, loss and gradient sweeps. The log-sum-exp sweep keeps its
// exponentials in the workspace too, so the probabilities are not computed again.
#include "kd_divergence.h"

#include "common/kd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kdfast {
namespace kd_divergence {
namespace {

// Row helpers (KD_CPU_INLINE) are inlined into row_sweeps, which is compiled twice: for
// AVX2 + FMA and for baseline x86-64 (kd_cpu.h's has_avx2_fma picks one).

// Row r of `src` as fp32 values divided by T (cpu::tempered_row): the buffer itself when it
// already is, else a copy in `buf` (16-bit rows widened by kd_cpu.h's block conversions, F16C /
// AVX2 where the CPU has them: the per-element software fp16 conversion made fp16 rows 2x
// slower than fp32).
const float* widen_row(const void* src, int dtype, int64_t offset, int64_t n, float inv_t, float* buf) {
  const float* v = cpu::load_floats(src, dtype, offset, n, buf);  // fp32: `src` itself
  return cpu::tempered_row(v, n, inv_t, buf);
}

struct RowResult {
  float loss, sum_w;
  LogNorm norm_s, norm_t;
  float inv_zs;  // 1 / sum exp(s - max): the student's probabilities are es[j] * inv_zs
};

// The sweep for the loss and sum(w); w is stored in `w_row` for row_grad.
template <int KIND, int L>
KD_CPU_INLINE RowResult row_divergence(const Consts& c, const float* s, const float* t, float* es, float* et,
                                       int64_t n, float* w_row) {
  RowResult r;
  const cpu::RowExp xs = cpu::row_exp<L>(s, n, es), xt = cpu::row_exp<L>(t, n, et);
  r.norm_s = LogNorm{xs.m, xs.log_z};
  r.norm_t = LogNorm{xt.m, xt.log_z};
  r.inv_zs = xs.inv_z;
  double loss = 0.0, sum_w = 0.0;
  const LogNorm ns = r.norm_s, nt = r.norm_t;
  const float inv_zs = xs.inv_z, inv_zt = xt.inv_z;
  for (int64_t j0 = 0; j0 < n; j0 += cpu::kSumBlock) {
    const int64_t j1 = std::min(n, j0 + cpu::kSumBlock);
    float lb = 0.f, wb = 0.f;
#pragma omp simd reduction(+ : lb, wb)
    for (int64_t j = j0; j < j1; ++j) {
      float w;
      // (the rows are tempered already: inv_t = 1)
      lb += divergence_term<KIND>(c, log_prob(s[j], ns, 1.f), log_prob(t[j], nt, 1.f), es[j] * inv_zs,
                                  et[j] * inv_zt, w);
      w_row[j] = w;
      wb += w;
    }
    loss += lb;
    sum_w += wb;
  }
  r.loss = float(loss);
  r.sum_w = float(sum_w);
  return r;
}

// The gradient, in place of the w row_divergence stored in g.
KD_CPU_INLINE void row_grad(const float* es, float inv_zs, int64_t n, float sum_w, float scale, float* g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = divergence_grad(g[j], es[j] * inv_zs, sum_w, scale);
}

// The sweeps of one row for every kind. `es`, `et`: scratch rows for the exponentials; `w_row`:
// the gradient row, or a scratch row without a gradient (`grad` false); L: the SIMD width in
// floats of the target the sweeps are compiled for.
template <int L>
KD_CPU_INLINE RowResult row_sweeps_any(const Consts& c, const float* s, const float* t, float* es, float* et,
                                       int64_t n, float scale, float* w_row, bool grad) {
  RowResult r;
  switch (c.kind) {
#define KD_ROW_CASE(K)                                  \
  case K:                                               \
    r = row_divergence<K, L>(c, s, t, es, et, n, w_row); \
    break;
    KD_ROW_CASE(kForwardKL)
    KD_ROW_CASE(kReverseKL)
    KD_ROW_CASE(kJSD)
    KD_ROW_CASE(kTVD)
    KD_ROW_CASE(kSkewKL)
#undef KD_ROW_CASE
    default: return RowResult{NAN, 0.f, LogNorm{0.f, 0.f}, LogNorm{0.f, 0.f}, 0.f};
  }
  if (grad) row_grad(es, r.inv_zs, n, r.sum_w, scale, w_row);
  return r;
}

using RowSweeps = RowResult (*)(const Consts&, const float*, const float*, float*, float*, int64_t, float, float*,
                                bool);

RowResult row_sweeps_baseline(const Consts& c, const float* s, const float* t, float* es, float* et, int64_t n,
                              float scale, float* w_row, bool grad) {
  return row_sweeps_any<4>(c, s, t, es, et, n, scale, w_row, grad);
}

KD_AVX2_FMA RowResult row_sweeps_avx2(const Consts& c, const float* s, const float* t, float* es, float* et,
                                      int64_t n, float scale, float* w_row, bool grad) {
  return row_sweeps_any<8>(c, s, t, es, et, n, scale, w_row, grad);
}

const RowSweeps row_sweeps = cpu::has_avx2_fma() ? row_sweeps_avx2 : row_sweeps_baseline;

void zero_row(void* dst, int dtype, int64_t offset, int64_t n) {
  const size_t bytes = dtype == kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(dst) + offset * bytes, 0, size_t(n) * bytes);
}

void run_row(const Params& p, const Consts& c, int64_t r, float* ws) {
  const int64_t n = p.vocab;
  const int64_t g_off = r * p.grad_stride;
  if (p.labels && p.labels[r] == p.ignore_index) {
    p.row_loss[r] = 0.f;
    if (p.grad) zero_row(p.grad, p.grad_dtype, g_off, p.grad_cols);
    return;
  }
  const float* s = widen_row(p.student, p.student_dtype, r * p.student_stride, n, p.inv_temperature, ws);
  const float* t = widen_row(p.teacher, p.teacher_dtype, r * p.teacher_stride, n, p.inv_temperature, ws + n);
  // An fp32 gradient is written in place, a 16-bit one through the third workspace row.
  float* g = nullptr;
  if (p.grad) g = p.grad_dtype == kFloat32 ? static_cast<float*>(p.grad) + g_off : ws + 2 * n;
  // Without a gradient, the loss sweep's w goes to the (then unused) third workspace row.
  const RowResult res = row_sweeps(c, s, t, ws + 3 * n, ws + 4 * n, n, p.loss_scale * p.inv_temperature,
                                   g ? g : ws + 2 * n, g != nullptr);
  const bool defined = is_distribution(res.norm_s) && is_distribution(res.norm_t);
  p.row_loss[r] = defined ? res.loss * p.loss_scale : NAN;
  if (!p.grad) return;
  if (!defined) std::fill(g, g + n, NAN);
  cpu::store_floats(p.grad, p.grad_dtype, g_off, n, g);
  if (p.grad_cols > n) zero_row(p.grad, p.grad_dtype, g_off + n, p.grad_cols - n);
}

}  // namespace

int kd_divergence_cpu(const Params& p) {
  if (p.student_dtype < 0 || p.student_dtype > 2 || p.teacher_dtype < 0 || p.teacher_dtype > 2 ||
      p.grad_dtype < 0 || p.grad_dtype > 2)
    return kBadDType;
  if (p.rows < 0 || p.vocab <= 0 || !p.row_loss || !p.workspace || p.kind < 0 || p.kind >= kNumKinds ||
      (p.grad && p.grad_cols < p.vocab))
    return kBadArgument;
  const Consts c = make_consts(p);
  // An entry costs about as much as kEntryCost elements of a streaming kernel (two
  // exponentials and the divergence's log terms), which is what threads_for's threshold is for.
  constexpr int64_t kEntryCost = 8;
  const int threads = cpu::threads_for(p.num_threads, p.rows, p.rows * p.vocab * kEntryCost);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t r = 0; r < p.rows; ++r) {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    run_row(p, c, r, p.workspace + int64_t(tid) * workspace_floats_per_thread(p.vocab));
  }
  return kOk;
}

}  // namespace kd_divergence
}  // namespace kdfast
