// Branch-free exp and tanh for float that GCC and Clang vectorize inside
// `#pragma omp simd` loops (std::exp / std::tanh are opaque libm calls and keep
// a loop scalar). Accuracy: a few ulp over the whole float range, enough for
// the 1e-5 tolerances of the tests; double uses libm (gradcheck runs in double).
#pragma once

#include <cmath>
#include <cstdint>
#include <bit>

namespace charmlp {

// Width of the explicit vector blocks in the row loops (softmax_xent_row.h,
// first_layer.h): one AVX-512 vector of float; an AVX2 machine runs a block as two.
// Loops written as blocks of this many lanes, the lanes past the row's end masked,
// compile to whole (masked) vectors where a plain loop leaves a scalar remainder or,
// with an inner loop, is not vectorized at all.
constexpr int64_t kVectorLanes = 16;

// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2, exp(r) by its
// degree-7 Taylor polynomial (truncation error < 1e-8 relative on that range).
// Inputs below -87.3 return ~1e-38 instead of a denormal or 0: harmless for
// softmax sums and gradients, and it keeps the bit trick below in range.
inline float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;        // ln2 split in a high part exact in float
  r = r - n * -2.12194440e-4f;           // and the low remainder (Cody-Waite)
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return p * scale;
}

// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|); below |x| = 0.25 that
// form cancels, so use the odd Taylor series there (next term < 1e-10).
inline float tanh_f32(float x) {
  const float ax = std::fabs(x);
  const float e = exp_f32(-2.0f * ax);
  const float big = (1.0f - e) / (1.0f + e);
  const float x2 = ax * ax;
  float s = -1382.0f / 155925.0f;
  s = s * x2 + 62.0f / 2835.0f;
  s = s * x2 - 17.0f / 315.0f;
  s = s * x2 + 2.0f / 15.0f;
  s = s * x2 - 1.0f / 3.0f;
  const float small = ax + ax * x2 * s;
  const float t = ax < 0.25f ? small : big;
  return std::copysign(t, x);
}

inline double tanh_f32(double x) { return std::tanh(x); }
inline double exp_f32(double x) { return std::exp(x); }

// The names above say float; these overloads keep templates over the
// accumulation type readable (float -> vectorizable code, double -> libm).
template <typename acc_t>
inline acc_t fast_exp(acc_t x) { return exp_f32(x); }
template <typename acc_t>
inline acc_t fast_tanh(acc_t x) { return tanh_f32(x); }

}  // namespace charmlp
