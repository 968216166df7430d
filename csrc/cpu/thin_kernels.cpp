// The kernels of thin_kernels.h, written with GCC vector types: a `vec` of 16 floats is one AVX-512
// register. Each exported kernel is compiled for AVX-512 (x86-64-v4) alone and called only where
// thin_kernels_fast() says the CPU has it: tuned for 32 vector registers, AVX2 or generic builds of
// them spilled and ran ~20x slower than BLAS, so other CPUs take ATen's GEMMs instead. The rest of
// the library stays baseline x86-64.
#include "thin_kernels.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GIVA_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define GIVA_AVX512
#endif
// The helpers inline into the kernels, so they are compiled for AVX-512 too.
#define GIVA_INLINE inline __attribute__((always_inline))
// Vector arguments of the inlined helpers never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace giva::cpu {
namespace {

typedef float vec __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;

GIVA_INLINE vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

GIVA_INLINE void store(float* p, const vec& v) { std::memcpy(p, &v, sizeof v); }

GIVA_INLINE float hsum(const vec& v) {
  const vec8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// R rows of x against J rows of a: R*J accumulators (16 with R = J = 4, half the AVX-512 register
// file), R + J loads per R*J FMAs; a K tail of fewer than 16 runs scalar.
template <int R, int J>
GIVA_INLINE void dot_tile(int64_t K, const float* x, int64_t ldx, const float* a, int64_t lda,
                          float* s, int64_t lds) {
  vec acc[R][J] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vec xv[R], av[J];
    for (int i = 0; i < R; ++i) xv[i] = load(x + i * ldx + k);
    for (int j = 0; j < J; ++j) av[j] = load(a + j * lda + k);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < J; ++j) acc[i][j] += xv[i] * av[j];
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) {
      float sum = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[i * ldx + kk] * a[j * lda + kk];
      s[i * lds + j] = sum;
    }
}

template <int R>
GIVA_INLINE void dot_rows(int64_t r, int64_t K, const float* x, int64_t ldx, const float* a,
                          int64_t lda, float* s, int64_t lds) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) dot_tile<R, 4>(K, x, ldx, a + j * lda, lda, s + j, lds);
  for (; j < r; ++j) dot_tile<R, 1>(K, x, ldx, a + j * lda, lda, s + j, lds);
}

// R rows x V vectors of out held in registers through the whole K loop: V loads of b and R scalar
// broadcasts of c per R*V FMAs.
template <int R, int V>
GIVA_INLINE void update_tile(int64_t K, const float* c, int64_t ci, int64_t ck, const float* b,
                             int64_t ldb, const float* init, int64_t ldi, float* out, int64_t ldo) {
  vec acc[R][V] = {};
  if (init)
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < V; ++v) acc[i][v] = load(init + i * ldi + v * kLanes);
  for (int64_t k = 0; k < K; ++k) {
    vec bv[V];
    for (int v = 0; v < V; ++v) bv[v] = load(b + k * ldb + v * kLanes);
    for (int i = 0; i < R; ++i) {
      const float cv = c[i * ci + k * ck];
      for (int v = 0; v < V; ++v) acc[i][v] += bv[v] * cv;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) store(out + i * ldo + v * kLanes, acc[i][v]);
}

// Rows [0, R) of out = init + c b, all columns, V vectors at a time; b's rows are read once per R
// rows of out.
template <int R, int V = 4>
GIVA_INLINE void update_rows(int64_t N, int64_t K, const float* c, int64_t ci, int64_t ck,
                             const float* b, int64_t ldb, const float* init, int64_t ldi,
                             float* out, int64_t ldo) {
  int64_t col = 0;
  for (; col + V * kLanes <= N; col += V * kLanes)
    update_tile<R, V>(K, c, ci, ck, b + col, ldb, init ? init + col : nullptr, ldi, out + col, ldo);
  for (; col + kLanes <= N; col += kLanes)
    update_tile<R, 1>(K, c, ci, ck, b + col, ldb, init ? init + col : nullptr, ldi, out + col, ldo);
  for (; col < N; ++col)
    for (int i = 0; i < R; ++i) {
      float sum = init ? init[i * ldi + col] : 0.f;
      for (int64_t k = 0; k < K; ++k) sum += c[i * ci + k * ck] * b[k * ldb + col];
      out[i * ldo + col] = sum;
    }
}

