// The "cpp" backend of model/peer_kernels.py: gather-and-reduce kernels for the PEER layer and RowSparseAdam.
// What each kernel computes, and the shapes, are in that module's docstring; it builds this file on first use
// (torch.utils.cpp_extension.load) and registers the torch ops around it. CPU, float32 and float64.

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

// Orders the streaming stores of store_row before whatever the thread writes next.
inline void finish_streaming_stores() {
#if defined(__AVX__)
  _mm_sfence();
#endif
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

// The two gathers of PEER's expert layer in one loop. For every entry p = r * M + m of idx [R, M], table row
// w = W[idx[p]] (W [N, D]) meets row r of `operand`:
//   Gather::dot  out[r, m] = x[r] . w       (operand x [R, D], out [R, M])
//   Gather::bag  out[r]   += c[r, m] w      (operand c [R, M], out [R, D])
// in parallel over r, with the table rows of the next PREFETCH_AHEAD entries already on their way to the cache.
enum class Gather { dot, bag };

template <Gather kind>
torch::Tensor gather_rows(const torch::Tensor& idx, const torch::Tensor& W, const torch::Tensor& operand) {
  check_2d(idx, "idx"); check_2d(W, "W"); check_2d(operand, kind == Gather::dot ? "x" : "c");
  const int64_t R = idx.size(0), M = idx.size(1), D = W.size(1);
  TORCH_CHECK(idx.scalar_type() == torch::kLong && operand.scalar_type() == W.scalar_type());
  TORCH_CHECK(operand.size(0) == R && operand.size(1) == (kind == Gather::dot ? D : M));
  auto out = kind == Gather::dot ? torch::empty({R, M}, W.options()) : torch::zeros({R, D}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "gather_rows", [&] {
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* ap = operand.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
      const int64_t end = e * M;
      for (int64_t p = b * M; p < end; ++p) {
        if (p + PREFETCH_AHEAD < end) prefetch_row(wp + ip[p + PREFETCH_AHEAD] * D, D * sizeof(scalar_t));
        const scalar_t* w = wp + ip[p] * D;
        if constexpr (kind == Gather::dot) {
          op[p] = dot_row(ap + (p / M) * D, w, D);
        } else {
          axpy_row(op + (p / M) * D, ap[p], w, D);
        }
      }
    });
  });
  return out;
}

}  // namespace

torch::Tensor gather_dot(torch::Tensor x, torch::Tensor W, torch::Tensor idx) {
  return gather_rows<Gather::dot>(idx, W, x);
}

torch::Tensor weighted_bag(torch::Tensor idx, torch::Tensor W, torch::Tensor c) {
  return gather_rows<Gather::bag>(idx, W, c);
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
    if (stream) finish_streaming_stores();
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
//    l of the chunks j with j % (G / 16) = p; for k <= 8, G = 8: lanes l and l + 8 together). The least group
//    maximum t is a lower bound of the k-th largest score: G >= k groups, so k distinct scores, reach it.
// 2. only the scores >= t (about 2.3 k of them for random scores, S = 64) are candidates for select_candidates.
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
      // k <= 8: lanes l and l + 8 folded into one group, 8 groups of 2 S / 16 scores, a tighter bound than 16
      // groups (about 18 candidates of S = 64 for random scores, against 36).
      v8f least = k <= 8 ? (maxima[r][0][0] > maxima[r][0][1] ? maxima[r][0][0] : maxima[r][0][1])
                         : (maxima[r][0][0] < maxima[r][0][1] ? maxima[r][0][0] : maxima[r][0][1]);
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
