// A small, allocation-free GEMM for the fused CPU kernels.
//
// The fused kernels multiply many tiny blocks (a chunk of 64 rows by a
// 200 x 27 weight, say). Going through at::mm for each would cost a tensor
// wrapper, a dispatcher call and a BLAS call setup per block (microseconds,
// more than the arithmetic), and libtorch does not export its raw BLAS entry
// points. So the fused kernels use this register-blocked kernel instead:
//
//   C[M, N] (+)= A[M, K] @ B[K, N]
//
// A is read one scalar at a time through arbitrary strides (so A^T is free),
// B and C are row-major. The inner block is up to 8 rows of C by two SIMD
// vectors of columns (32 floats or 16 doubles with AVX-512), held in registers
// across the whole K loop: per k, two vector loads of B, up to eight broadcasts
// of A and sixteen FMAs. Two vectors per row rather than one halve the
// broadcasts per FMA, which otherwise compete with the B loads for the load
// ports (measured on the logits GEMM [64 x 200] @ [200 x 32]: ~1.2x). Compiled per
// capability (cpu/capability.h), GCC turns the fixed-size inner loops into AVX-512 or
// AVX2 FMAs; the kernel is FMA-bound once K is more than a few dozen.
#pragma once

#include "cpu/capability.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace charmlp::CHARMLP_CPU_CAPABILITY {

