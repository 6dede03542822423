// CPU launcher of the fused diffusion losses. Each sample is cut into tiles of kCpuTile
// elements; threads take (sample, tile) pairs, so a batch of 1 still uses every core. Inside a
// tile, chunks of kChunk elements are widened to fp32 in L1 and run through the shared math of
// diffusion_losses.h in plain vectorisable loops. Forward partial sums go to the workspace and
// are added per sample in tile order (results do not depend on the thread count).
#include "diffusion_losses.h"

#include "common/kd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace kdfast {
namespace diffusion_losses {
namespace {

constexpr int64_t kChunk = 512;


// Per-sample constants of the element math.
struct SampleConsts {
  float c = 0.f;
  double ca = 0.0, cb = 0.0;
};

SampleConsts sample_consts(const Params& p, int64_t b) {
  SampleConsts k;
  if (p.kind == kPseudoHuber || p.kind == kPseudoHuberElementwise) k.c = float(p.param[kC].at(b));
  if (p.kind == kProgressiveMSE) sample_coefficients(p, b, kPDTarget, k.ca, k.cb);
  return k;
}

template <int KIND>
KD_CPU_INLINE void reduce_chunk(const float* v0, const float* v1, const float* v2, int64_t n, const SampleConsts& k,
                                  double& s0, double& s1) {
  double a0 = 0.0, a1 = 0.0;
  const float c = k.c;
  const double ca = k.ca, cb = k.cb;
#pragma omp simd reduction(+ : a0, a1)
  for (int64_t i = 0; i < n; ++i) {
    double t0, t1;
    forward_terms<KIND>(v0[i], v1[i], v2[i], c, ca, cb, t0, t1);
    a0 += t0;
    a1 += t1;
  }
  s0 += a0;
  s1 += a1;
}

template <int KIND>
KD_CPU_INLINE void grad_chunk(const float* v0, const float* v1, const float* v2, int64_t n, const SampleConsts& k,
                                double factor, float* g0, float* g1) {
  const float c = k.c;
  const double ca = k.ca, cb = k.cb;
  if (g0 && g1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float g = float(grad_element<KIND>(v0[i], v1[i], v2[i], c, ca, cb, factor));
      g0[i] = g;
      g1[i] = -g;
    }
  } else {
    float* out = g0 ? g0 : g1;
    const double f = g0 ? factor : -factor;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = float(grad_element<KIND>(v0[i], v1[i], v2[i], c, ca, cb, f));
  }
}

// One chunk of every kind, compiled for AVX2 + FMA and for baseline x86-64 (kd_cpu.h); the
// launchers call the table picked for this CPU.
KD_CPU_INLINE void reduce_chunk_any(int kind, const float* v0, const float* v1, const float* v2, int64_t n,
                                    const SampleConsts& k, double& s0, double& s1) {
  switch (kind) {
    case kPseudoHuber: reduce_chunk<kPseudoHuber>(v0, v1, v2, n, k, s0, s1); break;
    case kPseudoHuberElementwise: reduce_chunk<kPseudoHuberElementwise>(v0, v1, v2, n, k, s0, s1); break;
    case kDMD: reduce_chunk<kDMD>(v0, v1, v2, n, k, s0, s1); break;
    default: reduce_chunk<kProgressiveMSE>(v0, v1, v2, n, k, s0, s1); break;
  }
}

KD_CPU_INLINE void grad_chunk_any(int kind, const float* v0, const float* v1, const float* v2, int64_t n,
                                  const SampleConsts& k, double factor, float* g0, float* g1) {
  switch (kind) {
    case kPseudoHuber: grad_chunk<kPseudoHuber>(v0, v1, v2, n, k, factor, g0, g1); break;
    case kPseudoHuberElementwise: grad_chunk<kPseudoHuberElementwise>(v0, v1, v2, n, k, factor, g0, g1); break;
    case kDMD: grad_chunk<kDMD>(v0, v1, v2, n, k, factor, g0, g1); break;
    default: grad_chunk<kProgressiveMSE>(v0, v1, v2, n, k, factor, g0, g1); break;
  }
}

KD_CPU_INLINE void combine_chunk_any(const float* a, const float* b, int64_t n, double ca, double cb, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = float(ca * double(a[i]) + cb * double(b[i]));
}

struct ChunkFns {
  void (*reduce)(int, const float*, const float*, const float*, int64_t, const SampleConsts&, double&, double&);
  void (*grad)(int, const float*, const float*, const float*, int64_t, const SampleConsts&, double, float*, float*);
  void (*combine)(const float*, const float*, int64_t, double, double, float*);
};

#define KD_CHUNK_FNS(SUFFIX, TARGET)                                                                         \
  TARGET void reduce_chunk_##SUFFIX(int kind, const float* v0, const float* v1, const float* v2, int64_t n,  \
                                    const SampleConsts& k, double& s0, double& s1) {                       \
    reduce_chunk_any(kind, v0, v1, v2, n, k, s0, s1);                                                      \
  }                                                                                                        \
  TARGET void grad_chunk_##SUFFIX(int kind, const float* v0, const float* v1, const float* v2, int64_t n,    \
                                  const SampleConsts& k, double factor, float* g0, float* g1) {            \
    grad_chunk_any(kind, v0, v1, v2, n, k, factor, g0, g1);                                                \
  }                                                                                                        \
  TARGET void combine_chunk_##SUFFIX(const float* a, const float* b, int64_t n, double ca, double cb,        \
                                     float* out) {                                                         \
    combine_chunk_any(a, b, n, ca, cb, out);                                                               \
  }                                                                                                        \
  constexpr ChunkFns kChunkFns_##SUFFIX{reduce_chunk_##SUFFIX, grad_chunk_##SUFFIX, combine_chunk_##SUFFIX};

