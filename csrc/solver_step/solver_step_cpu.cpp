// CPU launcher for the fused solver step: tiles of each sample are converted to fp32 in L1,
// run through step_element's terms (its guided / apply_threshold helpers, then the same
// source terms in the same order, one source at a time so that each loop vectorises), and
// written back, so memory is touched once. step_element itself runs in the CUDA launcher.
// A tile lies within one sample, so it reads one row of coefficients (the batch's, or its
// sample's own).
#include "solver_step.h"

#include "common/kd_cpu.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

namespace kdfast {
namespace solver_step {
namespace {

constexpr int64_t kTile = 512;

// An output's terms over a tile in one pass: o = (((0 + c0*s0) + c1*s1) + c2*s2) + c3*s3, the
// same products and sums in the same order as adding one term per pass (step_element's order).
// The sum starts from +0 as step_element's does, so a -0 first product gives +0 there too
// (compilers keep `0.f + x` without -fno-signed-zeros).
KD_CPU_INLINE void sum_terms(int count, const float* c, const float* const* s, int64_t n, float* o) {
  switch (count) {
    case 1:
      for (int64_t e = 0; e < n; ++e) o[e] = 0.f + c[0] * s[0][e];
      return;
    case 2:
      for (int64_t e = 0; e < n; ++e) o[e] = 0.f + c[0] * s[0][e] + c[1] * s[1][e];
      return;
    case 3:
      for (int64_t e = 0; e < n; ++e) o[e] = 0.f + c[0] * s[0][e] + c[1] * s[1][e] + c[2] * s[2][e];
      return;
    default:
      for (int64_t e = 0; e < n; ++e)
        o[e] = 0.f + c[0] * s[0][e] + c[1] * s[1][e] + c[2] * s[2][e] + c[3] * s[3][e];
  }
}

// step_element over a tile: the guided model output and x0 (when an output reads it) are
// made in L1, then each output sums its nonzero terms, four per pass, in source order.
// Built for AVX2 and for baseline x86-64; the loader picks one for the CPU it runs on. Not
// with FMA (kd_cpu.h's KD_AVX2_FMA): this stream is memory-bound, and unfused products and
// sums give the same bits as the Triton kernel's (tests/ops/test_memory_layouts.py).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void step_tile(const Params& p, const float* c, bool has_cond, float dyn, int64_t n, const float* const* in,
               float* const* out) {
  alignas(64) float guided_buf[kTile], x0_buf[kTile];
  const float scale = p.guidance_scale;
  const float* xin = in[kInX];
  const float* model = in[kInModel];
  const float* cond = in[kInCond];
  const float* m = model;  // the model output itself unless guidance combines it with cond
  if (has_cond) {
    for (int64_t e = 0; e < n; ++e) guided_buf[e] = guided(model[e], cond[e], true, scale);
    m = guided_buf;
  }
  bool uses_x0 = false;
  for (int k = 0; k < kNumOutputs; ++k) uses_x0 |= p.out[k] && c[2 + k * kNumSources + kSrcX0] != 0.f;
  if (uses_x0) {
    for (int64_t e = 0; e < n; ++e) x0_buf[e] = c[0] * xin[e] + c[1] * m[e];
    if (p.threshold == kThresholdClip) {
      for (int64_t e = 0; e < n; ++e) x0_buf[e] = apply_threshold(x0_buf[e], kThresholdClip, p.clip_value, 1.f);
    } else if (p.threshold == kThresholdDynamic) {
      for (int64_t e = 0; e < n; ++e) x0_buf[e] = apply_threshold(x0_buf[e], kThresholdDynamic, 1.f, dyn);
    }
  }
  // Absent inputs (nullptr) and zero coefficients drop their terms (add_term's rule).
  const float* src[kNumSources] = {xin, m, model, x0_buf, in[kInHist0], in[kInHist1],
                                   in[kInHist2], in[kInAux], in[kInNoise]};
  for (int k = 0; k < kNumOutputs; ++k) {
    if (!p.out[k]) continue;
    float* o = out[k];
    const float* ck = c + 2 + k * kNumSources;
    float coef[kNumSources];
    const float* terms[kNumSources];
    int count = 0;
    for (int j = 0; j < kNumSources; ++j) {
      if (ck[j] == 0.f || !src[j]) continue;
      coef[count] = ck[j];
      terms[count++] = src[j];
    }
    if (count == 0) {
      std::fill(o, o + n, 0.f);
      continue;
    }
    sum_terms(std::min(count, 4), coef, terms, n, o);
    for (int t = 4; t < count; ++t)  // (rare) further terms, one pass each, in order
      for (int64_t e = 0; e < n; ++e) o[e] = o[e] + coef[t] * terms[t][e];
  }
}

}  // namespace

int solver_step_cpu(const Params& p) {
  if (p.batch < 0 || p.inner < 0 || p.in[kInX] == nullptr || p.in[kInModel] == nullptr)
    return kBadArgument;
  if (!valid_dtypes(p)) return kBadDType;
  if (p.threshold == kThresholdDynamic && p.dynamic_scale == nullptr) return kBadArgument;

  const int64_t tiles_per_sample = (p.inner + kTile - 1) / kTile;
  const int64_t num_tiles = p.batch * tiles_per_sample;
  const bool has_cond = p.in[kInCond] != nullptr;
  const int nthreads = cpu::threads_for(p.num_threads, p.batch * p.inner, p.batch * p.inner);

#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int64_t b = t / tiles_per_sample;
    const int64_t start = (t % tiles_per_sample) * kTile;
    const int64_t n = std::min(kTile, p.inner - start);
    alignas(64) float in_buf[kNumInputs][kTile];
    alignas(64) float out_buf[kNumOutputs][kTile];
    const float* in[kNumInputs];  // nullptr: absent, reads as 0
    float* out[kNumOutputs];
    for (int i = 0; i < kNumInputs; ++i)
      in[i] = p.in[i] ? cpu::load_floats(p.in[i], p.in_dtype[i], b * p.in_stride[i] + start, n, in_buf[i]) : nullptr;
    for (int k = 0; k < kNumOutputs; ++k)
      out[k] = p.out[k] ? cpu::float_target(p.out[k], p.out_dtype[k], b * p.out_stride[k] + start, out_buf[k]) : nullptr;
    const float dyn = p.threshold == kThresholdDynamic ? p.dynamic_scale[b] : 1.f;
    const float* c = p.coef_rows ? p.coef_rows + b * kNumCoefs : p.coef;
    step_tile(p, c, has_cond, dyn, n, in, out);
    for (int k = 0; k < kNumOutputs; ++k)
      if (p.out[k]) cpu::store_floats(p.out[k], p.out_dtype[k], b * p.out_stride[k] + start, n, out[k]);
  }
  return kOk;
}

