// Torch-free helpers shared by every kdfast kernel: host/device qualifiers, dtype codes,
// fp16/bf16 <-> fp32 conversion usable on both sides, and status codes.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#else
#define KD_HD inline __attribute__((always_inline))
#endif

namespace kdfast {

// Dtype codes passed across the binding; kdfast/ops/_dtypes.py holds the same table.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Status codes returned by launchers (kernels never throw across the boundary).
enum Status : int { kOk = 0, kBadDType = 1, kBadArgument = 2, kLaunchFailed = 3, kOutOfMemory = 4 };

// Whether a dtype code is one of the above (every launcher checks the codes it is given).
inline bool valid_dtype(int d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16; }

// 16-bit storage types: plain bit containers so host and device code share one layout.
struct half_bits { uint16_t v; };
struct bf16_bits { uint16_t v; };

KD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
KD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

KD_HD float to_float(float x) { return x; }
KD_HD float to_float(bf16_bits x) { return bits_to_float(uint32_t(x.v) << 16); }
KD_HD float to_float(half_bits x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.v));
#else
  // IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
  const uint32_t h = x.v, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  const float mag = float(man) * 5.9604644775390625e-08f;  // man * 2^-24
  return sign ? -mag : mag;
#endif
}

template <typename T> KD_HD T from_float(float f);
template <> KD_HD float from_float<float>(float f) { return f; }
template <> KD_HD bf16_bits from_float<bf16_bits>(float f) {
  // Round to nearest even, keep NaN a (quiet) NaN.
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_bits{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_bits{uint16_t(u >> 16)};
}
template <> KD_HD half_bits from_float<half_bits>(float f) {
#if defined(__CUDA_ARCH__)
  return half_bits{__half_as_ushort(__float2half_rn(f))};
#else
  // IEEE binary32 -> binary16, round to nearest even, overflow to inf, NaN kept.
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_bits{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return half_bits{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520
  if (a < 0x38800000u) {  // result is subnormal or zero: round a * 2^24 to an integer
    const float mag = bits_to_float(a) * 16777216.0f;
    uint32_t q = uint32_t(mag);
    const float rem = mag - float(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return half_bits{uint16_t(sign | q)};
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15 (in the shifted position)
  r += 0xfffu + ((r >> 13) & 1u);
  return half_bits{uint16_t(sign | (r >> 13))};
#endif
}

// Element i of a buffer of dtype code `dtype`, widened to fp32 / narrowed from fp32.
KD_HD float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return to_float(static_cast<const half_bits*>(p)[i]);
    case kBFloat16: return to_float(static_cast<const bf16_bits*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
KD_HD void store_from_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<half_bits*>(p)[i] = from_float<half_bits>(v); break;
    case kBFloat16: static_cast<bf16_bits*>(p)[i] = from_float<bf16_bits>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// (x - m) / T for a logit x of a row whose max is m, the argument of softmax(x / T)'s
// exponentials: at T < 1 the difference comes first, as x / T alone overflows for
// |x| > T * FLT_MAX (logits of 1e38 at T = 0.5); at T >= 1 each is scaled first, as x - m
// overflows for rows that span more than FLT_MAX, which x / T - m / T brings back in range.
// Either way the result overflows only where the exact value does. The KD kernels keep their
// row maxima in logit units and take every difference through this.
KD_HD float tempered_shift(float x, float m, float inv_t) {
  return inv_t > 1.f ? (x - m) * inv_t : x * inv_t - m * inv_t;
}

// exp(x) for the whole float range (subnormal results down to exp(-103.97), the smallest
// float; 0 below; inf above 88.72; NaN kept), as expf. On the host a branch-free Cody-Waite
// reduction with a degree-7 polynomial (<= 2 ulp), which compilers vectorise, unlike libm's
// expf. (Subnormal results cost x86 extra: a KD row whose logits nearly all lie 87 to 104
// below its maximum runs 1.8x slower than one within 87; torch.exp slows 30x there.)
KD_HD float kd_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Outside the range (and for NaN, whose int conversion below would be undefined) x is
  // replaced by 0 rather than by -104: masked -inf entries would otherwise make subnormals for
  // nothing, which x86 computes slowly. The selects at the end give those entries their value.
  const float xc = (x >= -104.f && x <= 88.72f) ? x : (x > 88.72f ? 88.72f : 0.f);
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = xc * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float e = 1.f / 5040.f;
  e = e * r + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  // 2^n as 2^n1 * 2^n2, both normal for n in [-150, 128]: the first product is exact and the
  // second rounds once, into the subnormals where exp(x) lies there.
  const int32_t ni = int32_t(n), n1 = ni >> 1, n2 = ni - n1;
  float y = e * bits_to_float(uint32_t(n1 + 127) << 23) * bits_to_float(uint32_t(n2 + 127) << 23);
  y = x < -104.f ? 0.f : y;
  y = x > 88.72f ? INFINITY : y;
  return x != x ? x : y;
#endif
}

}  // namespace kdfast
