// CUDA launcher of the fused KD divergences: one block per row (grid-strided over rows). The
// element math is divergence_term from kd_divergence.h, the code the CPU launcher runs.
// Sweep 1 is an online log-sum-exp of both rows in one read; sweeps 2 and 3 reread the row
// (from L2 while the rows in flight fit there, else from HBM: at most 3 reads per logit, which
// next to the LM-head GEMMs that produce the logits is a small share of a fused-linear step).
// Forward KL writes its gradient in sweep 2 and has no sweep 3 (2 reads per logit).
#include "kd_divergence.h"

#include <cuda_runtime.h>

#include "common/kd_cuda.h"

namespace kdfast {
namespace kd_divergence {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = grid_cap(65535);

__device__ __forceinline__ LogNorm log_norm(Lse a) {
  return LogNorm{a.m, (a.m == -INFINITY || a.m == INFINITY) ? 0.f : logf(a.z)};
}

// Block-wide reductions; `scratch` holds kWarps entries. Every thread gets the result.
__device__ Lse block_lse(Lse v, float inv_t, Lse* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    Lse other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.z, o)};
    v = lse_merge(v, other, inv_t);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  Lse r{-INFINITY, 0.f};
  for (int i = 0; i < kWarps; ++i) r = lse_merge(r, scratch[i], inv_t);
  return r;
}

__device__ float2 block_sum2(float2 v, float2* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float2 r{0.f, 0.f};
  for (int i = 0; i < kWarps; ++i) { r.x += scratch[i].x; r.y += scratch[i].y; }
  return r;
}

// Entry j of a row (student at s_off, teacher at t_off): returns its divergence term and sets
// w and the student probability q.
template <int KIND>
__device__ __forceinline__ float entry_term(const Params& p, const Consts& c, int64_t s_off, int64_t t_off,
                                            int64_t j, LogNorm ns, LogNorm nt, float& w, float& q) {
  const float ls = log_prob(load_as_float(p.student, p.student_dtype, s_off + j), ns, p.inv_temperature);
  const float lt = log_prob(load_as_float(p.teacher, p.teacher_dtype, t_off + j), nt, p.inv_temperature);
  q = kd_exp(ls);
  return divergence_term<KIND>(c, ls, lt, q, kd_exp(lt), w);
}

template <int KIND>
__global__ void __launch_bounds__(kThreads) kd_divergence_kernel(const Params p, const Consts c) {
  __shared__ Lse lse_scratch[2][kWarps];
  __shared__ float2 sum_scratch[kWarps];
  const int64_t n = p.vocab;
  const float inv_t = p.inv_temperature;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t g_off = r * p.grad_stride;
    if (p.labels && p.labels[r] == p.ignore_index) {
      if (threadIdx.x == 0) p.row_loss[r] = 0.f;
      if (p.grad)
        for (int64_t j = threadIdx.x; j < p.grad_cols; j += blockDim.x)
          store_from_float(p.grad, p.grad_dtype, g_off + j, 0.f);
      continue;
    }
    const int64_t s_off = r * p.student_stride, t_off = r * p.teacher_stride;
    Lse ls_acc{-INFINITY, 0.f}, lt_acc{-INFINITY, 0.f};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      ls_acc = lse_push(ls_acc, load_as_float(p.student, p.student_dtype, s_off + j), inv_t);
      lt_acc = lse_push(lt_acc, load_as_float(p.teacher, p.teacher_dtype, t_off + j), inv_t);
    }
    const LogNorm ns = log_norm(block_lse(ls_acc, inv_t, lse_scratch[0]));
    const LogNorm nt = log_norm(block_lse(lt_acc, inv_t, lse_scratch[1]));
    const bool defined = is_distribution(ns) && is_distribution(nt);

    // Forward KL's sum(w) is known before its sweep (kd_divergence.h): the gradient is written
    // in this sweep, which then also covers the padding columns.
    const float scale = p.loss_scale * inv_t;
    const bool grad_now = KIND == kForwardKL && p.grad;
    float2 acc{0.f, 0.f};  // (loss, sum of w)
    for (int64_t j = threadIdx.x; j < (grad_now ? p.grad_cols : n); j += blockDim.x) {
      float g = 0.f;
      if (j < n) {
        float w, q;
        acc.x += entry_term<KIND>(p, c, s_off, t_off, j, ns, nt, w, q);
        acc.y += w;
        if (grad_now) g = defined ? divergence_grad(w, q, kForwardKLSumW, scale) : NAN;
      }
      if (grad_now) store_from_float(p.grad, p.grad_dtype, g_off + j, g);
    }
    acc = block_sum2(acc, sum_scratch);
    if (threadIdx.x == 0) p.row_loss[r] = defined ? acc.x * p.loss_scale : NAN;
    if (!p.grad || grad_now) continue;

    for (int64_t j = threadIdx.x; j < p.grad_cols; j += blockDim.x) {
      float g = 0.f;
      if (j < n) {
        float w, q;
        entry_term<KIND>(p, c, s_off, t_off, j, ns, nt, w, q);
        g = defined ? divergence_grad(w, q, acc.y, scale) : NAN;
      }
      store_from_float(p.grad, p.grad_dtype, g_off + j, g);
    }
  }
}

}  // namespace

int kd_divergence_cuda(const Params& p) {
  if (p.student_dtype < 0 || p.student_dtype > 2 || p.teacher_dtype < 0 || p.teacher_dtype > 2 ||
      p.grad_dtype < 0 || p.grad_dtype > 2)
    return kBadDType;
  if (p.rows < 0 || p.vocab <= 0 || !p.row_loss || p.kind < 0 || p.kind >= kNumKinds ||
      (p.grad && p.grad_cols < p.vocab))
    return kBadArgument;
  if (p.rows == 0) return kOk;
  const Consts c = make_consts(p);
  const unsigned blocks = unsigned(p.rows < kMaxBlocks ? p.rows : kMaxBlocks);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  switch (p.kind) {
    case kForwardKL: kd_divergence_kernel<kForwardKL><<<blocks, kThreads, 0, stream>>>(p, c); break;
    case kReverseKL: kd_divergence_kernel<kReverseKL><<<blocks, kThreads, 0, stream>>>(p, c); break;
    case kJSD: kd_divergence_kernel<kJSD><<<blocks, kThreads, 0, stream>>>(p, c); break;
    case kTVD: kd_divergence_kernel<kTVD><<<blocks, kThreads, 0, stream>>>(p, c); break;
    default: kd_divergence_kernel<kSkewKL><<<blocks, kThreads, 0, stream>>>(p, c); break;
  }
  return launch_status();
}

}  // namespace kd_divergence
}  // namespace kdfast