KD_CHUNK_FNS(baseline, )
KD_CHUNK_FNS(avx2_fma, KD_AVX2_FMA)
#undef KD_CHUNK_FNS

const ChunkFns& chunk_fns() {
  static const ChunkFns& fns = cpu::has_avx2_fma() ? kChunkFns_avx2_fma : kChunkFns_baseline;
  return fns;
}

// Inputs the kind reads; absent ones alias in[0] (their values are never used).
int inputs_of(int kind) { return kind == kPseudoHuber || kind == kPseudoHuberElementwise ? 2 : 3; }

int check_inputs(const Params& p, int num_inputs) {
  if (p.batch < 0 || p.inner <= 0) return kBadArgument;
  for (int i = 0; i < num_inputs; ++i) {
    if (!p.in[i]) return kBadArgument;
    if (!valid_dtype(p.in_dtype[i])) return kBadDType;
  }
  return kOk;
}

// The chunk [start, start + n) of sample b of every input the kind reads, as fp32.
// `first` > 0 skips inputs the caller does not read (they alias in[first]).
void load_inputs(const Params& p, int num_inputs, int64_t b, int64_t start, int64_t n, float (*buf)[kChunk],
                 const float** v, int first = 0) {
  for (int i = first; i < num_inputs; ++i)
    v[i] = cpu::load_floats(p.in[i], p.in_dtype[i], b * p.in_stride[i] + start, n, buf[i]);
  for (int i = 0; i < first; ++i) v[i] = v[first];
  for (int i = num_inputs; i < kMaxInputs; ++i) v[i] = v[0];
}

}  // namespace

int loss_forward_cpu(const Params& p) {
  if (p.kind < 0 || p.kind >= kNumKinds || !p.loss || !p.aux || !p.workspace) return kBadArgument;
  const int num_inputs = inputs_of(p.kind);
  if (int s = check_inputs(p, num_inputs)) return s;
  const int64_t tps = tiles_per_sample(p.inner, kCpuTile);
  const int64_t tasks = p.batch * tps;
  const int threads = cpu::threads_for(p.num_threads, tasks, p.batch * p.inner);
  const ChunkFns& fns = chunk_fns();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / tps;
    const int64_t start = (t % tps) * kCpuTile, end = std::min(p.inner, start + kCpuTile);
    const SampleConsts k = sample_consts(p, b);
    alignas(64) float buf[kMaxInputs][kChunk];
    const float* v[kMaxInputs];
    double s0 = 0.0, s1 = 0.0;
    for (int64_t c0 = start; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      load_inputs(p, num_inputs, b, c0, n, buf, v);
      fns.reduce(p.kind, v[0], v[1], v[2], n, k, s0, s1);
    }
    p.workspace[2 * t] = s0;
    p.workspace[2 * t + 1] = s1;
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    double s0 = 0.0, s1 = 0.0;
    for (int64_t j = 0; j < tps; ++j) {
      s0 += p.workspace[2 * (b * tps + j)];
      s1 += p.workspace[2 * (b * tps + j) + 1];
    }
    double raw, stat;
    finish_sample(p.kind, s0, s1, p.param[kC].at(b), p.inner, raw, stat);
    p.loss[b] = weighted(p.param[kWeight].at(b), raw);
    p.aux[2 * b] = raw;
    p.aux[2 * b + 1] = stat;
  }
  return kOk;
}

