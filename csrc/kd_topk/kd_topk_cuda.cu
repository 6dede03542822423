// CUDA launcher of the fused top-k KD: one block per row (grid-strided over rows). The per-row
// math is kd_topk.h's, the code the CPU launcher runs.
// Sweep 1 is an online log-sum-exp of the row; the k stored entries (teacher mass, entry losses,
// weights) are spread over the block's threads and combined by block reductions (k may be as
// large as the vocabulary). Where a live remainder needs the student's mass outside the ids, a
// bitmap of the row's ids in shared memory tells the outside columns apart: one window of
// kBitmapCols columns covers vocabularies up to 262144 (built once per row); larger ones are
// swept window by window, the bitmap rebuilt from the ids for each (k reads of the ids per
// window, instead of a scan of the ids per column). The gradient sweep needs no membership
// test: it writes grad_entry at every column, and after a barrier the ids are overwritten with
// A q_id - w_i (times the scale), as the CPU launcher does. A row with an id outside the
// vocabulary is NaN (kd_topk.h: id_in_range), found before anything is read at the ids.
#include "kd_topk.h"

#include <cuda_runtime.h>

#include "common/kd_cuda.h"

namespace kdfast {
namespace kd_topk {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = grid_cap(65535);
constexpr int kBitmapWords = 8192;  // 32 KiB of static shared memory
constexpr int64_t kBitmapCols = int64_t(kBitmapWords) * 32;

// The loss and sum(w) of the stored entries, in double as the CPU launcher sums them.
struct Sums {
  double loss, weight;
};

__device__ __forceinline__ float shfl(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ Lse shfl(Lse v, int o) { return Lse{shfl(v.m, o), shfl(v.z, o)}; }
__device__ __forceinline__ TeacherAcc shfl(TeacherAcc v, int o) {
  return TeacherAcc{shfl(v.m, o), shfl(v.z, o), shfl(v.rounding, o)};
}
__device__ __forceinline__ Sums shfl(Sums v, int o) { return Sums{shfl(v.loss, o), shfl(v.weight, o)}; }

struct MergeLse {
  float inv_t;
  __device__ __forceinline__ Lse operator()(Lse a, Lse b) const { return lse_merge(a, b, inv_t); }
};
struct MergeTeacher {
  __device__ __forceinline__ TeacherAcc operator()(TeacherAcc a, TeacherAcc b) const { return teacher_merge(a, b); }
};
struct AddFloat {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxFloat {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddSums {
  __device__ __forceinline__ Sums operator()(Sums a, Sums b) const {
    return Sums{a.loss + b.loss, a.weight + b.weight};
  }
};

// Block-wide reduction; `scratch` holds kWarps entries. Every thread gets the same result (each
// combines the warps' partials in the same order).
template <typename T, typename Merge>
__device__ T block_reduce(T v, T* scratch, Merge merge) {
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl(v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // earlier readers of `scratch` are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int i = 1; i < kWarps; ++i) r = merge(r, scratch[i]);
  return r;
}

// The bitmap of the row's ids in columns [w0, w0 + kBitmapCols) (and below the vocabulary).
__device__ void build_bitmap(uint32_t* bitmap, const int64_t* ids, int64_t k, int64_t w0, int64_t n) {
  const int64_t span = (n - w0 < kBitmapCols) ? n - w0 : kBitmapCols;
  const int words = int((span + 31) / 32);
  __syncthreads();  // earlier readers of the bitmap are done
  for (int i = threadIdx.x; i < words; i += blockDim.x) bitmap[i] = 0u;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t d = ids[i] - w0;
    if (d >= 0 && d < span) atomicOr(&bitmap[d >> 5], 1u << unsigned(d & 31));
  }
  __syncthreads();
}

// f(s_j) for every column j of the row outside its ids (the logits, not divided by T), in the
// calling thread's share of the columns. `rebuild`: build the bitmap first (always where the
// vocabulary takes more than one window; otherwise the bitmap of an earlier sweep of this row
// is reused).
template <typename F>
__device__ void sweep_outside(const Params& p, int64_t s_off, const int64_t* ids, uint32_t* bitmap, bool rebuild,
                              F& f) {
  const int64_t n = p.vocab;
  for (int64_t w0 = 0; w0 < n; w0 += kBitmapCols) {
    if (rebuild || n > kBitmapCols) build_bitmap(bitmap, ids, p.k, w0, n);
    const int64_t w1 = (n - w0 < kBitmapCols) ? n : w0 + kBitmapCols;
    for (int64_t j = w0 + threadIdx.x; j < w1; j += blockDim.x) {
      const int64_t d = j - w0;
      if ((bitmap[d >> 5] >> unsigned(d & 31)) & 1u) continue;
      f(load_as_float(p.student, p.student_dtype, s_off + j));
    }
  }
}

struct SumExp {  // sum of exp((s - m) / T)
  float m, inv_t, sum;
  __device__ __forceinline__ void operator()(float s) { sum += kd_exp(tempered_shift(s, m, inv_t)); }
};
struct MaxOf {
  float m;
  __device__ __forceinline__ void operator()(float s) { m = fmaxf(m, s); }
};

// The student's logit at a stored id (checked to lie in the vocabulary before).
__device__ __forceinline__ float logit_at(const Params& p, int64_t s_off, int64_t id) {
  return load_as_float(p.student, p.student_dtype, s_off + id);
}

// A row without a loss: NaN for its loss and every entry of its gradient.
__device__ void nan_row(const Params& p, int64_t r, int64_t g_off) {
  if (threadIdx.x == 0) p.row_loss[r] = NAN;
  if (p.grad)
    for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) store_from_float(p.grad, p.grad_dtype, g_off + j, NAN);
}

__global__ void __launch_bounds__(kThreads) kd_topk_kernel(const Params p) {
  __shared__ uint32_t bitmap[kBitmapWords];
  __shared__ Lse lse_scratch[kWarps];
  __shared__ TeacherAcc teacher_scratch[kWarps];
  __shared__ float float_scratch[kWarps];
  __shared__ Sums sum_scratch[kWarps];
  const int64_t n = p.vocab, k = p.k;
  const float inv_t = p.inv_temperature, scale = p.loss_scale * inv_t;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t g_off = r * p.grad_stride, s_off = r * p.student_stride;
    if (p.labels && p.labels[r] == p.ignore_index) {
      if (threadIdx.x == 0) p.row_loss[r] = 0.f;
      if (p.grad)
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) store_from_float(p.grad, p.grad_dtype, g_off + j, 0.f);
      continue;
    }
    const int64_t* ids = p.ids + r * k;
    const float* lps = p.logprobs + r * k;

    // Sweep 1: the student's log-normaliser m / T + log_z.
    Lse acc{-INFINITY, 0.f};
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      acc = lse_push(acc, load_as_float(p.student, p.student_dtype, s_off + j), inv_t);
    const Lse lse = block_reduce(acc, lse_scratch, MergeLse{inv_t});
    Student st{lse.m, logf(lse.z), -INFINITY, inv_t};

    // The stored entries' mass and the remainder. An id outside the vocabulary (ids are checked
    // on the CPU only) makes the row NaN, without reading or writing outside the row.
    TeacherAcc t{-INFINITY, 0.f, 0.f};
    int bad_id = 0;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      t = teacher_push(t, clamp_logprob(lps[i]));
      bad_id |= !id_in_range(ids[i], n);
    }
    t = block_reduce(t, teacher_scratch, MergeTeacher{});
    if (__syncthreads_or(bad_id) || !student_defined(st)) {
      nan_row(p, r, g_off);
      continue;
    }
    const float log_mass = teacher_log_mass(t);
    const float log_r = log_remainder(p, log_mass, t.rounding);

    // The student's mass outside the ids, summed directly, only where a live remainder needs
    // it; relative to the largest outside entry where it is tiny relative to the row's maximum.
    bool rare = false;
    float m_out = st.m, inv_z_out = 0.f;
    if (expf(log_r) > 0.f) {
      SumExp sum{st.m, inv_t, 0.f};
      sweep_outside(p, s_off, ids, bitmap, true, sum);
      float z_out = block_reduce(sum.sum, float_scratch, AddFloat{});
      if (z_out < kTinyOutside) {
        rare = true;
        MaxOf mx{-INFINITY};
        sweep_outside(p, s_off, ids, bitmap, false, mx);
        m_out = block_reduce(mx.m, float_scratch, MaxFloat{});
        z_out = 0.f;
        if (m_out > -INFINITY) {
          SumExp rest{m_out, inv_t, 0.f};
          sweep_outside(p, s_off, ids, bitmap, false, rest);
          z_out = block_reduce(rest.sum, float_scratch, AddFloat{});
        }
      }
      st.log_q_rest = z_out > 0.f ? tempered_shift(m_out, st.m, inv_t) + (logf(z_out) - st.log_z) : -INFINITY;
      inv_z_out = z_out > 0.f ? 1.f / z_out : 0.f;
    }

    // The stored entries' losses and weights.
    Sums s{0.0, 0.0};
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      float w;
      s.loss += entry_loss(teacher_log_weight(p, clamp_logprob(lps[i]), t), logit_at(p, s_off, ids[i]), st, w);
      s.weight += w;
    }
    s = block_reduce(s, sum_scratch, AddSums{});
    const double loss = s.loss + double(remainder_loss(log_r, st));
    if (threadIdx.x == 0) p.row_loss[r] = float(loss) * p.loss_scale;
    if (!p.grad) continue;