// out = init + c b over all n rows: 6 at a time (24 accumulators, 4 of b: 28 of the 32 AVX-512
// registers; measured 155 against 143 GFLOP/s with 4 rows for x A^T at r = 64), then 4, then 1.
GIVA_INLINE void update(int64_t n, int64_t N, int64_t K, const float* c, int64_t ci, int64_t ck,
                        const float* b, int64_t ldb, const float* init, int64_t ldi, float* out,
                        int64_t ldo) {
  int64_t i = 0;
  for (; i + 6 <= n; i += 6)
    update_rows<6>(N, K, c + i * ci, ci, ck, b, ldb, init ? init + i * ldi : nullptr, ldi,
                   out + i * ldo, ldo);
  for (; i + 4 <= n; i += 4)
    update_rows<4>(N, K, c + i * ci, ci, ck, b, ldb, init ? init + i * ldi : nullptr, ldi,
                   out + i * ldo, ldo);
  for (; i < n; ++i)
    update_rows<1>(N, K, c + i * ci, ci, ck, b, ldb, init ? init + i * ldi : nullptr, ldi,
                   out + i * ldo, ldo);
}

}  // namespace

GIVA_AVX512
void rows_dot(int64_t n, int64_t r, int64_t K, const float* x, int64_t ldx, const float* a,
              int64_t lda, float* s, int64_t lds) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) dot_rows<4>(r, K, x + i * ldx, ldx, a, lda, s + i * lds, lds);
  for (; i < n; ++i) dot_rows<1>(r, K, x + i * ldx, ldx, a, lda, s + i * lds, lds);
}

GIVA_AVX512
void rank_update(int64_t n, int64_t N, int64_t K, const float* c, int64_t ldc, const float* b,
                 int64_t ldb, const float* init, int64_t ldi, float* out, int64_t ldo) {
  update(n, N, K, c, ldc, 1, b, ldb, init, ldi, out, ldo);
}

// g streams through in panels of 16 rows x 96 columns, copied to a contiguous buffer first: g is
// read from memory once, and 16 rows keep few enough page streams in flight for the hardware
// prefetcher (64 rows measured 25% slower from a cold g), while the copy's independent loads keep
// misses overlapped and the panel stays in L1 (rows of g 4 KiB apart would share L1 sets). m's
// rows go 8 at a time (24 accumulators over 48 columns, 3 loads and 8 broadcasts per 24 FMAs).
GIVA_AVX512
void accumulate_outer(int64_t r, int64_t N, int64_t T, const float* s, int64_t lds,
                      const float* g, int64_t ldg, float* m, int64_t ldm) {
  constexpr int64_t kRows = 16, kCols = 6 * kLanes;
  alignas(64) float panel[kRows * kCols];
  for (int64_t t0 = 0; t0 < T; t0 += kRows) {
    const int64_t K = std::min(kRows, T - t0);
    const float* s0 = s + t0 * lds;
    const float* g0 = g + t0 * ldg;
    for (int64_t col = 0; col < N; col += kCols) {
      const int64_t n = std::min(kCols, N - col);
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(panel + k * kCols, g0 + k * ldg + col, sizeof(float) * n);
      float* mc = m + col;
      int64_t j = 0;
      for (; j + 8 <= r; j += 8)
        update_rows<8, 3>(n, K, s0 + j, 1, lds, panel, kCols, mc + j * ldm, ldm, mc + j * ldm, ldm);
      for (; j + 4 <= r; j += 4)
        update_rows<4>(n, K, s0 + j, 1, lds, panel, kCols, mc + j * ldm, ldm, mc + j * ldm, ldm);
      for (; j < r; ++j)
        update_rows<1>(n, K, s0 + j, 1, lds, panel, kCols, mc + j * ldm, ldm, mc + j * ldm, ldm);
    }
  }
}

bool thin_kernels_fast() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool fast = __builtin_cpu_supports("x86-64-v4");
  return fast;
#else
  return false;
#endif
}

}  // namespace giva::cpu
