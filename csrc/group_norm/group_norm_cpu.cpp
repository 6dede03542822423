// CPU launcher of the fused group norm + activation. Threads take whole samples (channels-last:
// a group's channels are interleaved with the others', so a sample is one task) or
// (sample, group) pairs (channel-major: a group is one contiguous block; for small maps,
// runs of whole groups that fill one block, swept flat). A task's three
// sweeps run over data that is still in L2 from the sweep before, so the feature map is
// read from memory about once and written once. Channels-last batches smaller than the
// thread count are cut into (sample, block) tasks instead, their partial sums gathered between
// the sweeps. Sums run in a fixed order: results do not depend on the thread count.
#include "group_norm.h"

#include "common/kd_cpu.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kdfast {
namespace group_norm {
namespace {

using cpu::float_target;
using cpu::load_floats;
using cpu::store_floats;

// Elements per float partial sum (channel-major) before it is gathered in double (channels-last:
// cl_rows_per_block): float rounding stays that of a 256-term sum for groups of any size.
constexpr int64_t kSumRows = 256;

// A channel's center (the group mean of x + shift, less the channel's shift) as a float pair,
// center + center_lo, for the variance sweeps: with a shift the channels of a group have
// different centers, and a float center's rounding error e then adds 2 e * sum(x - center) to
// each channel's sum of squares, which no longer cancels over the group (at a mean 1e4 times
// the spread, variances came out ~2e-4 relative too high: 4x torch's float32 output error).
// The output's center stays the float one, whose error is that of float32 x + shift.
inline void center_pair(double center, float& hi, float& lo) {
  hi = float(center);
  lo = float(center - double(hi));
}

// A thread's scratch (per_thread_floats): double sums first (8-byte aligned: every thread's
// share is an even number of floats), then per-channel floats, then one widened block.
struct Scratch {
  double *csum, *gmean, *gvar;  // [C], [G], [G]
  float *fsum, *center, *scale, *bias, *block;  // [C] x 4, [block_floats(C)]
  float *spread_center, *spread_scale, *spread_bias;  // [kCpuBlock] x 3
  Scratch(float* ws, int64_t C) {
    double* d = reinterpret_cast<double*>(ws);
    csum = d;
    gmean = d + C;
    gvar = d + 2 * C;
    float* f = ws + 6 * C;
    fsum = f;
    center = f + C;
    scale = f + 2 * C;
    bias = f + 3 * C;
    block = f + 4 * C;
    spread_center = block + block_floats(C);
    spread_scale = spread_center + kCpuBlock;
    spread_bias = spread_scale + kCpuBlock;
  }
};

// ---- channels-last: a sample is [spatial, channels]; the inner loops run over channels. A
// block is cl_rows_per_block pixels; its per-channel float partial sums are gathered in double
// in block order, by either driver below (so both give the same bits).

// Per-channel sums of the deviations of block k of sample b from `center` (per channel), or with
// `squares` of their squares, the deviations then taken from center + center_lo (cl_means).
KD_CPU_INLINE void cl_block_sums(const Params& p, int64_t b, int64_t k, const float* center, const float* center_lo,
                                 bool squares, float* fsum, float* buf) {
  const int64_t C = p.channels, rpb = cl_rows_per_block(C), r0 = k * rpb, rows = std::min(rpb, p.spatial - r0);
  const float* v = load_floats(p.x, p.x_dtype, b * p.x_stride + r0 * C, rows * C, buf);
  std::fill(fsum, fsum + C, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = v + r * C;
    if (squares) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float d = (row[c] - center[c]) - center_lo[c];
        fsum[c] += d * d;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) fsum[c] += row[c] - center[c];
    }
  }
}

