// CPU-launcher helpers shared by every op: blocks of a buffer of any kernel dtype seen as fp32
// (used in place when already fp32, widened into / narrowed from a scratch buffer otherwise)
// and the thread count worth using for an amount of work.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kd_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace kdfast {
namespace cpu {

// Hot loops are compiled twice, for AVX2 + FMA (KD_AVX2_FMA on a wrapper, the loop helpers
// KD_CPU_INLINE so they are compiled inside it) and for baseline x86-64, and one of the two is
// picked once with has_avx2_fma(). target_clones("avx2") would build AVX2 without FMA (a
// quarter slower on exp-heavy loops here), and an "arch=haswell" clone is picked by CPU
// model, so every AMD CPU would run the baseline.
#define KD_CPU_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define KD_AVX2_FMA __attribute__((target("avx2,fma")))
inline bool has_avx2_fma() {
  const char* baseline = std::getenv("KDFAST_CPU_BASELINE");  // set (not "0"): the baseline build, for tests
  if (baseline && *baseline && std::strcmp(baseline, "0") != 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define KD_AVX2_FMA
inline bool has_avx2_fma() { return false; }
#endif

// fp16 <-> fp32 blocks with the F16C instructions (8 lanes each, IEEE round to nearest even, as
// the software conversions of kd_common.h), on CPUs that have AVX2 + FMA (all that have those
// have F16C): the software conversions branch per element and made fp16 steps 3x slower than
// bf16 ones. Tails and the baseline build take the software path.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const half_bits* s, int64_t n, float* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = to_float(s[i]);
}
__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* s, int64_t n, half_bits* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = from_float<half_bits>(s[i]);
}
inline bool use_f16c() {
  static const bool yes = has_avx2_fma() && __builtin_cpu_supports("f16c");
  return yes;
}
// bf16 <-> fp32 blocks, 8 lanes, on CPUs with AVX2 + FMA, with the software conversions'
// results: widening is exact (the bits shifted into the high half); narrowing rounds to nearest
// even and keeps NaN a quiet NaN (from_float<bf16_bits>). GCC vectorises neither scalar loop
// well; these made bf16 kernels' conversions ~2x faster.
inline bool use_avx2() {
  static const bool yes = has_avx2_fma();
  return yes;
}
__attribute__((target("avx2"))) inline void bf16_to_float_avx2(const bf16_bits* s, int64_t n, float* d) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_slli_epi32(wide, 16));
  }
  for (; i < n; ++i) d[i] = to_float(s[i]);
}
__attribute__((target("avx2"))) inline void float_to_bf16_avx2(const float* s, int64_t n, bf16_bits* d) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i half_ulp = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i high = _mm256_srli_epi32(u, 16);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, half_ulp), _mm256_and_si256(high, one)), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, magnitude), inf);
    const __m256i bits = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, quiet), nan);
    // 32 -> 16 bits (every value is < 2^16, so the unsigned saturation never clips); packus
    // interleaves the two 128-bit lanes, the permute restores the order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) d[i] = from_float<bf16_bits>(s[i]);
}
#else
inline void half_to_float_f16c(const half_bits*, int64_t, float*) {}
inline void float_to_half_f16c(const float*, int64_t, half_bits*) {}
inline bool use_f16c() { return false; }
inline bool use_avx2() { return false; }
inline void bf16_to_float_avx2(const bf16_bits*, int64_t, float*) {}
inline void float_to_bf16_avx2(const float*, int64_t, bf16_bits*) {}
#endif

// Below this many elements per thread, a parallel region costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;

// Elements [off, off + n) of `p` as fp32: `p` itself when fp32, else widened into `buf`.
inline const float* load_floats(const void* p, int dtype, int64_t off, int64_t n, float* buf) {
  switch (dtype) {
    case kFloat16: {
      const half_bits* s = static_cast<const half_bits*>(p) + off;
      if (use_f16c()) {
        half_to_float_f16c(s, n, buf);
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = to_float(s[i]);
      }
      return buf;
    }
    case kBFloat16: {
      const bf16_bits* s = static_cast<const bf16_bits*>(p) + off;
      if (use_avx2()) {
        bf16_to_float_avx2(s, n, buf);
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = to_float(s[i]);
      }
      return buf;
    }
    default: return static_cast<const float*>(p) + off;
  }
}

// Where to compute elements [off, off + n) of output `p`: in place when fp32, else in `buf`,
// to be narrowed by store_floats.
inline float* float_target(void* p, int dtype, int64_t off, float* buf) {
  return dtype == kFloat32 ? static_cast<float*>(p) + off : buf;
}