template <typename T>
struct MatrixRef {
  const T* data;
  int64_t row_stride;
  int64_t col_stride;
  T operator()(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

template <typename T>
inline MatrixRef<T> row_major(const T* data, int64_t ld) { return {data, ld, 1}; }
template <typename T>
inline MatrixRef<T> transposed(const T* data, int64_t ld) { return {data, 1, ld}; }

namespace detail {
// The register block is kGemmMaxRows rows of C by two vectors: its accumulators, the
// two vectors of B and the broadcast of A must fit the register file, or GCC spills
// accumulators to the stack inside the K loop (a load and a store per FMA).
//   AVX-512: 32 zmm, 8 x 2 accumulators (16) + 3.
//   AVX2:    16 ymm, 6 x 2 accumulators (12) + 3, the shape of BLIS's Haswell kernel
//            (8 x 2 needs 19 registers: the lecture's SGD step under AVX2 took 1.13-1.15x
//            longer at B = 32 and 1.08x at B = 4,096, timed against this one).
//   baseline (SSE2): 16 xmm, 6 x 2 of 4 floats.
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
constexpr int64_t kGemmMaxRows = 8;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
constexpr int64_t kGemmMaxRows = 6;
#else
constexpr int64_t kVectorBytes = 16;
constexpr int64_t kGemmMaxRows = 6;
#endif
// Columns per block: two SIMD vectors of T.
template <typename T>
constexpr int64_t kGemmCols = 2 * kVectorBytes / static_cast<int64_t>(sizeof(T));

// One block of C: rows [r0, r0 + ROWS), columns [c0, c0 + cols), cols <= COLS.
// Bblk points at the block's first column of B (COLS readable columns per row,
// ldb apart); only the C side honours `cols`.
template <typename T, int64_t ROWS, int64_t COLS, bool FULL>
inline void gemm_block(int64_t r0, int64_t c0, int64_t cols, int64_t K, MatrixRef<T> A,
                       const T* Bblk, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  T acc[ROWS][COLS];
  for (int64_t i = 0; i < ROWS; ++i) {
    T* c = C + (r0 + i) * ldc + c0;
    for (int64_t j = 0; j < COLS; ++j) acc[i][j] = (accumulate && (FULL || j < cols)) ? c[j] : T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = Bblk + k * ldb;
    for (int64_t i = 0; i < ROWS; ++i) {
      const T a = A(r0 + i, k);
#pragma omp simd
      for (int64_t j = 0; j < COLS; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int64_t i = 0; i < ROWS; ++i) {
    T* c = C + (r0 + i) * ldc + c0;
    for (int64_t j = 0; j < (FULL ? COLS : cols); ++j) c[j] = acc[i][j];
  }
}

// One row block of C across all N columns: full-width blocks, then the last
// N % COLS columns from the zero-padded tail panel (one vector wide when they
// fit in one, so a remainder of 8 does not pay for 32).
template <typename T, int64_t ROWS>
inline void gemm_rows(int64_t r0, int64_t N, int64_t K, MatrixRef<T> A, const T* B, int64_t ldb,
                      const T* Btail, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t COLS = kGemmCols<T>;
  const int64_t full = N / COLS * COLS;
  for (int64_t c0 = 0; c0 < full; c0 += COLS) {
    gemm_block<T, ROWS, COLS, true>(r0, c0, COLS, K, A, B + c0, ldb, C, ldc, accumulate);
  }
  const int64_t rest = N - full;
  if (rest > COLS / 2) {
    gemm_block<T, ROWS, COLS, false>(r0, full, rest, K, A, Btail, COLS, C, ldc, accumulate);
  } else if (rest > 0) {
    gemm_block<T, ROWS, COLS / 2, false>(r0, full, rest, K, A, Btail, COLS, C, ldc, accumulate);
  }
}
}  // namespace detail

// C[M, N] = A[M, K] @ B[K, N] (accumulate = false) or C += A @ B (accumulate = true).
// B: row-major with leading dimension ldb; C: row-major with leading dimension ldc.
// When N is not a multiple of the block width, the last columns of B are first
// copied into a zero-padded [K, COLS] panel so that every inner loop is a
// full-width vector FMA (a masked tail loop runs several times slower).
template <typename T>
inline void small_gemm(int64_t M, int64_t N, int64_t K, MatrixRef<T> A, const T* B, int64_t ldb,
                       T* C, int64_t ldc, bool accumulate) {
  using detail::gemm_rows;
  constexpr int64_t COLS = detail::kGemmCols<T>;
  const int64_t full = N / COLS * COLS;
  thread_local std::vector<T> tail;  // reused: small_gemm runs per chunk of rows
  if (full < N) {
    tail.assign(static_cast<size_t>(K * COLS), T(0));
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = full; j < N; ++j) tail[k * COLS + j - full] = B[k * ldb + j];
    }
  }
  // Up to kGemmMaxRows (6-8) rows per block give as many independent FMA chains per
  // vector and k, enough to cover the FMA latency (4 cycles x 2 ports). Rows are split
  // into blocks of near-equal size (27 -> 7+7+7+6, not 8+8+8+2+1): a block of one or
  // two rows is latency bound and would cost as much as a full one.
  constexpr int64_t kMaxRows = detail::kGemmMaxRows;
  const int64_t blocks = (M + kMaxRows - 1) / kMaxRows;
  int64_t r0 = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t rows = (M - r0 + (blocks - b) - 1) / (blocks - b);
    const T* bt = tail.data();
    switch (rows) {
      case 8:
        if constexpr (kMaxRows >= 8) gemm_rows<T, 8>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate);
        break;
      case 7:
        if constexpr (kMaxRows >= 7) gemm_rows<T, 7>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate);
        break;
      case 6: gemm_rows<T, 6>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate); break;
      case 5: gemm_rows<T, 5>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate); break;
      case 4: gemm_rows<T, 4>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate); break;
      case 3: gemm_rows<T, 3>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate); break;
      case 2: gemm_rows<T, 2>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate); break;
      default: gemm_rows<T, 1>(r0, N, K, A, B, ldb, bt, C, ldc, accumulate); break;
    }
    r0 += rows;
  }
}

// x [rows, cols] -> xt [cols, ld] (ld >= rows; the padding columns are zeroed).
template <typename T>
inline void transpose_into(const T* x, int64_t rows, int64_t cols, T* xt, int64_t ld) {
  for (int64_t c = 0; c < cols; ++c) {
    T* dst = xt + c * ld;
    for (int64_t r = 0; r < rows; ++r) dst[r] = x[r * cols + c];
    for (int64_t r = rows; r < ld; ++r) dst[r] = T(0);
  }
}