// Normalise, activate and write block k of sample b.
KD_CPU_INLINE void cl_block_write(const Params& p, int64_t b, int64_t k, const float* center, const float* scale,
                                  const float* bias, float* buf) {
  const int64_t C = p.channels, rpb = cl_rows_per_block(C), r0 = k * rpb, rows = std::min(rpb, p.spatial - r0);
  const float* v = load_floats(p.x, p.x_dtype, b * p.x_stride + r0 * C, rows * C, buf);
  // in place in the widened block when x is not fp32; fp32 output goes straight to out
  const int64_t o = b * p.out_stride + r0 * C;
  float* y = float_target(p.out, p.out_dtype, o, buf);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = v + r * C;
    float* dst = y + r * C;
    // one loop per activation (a constant there): group_norm.h's math, branch-free
    if (p.activation == kSiLU) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c] = normalize(ChannelConsts{center[c], scale[c], bias[c]}, kSiLU, row[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        dst[c] = normalize(ChannelConsts{center[c], scale[c], bias[c]}, kIdentity, row[c]);
    }
  }
  store_floats(p.out, p.out_dtype, o, rows * C, y);
}

// Each channel's pivot: the first element of its group in sample b (pixel 0, the group's first
// channel). The first sweep sums deviations from it, so a group's float partial sums are of the
// order of its spread, not of its values: a constant group at any offset has mean exactly that
// value (float sums of 1e4 + noise were off by float32 ulps of the sums, which a small variance
// then magnified into outputs of 0.1 to 0.5 where torch gives 0).
void cl_pivots(const Params& p, int64_t b, float* pivot) {
  const int64_t C = p.channels, cpg = C / p.groups;
  for (int64_t c = 0; c < C; ++c) pivot[c] = load_as_float(p.x, p.x_dtype, b * p.x_stride + c / cpg * cpg);
}

// Group means of x + shift from the per-channel sums of x's deviations from `pivot`; the
// per-channel centers of sweep 2 as float pairs (see center_pair).
void cl_means(const Params& p, int64_t b, const double* csum, const float* pivot, double* gmean, float* center,
              float* center_lo) {
  const int64_t C = p.channels, S = p.spatial, cpg = C / p.groups;
  for (int64_t g = 0; g < p.groups; ++g) {
    double s = 0.0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += csum[c] + double(S) * double(shift_at(p, b, c));
    gmean[g] = double(pivot[g * cpg]) + s / double(cpg * S);
  }
  for (int64_t c = 0; c < C; ++c) center_pair(gmean[c / cpg] - double(shift_at(p, b, c)), center[c], center_lo[c]);
}

// The per-channel constants of sweep 3 from the group means and squared-deviation sums.
void cl_consts(const Params& p, int64_t b, const double* gmean, const double* gvar, float* center, float* scale,
               float* bias) {
  const int64_t C = p.channels, cpg = C / p.groups, n_group = cpg * p.spatial;
  for (int64_t c = 0; c < C; ++c) {
    const ChannelConsts k = channel_consts(gmean[c / cpg], inverse_std(gvar[c / cpg] / double(n_group), p.eps),
                                           shift_at(p, b, c), weight_at(p, c), bias_at(p, c));
    center[c] = k.center;
    scale[c] = k.scale;
    bias[c] = k.bias;
  }
}

// One whole sample per task (batches of at least one sample per thread): its three sweeps run
// over data still in L2 from the sweep before.
KD_CPU_INLINE void cl_sample(const Params& p, int64_t b, float* ws) {
  const int64_t C = p.channels, G = p.groups, cpg = C / G, blocks = cl_blocks(C, p.spatial);
  Scratch w(ws, C);
  std::fill(w.csum, w.csum + C, 0.0);
  std::fill(w.gvar, w.gvar + G, 0.0);
  float* pivot = w.scale;      // (the scales are set after the last use of the pivots,
  float* center_lo = w.bias;   // the biases after the last use of the centers' low parts)
  cl_pivots(p, b, pivot);
  for (int64_t k = 0; k < blocks; ++k) {
    cl_block_sums(p, b, k, pivot, nullptr, false, w.fsum, w.block);
    for (int64_t c = 0; c < C; ++c) w.csum[c] += w.fsum[c];
  }
  cl_means(p, b, w.csum, pivot, w.gmean, w.center, center_lo);
  for (int64_t k = 0; k < blocks; ++k) {
    cl_block_sums(p, b, k, w.center, center_lo, true, w.fsum, w.block);
    for (int64_t c = 0; c < C; ++c) w.gvar[c / cpg] += w.fsum[c];
  }
  cl_consts(p, b, w.gmean, w.gvar, w.center, w.scale, w.bias);
  for (int64_t k = 0; k < blocks; ++k) cl_block_write(p, b, k, w.center, w.scale, w.bias, w.block);
}

