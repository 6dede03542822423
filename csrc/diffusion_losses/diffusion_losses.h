// Fused diffusion-distillation losses, batched over samples that sit at different timesteps,
// with per-sample weights. Every loss is a per-sample reduction followed (in the backward) by
// one element pass:
//
//   kPseudoHuber             L_b = sqrt(||x - y||^2 + c^2) - c              (iCT, per-sample norm)
//   kPseudoHuberElementwise  L_b = mean_i sqrt((x_i - y_i)^2 + c^2) - c     (LCM)
//   kDMD                     L_b = 0.5 mean_i (x_i - sg(x_i - g_i))^2 = 0.5 mean_i g_i^2,
//                            g = (x0_fake - x0_real) / mean_i |x_t,i - x0_real,i|  (DMD / DMD2)
//   kProgressiveMSE          L_b = mean_i (pred_i - (ca x_s,i + cb x_t,i))^2       (Salimans & Ho)
//
// each multiplied by the sample's weight w_b. The loss kernels write L_b (float32) and an
// auxiliary float64 pair per sample (the unweighted loss and the statistic the backward needs:
// sqrt(||x - y||^2 + c^2) for kPseudoHuber, 1 / normaliser for kDMD). The backward kernels
// take the incoming gradient of L_b and write d L / d x (and d L / d y for pseudo-Huber).
//
// Why the gradient is a second pass in the backward instead of being written by the forward
// (as kd_divergence does): the per-sample norm / normaliser must be known before any gradient
// element, so a forward-written gradient would re-read the inputs in the forward anyway and
// then need a third pass in the backward to scale it by the incoming gradient. Done in the
// backward, that re-read folds in the incoming per-sample gradient and the weight: 5 latent
// passes instead of 7 for pseudo-Huber (read x, y; read x, y + write grad), gradients rounded
// once, d/dy in the same pass, and nothing but the [batch] loss when no backward runs. The
// price: the inputs stay alive until the backward (a few latents, small next to the network's
// activations).
//
// The combination kernel (sample_combination) writes a per-sample linear combination
// out = ca_b a + cb_b b of two latents: the progressive-distillation target (a = x_s, b = x_t)
// or a DDIM step with per-sample timesteps (a = x_t, b = model output).
//
// Numerics: per-sample sums, norms and coefficients are float64; element differences are
// taken in float64 for the norm-based losses (no overflow of (x - y)^2 for any float input);
// the element-wise pseudo-Huber works in float32 with an overflow- and cancellation-free form
// (the halves of x - y where it overflows).
// The same functions run on the CPU and CUDA; kernels/diffusion_losses.py (Triton) and
// kdfast/reference/diffusion_losses.py (the spec) mirror them.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/kd_common.h"

namespace kdfast {
namespace diffusion_losses {

// Same order as KINDS in kdfast/ops/diffusion_losses.py.
enum Kind : int { kPseudoHuber = 0, kPseudoHuberElementwise = 1, kDMD = 2, kProgressiveMSE = 3 };
constexpr int kNumKinds = 4;

// Prediction types of the progressive-distillation target and of the DDIM step (same order as
// PREDICTION_TYPES in kdfast/ops/diffusion_losses.py).
enum Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };
constexpr int kNumPredictions = 3;

// What sample_combination computes.
enum Combination : int { kPDTarget = 0, kDDIMStep = 1 };
constexpr int kNumCombinations = 2;

// Per-sample scalars: a [batch] float32/float64 array (stride 0 broadcasts one element) or,
// when ptr is null, a host value.
enum Slot : int { kWeight = 0, kC = 1, kAlphaT = 2, kSigmaT = 3, kAlphaS = 4, kSigmaS = 5 };
constexpr int kNumSlots = 6;

// Latent inputs, by kind:
//   kPseudoHuber*:   in[0] = x, in[1] = y
//   kDMD:            in[0] = x_t (x itself by default), in[1] = x0_real, in[2] = x0_fake
//   kProgressiveMSE: in[0] = the student's prediction, in[1] = x_s, in[2] = x_t
//   sample_combination: in[0] = a, in[1] = b
constexpr int kMaxInputs = 3;
constexpr int kMaxGrads = 2;  // d/d in[0] and, for pseudo-Huber, d/d in[1]

struct PerSample {
  const void* ptr = nullptr;
  int64_t stride = 0;
  int is_double = 0;
  double value = 0.0;