// Linear-interpolated quantile like torch.quantile(..., interpolation="linear"), NaN when a
// value is NaN, as torch's (nth_element's order is undefined with NaN in the range).
static float quantile_inplace(std::vector<float>& v, float q) {
  for (const float x : v)
    if (x != x) return NAN;
  const QuantilePosition at = quantile_position(q, int64_t(v.size()));
  std::nth_element(v.begin(), v.begin() + at.lo, v.end());
  const float vlo = v[at.lo];
  const float vhi = at.hi == at.lo ? vlo : *std::min_element(v.begin() + at.lo + 1, v.end());
  return quantile_lerp(vlo, vhi, at.frac);
}

int threshold_scale_cpu(const ThresholdParams& p) {
  if (p.batch < 0 || p.inner <= 0 || !p.x || !p.model || !p.out) return kBadArgument;
  if (!valid_dtypes(p)) return kBadDType;
  const bool has_cond = p.cond != nullptr;
  const int nthreads = cpu::threads_for(p.num_threads, p.batch * p.inner, p.batch * p.inner);
  int status = kOk;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t b = 0; b < p.batch; ++b) {
    std::vector<float> v;  // |x0| of the sample, as float (a thread's scratch: inner * 4 bytes)
    try {
      v.resize(size_t(p.inner));
    } catch (const std::bad_alloc&) {  // (an exception leaving the parallel region would abort)
#pragma omp atomic write
      status = kOutOfMemory;
      continue;
    }
    for (int64_t i = 0; i < p.inner; ++i) {
      const float m = guided(load_as_float(p.model, p.model_dtype, b * p.model_stride + i),
                             has_cond ? load_as_float(p.cond, p.cond_dtype, b * p.cond_stride + i) : 0.f,
                             has_cond, p.guidance_scale);
      v[i] = std::fabs(p.x0_from_x * load_as_float(p.x, p.x_dtype, b * p.x_stride + i) + p.x0_from_model * m);
    }
    const float s = quantile_inplace(v, p.ratio);
    const float lo = s < 1.f ? 1.f : s;  // torch.clamp(s, 1, max): min(max(s, 1), max)
    p.out[b] = lo > p.max_value ? p.max_value : lo;
  }
  return status;
}

}  // namespace solver_step
}  // namespace kdfast