    // The gradient: grad_entry at every column (the ids are overwritten below). out_prob is
    // exp((s - m_out) / T) / Z_out, formed only where the remainder has a gradient (B > 0).
    const float b = remainder_weight(log_r, st), a = float(s.weight) + b;
    const float bz = b * inv_z_out, inv_z = 1.f / lse.z;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float x = load_as_float(p.student, p.student_dtype, s_off + j);
      const float e = kd_exp(tempered_shift(x, st.m, inv_t));
      const float out = bz > 0.f ? (rare ? kd_exp(tempered_shift(x, m_out, inv_t)) : e) : 0.f;
      store_from_float(p.grad, p.grad_dtype, g_off + j, grad_entry(a, e * inv_z, bz, out, scale));
    }
    __syncthreads();  // the sweep's writes at the ids are done (ids are distinct within a row)
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      const int64_t id = ids[i];
      const float x_id = logit_at(p, s_off, id);
      float w;
      entry_loss(teacher_log_weight(p, clamp_logprob(lps[i]), t), x_id, st, w);
      const float g = a * expf(student_log_prob(st, x_id)) * scale;
      store_from_float(p.grad, p.grad_dtype, g_off + id, g - w * scale);
    }
  }
}

}  // namespace

int kd_topk_cuda(const Params& p) {
  if (p.student_dtype < 0 || p.student_dtype > 2 || (p.grad && (p.grad_dtype < 0 || p.grad_dtype > 2)))
    return kBadDType;
  if (p.rows < 0 || p.vocab <= 0 || p.k <= 0 || p.k > p.vocab || !p.row_loss || !p.ids || !p.logprobs)
    return kBadArgument;
  if (p.rows == 0) return kOk;
  const unsigned blocks = unsigned(p.rows < kMaxBlocks ? p.rows : kMaxBlocks);
  kd_topk_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
  return launch_status();
}

}  // namespace kd_topk
}  // namespace kdfast