// Sum of v - center over [0, n), or with kSquares of (v - center - center_lo)^2 (center[j] and
// center_lo[j] with kPerElement, else center[0] and center_lo[0]; center_lo only with
// kSquares): float partial sums of kSumRows terms gathered in double, so float rounding stays
// that of a kSumRows-term sum for any n.
template <bool kSquares, bool kPerElement>
KD_CPU_INLINE double flat_sum(const float* v, int64_t n, const float* center, const float* center_lo = nullptr) {
  const float c0 = kPerElement ? 0.f : center[0];
  const float l0 = kSquares && !kPerElement ? center_lo[0] : 0.f;
  double total = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kSumRows) {
    const int64_t k1 = std::min(n, k0 + kSumRows);
    float f = 0.f;
#pragma omp simd reduction(+ : f)
    for (int64_t j = k0; j < k1; ++j) {
      const float d = v[j] - (kPerElement ? center[j] : c0);
      if (kSquares) {
        const float e = d - (kPerElement ? center_lo[j] : l0);
        f += e * e;
      } else {
        f += d;
      }
    }
    total += f;
  }
  return total;
}

// Sum of x - center (of (x - center - center_lo)^2 when `squares`) over elements [off, off + n)
// of x, contiguous, widened a block at a time.
KD_CPU_INLINE double range_sum(const Params& p, int64_t off, int64_t n, bool squares, float center, float center_lo,
                               float* block) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kCpuBlock) {  // (kCpuBlock is a multiple of kSumRows)
    const int64_t m = std::min(kCpuBlock, n - j0);
    const float* v = load_floats(p.x, p.x_dtype, off + j0, m, block);
    total += squares ? flat_sum<true, false>(v, m, &center, &center_lo) : flat_sum<false, false>(v, m, &center);
  }
  return total;
}

// One group of one sample laid out [channels, spatial]: its channels are consecutive rows of
// `spatial` contiguous elements, so the group is one contiguous range: its sums run over it
// whole (few long loops for small maps), per channel only where the shift makes the
// channels' centers differ.
KD_CPU_INLINE void group_channel_major(const Params& p, int64_t b, int64_t g, float* ws) {
  const int64_t S = p.spatial, cpg = p.channels / p.groups, n_group = cpg * S;
  float* block = Scratch(ws, p.channels).block;
  const void* x = p.x;
  void* out = p.out;
  const int64_t x0 = b * p.x_stride, o0 = b * p.out_stride, c0 = g * cpg;

  double shift_total = 0.0;
  if (p.shift)
    for (int64_t c = c0; c < c0 + cpg; ++c) shift_total += double(S) * shift_at(p, b, c);
  // deviations from the group's first element (a pivot: see cl_pivots)
  const float pivot = load_as_float(x, p.x_dtype, x0 + c0 * S);
  const double mean = double(pivot) + (range_sum(p, x0 + c0 * S, n_group, false, pivot, 0.f, block) + shift_total) /
                                          double(n_group);

  double sq = 0.0;
  float center, center_lo;
  if (!p.shift) {
    center_pair(mean, center, center_lo);
    sq = range_sum(p, x0 + c0 * S, n_group, true, center, center_lo, block);
  } else {
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      center_pair(mean - double(shift_at(p, b, c)), center, center_lo);
      sq += range_sum(p, x0 + c * S, S, true, center, center_lo, block);
    }
  }
  const float rstd = inverse_std(sq / double(n_group), p.eps);

  const int act = p.activation;
  for (int64_t c = c0; c < c0 + cpg; ++c) {
    const ChannelConsts k = channel_consts(mean, rstd, shift_at(p, b, c), weight_at(p, c), bias_at(p, c));
    for (int64_t j0 = 0; j0 < S; j0 += kCpuBlock) {
      const int64_t n = std::min(kCpuBlock, S - j0);
      const float* v = load_floats(x, p.x_dtype, x0 + c * S + j0, n, block);
      float* y = float_target(out, p.out_dtype, o0 + c * S + j0, block);
      if (act == kSiLU) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] = normalize(k, kSiLU, v[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] = normalize(k, kIdentity, v[j]);
      }
      store_floats(out, p.out_dtype, o0 + c * S + j0, n, y);
    }
  }
}

