"""Gather-and-reduce kernels behind the fast PEER layer (model/peer.py) and RowSparseAdam (model/sparse_adam.py).

PEER touches h*k rows of two (N, D) tables per token and nothing else, so every step is one of a few
row-wise primitives; none of them materialises the gathered (R, M, D) rows and none does work that grows
with N (beyond an O(N) int32 counting array in `row_grads`):
  gather_dot(x, W, idx)[r, m]   = x[r] . W[idx[r, m]]                        (down projection, d gates)
  weighted_bag(idx, W, c)[r]    = sum_m c[r, m] W[idx[r, m]]                 (up projection, d x)
  row_grads(idx, N, (c, X)...)  = sorted unique rows u of idx and, per pair, G[u] = sum over (r, m) with
                                  idx[r, m] = u of c[r, m] X[r]              (row-sparse table gradients)
  dense_row_grads(idx, N, c, X) = the same as a dense [N, D] sum, for small tables (the sub-keys)
  topk_rows(S, k)               = per-row top-k of a score matrix, sorted descending (ties: lower column first)
  product_key_topk(q, keys, k)  = the exact product-key top-k (model/product_keys.py), fused: in float32 the
                                  sub-key scores are computed in registers and only those above a proven lower
                                  bound of the k-th best are ranked; never a full (R, S) score matrix
  row_adam_(...)                = AdamW on the listed rows of a table, in place (see sparse_adam.py)
  empty_table(N, D)             = memory for a table read at random rows, in transparent huge pages

Shapes: R rows (tokens, or tokens x heads), M entries per row, D row width, N table rows, U unique rows.

Two backends with the same results up to float summation order:
- "cpp": a small C++ extension (OpenMP via at::parallel_for, one pass over each gathered row, software
  prefetch of rows a few entries ahead), built on first use with torch.utils.cpp_extension (needs a C++
  compiler; the build is cached under TORCH_EXTENSIONS_DIR). CPU, float32 and float64 only.
- "torch": plain torch ops (F.embedding_bag and its per-sample-weight backward, sort, index_add_):
  any device and dtype, used where "cpp" does not apply or cannot be built.
PEER_KERNELS=torch|cpp in the environment forces one; the default is "cpp" where it applies.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <cmath>
#include <cstdint>
#include <sys/mman.h>
#include <algorithm>
#include <type_traits>
#include <limits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t PREFETCH_AHEAD = 4;  // gathered rows in flight ahead of the one being reduced

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

template <typename T>
inline T dot_row(const T* __restrict a, const T* __restrict b, int64_t D) {
  constexpr int L = 16;
  T acc[L] = {0};
  int64_t i = 0;
  for (; i + L <= D; i += L)
    for (int j = 0; j < L; ++j) acc[j] += a[i + j] * b[i + j];
  T s = 0;
  for (; i < D; ++i) s += a[i] * b[i];
  for (int j = 0; j < L; ++j) s += acc[j];
  return s;
}

template <typename T>
inline void axpy_row(T* __restrict y, T alpha, const T* __restrict x, int64_t D) {
  for (int64_t i = 0; i < D; ++i) y[i] += alpha * x[i];
}

template <typename T>
inline void store_row(T* __restrict dst, const T* __restrict src, int64_t D, bool stream) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    if (stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0 && D % 8 == 0) {
      for (int64_t i = 0; i < D; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
      return;
    }
  }
#endif
  std::copy_n(src, D, dst);
}

// A fresh large tensor is fresh mmap'd memory: faulting it in 4 KiB pages cost ~1 ms per MiB on the 2-core
// VMs (10x the writing). Ask for transparent huge pages on it before it is touched (a no-op where THP is off).
torch::Tensor empty_huge(at::IntArrayRef shape, const torch::TensorOptions& options) {
  auto t = torch::empty(shape, options);
  constexpr uintptr_t HUGE = 2 << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(HUGE - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  return t;
}

void check_2d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name, ": a contiguous 2-d CPU tensor");
}

// [U, D] memory for a row-sparse table gradient: the first U rows of `buffer` where it is large enough and
// nothing else (a gradient still held, a view) shares its memory, else fresh memory.
torch::Tensor table_grad_buffer(const torch::Tensor& buffer, int64_t U, int64_t D, const torch::TensorOptions& o) {
  const bool reuse = buffer.defined() && buffer.is_contiguous() && buffer.dim() == 2 && buffer.size(0) >= U &&
                     buffer.size(1) == D && buffer.scalar_type() == o.dtype().toScalarType() &&
                     buffer.storage().use_count() == 1;
  return reuse ? buffer.narrow(0, 0, U) : empty_huge({U, D}, o);
}

}  // namespace

torch::Tensor gather_dot(torch::Tensor x, torch::Tensor W, torch::Tensor idx) {
  check_2d(x, "x"); check_2d(W, "W"); check_2d(idx, "idx");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && x.scalar_type() == W.scalar_type());
  const int64_t R = idx.size(0), M = idx.size(1), D = W.size(1);
  TORCH_CHECK(x.size(0) == R && x.size(1) == D);
  auto out = torch::empty({R, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gather_dot", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
      const int64_t end = e * M;
      for (int64_t p = b * M; p < end; ++p) {
        if (p + PREFETCH_AHEAD < end) prefetch_row(wp + ip[p + PREFETCH_AHEAD] * D, D * sizeof(scalar_t));
        op[p] = dot_row(xp + (p / M) * D, wp + ip[p] * D, D);
      }
    });
  });
  return out;
}

torch::Tensor weighted_bag(torch::Tensor idx, torch::Tensor W, torch::Tensor c) {
  check_2d(idx, "idx"); check_2d(W, "W"); check_2d(c, "c");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && c.scalar_type() == W.scalar_type());
  const int64_t R = idx.size(0), M = idx.size(1), D = W.size(1);
  TORCH_CHECK(c.size(0) == R && c.size(1) == M);
  auto out = torch::zeros({R, D}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "weighted_bag", [&] {
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
      const int64_t end = e * M;
      for (int64_t p = b * M; p < end; ++p) {
        if (p + PREFETCH_AHEAD < end) prefetch_row(wp + ip[p + PREFETCH_AHEAD] * D, D * sizeof(scalar_t));
        axpy_row(op + (p / M) * D, cp[p], wp + ip[p] * D, D);
      }
    });
  });
  return out;
}

namespace {

// Pairs p = r * M + m of idx [R, M] (values in [0, N)) grouped by table row, by a counting sort: rows (sorted,
// unique), and for row rows[u] the pairs perm[offs[u] .. offs[u + 1]), in increasing p.
struct RowGroups {
  torch::Tensor rows;
  std::vector<int64_t> offs;
  std::vector<int32_t> perm;
};

RowGroups group_rows(const torch::Tensor& idx, int64_t N) {
  const int64_t P = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  TORCH_CHECK(P < INT32_MAX && N < INT32_MAX);
  thread_local std::vector<int32_t> slot;  // kept between calls: a fresh O(N) array costs its page faults
  slot.assign(N, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ip[p] >= 0 && ip[p] < N, "index out of range");
    ++slot[ip[p]];
  }
  int64_t U = 0;
  for (int64_t n = 0; n < N; ++n) U += slot[n] != 0;
  RowGroups g{torch::empty({U}, idx.options()), std::vector<int64_t>(U + 1), std::vector<int32_t>(P)};
  int64_t* rp = g.rows.data_ptr<int64_t>();
  int64_t u = 0, acc = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (!slot[n]) continue;
    rp[u] = n; g.offs[u] = acc; acc += slot[n]; slot[n] = static_cast<int32_t>(u); ++u;
  }
  g.offs[U] = acc;
  std::vector<int64_t> cursor(g.offs.begin(), g.offs.end() - 1);
  for (int64_t p = 0; p < P; ++p) g.perm[cursor[slot[ip[p]]]++] = static_cast<int32_t>(p);
  return g;
}

}  // namespace

// Sorted unique rows of idx [R, M] and, for each (c_j [R, M], X_j [R, D]) pair,
// G_j[u] = sum over (r, m) with idx[r, m] = rows[u] of c_j[r, m] X_j[r], summed in increasing (r, m) order.
// outs: optional buffers, one per pair; G_j is written into the first U rows of outs[j] where it is large enough.
std::vector<torch::Tensor> row_grads(torch::Tensor idx, int64_t N, std::vector<torch::Tensor> coefs,
                                     std::vector<torch::Tensor> xs, std::vector<torch::Tensor> outs) {
  check_2d(idx, "idx");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && coefs.size() == xs.size() && !xs.empty());
  const int64_t R = idx.size(0), M = idx.size(1), D = xs[0].size(1), J = xs.size();
  for (int64_t j = 0; j < J; ++j) {
    check_2d(coefs[j], "c"); check_2d(xs[j], "X");
    TORCH_CHECK(coefs[j].size(0) == R && coefs[j].size(1) == M && xs[j].size(0) == R && xs[j].size(1) == D &&
                coefs[j].scalar_type() == xs[0].scalar_type() && xs[j].scalar_type() == xs[0].scalar_type());
  }
  const RowGroups g = group_rows(idx, N);
  const int64_t U = g.rows.numel();
  std::vector<torch::Tensor> result{g.rows};
  for (int64_t j = 0; j < J; ++j)
    result.push_back(table_grad_buffer(j < (int64_t)outs.size() ? outs[j] : torch::Tensor(), U, D, xs[0].options()));
  AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "row_grads", [&] {
    std::vector<const scalar_t*> cp, xp;
    std::vector<scalar_t*> gp;
    for (int64_t j = 0; j < J; ++j) {
      cp.push_back(coefs[j].data_ptr<scalar_t>()); xp.push_back(xs[j].data_ptr<scalar_t>());
      gp.push_back(result[j + 1].data_ptr<scalar_t>());
    }
    // Rows are summed in a small buffer and then copied out; where the gradients are larger than the cache the
    // copy bypasses it (streaming stores), which also saves reading each destination line before writing it.
    const bool stream = U * D * J * sizeof(scalar_t) > (64 << 20);
    at::parallel_for(0, U, 64, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> sums(J * D);
      for (int64_t u = b; u < e; ++u) {
        std::fill(sums.begin(), sums.end(), scalar_t(0));
        for (int64_t q = g.offs[u]; q < g.offs[u + 1]; ++q) {
          const int64_t p = g.perm[q], r = p / M;
          for (int64_t j = 0; j < J; ++j) axpy_row(sums.data() + j * D, cp[j][p], xp[j] + r * D, D);
        }
        for (int64_t j = 0; j < J; ++j) store_row(gp[j] + u * D, sums.data() + j * D, D, stream);
      }
    });
#if defined(__AVX__)
    if (stream) _mm_sfence();
#endif
  });
  return result;
}

// G [N, D] = sum over (r, m) of c[r, m] X[r] into row idx[r, m], for tables small enough to keep one dense copy
// per thread in cache (the sub-keys): pairs in token order, no sort; the per-chunk partial sums are then added.
torch::Tensor dense_row_grads(torch::Tensor idx, int64_t N, torch::Tensor c, torch::Tensor X) {
  check_2d(idx, "idx"); check_2d(c, "c"); check_2d(X, "X");
  const int64_t R = idx.size(0), M = idx.size(1), D = X.size(1);
  TORCH_CHECK(idx.scalar_type() == torch::kLong && c.size(0) == R && c.size(1) == M && X.size(0) == R &&
              c.scalar_type() == X.scalar_type());
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
  auto sums = torch::zeros({n, N, D}, X.options());  // one partial sum per chunk of rows r
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "dense_row_grads", [&] {
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t *cp = c.data_ptr<scalar_t>(), *xp = X.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        scalar_t* gp = sums.data_ptr<scalar_t>() + chunk * N * D;
        for (int64_t r = R * chunk / n; r < R * (chunk + 1) / n; ++r)
          for (int64_t m = 0; m < M; ++m) {
            const int64_t i = ip[r * M + m];
            TORCH_CHECK(i >= 0 && i < N, "index out of range");
            axpy_row(gp + i * D, cp[r * M + m], xp + r * D, D);
          }
      }
    });
  });
  return sums.sum(0);
}

namespace {

// Offers x (column j) to the n <= k entries v, c held in descending order (ties: the earlier offer first).
template <typename T>
inline void topk_offer(T x, int64_t j, int64_t k, T* v, int64_t* c, int64_t& n) {
  if (n == k && !(x > v[k - 1])) return;
  int64_t pos = n < k ? n++ : k - 1;
  while (pos > 0 && x > v[pos - 1]) { v[pos] = v[pos - 1]; c[pos] = c[pos - 1]; --pos; }
  v[pos] = x; c[pos] = j;
}

// The k largest of s[0..C), descending, with their columns (ties: lower column first); v, c hold k entries.
template <typename T>
inline void topk_insert(const T* s, int64_t C, int64_t k, T* v, int64_t* c) {
  int64_t n = 0;
  for (int64_t j = 0; j < C; ++j) topk_offer(s[j], j, k, v, c, n);
}

// Eight floats in one AVX register where the machine has them (GCC/Clang vector extensions: portable code).
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof(v)); return v; }

inline int lane_mask(v8f a, v8f b, float thr) {
#if defined(__AVX__)
  return _mm256_movemask_ps(reinterpret_cast<__m256>(a > thr)) | _mm256_movemask_ps(reinterpret_cast<__m256>(b > thr)) << 8;
#else
  int m = 0;
  for (int i = 0; i < 8; ++i) m |= (a[i] > thr) << i | (b[i] > thr) << (i + 8);
  return m;
#endif
}

// The k best of n candidates (values x, columns j), descending, ties: the earlier candidate first, written to v,
// c; NaN-filled where n < k (only where scores are NaN).
inline void select_candidates(const float* x, const int32_t* j, int64_t n, int64_t k, float* v, int64_t* c) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) topk_offer(x[i], j[i], k, v, c, kept);
  for (; kept < k; ++kept) { v[kept] = std::numeric_limits<float>::quiet_NaN(); c[kept] = 0; }
}

#if defined(__AVX2__)
// For each 8-bit mask, its set lanes in order (then zeros): the permutation that left-packs them.
struct LeftPack {
  alignas(32) int32_t lanes[256][8];
  LeftPack() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) lanes[m][n++] = l;
      for (; n < 8; ++n) lanes[m][n] = 0;
    }
  }
};
const LeftPack LEFT_PACK;

// The scores sr[0, end) above threshold (end a multiple of 8) and their columns, appended in column order to
// x and j (which have 8 entries of slack); returns how many. Without a branch per score or per chunk.
inline int64_t pack_above(const float* sr, int64_t end, float threshold, float* x, int32_t* j) {
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t n = 0;
  for (int64_t i = 0; i < end; i += 8) {
    const __m256 s = _mm256_loadu_ps(sr + i);
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(s, t, _CMP_GT_OQ));
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(LEFT_PACK.lanes[m]));
    _mm256_storeu_ps(x + n, _mm256_permutevar8x32_ps(s, lanes));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(j + n), _mm256_add_epi32(lanes, _mm256_set1_epi32(i)));
    n += __builtin_popcount(m);
  }
  return n;
}

// select_candidates for k <= 16 and candidates that are numbers above -inf, in column order: the 16 best so far
// live in two AVX registers and each candidate is inserted by compares and blends, without a branch (the
// insertion above takes an unpredictable branch per candidate and per entry it shifts).
inline void select_candidates16(const float* x, const int32_t* j, int64_t n, int64_t k, float* v, int64_t* c) {
  const __m256i left_neighbour = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
  const __m256 lane0 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, 0, 0, 0, 0, 0, 0));
  __m256 v0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), v1 = v0;
  __m256 c0 = _mm256_setzero_ps(), c1 = c0;  // int32 columns, only ever moved as float bits
  // Lane l of (a0, a1) shifted to lane l + 1 of the 16; lane 0 gets `first`.
  auto shift = [&](__m256 a0, __m256 a1, __m256 first, __m256& s0, __m256& s1) {
    const __m256 p0 = _mm256_permutevar8x32_ps(a0, left_neighbour), p1 = _mm256_permutevar8x32_ps(a1, left_neighbour);
    s0 = _mm256_blendv_ps(p0, first, lane0);
    s1 = _mm256_blend_ps(p1, p0, 1);
  };
  for (int64_t i = 0; i < n; ++i) {
    const __m256 xv = _mm256_set1_ps(x[i]);
    const __m256 jv = _mm256_castsi256_ps(_mm256_set1_epi32(j[i]));
    // Entries >= x stay (ties: the earlier candidate first); x goes to the first lane after them; the rest
    // move one lane on.
    const __m256 stay0 = _mm256_cmp_ps(v0, xv, _CMP_GE_OQ), stay1 = _mm256_cmp_ps(v1, xv, _CMP_GE_OQ);
    __m256 ahead0, ahead1, sv0, sv1, sc0, sc1;
    shift(stay0, stay1, lane0, ahead0, ahead1);
    shift(v0, v1, xv, sv0, sv1);
    shift(c0, c1, jv, sc0, sc1);
    v0 = _mm256_blendv_ps(_mm256_blendv_ps(sv0, xv, ahead0), v0, stay0);
    v1 = _mm256_blendv_ps(_mm256_blendv_ps(sv1, xv, ahead1), v1, stay1);
    c0 = _mm256_blendv_ps(_mm256_blendv_ps(sc0, jv, ahead0), c0, stay0);
    c1 = _mm256_blendv_ps(_mm256_blendv_ps(sc1, jv, ahead1), c1, stay1);
  }
  alignas(32) float vs[16];
  alignas(32) int32_t cs[16];
  _mm256_store_ps(vs, v0); _mm256_store_ps(vs + 8, v1);
  _mm256_store_ps(reinterpret_cast<float*>(cs), c0); _mm256_store_ps(reinterpret_cast<float*>(cs + 8), c1);
  for (int64_t l = 0; l < k; ++l) {
    v[l] = l < n ? vs[l] : std::numeric_limits<float>::quiet_NaN();
    c[l] = l < n ? cs[l] : 0;
  }
}
#endif

// For RB queries (rows of q, stride ld) and the S sub-keys of one half (keys [S, half], and the same in chunks of
// 16 sub-keys, chunked [S / 16, half, 16]): each query's top-k sub-key scores and columns (v, c: RB x k,
// descending; ties: lower column first). Two passes over scores kept in L1 (scores: RB x S floats):
// 1. scores, 16 sub-keys at a time in registers, and the maxima of G = 16 * ceil(k / 16) disjoint groups (lane
//    l of the chunks j with j % (G / 16) = p). The least group maximum t is a lower bound of the k-th largest
//    score: G >= k groups, so k distinct scores, reach it.
// 2. only the scores >= t (about 3 k of them for random scores) are candidates for select_candidates.
template <int RB>
void subkey_topk_block(const float* q, int64_t ld, const float* keys, const float* chunked, int64_t half,
                       int64_t S, int64_t k, float* scores, float* cand_x, int32_t* cand_j, float* v, int64_t* c) {
  constexpr int MAXP = 4;
  const int64_t chunks = S / 16, P = (k + 15) / 16;
  const bool bounded = P <= MAXP && chunks >= P;
  const float lowest = -std::numeric_limits<float>::infinity();
  v8f maxima[RB][MAXP][2];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < MAXP; ++i) maxima[r][i][0] = maxima[r][i][1] = v8f{} + lowest;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const float* kc = chunked + ch * 16 * half;
    v8f acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = v8f{};
    for (int64_t d = 0; d < half; ++d) {
      const v8f k0 = load8(kc + d * 16), k1 = load8(kc + d * 16 + 8);
      for (int r = 0; r < RB; ++r) {
        const float qd = q[r * ld + d];
        acc[r][0] += qd * k0;
        acc[r][1] += qd * k1;
      }
    }
    const int64_t part = bounded ? ch % P : 0;
    for (int r = 0; r < RB; ++r) {
      __builtin_memcpy(scores + r * S + ch * 16, &acc[r][0], 32);
      __builtin_memcpy(scores + r * S + ch * 16 + 8, &acc[r][1], 32);
      v8f* m = maxima[r][part];
      m[0] = m[0] > acc[r][0] ? m[0] : acc[r][0];
      m[1] = m[1] > acc[r][1] ? m[1] : acc[r][1];
    }
  }
  for (int64_t j = chunks * 16; j < S; ++j)
    for (int r = 0; r < RB; ++r) {
      float x = 0;
      for (int64_t d = 0; d < half; ++d) x += q[r * ld + d] * keys[j * half + d];
      scores[r * S + j] = x;
    }
  for (int r = 0; r < RB; ++r) {
    float threshold = lowest;  // candidates: scores > threshold
    if (bounded) {
      v8f least = maxima[r][0][0] < maxima[r][0][1] ? maxima[r][0][0] : maxima[r][0][1];
      for (int64_t i = 1; i < P; ++i) {
        least = least < maxima[r][i][0] ? least : maxima[r][i][0];
        least = least < maxima[r][i][1] ? least : maxima[r][i][1];
      }
      float t = least[0];
      for (int l = 1; l < 8; ++l) t = std::min(t, least[l]);
      threshold = std::nextafter(t, lowest);
    }
    const float* sr = scores + r * S;
    int64_t n = 0, j = 0;
#if defined(__AVX2__)
    j = S / 8 * 8;
    n = pack_above(sr, j, threshold, cand_x, cand_j);
#else
    for (; j + 16 <= S; j += 16)
      for (int mask = lane_mask(load8(sr + j), load8(sr + j + 8), threshold); mask; mask &= mask - 1) {
        const int l = __builtin_ctz(mask);
        cand_x[n] = sr[j + l]; cand_j[n++] = j + l;
      }
#endif
    for (; j < S; ++j)
      if (sr[j] > threshold || !bounded) { cand_x[n] = sr[j]; cand_j[n++] = j; }
#if defined(__AVX2__)
    if (bounded && k <= 16) {
      select_candidates16(cand_x, cand_j, n, k, v + r * k, c + r * k);
      continue;
    }
#endif
    select_candidates(cand_x, cand_j, n, k, v + r * k, c + r * k);
  }
}

// The top-k of the k x k sums v1[a] + v2[b] (both lists descending), as (score, c1[a] * S + c2[b]), scanned in
// order with early exits.
template <typename T>
inline void combine_halves(const T* v1, const int64_t* c1, const T* v2, const int64_t* c2, int64_t k, int64_t S,
                           T* v, int64_t* c) {
  int64_t n = 0;
  for (int64_t a = 0; a < k; ++a) {
    if (n == k && !(v1[a] + v2[0] > v[k - 1])) break;
    for (int64_t b = 0; b < k; ++b) {
      const T x = v1[a] + v2[b];
      if (n == k && !(x > v[k - 1])) break;
      topk_offer(x, c1[a] * S + c2[b], k, v, c, n);
    }
  }
}

}  // namespace

// Per row of S [R, C]: the k largest values, descending, and their columns (ties: lower column first).
std::vector<torch::Tensor> topk_rows(torch::Tensor S, int64_t k) {
  check_2d(S, "S");
  const int64_t R = S.size(0), C = S.size(1);
  TORCH_CHECK(k >= 1 && k <= C);
  auto vals = torch::empty({R, k}, S.options());
  auto cols = torch::empty({R, k}, S.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "topk_rows", [&] {
    const scalar_t* sp = S.data_ptr<scalar_t>();
    scalar_t* vp = vals.data_ptr<scalar_t>();
    int64_t* cp = cols.data_ptr<int64_t>();
    at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) topk_insert(sp + r * C, C, k, vp + r * k, cp + r * k);
    });
  });
  return {vals, cols};
}

// Exact product-key top-k (model/product_keys.py) for queries q [R, Q] and shared sub-keys [2, S, Q/2]:
// (scores [R, k] descending, indices [R, k] = i * S + j). float32: sub-key scores in registers
// (subkey_topk_block); other types: rows in blocks whose sub-key score matrices stay in cache.
std::vector<torch::Tensor> product_key_topk(torch::Tensor q, torch::Tensor sub_keys, int64_t k) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && sub_keys.dim() == 3 && sub_keys.size(0) == 2);
  const int64_t R = q.size(0), Q = q.size(1), S = sub_keys.size(1), half = sub_keys.size(2);
  TORCH_CHECK(Q == 2 * half && k >= 1 && k <= S && q.scalar_type() == sub_keys.scalar_type());
  q = q.contiguous();
  auto scores = torch::empty({R, k}, q.options());
  auto indices = torch::empty({R, k}, q.options().dtype(torch::kLong));
  if (q.scalar_type() == torch::kFloat) {
    const auto keys = sub_keys.contiguous();
    const int64_t S16 = S / 16 * 16;
    const auto chunked = keys.narrow(1, 0, S16).view({2, S / 16, 16, half}).transpose(2, 3).contiguous();
    const float *qp = q.data_ptr<float>(), *keys0 = keys.data_ptr<float>(), *keys1 = keys0 + S * half;
    const float *k0 = chunked.data_ptr<float>(), *k1 = k0 + S16 * half;
    float* op = scores.data_ptr<float>();
    int64_t* ip = indices.data_ptr<int64_t>();
    constexpr int RB = 6;  // queries per register block
    at::parallel_for(0, (R + RB - 1) / RB, 16, [&](int64_t b0, int64_t b1) {
      std::vector<float> v1(RB * k), v2(RB * k), scores_buf(RB * S), cand_x(S + 8);
      std::vector<int64_t> c1(RB * k), c2(RB * k);
      std::vector<int32_t> cand_j(S + 8);
      // Top-k of both halves for `rows` queries from row r; out: v1, c1, v2, c2 from entry `at`.
      auto halves = [&](auto rows, int64_t r, int64_t at) {
        constexpr int n = decltype(rows)::value;
        subkey_topk_block<n>(qp + r * Q, Q, keys0, k0, half, S, k, scores_buf.data(), cand_x.data(), cand_j.data(),
                             v1.data() + at * k, c1.data() + at * k);
        subkey_topk_block<n>(qp + r * Q + half, Q, keys1, k1, half, S, k, scores_buf.data(), cand_x.data(),
                             cand_j.data(), v2.data() + at * k, c2.data() + at * k);
      };
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * RB, nr = std::min<int64_t>(RB, R - r0);
        if (nr == RB) {
          halves(std::integral_constant<int, RB>(), r0, 0);
        } else {
          for (int64_t i = 0; i < nr; ++i) halves(std::integral_constant<int, 1>(), r0 + i, i);
        }
        for (int64_t i = 0; i < nr; ++i)
          combine_halves(v1.data() + i * k, c1.data() + i * k, v2.data() + i * k, c2.data() + i * k, k, S,
                         op + (r0 + i) * k, ip + (r0 + i) * k);
      }
    });
    return {scores, indices};
  }
  const auto keys0 = sub_keys[0].t(), keys1 = sub_keys[1].t();  // [half, S]
  constexpr int64_t B = 128;  // rows per block: 2 x B x S scores in L2
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "product_key_topk", [&] {
    scalar_t* op = scores.data_ptr<scalar_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    at::parallel_for(0, (R + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
      auto s1 = torch::empty({B, S}, q.options()), s2 = torch::empty({B, S}, q.options());
      std::vector<scalar_t> v1(k), v2(k);
      std::vector<int64_t> c1(k), c2(k);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * B, nr = std::min(B, R - r0);
        auto rows = q.narrow(0, r0, nr);
        auto t1 = s1.narrow(0, 0, nr), t2 = s2.narrow(0, 0, nr);
        at::mm_out(t1, rows.narrow(1, 0, half), keys0);
        at::mm_out(t2, rows.narrow(1, half, half), keys1);
        const scalar_t* p1 = t1.data_ptr<scalar_t>();
        const scalar_t* p2 = t2.data_ptr<scalar_t>();
        for (int64_t i = 0; i < nr; ++i) {
          topk_insert(p1 + i * S, S, k, v1.data(), c1.data());
          topk_insert(p2 + i * S, S, k, v2.data(), c2.data());
          combine_halves(v1.data(), c1.data(), v2.data(), c2.data(), k, S, op + (r0 + i) * k, ip + (r0 + i) * k);
        }
      }
    });
  });
  return {scores, indices};
}

namespace {

template <typename T>
inline void adam_row(T* __restrict p, T* __restrict m, T* __restrict v, const T* __restrict g, int64_t D, T decay,
                     T w1, T b2, T w2, T step_size, T sqrt_bc2, T eps) {
  for (int64_t i = 0; i < D; ++i) {
    p[i] *= decay;
    m[i] += w1 * (g[i] - m[i]);
    v[i] = v[i] * b2 + w2 * g[i] * g[i];
    p[i] -= step_size * m[i] / (std::sqrt(v[i]) / sqrt_bc2 + eps);
  }
}

}  // namespace

// AdamW (torch.optim.AdamW's arithmetic) on rows `rows` of param/exp_avg/exp_avg_sq, gradient rows `grad`.
void row_adam_(torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor rows,
               torch::Tensor grad, double lr, double beta1, double beta2, double eps, double weight_decay,
               double bias_correction1, double bias_correction2) {
  check_2d(param, "param"); check_2d(exp_avg, "exp_avg"); check_2d(exp_avg_sq, "exp_avg_sq"); check_2d(grad, "grad");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.dim() == 1 && rows.is_contiguous());
  const int64_t U = rows.size(0), D = param.size(1);
  TORCH_CHECK(grad.size(0) == U && grad.size(1) == D);
  const int64_t* rp = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "row_adam_", [&] {
    scalar_t* pp = param.data_ptr<scalar_t>();
    scalar_t* mp = exp_avg.data_ptr<scalar_t>();
    scalar_t* vp = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t decay = 1 - lr * weight_decay, w1 = 1 - beta1, b2 = beta2, w2 = 1 - beta2;
    const scalar_t step_size = lr / bias_correction1, sqrt_bc2 = std::sqrt(bias_correction2), e = eps;
    at::parallel_for(0, U, 64, [&](int64_t b, int64_t end) {
      for (int64_t u = b; u < end; ++u) {
        if (u + PREFETCH_AHEAD < end) {
          const int64_t ahead = rp[u + PREFETCH_AHEAD] * D;
          prefetch_row(pp + ahead, D * sizeof(scalar_t));
          prefetch_row(mp + ahead, D * sizeof(scalar_t));
          prefetch_row(vp + ahead, D * sizeof(scalar_t));
        }
        const int64_t o = rp[u] * D;
        adam_row(pp + o, mp + o, vp + o, gp + u * D, D, decay, w1, b2, w2, step_size, sqrt_bc2, e);
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_dot", &gather_dot);
  m.def("weighted_bag", &weighted_bag);
  m.def("row_grads", &row_grads);
  m.def("dense_row_grads", &dense_row_grads);
  m.def("empty_huge", [](std::vector<int64_t> shape, torch::ScalarType dtype) {
    return empty_huge(shape, torch::TensorOptions().dtype(dtype));
  });
  m.def("topk_rows", &topk_rows);
  m.def("product_key_topk", &product_key_topk);
  m.def("row_adam_", &row_adam_);
}
"""

