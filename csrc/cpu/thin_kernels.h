// fp32 SIMD kernels for the adapter's thin products (one of the two dimensions is the rank r), which
// BLAS runs far below its GEMM speed. Single-threaded: callers split rows across threads. Matrices
// are row-major with unit column stride; ld* are row strides in elements.
#pragma once

#include <cstdint>

namespace giva::cpu {

// Whether this CPU runs the kernels below: they are compiled for AVX-512 (x86-64-v4) only, tuned
// for its 32 vector registers, and must not be called where this is false (callers use ATen).
bool thin_kernels_fast();

// s[i, j] = sum_k x[i, k] a[j, k] for i < n, j < r, k < K: r dot products per row of x against the
// rows of a (r x K, small enough to stay in cache while x streams through once).
void rows_dot(int64_t n, int64_t r, int64_t K, const float* x, int64_t ldx, const float* a,
              int64_t lda, float* s, int64_t lds);

// out[i, :N] = init[i, :N] + sum_k c[i, k] b[k, :N] for i < n, k < K: a rank-K update, vectorised
// along the rows of b (small: K x N stays in cache). init may be null (zeros), have row stride
// ldi = 0 (one row broadcast, e.g. a bias), or be out itself (accumulate).
void rank_update(int64_t n, int64_t N, int64_t K, const float* c, int64_t ldc, const float* b,
                 int64_t ldb, const float* init, int64_t ldi, float* out, int64_t ldo);

// m[j, :N] += sum_t s[t, j] g[t, :N] for j < r, t < T (m = m + s^T g): the outer products of a
// thin s (T x r) with a T-row stream g.
void accumulate_outer(int64_t r, int64_t N, int64_t T, const float* s, int64_t lds,
                      const float* g, int64_t ldg, float* m, int64_t ldm);

}  // namespace giva::cpu