#if defined(__AVX512F__)
// float: 16 x 16 blocks transposed in registers (16 loads, 64 shuffles, 16 stores)
// instead of 256 strided scalar copies, ~3x faster. The step transposes both weight
// matrices every call, ~8% of the lecture's B = 32 step in scalar code.
// Partial blocks use masked loads (absent rows and columns read as 0) and stores.
inline void transpose_into(const float* x, int64_t rows, int64_t cols, float* xt, int64_t ld) {
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {  // a block of xt's columns (x's rows)
    const int64_t nr = std::clamp<int64_t>(rows - r0, 0, 16);  // rows of x that exist
    const __mmask16 store_mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, ld - r0)) - 1u);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
      const __mmask16 load_mask = static_cast<__mmask16>((1u << nc) - 1u);
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = i < nr ? _mm512_maskz_loadu_ps(load_mask, x + (r0 + i) * cols + c0) : _mm512_setzero_ps();
      }
      // 32-bit then 64-bit interleaves within 128-bit lanes: s[4g + k], lane L, holds
      // x[4g .. 4g + 3][4L + k] (rows of the block, one column).
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int g = 0; g < 4; ++g) {
        r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
        r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
        r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
      }
      // A 4 x 4 transpose of 128-bit lanes across r[k], r[4 + k], r[8 + k], r[12 + k]
      // gives column 4L + k of the block in output lane order.
      for (int k = 0; k < 4; ++k) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
        const __m512 u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
        const __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
        const __m512 u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
        const __m512 out[4] = {_mm512_shuffle_f32x4(u0, u2, 0x88), _mm512_shuffle_f32x4(u1, u3, 0x88),
                               _mm512_shuffle_f32x4(u0, u2, 0xDD), _mm512_shuffle_f32x4(u1, u3, 0xDD)};
        for (int L = 0; L < 4; ++L) {
          const int64_t c = 4 * L + k;
          if (c < nc) _mm512_mask_storeu_ps(xt + (c0 + c) * ld + r0, store_mask, out[L]);
        }
      }
    }
  }
}
#elif defined(__AVX2__)
// float under AVX2: full 8 x 8 blocks transposed in registers (8 loads, 24 shuffles,
// 8 stores), the ragged edges scalar. AVX2 has no cheap masked byte-granular loads, and
// at the shapes the kernels transpose ([27, 200], [200, 30]) the edges are a small part.
inline void transpose_into(const float* x, int64_t rows, int64_t cols, float* xt, int64_t ld) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < rows8; r0 += 8) {
    for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(x + (r0 + i) * cols + c0);
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      // Within each 128-bit lane, r[4g + k] holds rows 4g .. 4g + 3 of column 4L + k.
      for (int g = 0; g < 2; ++g) {
        r[4 * g + 0] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
        r[4 * g + 1] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
        r[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        r[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
      }
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(xt + (c0 + k) * ld + r0, _mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
        _mm256_storeu_ps(xt + (c0 + 4 + k) * ld + r0, _mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) {  // the edges: columns past cols8, rows past rows8
    float* dst = xt + c * ld;
    for (int64_t r = c < cols8 ? rows8 : 0; r < rows; ++r) dst[r] = x[r * cols + c];
    for (int64_t r = rows; r < ld; ++r) dst[r] = 0.0f;
  }
}
#endif

template <typename T>
inline std::vector<T> transpose_copy(const T* x, int64_t rows, int64_t cols, int64_t ld = 0) {
  std::vector<T> xt(static_cast<size_t>(cols * std::max(ld, rows)));
  transpose_into(x, rows, cols, xt.data(), std::max(ld, rows));
  return xt;
}

// n rounded up to a whole number of small_gemm column blocks for T.
template <typename T>
inline int64_t padded_cols(int64_t n) {
  constexpr int64_t cols = detail::kGemmCols<T>;
  return (n + cols - 1) / cols * cols;
}

}  // namespace charmlp::CHARMLP_CPU_CAPABILITY
