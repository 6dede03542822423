// Fused diffusion solver step: params struct and the per-element math shared by the CPU and
// CUDA launchers.
//
// Every supported solver (DDIM, Euler, Heun, DPM-Solver++, UniPC, DEIS, LCM, ...) is, for one
// step, a fixed linear map of a handful of full-latent tensors, after two element-wise
// non-linear pieces: classifier-free guidance and thresholding of the data prediction x0.
// The host computes the step's coefficients once, in float64, when the schedule is set; the
// kernel then reads each input once and writes each output once.
//
//   m   = cond ? model + scale * (cond - model) : model       guided model output
//   u   = model                                               unconditional output (CFG++)
//   x0  = c[0] * x + c[1] * m                                 data prediction
//   x0  = clip(x0, -r, r)  or  clip(x0, -s_b, s_b) / s_b      optional thresholding
//   out_k = sum_j c[2 + 9k + j] * src_j,  src = (x, m, u, x0, h0, h1, h2, aux, noise)
//
// c is one row of coefficients for the whole batch (host-made, passed by value), or one row
// per sample (coef_rows, a table on the kernel's device: samples at different timesteps).
// out_0 is the new sample, out_1 the new history entry (what a multistep solver keeps, in
// the history dtype), out_2 an auxiliary sample (UniPC's corrected sample, Heun's stage).
#pragma once
#include <cmath>

#include "../common/kd_common.h"