// ---- channel-major maps with small channels (small_groups): a task is a run of whole groups of
// one sample, one contiguous block, swept flat with each channel's constants spread over its
// elements.

// dst[c * S + s] = value[c] for c < channels, s < S; common map sizes get fixed-length inner
// loops (single vector stores).
template <int kS>
void spread_fixed(float* dst, const float* value, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c)
    for (int s = 0; s < kS; ++s) dst[c * kS + s] = value[c];
}
void spread(float* dst, const float* value, int64_t channels, int64_t S) {
  switch (S) {
    case 1: std::copy_n(value, channels, dst); return;
    case 2: return spread_fixed<2>(dst, value, channels);
    case 4: return spread_fixed<4>(dst, value, channels);
    case 8: return spread_fixed<8>(dst, value, channels);
    case 16: return spread_fixed<16>(dst, value, channels);
    case 32: return spread_fixed<32>(dst, value, channels);
    default:
      for (int64_t c = 0; c < channels; ++c) std::fill_n(dst + c * S, S, value[c]);
  }
}

// Groups [g0, g1) of sample b: per-group statistics, then each channel's constants spread
// over its elements, then one flat pass.
KD_CPU_INLINE void small_groups_block(const Params& p, int64_t b, int64_t g0, int64_t g1, float* ws) {
  const int64_t S = p.spatial, cpg = p.channels / p.groups, n_group = cpg * S, groups = g1 - g0;
  const int64_t c0 = g0 * cpg, nc = groups * cpg, n = groups * n_group;
  const double inv_n = 1.0 / double(n_group);
  Scratch w(ws, p.channels);
  const int64_t x0 = b * p.x_stride + g0 * n_group, o0 = b * p.out_stride + g0 * n_group;
  const float* v = load_floats(p.x, p.x_dtype, x0, n, w.block);
  // the run's channels: their shifts as floats, then their centers, scales and biases
  float *shift = w.fsum, *k_center = w.center, *k_scale = w.scale, *k_bias = w.bias;
  double* gmean = w.gmean;
  for (int64_t c = 0; c < nc; ++c) shift[c] = shift_at(p, b, c0 + c);

  for (int64_t g = 0; g < groups; ++g) {  // means of x + shift; the per-element centers
    double shift_total = 0.0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) shift_total += shift[c];
    const float* group = v + g * n_group;  // deviations from its first element (see cl_pivots)
    gmean[g] = double(group[0]) + (flat_sum<false, false>(group, n_group, group) + double(S) * shift_total) * inv_n;
  }
  // the centers (channel_consts' center: mean - shift) serve the variances and the output alike;
  // their low parts (center_pair), the variances only: they stay in the scales' slots until
  // the scales are set, group by group after its variance
  float* k_center_lo = k_scale;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
      center_pair(gmean[g] - double(shift[c]), k_center[c], k_center_lo[c]);
  spread(w.spread_center, k_center, nc, S);
  float* spread_center_lo = w.spread_scale;  // (likewise, spread over the scales' slots after the variances)
  spread(spread_center_lo, k_center_lo, nc, S);
  for (int64_t g = 0; g < groups; ++g) {  // variances; the per-channel scales and biases
    const float rstd = inverse_std(flat_sum<true, true>(v + g * n_group, n_group, w.spread_center + g * n_group,
                                                        spread_center_lo + g * n_group) * inv_n, p.eps);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const ChannelConsts k = channel_consts(gmean[g], rstd, shift[c], weight_at(p, c0 + c), bias_at(p, c0 + c));
      k_scale[c] = k.scale;
      k_bias[c] = k.bias;
    }
  }
  const float *center = w.spread_center, *scale = w.spread_scale, *bias = w.spread_bias;
  spread(w.spread_scale, k_scale, nc, S);
  spread(w.spread_bias, k_bias, nc, S);

  float* y = float_target(p.out, p.out_dtype, o0, w.block);
  if (p.activation == kSiLU) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = normalize(ChannelConsts{center[j], scale[j], bias[j]}, kSiLU, v[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = normalize(ChannelConsts{center[j], scale[j], bias[j]}, kIdentity, v[j]);
  }
  store_floats(p.out, p.out_dtype, o0, n, y);
}

