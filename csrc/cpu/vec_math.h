// Branch-free exp, tanh and log for float that GCC and Clang vectorize inside
// `#pragma omp simd` loops (std::exp / std::tanh / std::log are opaque libm calls and
// keep a loop scalar). Accuracy: a few ulp over the whole float range, enough for
// the 1e-5 tolerances of the tests; double uses libm (gradcheck runs in double).
#pragma once

#include "cpu/capability.h"

#include <cmath>
#include <cstdint>
#include <bit>
#include <limits>

namespace charmlp::CHARMLP_CPU_CAPABILITY {

// Width of the explicit vector blocks in the row loops (softmax_xent_row.h,
// first_layer.h): one AVX-512 vector of float; an AVX2 machine runs a block as two.
// Loops written as blocks of this many lanes, the lanes past the row's end masked,
// compile to whole (masked) vectors where a plain loop leaves a scalar remainder or,
// with an inner loop, is not vectorized at all.
constexpr int64_t kVectorLanes = 16;

// exp and expm1 share a range reduction, x = n ln2 + r with n = round(x / ln2) and
// |r| <= ln2 / 2 (Cody-Waite: ln2 split in a high part exact in float and the low
// remainder), and one polynomial, exp(r) - 1 = r q(r) with q the degree-6 Taylor
// polynomial of (exp(r) - 1) / r (truncation error < 1e-8 relative on that range).
// Inputs below -87.3 are clamped (exp gives ~1e-38 instead of a denormal or 0:
// harmless for softmax sums and gradients, and it keeps the bit trick in range).
inline float exp_reduce_f32(float x, float* r) {
#if defined(__x86_64__) && !defined(__SSE4_1__)
  // The x86-64 baseline (SSE2) has no vector floor (roundps is SSE4.1): GCC would call
  // floorf per lane and leave every exp loop scalar (with it, the baseline's cross_entropy
  // forward took 1.35x and its SGD step 1.4-1.5x longer). Adding and subtracting 1.5 * 2^23
  // rounds to the nearest integer instead (exact for |v| < 2^22; x is clamped far inside):
  // n differs from floor(v + 0.5) only at exact ties, where either keeps |r| <= ln2 / 2.
  // (Without -ffast-math GCC keeps the two roundings.)
  const float v = x * 1.44269504088896341f;
  const float n = (v + 12582912.0f) - 12582912.0f;
#else
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
#endif
  *r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  return n;
}
inline float pow2_f32(float n) {  // 2^n for integral n in the normal range
  return std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
inline float expm1_poly_f32(float r) {
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  return r * q;
}

inline float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  float r;
  const float s = pow2_f32(exp_reduce_f32(x, &r));
  return s * expm1_poly_f32(r) + s;
}

// exp(x) - 1 with full relative precision near 0 (the polynomial has no constant
// term to cancel against), for x <= 88.7.
inline float expm1_f32(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  float r;
  const float s = pow2_f32(exp_reduce_f32(x, &r));
  return s * expm1_poly_f32(r) + (s - 1.0f);
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|), as -u / (2 + u) with
// u = e - 1 = expm1(-2|x|) in (-1, 0]: no cancellation at small |x|, so no second
// (series) branch is needed. ~3 ulp (2e-7 relative); 1.3x faster than the
// two-branch form with a plain exp that it replaced.
inline float tanh_f32(float x) {
  const float u = expm1_f32(-2.0f * std::fabs(x));
  return std::copysign(u / (-2.0f - u), x);
}

// log(x) for x = f 2^e, f in [sqrt(1/2), sqrt(2)): e ln2 (ln2 split as in exp) plus
// log(f) = g - g^2/2 + g^3 P(g), g = f - 1, with the Cephes logf polynomial (~1 ulp).
// Branch-free, so a loop over rows vectorizes (libm's logf is an opaque call, ~15% of
// the cross_entropy forward at V = 27 when called once a row). Domain: normal positive
// floats (the callers pass sums of exps, >= 1), 0 (-inf), +inf and NaN (propagated);
// not subnormals.
inline float log_f32(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126);
  float f = std::bit_cast<float>((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool low = f < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  f = low ? f + f - 1.0f : f - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  float r = f + y + 0.693359375f * e;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  r = x > 0.0f ? r : (x == 0.0f ? -kInf : std::numeric_limits<float>::quiet_NaN());
  return x == kInf ? x : r;
}

inline double tanh_f32(double x) { return std::tanh(x); }
inline double exp_f32(double x) { return std::exp(x); }
inline double log_f32(double x) { return std::log(x); }

// The names above say float; these overloads keep templates over the
// accumulation type readable (float -> vectorizable code, double -> libm).
template <typename acc_t>
inline acc_t fast_exp(acc_t x) { return exp_f32(x); }
template <typename acc_t>
inline acc_t fast_tanh(acc_t x) { return tanh_f32(x); }
template <typename acc_t>
inline acc_t fast_log(acc_t x) { return log_f32(x); }

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