namespace kdfast {
namespace solver_step {

enum Input : int { kInX = 0, kInModel, kInCond, kInHist0, kInHist1, kInHist2, kInAux, kInNoise, kNumInputs };
enum Source : int { kSrcX = 0, kSrcModel, kSrcUncond, kSrcX0, kSrcHist0, kSrcHist1, kSrcHist2, kSrcAux, kSrcNoise, kNumSources };
enum Output : int { kOutSample = 0, kOutHistory, kOutAux, kNumOutputs };
enum Threshold : int { kThresholdNone = 0, kThresholdClip = 1, kThresholdDynamic = 2 };
constexpr int kNumCoefs = 2 + kNumOutputs * kNumSources;

struct Params {
  int64_t batch = 0;  // samples
  int64_t inner = 0;  // elements per sample; each sample's elements are contiguous
  const void* in[kNumInputs] = {};   // nullptr: input absent (reads as 0)
  int64_t in_stride[kNumInputs] = {};  // elements between consecutive samples
  int in_dtype[kNumInputs] = {};
  void* out[kNumOutputs] = {};        // nullptr: output not written
  int64_t out_stride[kNumOutputs] = {};
  int out_dtype[kNumOutputs] = {};
  float coef[kNumCoefs] = {};          // the step's coefficients, one row for the whole batch
  // Or one row per sample (a batch whose samples sit at different timesteps): row b at
  // coef_rows + b * kNumCoefs, float32, on the kernel's device; nullptr: every sample uses coef.
  const float* coef_rows = nullptr;
  float guidance_scale = 1.f;
  int threshold = kThresholdNone;
  float clip_value = 1.f;              // kThresholdClip
  const float* dynamic_scale = nullptr;  // kThresholdDynamic: float32 [batch], same device
  int num_threads = 1;                 // CPU launcher only
  void* stream = nullptr;              // CUDA launcher only
};

// Per-sample quantile of |x0| for dynamic thresholding (Imagen; diffusers' `_threshold_sample`):
// s_b = clamp(quantile(|x0_b|, ratio), 1, max_value), linear interpolation like torch.quantile.
struct ThresholdParams {
  int64_t batch = 0, inner = 0;
  const void* x = nullptr; const void* model = nullptr; const void* cond = nullptr;
  int64_t x_stride = 0, model_stride = 0, cond_stride = 0;
  int x_dtype = 0, model_dtype = 0, cond_dtype = 0;
  float x0_from_x = 0.f, x0_from_model = 0.f, guidance_scale = 1.f;
  float ratio = 0.995f, max_value = 1.f;
  float* out = nullptr;  // float32 [batch]
  int num_threads = 1;
  void* stream = nullptr;
};

// Where the ``q`` quantile of ``n`` sorted values lies: between element ``lo`` and ``hi`` at
// ``frac``. float32 like torch.quantile up to 2^24 values (the most it takes), so the two agree
// bit for bit; above, n - 1 is no longer exact in float32 (q = 1 could land past the end),
// so the position is computed in double. lo and hi are clamped to [0, n - 1].
struct QuantilePosition {
  int64_t lo, hi;
  float frac;
};

KD_HD QuantilePosition quantile_position(float q, int64_t n) {
  QuantilePosition r;
  if (n <= (int64_t(1) << 24)) {
    const float pos = q * float(n - 1);
    r.lo = int64_t(floorf(pos));
    r.frac = pos - float(r.lo);
  } else {
    const double pos = double(q) * double(n - 1);
    r.lo = int64_t(floor(pos));
    r.frac = float(pos - double(r.lo));
  }
  if (r.lo > n - 1) r.lo = n - 1;
  if (r.lo < 0) r.lo = 0;
  // torch.quantile's upper rank is ceil(pos): lo itself at an exact position (so an inf next to
  // it does not make lo + 0 * inf = NaN)
  r.hi = r.frac > 0.f && r.lo + 1 < n ? r.lo + 1 : r.lo;
  return r;
}

// torch.lerp, as torch.quantile interpolates: from the nearer end, each a fused multiply-add as
// torch's kernels compute them (vectorised fmadd / fnmadd on CPUs, contracted by nvcc), so that
// the same values come out bit for bit (and inf - inf = NaN where torch's does).
KD_HD float quantile_lerp(float lo, float hi, float w) {
  return w < 0.5f ? fmaf(w, hi - lo, lo) : fmaf(-(hi - lo), 1.f - w, hi);
}

KD_HD float guided(float model, float cond, bool has_cond, float scale) {
  return has_cond ? model + scale * (cond - model) : model;
}

// torch.clamp(v, -r, r): comparisons rather than fminf/fmaxf so that NaN propagates, and the
// upper bound applied last, so that a negative r gives r as torch's does.
KD_HD float clamp_symmetric(float v, float r) {
  const float above_lo = v < -r ? -r : v;
  return above_lo > r ? r : above_lo;
}

KD_HD float apply_threshold(float x0, int mode, float clip_value, float dyn_scale) {
  if (mode == kThresholdClip) return clamp_symmetric(x0, clip_value);
  if (mode == kThresholdDynamic) return clamp_symmetric(x0, dyn_scale) / dyn_scale;
  return x0;
}

// One term of an output. A zero coefficient drops its term, so that an unused source holding
// inf or NaN cannot poison an output; every backend follows this rule.
KD_HD float add_term(float acc, float c, float src) { return c == 0.f ? acc : acc + c * src; }

// The sources whose input was not passed (bit j: source j; history, aux and noise follow the
// inputs' order). Their terms are dropped whatever their coefficients, as the CPU launcher and
// the reference drop them: an inf or NaN coefficient times the 0 read in their place is NaN.
KD_HD unsigned absent_sources(const Params& p) {
  unsigned bits = 0;
  for (int j = kSrcHist0; j < kNumSources; ++j)
    if (!p.in[kInHist0 + (j - kSrcHist0)]) bits |= 1u << j;
  return bits;
}

// The whole step for one element. `in` holds x, model, cond, h0, h1, h2, aux, noise in
// input order (absent inputs as 0, their sources flagged in `absent`: absent_sources); results
// go to out[kNumOutputs]. Terms are added in
// source order, starting from 0, as the CPU launcher's tile loops do.
KD_HD void step_element(const float* c, float scale, bool has_cond, int threshold,
                        float clip_value, float dyn_scale, unsigned absent, const float in[kNumInputs],
                        float out[kNumOutputs]) {
  const float m = guided(in[kInModel], in[kInCond], has_cond, scale);
  const float x0 = apply_threshold(c[0] * in[kInX] + c[1] * m, threshold, clip_value, dyn_scale);
  const float s[kNumSources] = {in[kInX], m, in[kInModel], x0, in[kInHist0],
                                in[kInHist1], in[kInHist2], in[kInAux], in[kInNoise]};
#pragma unroll
  for (int k = 0; k < kNumOutputs; ++k) {
    const float* ck = c + 2 + k * kNumSources;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < kNumSources; ++j) acc = (absent >> j & 1u) ? acc : add_term(acc, ck[j], s[j]);
    out[k] = acc;
  }
}

// Dtype checks shared by the launchers: every code of a tensor the launch reads or writes.
inline bool valid_dtypes(const Params& p) {
  for (int i = 0; i < kNumInputs; ++i)
    if (p.in[i] && !valid_dtype(p.in_dtype[i])) return false;
  for (int k = 0; k < kNumOutputs; ++k)
    if (p.out[k] && !valid_dtype(p.out_dtype[k])) return false;
  return true;
}
inline bool valid_dtypes(const ThresholdParams& p) {
  return valid_dtype(p.x_dtype) && valid_dtype(p.model_dtype) && (!p.cond || valid_dtype(p.cond_dtype));
}

// Launchers: return a Status; never throw.
int solver_step_cpu(const Params& p);
int threshold_scale_cpu(const ThresholdParams& p);
#if defined(KDFAST_WITH_CUDA)
int solver_step_cuda(const Params& p);
int threshold_scale_cuda(const ThresholdParams& p);
#endif

}  // namespace solver_step
}  // namespace kdfast