// ---- the task functions, compiled for AVX2 + FMA and for baseline x86-64 (kd_cpu.h); the
// drivers below call them through the table picked for this CPU, from inside their parallel
// regions (a region's body is compiled for the target of the function it is written in).

struct TaskFns {
  void (*cl_sample)(const Params&, int64_t, float*);
  void (*cl_block_sums)(const Params&, int64_t, int64_t, const float*, const float*, bool, float*, float*);
  void (*cl_block_write)(const Params&, int64_t, int64_t, const float*, const float*, const float*, float*);
  void (*group_channel_major)(const Params&, int64_t, int64_t, float*);
  void (*small_groups_block)(const Params&, int64_t, int64_t, int64_t, float*);
};

#define KD_GROUP_NORM_TASKS(SUFFIX, TARGET)                                                                    \
  TARGET void cl_sample_##SUFFIX(const Params& p, int64_t b, float* ws) { cl_sample(p, b, ws); }             \
  TARGET void cl_block_sums_##SUFFIX(const Params& p, int64_t b, int64_t k, const float* center,             \
                                     const float* center_lo, bool squares, float* fsum, float* buf) {      \
    cl_block_sums(p, b, k, center, center_lo, squares, fsum, buf);                                         \
  }                                                                                                        \
  TARGET void cl_block_write_##SUFFIX(const Params& p, int64_t b, int64_t k, const float* center,             \
                                      const float* scale, const float* bias, float* buf) {                 \
    cl_block_write(p, b, k, center, scale, bias, buf);                                                     \
  }                                                                                                        \
  TARGET void group_channel_major_##SUFFIX(const Params& p, int64_t b, int64_t g, float* ws) {               \
    group_channel_major(p, b, g, ws);                                                                      \
  }                                                                                                        \
  TARGET void small_groups_block_##SUFFIX(const Params& p, int64_t b, int64_t g0, int64_t g1, float* ws) {   \
    small_groups_block(p, b, g0, g1, ws);                                                                  \
  }                                                                                                        \
  constexpr TaskFns kTasks_##SUFFIX{cl_sample_##SUFFIX, cl_block_sums_##SUFFIX, cl_block_write_##SUFFIX,     \
                                    group_channel_major_##SUFFIX, small_groups_block_##SUFFIX};

KD_GROUP_NORM_TASKS(baseline, )
KD_GROUP_NORM_TASKS(avx2_fma, KD_AVX2_FMA)
#undef KD_GROUP_NORM_TASKS

const TaskFns& task_fns() {
  static const TaskFns& fns = cpu::has_avx2_fma() ? kTasks_avx2_fma : kTasks_baseline;
  return fns;
}