_cpp_module = None
_cpp_error: str | None = None


def _cpp():
    """The compiled extension, built on first use; None where it cannot be built (reason in _cpp_error)."""
    global _cpp_module, _cpp_error
    if _cpp_module is None and _cpp_error is None:
        try:
            from torch.utils.cpp_extension import load_inline

            _cpp_module = load_inline(
                name="peer_kernels_v8", cpp_sources=[_CPP_SOURCE],
                extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"], extra_ldflags=["-fopenmp"],
            )
        except Exception as e:  # no compiler, no ninja, ...: the torch backend still works
            _cpp_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"PEER C++ kernels unavailable, using the torch backend ({_cpp_error[:200]})")
    return _cpp_module


def backend(*tensors: torch.Tensor) -> str:
    """'cpp' where the C++ kernels apply to these tensors (CPU, float32/float64) and can be built, else 'torch'."""
    choice = os.environ.get("PEER_KERNELS", "cpp")
    if choice not in ("cpp", "torch"):
        raise ValueError(f"PEER_KERNELS={choice!r}: expected 'cpp' or 'torch'")
    applies = all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
                  for t in tensors if t.is_floating_point())
    return "cpp" if choice == "cpp" and applies and _cpp() is not None else "torch"


def empty_table(rows: int, cols: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised [rows, cols] CPU tensor for a table read at random rows (PEER's experts, their optimizer
    state): backed by transparent huge pages where the C++ kernels apply, since with 4 KiB pages nearly every
    random row read of a 1 GiB table is also a TLB miss (gathers 1.5-1.8x slower at N = 1024^2). A no-op
    where the kernel does not back madvised memory with huge pages."""
    dtype = dtype or torch.get_default_dtype()
    if backend(torch.empty(0, dtype=dtype)) == "cpp":
        return _cpp().empty_huge([rows, cols], dtype)
    return torch.empty(rows, cols, dtype=dtype)


def _bag_offsets(R: int, M: int, device) -> torch.Tensor:
    return torch.arange(0, R * M, M, device=device)


# The kernels that do arithmetic are registered as torch ops (peer_sweeps::...) with FLOP formulas, so that
# torch.utils.flop_counter.FlopCounterMode counts PEER's and PKM's retrieval and experts, forward and
# backward, as it counts an einsum's.
@torch.library.custom_op("peer_sweeps::gather_dot", mutates_args=())
def gather_dot(x: torch.Tensor, W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[R, M]: out[r, m] = x[r] . W[idx[r, m]]. x [R, D], W [N, D], idx [R, M] int64."""
    x, idx = x.contiguous(), idx.contiguous()
    if backend(x, W) == "cpp":
        return _cpp().gather_dot(x, W.contiguous(), idx)
    R, M = idx.shape
    # The per-sample-weight gradient of embedding_bag is exactly this gather-dot, computed row by row.
    flat = idx.reshape(-1)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x, W, flat, _bag_offsets(R, M, x.device), torch.arange(R, device=x.device).repeat_interleave(M), 0, -1
    ).view(R, M)