  KD_HD double at(int64_t b) const {
    if (!ptr) return value;
    return is_double ? static_cast<const double*>(ptr)[b * stride] : double(static_cast<const float*>(ptr)[b * stride]);
  }
};

struct Params {
  int kind = kPseudoHuber;
  int prediction = kEpsilon;  // kProgressiveMSE and sample_combination
  int combination = kPDTarget;  // sample_combination
  int64_t batch = 0;
  int64_t inner = 0;  // elements per sample; each sample's elements are contiguous
  const void* in[kMaxInputs] = {};
  int64_t in_stride[kMaxInputs] = {};  // elements between consecutive samples
  int in_dtype[kMaxInputs] = {};
  PerSample param[kNumSlots];
  // Loss forward: outputs.
  float* loss = nullptr;    // float32 [batch], weighted
  double* aux = nullptr;    // float64 [batch, 2]: unweighted loss, backward statistic
  double* workspace = nullptr;  // float64 [2 * batch * tiles_per_sample] (see workspace_doubles)
  // Loss backward: the incoming gradient of `loss` and the gradients to write (null: skip).
  const float* grad_loss = nullptr;  // float32 [batch]
  int64_t grad_loss_stride = 1;
  void* grad[kMaxGrads] = {};  // contiguous, like the inputs; sample_combination writes grad[0]
  int grad_dtype[kMaxGrads] = {};
  int num_threads = 1;  // CPU launcher only
  void* stream = nullptr;  // CUDA launcher only
};

// Partial sums: each sample is cut into tiles of `tile` elements, reduced independently (in
// parallel) and summed in a fixed order, so results do not depend on the thread count.
KD_HD int64_t tiles_per_sample(int64_t inner, int64_t tile) { return inner <= 0 ? 1 : (inner + tile - 1) / tile; }
KD_HD int64_t workspace_doubles(int64_t batch, int64_t inner, int64_t tile) {
  return 2 * batch * tiles_per_sample(inner, tile);
}

KD_HD bool is_finite(double v) { return v - v == 0.0; }  // false for inf and NaN

// ---------------------------------------------------------------------------- pseudo-Huber

// sqrt(a^2 + c^2) for a, c >= 0 without overflow or underflow of the squares (inf for a = inf).
KD_HD float hypot_nonneg(float a, float c) {
  const float m = a > c ? a : c;
  const bool big = m > 1e18f, small = m < 1e-18f;
  // Scale by a power of two and back (exact): k and 1 / k, a product instead of a division.
  const float k = big ? 8.2718061255302767e-25f : (small ? 1.2676506002282294e30f : 1.f);  // 2^-80, 2^100
  const float inv_k = big ? 1.2089258196146292e24f : (small ? 7.8886090522101181e-31f : 1.f);  // 2^80, 2^-100
  const float as = a * k, cs = c * k;
  return sqrtf(as * as + cs * cs) * inv_k;
}

// Element-wise pseudo-Huber sqrt(d^2 + c^2) - c of d = v0 - v1, written as a^2 / (h + c) (no
// cancellation when |d| << c), and its derivative d / h; a = |d| = inf gives (inf, NaN) and a
// NaN d (NaN, NaN), as autograd of the formula does (so that GradScaler sees an overflow),
// d = c = 0 (0, 0). Where v0 - v1 overflows float32 (finite v0, v1 of opposite signs), it is
// taken on the halves and the value doubled in float64 (the loss sums in float64).
KD_HD void pseudo_huber_element(float v0, float v1, float c, double& value, float& slope) {
  float d = v0 - v1;
  double scale = 1.0;
  if (fabsf(d) == INFINITY && fabsf(v0) < INFINITY && fabsf(v1) < INFINITY) {
    d = 0.5f * v0 - 0.5f * v1;  // (exact halvings but for subnormals, negligible beside |d| > 1.7e38)
    c *= 0.5f;
    scale = 2.0;
  }
  const float a = fabsf(d);
  const float h = hypot_nonneg(a, c);
  const bool inf = a == INFINITY;
  const float ratio = h > 0.f ? a / (h + c) : 0.f;  // in [0, 1]
  const float rel = h > 0.f && !inf ? a / h : 0.f;  // |slope|
  value = inf ? INFINITY : scale * double(a * ratio);
  slope = inf ? NAN : (d < 0.f ? -rel : (d > 0.f ? rel : (d == 0.f ? 0.f : d)));
}

// ---------------------------------------------------------------------------- forward terms

// One element's contributions to the sample's two sums. v0, v1, v2: in[0..2] as float.
// `coef` holds per-sample constants: c for pseudo-Huber, (ca, cb) for kProgressiveMSE.
template <int KIND>
KD_HD void forward_terms(float v0, float v1, float v2, float c, double ca, double cb, double& s0, double& s1) {
  if constexpr (KIND == kPseudoHuber) {
    const double d = double(v0) - double(v1);
    s0 = d * d;
    s1 = 0.0;
  } else if constexpr (KIND == kPseudoHuberElementwise) {
    double value;
    float slope;
    pseudo_huber_element(v0, v1, c, value, slope);
    s0 = value;
    s1 = 0.0;
  } else if constexpr (KIND == kDMD) {
    // s0: |x_t - x0_real| (the normaliser); s1: (x0_fake - x0_real)^2 where finite.
    const double n = double(v0) - double(v1);
    const double d = double(v2) - double(v1);
    s0 = n < 0.0 ? -n : n;
    s1 = is_finite(d) ? d * d : 0.0;
  } else {  // kProgressiveMSE
    const double e = double(v0) - (ca * double(v1) + cb * double(v2));
    s0 = e * e;
    s1 = 0.0;
  }
}

// The sample's loss (unweighted) and backward statistic from its two sums.
KD_HD void finish_sample(int kind, double s0, double s1, double c, int64_t inner, double& raw, double& stat) {
  const double n = double(inner);
  stat = 0.0;
  switch (kind) {
    case kPseudoHuber: {
      const double r = sqrt(s0 + c * c);
      stat = r;
      // sqrt(s + c^2) - c = s / (r + c): no cancellation when s << c^2.
      // (r == 0 only for s = c = 0; a NaN s stays NaN, as the loss of a sample holding NaN)
      raw = s0 == INFINITY ? INFINITY : (r == 0.0 ? 0.0 : s0 / (r + c));
      break;
    }
    case kDMD: {
      const double norm = s0 / n;
      // A zero or non-finite normaliser gives the sample no gradient (and loss 0).
      const double inv = (norm > 0.0 && norm < INFINITY) ? 1.0 / norm : 0.0;
      stat = inv;
      raw = inv > 0.0 ? 0.5 * (s1 * inv) * inv / n : 0.0;
      break;
    }
    default:  // element means
      raw = s0 / n;
  }
}

KD_HD float weighted(double w, double raw) { return w == 0.0 ? 0.f : float(w * raw); }

// ---------------------------------------------------------------------------- backward terms

// Per-sample factor of the gradient: `k` = weight * incoming gradient of the sample's loss.
KD_HD double grad_factor(int kind, double k, double stat, int64_t inner) {
  const double n = double(inner);
  switch (kind) {
    case kPseudoHuber:  // (x - y) / r; a NaN r (a NaN in the sample) makes all of it NaN, as autograd does
      return stat != stat ? stat : stat > 0.0 && stat < INFINITY ? k / stat : 0.0;
    case kPseudoHuberElementwise: return k / n;                               // slope / n
    case kDMD: return k * stat / n;                                           // g / n
    default: return 2.0 * k / n;                                              // 2 (pred - target) / n
  }
}

// d L_b / d in[0] of one element (d / d in[1] is its negative for pseudo-Huber).
template <int KIND>
KD_HD double grad_element(float v0, float v1, float v2, float c, double ca, double cb, double factor) {
  if constexpr (KIND == kPseudoHuber) {
    return (double(v0) - double(v1)) * factor;
  } else if constexpr (KIND == kPseudoHuberElementwise) {
    double value;
    float slope;
    pseudo_huber_element(v0, v1, c, value, slope);
    return double(slope) * factor;
  } else if constexpr (KIND == kDMD) {
    const double d = double(v2) - double(v1);
    return is_finite(d) ? d * factor : 0.0;  // like torch.nan_to_num, but a non-finite g gives 0
  } else {
    return (double(v0) - (ca * double(v1) + cb * double(v2))) * factor;
  }
}

// ---------------------------------------------------------------------------- coefficients

// x0 = p0 z + q0 m and eps = p1 z + q1 m for a latent z = alpha x0 + sigma eps and a model
// prediction m of type `prediction` (v = alpha eps - sigma x0).
KD_HD void prediction_to_x0_eps(int prediction, double alpha, double sigma, double& p0, double& q0, double& p1,
                                double& q1) {
  if (prediction == kEpsilon) {
    p0 = 1.0 / alpha; q0 = -sigma / alpha; p1 = 0.0; q1 = 1.0;
  } else if (prediction == kSample) {
    p0 = 0.0; q0 = 1.0; p1 = 1.0 / sigma; q1 = -alpha / sigma;
  } else {
    const double n = alpha * alpha + sigma * sigma;
    p0 = alpha / n; q0 = -sigma / n; p1 = sigma / n; q1 = alpha / n;
  }
}

// The prediction of type `prediction` that gives x0 at z: u x0 + v z.
KD_HD void x0_to_prediction(int prediction, double alpha, double sigma, double& u, double& v) {
  if (prediction == kEpsilon) {
    u = -alpha / sigma; v = 1.0 / sigma;
  } else if (prediction == kSample) {
    u = 1.0; v = 0.0;
  } else {
    u = -(alpha * alpha + sigma * sigma) / sigma; v = alpha / sigma;
  }
}

// kPDTarget: the student's one-step target from (a = x_s, b = x_t), Salimans & Ho (2022):
//   x0 = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),
// converted to the student's prediction type at x_t. kDDIMStep: the deterministic DDIM step
// x_s = alpha_s x0 + sigma_s eps from (a = x_t, b = model output).
KD_HD void combination_coefficients(int combination, int prediction, double alpha_t, double sigma_t, double alpha_s,
                                    double sigma_s, double& ca, double& cb) {
  if (combination == kPDTarget) {
    const double r = sigma_s / sigma_t;
    const double inv_den = 1.0 / (alpha_s - r * alpha_t);
    double u, v;
    x0_to_prediction(prediction, alpha_t, sigma_t, u, v);
    ca = u * inv_den;
    cb = v - u * r * inv_den;
  } else {
    double p0, q0, p1, q1;
    prediction_to_x0_eps(prediction, alpha_t, sigma_t, p0, q0, p1, q1);
    ca = alpha_s * p0 + sigma_s * p1;
    cb = alpha_s * q0 + sigma_s * q1;
  }
}

KD_HD void sample_coefficients(const Params& p, int64_t b, int combination, double& ca, double& cb) {
  combination_coefficients(combination, p.prediction, p.param[kAlphaT].at(b), p.param[kSigmaT].at(b),
                           p.param[kAlphaS].at(b), p.param[kSigmaS].at(b), ca, cb);
}

int loss_forward_cpu(const Params& p);
int loss_backward_cpu(const Params& p);
int sample_combination_cpu(const Params& p);
int loss_forward_cuda(const Params& p);
int loss_backward_cuda(const Params& p);
int sample_combination_cuda(const Params& p);

// Tile sizes of the launchers (the workspace of the forward depends on them).
constexpr int64_t kCpuTile = 1 << 14;
constexpr int64_t kCudaTile = 1 << 13;

}  // namespace diffusion_losses
}  // namespace kdfast