int loss_backward_cpu(const Params& p) {
  if (p.kind < 0 || p.kind >= kNumKinds || !p.aux || !p.grad_loss) return kBadArgument;
  const int num_inputs = inputs_of(p.kind);
  if (int s = check_inputs(p, num_inputs)) return s;
  for (int k = 0; k < kMaxGrads; ++k)
    if (p.grad[k] && !valid_dtype(p.grad_dtype[k])) return kBadDType;
  if (p.grad[1] && !(p.kind == kPseudoHuber || p.kind == kPseudoHuberElementwise)) return kBadArgument;
  if (!p.grad[0] && !p.grad[1]) return kOk;
  const int64_t tps = (p.inner + kCpuTile - 1) / kCpuTile;
  const int64_t tasks = p.batch * tps;
  const int threads = cpu::threads_for(p.num_threads, tasks, p.batch * p.inner);
  const ChunkFns& fns = chunk_fns();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / tps;
    const int64_t start = (t % tps) * kCpuTile, end = std::min(p.inner, start + kCpuTile);
    const SampleConsts k = sample_consts(p, b);
    const double w = p.param[kWeight].at(b);
    const double scale = w == 0.0 ? 0.0 : w * double(p.grad_loss[b * p.grad_loss_stride]);
    const double factor = grad_factor(p.kind, scale, p.aux[2 * b + 1], p.inner);
    alignas(64) float buf[kMaxInputs][kChunk];
    alignas(64) float gbuf[kMaxGrads][kChunk];
    const float* v[kMaxInputs];
    for (int64_t c0 = start; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      load_inputs(p, num_inputs, b, c0, n, buf, v, p.kind == kDMD ? 1 : 0);  // DMD's gradient ignores x_t
      float* g[kMaxGrads];
      for (int j = 0; j < kMaxGrads; ++j)
        g[j] = p.grad[j] ? cpu::float_target(p.grad[j], p.grad_dtype[j], b * p.inner + c0, gbuf[j]) : nullptr;
      if (scale == 0.0) {  // zero weight (or zero incoming gradient): 0, even where the sample holds NaN or inf
        for (int j = 0; j < kMaxGrads; ++j)
          if (g[j]) std::fill(g[j], g[j] + n, 0.f);
      } else {
        fns.grad(p.kind, v[0], v[1], v[2], n, k, factor, g[0], g[1]);
      }
      for (int j = 0; j < kMaxGrads; ++j)
        if (p.grad[j]) cpu::store_floats(p.grad[j], p.grad_dtype[j], b * p.inner + c0, n, g[j]);
    }
  }
  return kOk;
}

int sample_combination_cpu(const Params& p) {
  if (p.combination < 0 || p.combination >= kNumCombinations || !p.grad[0]) return kBadArgument;
  if (int s = check_inputs(p, 2)) return s;
  if (!valid_dtype(p.grad_dtype[0])) return kBadDType;
  const int64_t tps = (p.inner + kCpuTile - 1) / kCpuTile;
  const int64_t tasks = p.batch * tps;
  const int threads = cpu::threads_for(p.num_threads, tasks, p.batch * p.inner);
  const ChunkFns& fns = chunk_fns();
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / tps;
    const int64_t start = (t % tps) * kCpuTile, end = std::min(p.inner, start + kCpuTile);
    double ca, cb;
    sample_coefficients(p, b, p.combination, ca, cb);
    alignas(64) float buf[kMaxInputs][kChunk];
    alignas(64) float obuf[kChunk];
    const float* v[kMaxInputs];
    for (int64_t c0 = start; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      load_inputs(p, 2, b, c0, n, buf, v);
      float* o = cpu::float_target(p.grad[0], p.grad_dtype[0], b * p.inner + c0, obuf);
      fns.combine(v[0], v[1], n, ca, cb, o);
      cpu::store_floats(p.grad[0], p.grad_dtype[0], b * p.inner + c0, n, o);
    }
  }
  return kOk;
}

}  // namespace diffusion_losses
}  // namespace kdfast