@torch.library.custom_op("peer_sweeps::weighted_bag", mutates_args=())
def weighted_bag(idx: torch.Tensor, W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[R, D]: out[r] = sum_m c[r, m] W[idx[r, m]]."""
    idx, c = idx.contiguous(), c.contiguous()
    if backend(W, c) == "cpp":
        return _cpp().weighted_bag(idx, W.contiguous(), c)
    return F.embedding_bag(idx, W, per_sample_weights=c, mode="sum")


@gather_dot.register_fake
def _(x, W, idx):
    return x.new_empty(idx.shape)


@weighted_bag.register_fake
def _(idx, W, c):
    return W.new_empty(idx.shape[0], W.shape[1])


@register_flop_formula(torch.ops.peer_sweeps.gather_dot)
def _gather_dot_flops(x_shape, W_shape, idx_shape, out_shape=None, **kwargs) -> int:
    return 2 * idx_shape[0] * idx_shape[1] * W_shape[1]


@register_flop_formula(torch.ops.peer_sweeps.weighted_bag)
def _weighted_bag_flops(idx_shape, W_shape, c_shape, out_shape=None, **kwargs) -> int:
    return 2 * idx_shape[0] * idx_shape[1] * W_shape[1]


def row_grads(idx: torch.Tensor, N: int, *pairs: tuple[torch.Tensor, torch.Tensor],
              out: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """[rows [U] (sorted, unique), G_1 [U, D], ...]: G_j[u] = sum over idx[r, m] = rows[u] of c_j[r, m] X_j[r],
    every X_j [R, D] of one width (the cpp backend sums all pairs in one pass). `out`: optional buffers (cpp backend): G_j is the first U rows of out[j] where out[j] is large enough and
    no other tensor shares its memory, else fresh memory."""
    out = list(out)
    rows, in_buffer, *grads = _row_grads_op(idx, N, [c for c, _ in pairs], [X for _, X in pairs], out)
    return [rows] + [out[j][: rows.numel()] if in_buffer[j] else G for j, G in enumerate(grads)]


# A torch op, so that FlopCounterMode sees the table gradients; an op may not return its inputs' memory, so
# a gradient written into out[j] comes back as an empty placeholder and in_buffer[j] = True.
@torch.library.custom_op("peer_sweeps::row_grads", mutates_args=("out",))
def _row_grads_op(idx: torch.Tensor, N: int, coefs: list[torch.Tensor], xs: list[torch.Tensor],
                  out: list[torch.Tensor]) -> list[torch.Tensor]:
    idx = idx.contiguous()
    coefs = [c.contiguous() for c in coefs]
    xs = [X.contiguous() for X in xs]
    if backend(*coefs, *xs) == "cpp":
        rows, *grads = _cpp().row_grads(idx, N, coefs, xs, out)
    else:
        rows, *grads = _row_grads_torch(idx, coefs, xs)
    in_buffer = [j < len(out) and G.numel() > 0 and G.data_ptr() == out[j].data_ptr() for j, G in enumerate(grads)]
    grads = [G.new_empty(0) if used else G for G, used in zip(grads, in_buffer)]
    return [rows, torch.tensor(in_buffer)] + grads


def _row_grads_torch(idx, coefs, xs):
    R, M = idx.shape
    rows, inverse = torch.unique(idx.reshape(-1), sorted=True, return_inverse=True)
    out = [rows]
    for c, X in zip(coefs, xs):
        contrib = c.reshape(R, M, 1) * X.reshape(R, 1, -1)  # materialised [R, M, D]: the fallback path only
        G = torch.zeros(rows.numel(), X.shape[1], dtype=X.dtype, device=X.device)
        out.append(G.index_add_(0, inverse, contrib.reshape(R * M, -1)))
    return out


@register_flop_formula(torch.ops.peer_sweeps.row_grads)
def _row_grads_flops(idx_shape, N, coefs_shapes, xs_shapes, out_shapes, out_shape=None, **kwargs) -> int:
    return sum(2 * idx_shape[0] * idx_shape[1] * X[1] for X in xs_shapes)


@torch.library.custom_op("peer_sweeps::dense_row_grads", mutates_args=())
def dense_row_grads(idx: torch.Tensor, N: int, c: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """G [N, D]: G[n] = sum over idx[r, m] = n of c[r, m] X[r], for small tables (a dense copy per thread)."""
    idx, c, X = idx.contiguous(), c.contiguous(), X.contiguous()
    if backend(c, X) == "cpp":
        return _cpp().dense_row_grads(idx, N, c, X)
    R, M = idx.shape
    return X.new_zeros(N, X.shape[1]).index_add_(0, idx.reshape(-1), (c.reshape(R, M, 1) * X.reshape(R, 1, -1)).reshape(R * M, -1))


@dense_row_grads.register_fake
def _(idx, N, c, X):
    return X.new_empty(N, X.shape[1])


@register_flop_formula(torch.ops.peer_sweeps.dense_row_grads)
def _dense_row_grads_flops(idx_shape, N, c_shape, X_shape, out_shape=None, **kwargs) -> int:
    return 2 * idx_shape[0] * idx_shape[1] * X_shape[1]


def topk_rows(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns), each [R, k]: per-row top-k of S [R, C], sorted descending."""
    if backend(S) == "cpp":
        vals, cols = _cpp().topk_rows(S.contiguous(), k)
        return vals, cols
    return S.topk(k, dim=-1)


@torch.library.custom_op("peer_sweeps::product_key_topk", mutates_args=())
def product_key_topk(q_RQ: torch.Tensor, sub_keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each [R, K]: the exact top-k of R queries over the S^2 composed keys (sorted descending)."""
    if backend(q_RQ, sub_keys) == "cpp":
        scores, indices = _cpp().product_key_topk(q_RQ, sub_keys.contiguous(), top_k)
        return scores, indices
    num_sub = sub_keys.shape[1]
    q1, q2 = q_RQ.chunk(2, dim=-1)
    top1, idx1 = (q1 @ sub_keys[0].t()).topk(top_k, dim=-1)  # (R, K)
    top2, idx2 = (q2 @ sub_keys[1].t()).topk(top_k, dim=-1)
    candidates = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # (R, K*K)
    scores, flat = candidates.topk(top_k, dim=-1)
    return scores, idx1.gather(-1, flat // top_k) * num_sub + idx2.gather(-1, flat % top_k)


@product_key_topk.register_fake
def _(q_RQ, sub_keys, top_k):
    shape = (q_RQ.shape[0], top_k)
    return q_RQ.new_empty(shape), q_RQ.new_empty(shape, dtype=torch.long)


@register_flop_formula(torch.ops.peer_sweeps.product_key_topk)
def _product_key_topk_flops(q_shape, sub_keys_shape, top_k, out_shape=None, **kwargs) -> int:
    """Every sub-key score of both halves (2 R S Q/2 multiply-adds: the float32 kernel bounds which scores it
    ranks, not which it computes), then the k^2 candidate sums (one FLOP each)."""
    return 2 * q_shape[0] * sub_keys_shape[1] * q_shape[1] + q_shape[0] * top_k * top_k


def row_adam_(param, exp_avg, exp_avg_sq, rows, grad, *, lr, beta1, beta2, eps, weight_decay,
              bias_correction1, bias_correction2) -> None:
    """AdamW on rows `rows` of param (and its moments), in place; grad [U, D] holds those rows' gradients."""
    if backend(param, grad) == "cpp":
        _cpp().row_adam_(param, exp_avg, exp_avg_sq, rows.contiguous(), grad.contiguous(), lr, beta1, beta2, eps,
                         weight_decay, bias_correction1, bias_correction2)
        return
    p, m, v = param.index_select(0, rows), exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    p.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)
    param.index_copy_(0, rows, p)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