inline void store_floats(void* p, int dtype, int64_t off, int64_t n, const float* src) {
  switch (dtype) {
    case kFloat16: {
      half_bits* d = static_cast<half_bits*>(p) + off;
      if (use_f16c()) {
        float_to_half_f16c(src, n, d);
      } else {
        for (int64_t i = 0; i < n; ++i) d[i] = from_float<half_bits>(src[i]);
      }
      break;
    }
    case kBFloat16: {
      bf16_bits* d = static_cast<bf16_bits*>(p) + off;
      if (use_avx2()) {
        float_to_bf16_avx2(src, n, d);
      } else {
        for (int64_t i = 0; i < n; ++i) d[i] = from_float<bf16_bits>(src[i]);
      }
      break;
    }
    default: break;  // fp32 was written in place
  }
}

// Threads for `tasks` independent pieces of `work` elements in all, at most `requested`.
inline int threads_for(int requested, int64_t tasks, int64_t work) {
  const int64_t useful = std::max<int64_t>(1, work / kMinElementsPerThread);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(std::max(requested, 1)), tasks, useful})));
}

// Row sweeps of the softmax kernels (KD divergences, top-k KD).

// The row's maximum in two accumulators of L lanes (GCC vector extensions: compilers do not
// vectorise a float max reduction without -ffinite-math-only). A NaN entry is passed over,
// as by std::max; the exponential sweep then makes the row's normaliser NaN.
template <int L>
struct FloatLanes {
  typedef float type __attribute__((vector_size(4 * L)));
};

template <int L>
KD_CPU_INLINE float row_max(const float* x, int64_t n) {
  using lanes = typename FloatLanes<L>::type;
  lanes a0, a1;
  for (int k = 0; k < L; ++k) a0[k] = a1[k] = -INFINITY;
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    lanes v0, v1;
    std::memcpy(&v0, x + j, sizeof(lanes));
    std::memcpy(&v1, x + j + L, sizeof(lanes));
    a0 = a0 < v0 ? v0 : a0;
    a1 = a1 < v1 ? v1 : a1;
  }
  a0 = a0 < a1 ? a1 : a0;
  float m = -INFINITY;
  for (int k = 0; k < L; ++k) m = m < a0[k] ? a0[k] : m;
  for (; j < n; ++j) m = m < x[j] ? x[j] : m;
  return m;
}

// A row x / T as the softmax kernels take it, into `out` (which may be `x`), or `x` itself at
// T = 1. Below T = 1 the row is shifted by its max first (softmax does not change), as
// x / T alone overflows for |x| > T * FLT_MAX (kd_common.h: tempered_shift); a row whose max
// is not finite keeps its inf, NaN or all -inf entries, so it still has no distribution.
KD_CPU_INLINE const float* tempered_row(const float* x, int64_t n, float inv_t, float* out) {
  if (inv_t == 1.f) return x;
  float m = inv_t > 1.f ? row_max<4>(x, n) : 0.f;
  if (!(m > -INFINITY && m < INFINITY)) m = 0.f;
  for (int64_t j = 0; j < n; ++j) out[j] = tempered_shift(x[j], m, inv_t);
  return out;
}

// Sums run in fp32 SIMD lanes over blocks of kSumBlock entries and in fp64 across blocks, so
// their rounding error stays at the level of torch's cascade sums for any vocabulary.
constexpr int64_t kSumBlock = 256;

// The row's log-normaliser; e[j] = exp(x[j] - max) is kept for the later sweeps, which form
// the probabilities as e[j] / z instead of taking exponentials again (2 exponentials per
// entry in all, not 5 to 7).
struct RowExp {
  float m, log_z;  // the log-normaliser, kept in two parts (see LogNorm in kd_divergence.h)
  float inv_z;
};

template <int L>
KD_CPU_INLINE RowExp row_exp(const float* x, int64_t n, float* e) {
  const float m = row_max<L>(x, n);
  if (!(m > -INFINITY && m < INFINITY)) {  // no distribution (every entry -inf, or inf / NaN)
    std::fill(e, e + n, 0.f);
    return RowExp{m, 0.f, 0.f};
  }
  double z = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    float zb = 0.f;
#pragma omp simd reduction(+ : zb)
    for (int64_t j = j0; j < j1; ++j) {
      e[j] = kd_exp(x[j] - m);
      zb += e[j];
    }
    z += zb;
  }
  return RowExp{m, float(std::log(z)), float(1.0 / z)};
}

// sum(x[0, n)) with kSumBlock's rounding.
KD_CPU_INLINE double row_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    float b = 0.f;
#pragma omp simd reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) b += x[j];
    total += b;
  }
  return total;
}

}  // namespace cpu
}  // namespace kdfast