// (sample, block) tasks, for batches smaller than the thread count (a batch of one still
// uses every core): each sweep's block partial sums go to the shared workspace and are
// gathered per sample, in block order, between the sweeps.
void cl_split_samples(const Params& p, int threads) {
  const TaskFns& fns = task_fns();
  const int64_t C = p.channels, G = p.groups, cpg = C / G, B = p.batch, blocks = cl_blocks(C, p.spatial);
  const int64_t per_thread = per_thread_floats(C);
  float* shared = p.workspace + per_thread * threads;  // split_sample_floats(...) floats
  double* gmean = reinterpret_cast<double*>(shared);   // [B][C] (G <= C used)
  double* gacc = gmean + B * C;                        // [B][C]: per-channel sums, then per-group
  float* partial = shared + 4 * B * C;                 // [B][blocks][C]
  float* consts = partial + B * blocks * C;            // [B][3][C]: center, scale, bias
  // the pivots of sample b in its scale slot and the centers' low parts in its bias slot, both
  // set after their last use (cl_consts)
  for (int64_t b = 0; b < B; ++b) cl_pivots(p, b, consts + b * 3 * C + C);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    float* buf = Scratch(p.workspace + int64_t(omp_get_thread_num()) * per_thread, C).block;
#else
    float* buf = Scratch(p.workspace, C).block;
#endif
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * blocks; ++t)
      fns.cl_block_sums(p, t / blocks, t % blocks, consts + (t / blocks) * 3 * C + C, nullptr, false, partial + t * C,
                        buf);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      double* csum = gacc + b * C;
      std::fill(csum, csum + C, 0.0);
      for (int64_t k = 0; k < blocks; ++k)
        for (int64_t c = 0; c < C; ++c) csum[c] += partial[(b * blocks + k) * C + c];
      float* k3 = consts + b * 3 * C;
      cl_means(p, b, csum, k3 + C, gmean + b * C, k3, k3 + 2 * C);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * blocks; ++t) {
      const float* k3 = consts + (t / blocks) * 3 * C;
      fns.cl_block_sums(p, t / blocks, t % blocks, k3, k3 + 2 * C, true, partial + t * C, buf);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      double* gvar = gacc + b * C;
      std::fill(gvar, gvar + G, 0.0);
      for (int64_t k = 0; k < blocks; ++k)
        for (int64_t c = 0; c < C; ++c) gvar[c / cpg] += partial[(b * blocks + k) * C + c];
      float* k3 = consts + b * 3 * C;
      cl_consts(p, b, gmean + b * C, gvar, k3, k3 + C, k3 + 2 * C);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * blocks; ++t) {
      const float* k3 = consts + (t / blocks) * 3 * C;
      fns.cl_block_write(p, t / blocks, t % blocks, k3, k3 + C, k3 + 2 * C, buf);
    }
  }
}

}  // namespace

int group_norm_cpu(const Params& p) {
  if (!valid_params(p) || !valid_dtype(p.x_dtype) || !valid_dtype(p.out_dtype) ||
      (p.shift && !valid_dtype(p.shift_dtype)) || !valid_dtype(p.affine_dtype))
    return valid_params(p) ? kBadDType : kBadArgument;
  if (p.batch == 0) return kOk;
  if (!p.workspace) return kBadArgument;
  if (split_samples(p.channels_last, p.batch, p.channels, p.spatial, p.num_threads)) {
    cl_split_samples(p, p.num_threads);
    return kOk;
  }
  // tasks per sample: one (channels-last), one per run of whole groups (small groups) or per group
  const bool small = small_groups(p.channels_last, p.channels, p.spatial, p.groups);
  const int64_t run = small ? std::max<int64_t>(1, kCpuBlock / (p.channels / p.groups * p.spatial)) : 1;
  const int64_t per_sample = p.channels_last ? 1 : (p.groups + run - 1) / run;
  const int64_t tasks = p.batch * per_sample;
  const int threads = cpu::threads_for(p.num_threads, tasks, p.batch * p.channels * p.spatial);
  const int64_t ws_per_thread = per_thread_floats(p.channels);
  const TaskFns& fns = task_fns();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
#ifdef _OPENMP
    float* ws = p.workspace + int64_t(omp_get_thread_num()) * ws_per_thread;
#else
    float* ws = p.workspace;
#endif
    const int64_t b = task / per_sample, g = task % per_sample * run;
    if (p.channels_last)
      fns.cl_sample(p, b, ws);
    else if (small)
      fns.small_groups_block(p, b, g, std::min(p.groups, g + run), ws);
    else
      fns.group_channel_major(p, b, g, ws);
  }
  return kOk;
}

}  // namespace group_norm
}  // namespace kdfast
