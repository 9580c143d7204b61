// Fused multi-head attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why: XLA:CPU runs attention as separate whole-array passes (logits, mask, max, exp, sum, products), each
// streaming [B, H, L, L] arrays through memory; it fuses no dot with its element-wise neighbours. Here one
// (trial, head) at a time, one query row at a time, everything stays in a core's L1/L2: the row's logits, its
// probabilities and the head's keys and values (docs/performance.md, row 38).
//
// Maths (float32 throughout; a bf16 forward on AMX at the end), for each trial b and head h, with s = 1/sqrt(D):
//   forward:  p_ij = exp(s q_i.k_j - lse_i) where mask_ij, else 0;  out_i = sum_j p_ij v_j;  lse_i = log-sum-exp.
//   backward: dp_ij = dout_i.v_j;  ds_ij = p_ij (dp_ij - dout_i.out_i) s;
//             dq_i = sum_j ds_ij k_j;  dk_j = sum_i ds_ij q_i;  dv_j = sum_i p_ij dout_i.
// Shapes (B trials, L tokens, H heads, D features a head): q, k, v, out, dout [B, L, H, D]; mask [B, L, L]
// (shared by the heads); lse [B, H, L]. Every query must see at least one key (ours see themselves).
//
// Each query row reads keys only up to its last visible one, and a row that sees one key only (a padded token,
// which sees itself) copies that key's value: masks whose queries see a prefix of the keys (real tokens first, a
// causal context) cost what they keep, not L^2 (docs/performance.md, row 41).
//
// Work is split over (trial, head) pairs on XLA's intra-op thread pool: the calling thread and the pool's
// tasks all claim pairs from one counter, and the caller waits only for tasks that started, so it never waits
// on a task the pool has not run.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)  // the bf16 forward below
#define IBL_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Keys a chunk = floats a vector register: 16 on AVX-512, 8 on AVX/AVX2, 4 elsewhere (SSE, NEON). The vector
// type must be the target's own width: GCC turns a comparison of a wider vector (16 floats on AVX2) into one
// scalar compare and branch a lane, which made the kernel 6x slower on AVX2 (docs/performance.md, row 43).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kRegisters = 32;
#else
constexpr int kLanes = 4, kRegisters = 16;
#endif
// Query rows at a time for V vectors of features a head: 8 while their accumulators (R x V vectors) take at most
// half the vector registers, else the most of 4, 2 or 1 whose accumulators fit them. Measured (row 43): AVX-512
// 8 rows for 16 and 32 features, 4 for 64; AVX2 4 rows for 16 and 32 features, 2 for 64.
template <int V>
constexpr int kRowsFor = 8 * V <= kRegisters / 2 ? 8 : 4 * V <= kRegisters ? 4 : 2 * V <= kRegisters ? 2 : 1;
constexpr int kMaxRows = 8;

// GCC/Clang vector types: one chunk of kLanes floats; aligned(4) lets them load from any float address.
typedef float FV __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t IV __attribute__((vector_size(4 * kLanes), aligned(4)));

inline int64_t RoundUp(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline FV Load(const float* p) { return *reinterpret_cast<const FV*>(p); }
inline void Store(float* p, FV x) { *reinterpret_cast<FV*>(p) = x; }
// A scalar in every lane (written out: `FV{} + x` would add 0 first, as -0 + 0 is not -0).
template <size_t... I>
inline FV SplatLanes(float x, std::index_sequence<I...>) { return FV{((void)I, x)...}; }
inline FV Splat(float x) { return SplatLanes(x, std::make_index_sequence<kLanes>{}); }
inline float Sum(FV x) {
  float t = 0.0f;
  for (int i = 0; i < kLanes; ++i) t += x[i];
  return t;
}
inline float Max(FV x) {
  float t = x[0];
  for (int i = 1; i < kLanes; ++i) t = std::max(t, x[i]);
  return t;
}

// exp(x) for x <= 0 (shifted logits), Cephes' polynomial after x = n ln2 + r: about 1 ulp; below 2^-126 the
// result flushes to 0. n is rounded to nearest by adding and subtracting 1.5 * 2^23.
inline FV ExpNonPositive(FV x) {
  const FV lo = Splat(-87.0f);
  x = x < lo ? lo : x;
  const FV n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const FV r = x - n * 0.693359375f + n * 2.12194440e-4f;
  FV p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const FV y = p * r * r + r + 1.0f;
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  return y * reinterpret_cast<const FV&>(bits);
}

// One (trial, head): keys and values transposed to [D, Lp] (keys along the vector lanes) and as [L, D], and a
// block of query rows' logits, probabilities and their gradients [kMaxRows, Lp]; Lp = L rounded up to whole
// chunks, the tail zero.
struct HeadScratch {
  std::vector<float> kt, vt, v, k, rows_s, rows_p, rows_dp, dk, dv, keep;
  void Resize(int64_t L, int64_t D) {
    const int64_t Lp = RoundUp(L);
    for (auto* x : {&kt, &vt}) x->assign(D * Lp, 0.0f);
    for (auto* x : {&v, &k, &dk, &dv}) x->assign(L * D, 0.0f);
    for (auto* x : {&rows_s, &rows_p, &rows_dp}) x->assign(kMaxRows * Lp, 0.0f);
    keep.assign(Lp, 0.0f);
  }
};

struct Dims {
  int64_t B, L, H, D;
  float scale;
  // Offset of (b, l, h, 0) in a [B, L, H, D] array.
  int64_t At(int64_t b, int64_t l, int64_t h) const { return ((b * L + l) * H + h) * D; }
};

// Gathers head h of trial b from a [B, L, H, D] array as [D, Lp] (transposed) and/or [L, D].
void Gather(const Dims& g, const float* x, int64_t b, int64_t h, float* xt_DxLp, float* x_LxD) {
  const int64_t Lp = RoundUp(g.L);
  for (int64_t l = 0; l < g.L; ++l) {
    const float* src = x + g.At(b, l, h);
    for (int64_t d = 0; d < g.D; ++d) {
      if (xt_DxLp) xt_DxLp[d * Lp + l] = src[d];
      if (x_LxD) x_LxD[l * g.D + d] = src[d];
    }
  }
}

// Query rows are taken R at a time (kRowsFor<V> but at the end): each key or value row loaded then serves R
// multiply-adds, and the R chains hide the multiply-add latency. Row buffers hold R rows of Lp floats.

// C chunks of keys at a time: each query broadcast then serves C multiply-adds (with one chunk the loop loads a
// broadcast per multiply-add, more loads than the two ports take), and a block of fewer than 8 rows still runs
// R x C >= 8 chains, which two FMA units of 4-cycle latency need (64 features on AVX-512: 4 rows, 2 chunks).
template <int V, int R, int C>
inline void LogitChunks(const float* const* q, const float* __restrict kt, int64_t j0, int64_t Lp, float scale,
                        float* __restrict rows) {
  FV a[R][C] = {};
  for (int d = 0; d < kLanes * V; ++d) {
    FV kd[C];
    for (int c = 0; c < C; ++c) kd[c] = Load(kt + d * Lp + j0 + kLanes * c);
    for (int r = 0; r < R; ++r) {
      const FV qd = Splat(q[r][d]);
      for (int c = 0; c < C; ++c) a[r][c] += qd * kd[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) Store(rows + r * Lp + j0 + kLanes * c, a[r][c] * scale);
}

// rows[r][j] = scale * q_r . k_j over the whole chunks of keys below Le (the zero tail of kt gives 0 there);
// kt and rows have rows of Lp floats.
template <int V, int R>
inline void Logits(const float* const* q, const float* __restrict kt, int64_t Le, int64_t Lp, float scale,
                   float* __restrict rows) {
  constexpr int kWant = R >= 4 ? 2 : 4;  // one chunk when the accumulators, chunks and a broadcast would spill
  constexpr int C = R * kWant + kWant + 1 <= kRegisters ? kWant : 1;
  int64_t j0 = 0;
  for (; j0 + C * kLanes <= Le; j0 += C * kLanes) LogitChunks<V, R, C>(q, kt, j0, Lp, scale, rows);
  for (; j0 < Le; j0 += kLanes) LogitChunks<V, R, 1>(q, kt, j0, Lp, scale, rows);
}

// out_r = sum_j w[r][j] x[j, :] over j < L, x as [L, kLanes V].
template <int V, int R>
inline void Weighted(const float* __restrict w, int64_t Lp, const float* __restrict x, int64_t L, float* const* out) {
  FV a[R][V] = {};
  for (int64_t j = 0; j < L; ++j) {
    for (int v = 0; v < V; ++v) {
      const FV xj = Load(x + j * kLanes * V + kLanes * v);
      for (int r = 0; r < R; ++r) a[r][v] += Splat(w[r * Lp + j]) * xj;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Store(out[r] + kLanes * v, a[r][v]);
}

// x[j, :] += sum_r w[r][j] y_r over j < L, x as [L, kLanes V].
template <int V, int R>
inline void AddOuter(const float* __restrict w, int64_t Lp, const float* const* y, int64_t L, float* __restrict x) {
  FV yv[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) yv[r][v] = Load(y[r] + kLanes * v);
  for (int64_t j = 0; j < L; ++j) {
    for (int v = 0; v < V; ++v) {
      FV xj = Load(x + j * kLanes * V + kLanes * v);
      for (int r = 0; r < R; ++r) xj += Splat(w[r * Lp + j]) * yv[r][v];
      Store(x + j * kLanes * V + kLanes * v, xj);
    }
  }
}

// A query row's mask as floats, 1 where it sees key j (j < L), 0 else: loops over bytes as numbers vectorise,
// vector conversions of bool do not (GCC 12).
inline void KeepRow(const bool* m, int64_t L, float* __restrict keep) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(m);
  for (int64_t j = 0; j < L; ++j) keep[j] = bytes[j];
}

template <int V, int R>
void ForwardRows(const Dims& g, int64_t b, int64_t h, const int64_t* rows_i, int64_t end, const float* q,
                 const bool* mask, float* out, float* lse, HeadScratch& s) {
  const int64_t L = g.L, Lp = RoundUp(L), Le = RoundUp(end);  // keys >= end are masked for all R rows
  const float* qr[R];
  float* outr[R];
  for (int r = 0; r < R; ++r) qr[r] = q + g.At(b, rows_i[r], h), outr[r] = out + g.At(b, rows_i[r], h);
  float* rows = s.rows_s.data();
  Logits<V, R>(qr, s.kt.data(), Le, Lp, g.scale, rows);
  float total[R], row_max[R];
  for (int r = 0; r < R; ++r) {
    float* row = rows + r * Lp;
    KeepRow(mask + (b * L + rows_i[r]) * L, std::min(Le, L), s.keep.data());
    FV mx = Splat(-INFINITY);
    for (int64_t j = 0; j < Le; j += kLanes) {
      const FV x = Load(s.keep.data() + j) != 0.0f ? Load(row + j) : Splat(-INFINITY);
      Store(row + j, x);
      mx = mx > x ? mx : x;
    }
    row_max[r] = Max(mx);
    FV tot{};
    for (int64_t j = 0; j < Le; j += kLanes) {
      const FV x = Load(row + j);
      const FV e = x == -INFINITY ? FV{} : ExpNonPositive(x - row_max[r]);
      Store(row + j, e);
      tot += e;
    }
    total[r] = Sum(tot);
  }
  Weighted<V, R>(rows, Lp, s.v.data(), end, outr);
  for (int r = 0; r < R; ++r) {
    const FV inv = Splat(1.0f / total[r]);
    for (int v = 0; v < V; ++v) Store(outr[r] + kLanes * v, Load(outr[r] + kLanes * v) * inv);
    lse[(b * g.H + h) * L + rows_i[r]] = row_max[r] + std::log(total[r]);
  }
}

// Index of the last set byte of m[0, L), or -1: glibc's memrchr scans a vector at a time; elsewhere (no memrchr)
// eight bytes at a time.
inline int64_t LastSet(const bool* m, int64_t L) {
#if defined(__GLIBC__)
  const void* l = memrchr(m, 1, L);
  return l == nullptr ? -1 : reinterpret_cast<const char*>(l) - reinterpret_cast<const char*>(m);
#else
  int64_t j = L;
  for (uint64_t w = 0; j >= 8; j -= 8) {
    std::memcpy(&w, m + j - 8, 8);
    if (w != 0) break;
  }
  while (j > 0 && !m[j - 1]) --j;
  return j - 1;
#endif
}

// A query row's first and last visible key (memchr scans the mask's bytes a vector at a time); first > last when
// it sees none.
struct Span {
  int64_t first, last;
};
inline Span RowSpan(const bool* m, int64_t L) {
  const void* f = std::memchr(m, 1, L);
  if (f == nullptr) return {1, 0};
  return {reinterpret_cast<const char*>(f) - reinterpret_cast<const char*>(m), LastSet(m, L)};
}

// Visits a head's query rows: `one(i, j)` for a row that sees key j alone, `none(i)` for one that sees nothing,
// and `block(rows, R, end)` for rows that see more, kRows at a time with `end` = 1 + the block's last visible
// key; the rows left at the end come one at a time, or as one block of fewer rows when kTailTogether.
template <int kRows, bool kTailTogether = false, typename One, typename None, typename Block>
void ForEachRowBlock(const Dims& g, const bool* mask_LxL, One one, None none, Block block) {
  int64_t rows[kRows], ends[kRows];
  int n = 0;
  for (int64_t i = 0; i < g.L; ++i) {
    const Span sp = RowSpan(mask_LxL + i * g.L, g.L);
    if (sp.first > sp.last) {
      none(i);
    } else if (sp.first == sp.last) {
      one(i, sp.first);
    } else {
      rows[n] = i, ends[n] = sp.last + 1;
      if (++n == kRows) {
        block(rows, kRows, *std::max_element(ends, ends + kRows));
        n = 0;
      }
    }
  }
  if (kTailTogether && n > 0) block(rows, n, *std::max_element(ends, ends + n));
  else for (int r = 0; r < n; ++r) block(rows + r, 1, ends[r]);
}

template <int V>
void ForwardHead(const Dims& g, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                 const bool* mask, float* out, float* lse, HeadScratch& s) {
  Gather(g, k, b, h, s.kt.data(), nullptr);
  Gather(g, v, b, h, nullptr, s.v.data());
  const int64_t L = g.L, D = g.D, Lp = RoundUp(L);
  float* lse_L = lse + (b * g.H + h) * L;
  constexpr int kRows = kRowsFor<V>;
  ForEachRowBlock<kRows>(
      g, mask + b * L * L,
      [&](int64_t i, int64_t j) {  // softmax over one key: probability 1
        const float* qi = q + g.At(b, i, h);
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * s.kt[d * Lp + j];  // keys as gathered for the blocks
        std::memcpy(out + g.At(b, i, h), s.v.data() + j * D, D * sizeof(float));
        lse_L[i] = g.scale * dot;
      },
      [&](int64_t i) {
        std::fill_n(out + g.At(b, i, h), D, 0.0f);
        lse_L[i] = -INFINITY;
      },
      [&](const int64_t* rows, int R, int64_t end) {
        if (R == kRows) ForwardRows<V, kRows>(g, b, h, rows, end, q, mask, out, lse, s);
        else ForwardRows<V, 1>(g, b, h, rows, end, q, mask, out, lse, s);
      });
}

template <int V, int R>
void BackwardRows(const Dims& g, int64_t b, int64_t h, const int64_t* rows_i, int64_t end, const float* q,
                  const bool* mask, const float* out, const float* lse, const float* dout, float* dq,
                  HeadScratch& s) {
  const int64_t L = g.L, Lp = RoundUp(L), Le = RoundUp(end);
  const float *qr[R], *dor[R];
  float* dqr[R];
  for (int r = 0; r < R; ++r) {
    const int64_t i = rows_i[r];
    qr[r] = q + g.At(b, i, h), dor[r] = dout + g.At(b, i, h), dqr[r] = dq + g.At(b, i, h);
  }
  float* p = s.rows_p.data();
  float* dp = s.rows_dp.data();
  float* ds = s.rows_s.data();
  Logits<V, R>(qr, s.kt.data(), Le, Lp, g.scale, p);
  Logits<V, R>(dor, s.vt.data(), Le, Lp, 1.0f, dp);
  for (int r = 0; r < R; ++r) {
    const float* o = out + g.At(b, rows_i[r], h);
    FV dsum{};
    for (int v = 0; v < V; ++v) dsum += Load(dor[r] + kLanes * v) * Load(o + kLanes * v);
    const FV delta = Splat(Sum(dsum));
    const FV lse_i = Splat(lse[(b * g.H + h) * L + rows_i[r]]);
    KeepRow(mask + (b * L + rows_i[r]) * L, std::min(Le, L), s.keep.data());
    for (int64_t j = r * Lp; j < r * Lp + Le; j += kLanes) {
      const FV pj = Load(s.keep.data() + j - r * Lp) != 0.0f ? ExpNonPositive(Load(p + j) - lse_i) : FV{};
      Store(p + j, pj);
      Store(ds + j, pj * (Load(dp + j) - delta) * g.scale);
    }
  }
  Weighted<V, R>(ds, Lp, s.k.data(), end, dqr);
  AddOuter<V, R>(ds, Lp, qr, end, s.dk.data());
  AddOuter<V, R>(p, Lp, dor, end, s.dv.data());
}

template <int V>
void BackwardHead(const Dims& g, int64_t b, int64_t h, const float* q, const float* k, const float* v,
                  const bool* mask, const float* out, const float* lse, const float* dout, float* dq, float* dk,
                  float* dv, HeadScratch& s) {
  const int64_t L = g.L, D = g.D;
  Gather(g, k, b, h, s.kt.data(), s.k.data());
  Gather(g, v, b, h, s.vt.data(), nullptr);
  std::fill(s.dk.begin(), s.dk.end(), 0.0f);
  std::fill(s.dv.begin(), s.dv.end(), 0.0f);
  constexpr int kRows = kRowsFor<V>;
  ForEachRowBlock<kRows>(
      g, mask + b * L * L,
      [&](int64_t i, int64_t j) {  // probability 1, so ds = 0: no dq, no dk; dv_j gets dout_i
        std::fill_n(dq + g.At(b, i, h), D, 0.0f);
        const float* di = dout + g.At(b, i, h);
        for (int64_t d = 0; d < D; ++d) s.dv[j * D + d] += di[d];
      },
      [&](int64_t i) { std::fill_n(dq + g.At(b, i, h), D, 0.0f); },
      [&](const int64_t* rows, int R, int64_t end) {
        if (R == kRows) BackwardRows<V, kRows>(g, b, h, rows, end, q, mask, out, lse, dout, dq, s);
        else BackwardRows<V, 1>(g, b, h, rows, end, q, mask, out, lse, dout, dq, s);
      });
  for (int64_t j = 0; j < L; ++j) {
    std::memcpy(dk + g.At(b, j, h), s.dk.data() + j * D, D * sizeof(float));
    std::memcpy(dv + g.At(b, j, h), s.dv.data() + j * D, D * sizeof(float));
  }
}

// ---- bfloat16 forward on AMX (Intel's tile units; Sapphire Rapids and later) ----
//
// Why: in bf16 runs the float32 kernel above spends most of NDT2's co-smoothing forward on its multiply-adds
// (64 features a head), where PyTorch's bf16 attention runs them on AMX (docs/performance.md, row 46). Here the
// two products of each block of 16 query rows go through tiles: logits = Q K^T (bf16 in, float32 out), then
// out = P V with the probabilities P rounded to bf16 (as PyTorch's CPU flash attention does); the softmax
// between them (mask, max, exp, sum) stays float32 on AVX-512, and so do out's normalisation (out is then
// rounded to bf16, the caller's dtype) and lse.
// Tiles: 0-3 accumulators (logits of 64 keys, then out's 64 features), 4-5 the block's queries (4 then holds
// P), 6-7 keys or values. Every tile is 16 rows of 64 bytes: A operands 16 x 32 bf16, B operands 16 pairs x 16
// bf16 pairs ("VNNI": B[k/2][n][k%2]), accumulators 16 x 16 float32.
#if defined(IBL_AMX)

constexpr int64_t kTileRows = 16;

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Each thread that uses the tiles loads their shape first; released at the end of each head's work.
inline void ConfigureTiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = kTileRows;
  _tile_loadconfig(&c);
}

inline int64_t RoundUp64(int64_t n) { return (n + 63) / 64 * 64; }

// One (trial, head) in tile layouts: keys as [D/2, Lk, 2] (feature pairs, keys), values as [Lk/2, D, 2] (key
// pairs, features), the block's queries [16, D], logits [16, Lk] float32, P [16, Lk] bf16, out [16, D] float32;
// Lk = L rounded up to 64 keys, the tails zero.
struct AmxScratch {
  std::vector<uint16_t> k2, v2, q, p;
  std::vector<float> logits, out, keep;
  void Resize(int64_t L, int64_t D) {
    const int64_t Lk = RoundUp64(L);
    k2.assign(D * Lk, 0), v2.assign(Lk * D, 0), q.assign(kTileRows * D, 0), p.assign(kTileRows * Lk, 0);
    logits.assign(kTileRows * Lk, 0.0f), out.assign(kTileRows * D, 0.0f), keep.assign(Lk, 0.0f);
  }
};

// exp(x) for x <= 0 to 3e-6 relative, enough for probabilities rounded to bf16 (8 bits) and their float32 sum:
// 2^n p(r) with n = round(x / ln 2), r = x - n ln 2 and p of degree 4 (minimax on |r| <= ln2 / 2), 2^n applied by
// scalef; about half the operations of ExpNonPositive. x is clamped at -87 first (n >= -126).
inline __m512 ExpForBf16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  __m512 p = _mm512_set1_ps(0.0415138453f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.167874739f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.500030160f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999966860f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline float Bf16ToFloat(uint16_t x) {
  const uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Logits of the block's 16 rows and NT x 16 keys from j0 (NQ query tiles of 32 features each).
template <int NQ, int NT>
inline void LogitTiles(const uint16_t* k2, int64_t Lk, int64_t j0, float* logits) {
  static_assert(NT >= 1 && NT <= 4 && NQ >= 1 && NQ <= 2);
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (NT > 2) _tile_zero(2);
  if (NT > 3) _tile_zero(3);
  const int64_t stride = 4 * Lk;  // bytes from one feature pair to the next
  for (int f = 0; f < NQ; ++f) {
    const uint16_t* kf = k2 + 2 * (16 * f * Lk + j0);
    // Two key tiles alternate so that a load overlaps the previous product.
    _tile_loadd(6, kf, stride);
    if (f == 0) _tile_dpbf16ps(0, 4, 6); else _tile_dpbf16ps(0, 5, 6);
    if (NT > 1) { _tile_loadd(7, kf + 32, stride); if (f == 0) _tile_dpbf16ps(1, 4, 7); else _tile_dpbf16ps(1, 5, 7); }
    if (NT > 2) { _tile_loadd(6, kf + 64, stride); if (f == 0) _tile_dpbf16ps(2, 4, 6); else _tile_dpbf16ps(2, 5, 6); }
    if (NT > 3) { _tile_loadd(7, kf + 96, stride); if (f == 0) _tile_dpbf16ps(3, 4, 7); else _tile_dpbf16ps(3, 5, 7); }
  }
  _tile_stored(0, logits + j0, 4 * Lk);
  if (NT > 1) _tile_stored(1, logits + j0 + 16, 4 * Lk);
  if (NT > 2) _tile_stored(2, logits + j0 + 32, 4 * Lk);
  if (NT > 3) _tile_stored(3, logits + j0 + 48, 4 * Lk);
}

// out[16, D] = P[16, :Le] V[:Le, D], Le a multiple of 32 (P's and V's tails zero), with NO = D / 16 tiles.
template <int NO>
inline void WeightedTiles(const uint16_t* p, const uint16_t* v2, int64_t Lk, int64_t Le, float* out) {
  static_assert(NO >= 2 && NO <= 4);
  constexpr int64_t D = 16 * NO;
  _tile_zero(0);
  _tile_zero(1);
  if (NO > 2) _tile_zero(2);
  if (NO > 3) _tile_zero(3);
  for (int64_t j0 = 0; j0 < Le; j0 += 32) {
    _tile_loadd(4, p + j0, 2 * Lk);
    const uint16_t* vj = v2 + j0 * D;  // key pairs j0/2 .. j0/2 + 15, each a row of D pairs
    _tile_loadd(6, vj, 4 * D);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, vj + 32, 4 * D);
    _tile_dpbf16ps(1, 4, 7);
    if (NO > 2) { _tile_loadd(6, vj + 64, 4 * D); _tile_dpbf16ps(2, 4, 6); }
    if (NO > 3) { _tile_loadd(7, vj + 96, 4 * D); _tile_dpbf16ps(3, 4, 7); }
  }
  _tile_stored(0, out, 4 * D);
  _tile_stored(1, out + 16, 4 * D);
  if (NO > 2) _tile_stored(2, out + 32, 4 * D);
  if (NO > 3) _tile_stored(3, out + 48, 4 * D);
}

// Up to 16 query rows (rows_i[:R]) that see keys below `end`.
template <int D>
void ForwardRowsAmx(const Dims& g, int64_t b, int64_t h, const int64_t* rows_i, int R, int64_t end,
                    const uint16_t* q, const bool* mask, uint16_t* out, float* lse, AmxScratch& s) {
  constexpr int NQ = D / 32;
  const int64_t L = g.L, Lk = RoundUp64(L), Le = (end + 31) / 32 * 32;  // keys >= end are masked for all rows
  uint16_t* qb = s.q.data();
  for (int r = 0; r < kTileRows; ++r) {
    if (r < R) std::memcpy(qb + r * D, q + g.At(b, rows_i[r], h), D * 2);
    else std::fill_n(qb + r * D, D, uint16_t(0));
  }
  _tile_loadd(4, qb, 2 * D);
  if (NQ > 1) _tile_loadd(5, qb + 32, 2 * D);
  float* logits = s.logits.data();
  int64_t j0 = 0;
  for (; j0 + 64 <= Le; j0 += 64) LogitTiles<NQ, 4>(s.k2.data(), Lk, j0, logits);
  if (j0 < Le) LogitTiles<NQ, 2>(s.k2.data(), Lk, j0, logits);
  float total[kTileRows], row_max[kTileRows];  // row_max: of the scaled logits
  for (int r = 0; r < R; ++r) {
    float* row = logits + r * Lk;
    const bool* m = mask + (b * L + rows_i[r]) * L;
    const int64_t Lm = std::min(Le, L);
    // A row that sees a prefix of the keys (NDT2's real tokens, all but padding) needs no mask pass: the keys
    // after the prefix are set to -inf, and the max reads the logits in place.
    const void* hole = std::memchr(m, 0, Lm);
    const int64_t prefix = hole ? static_cast<const char*>(hole) - reinterpret_cast<const char*>(m) : Lm;
    FV mx = Splat(-INFINITY);
    if (prefix == Lm || LastSet(m + prefix, Lm - prefix) < 0) {
      std::fill(row + prefix, row + Le, -INFINITY);
      for (int64_t j = 0; j < Le; j += kLanes) {
        const FV x = Load(row + j);
        mx = mx > x ? mx : x;
      }
    } else {
      KeepRow(m, Lm, s.keep.data());
      for (int64_t j = 0; j < Le; j += kLanes) {
        const FV x = Load(s.keep.data() + j) != 0.0f ? Load(row + j) : Splat(-INFINITY);
        Store(row + j, x);
        mx = mx > x ? mx : x;
      }
    }
    row_max[r] = g.scale * Max(mx);  // the scale (> 0) applied inside the exp: exp(scale x - scale max)
    const FV shift = Splat(row_max[r]);
    FV tot{};
    uint16_t* prow = s.p.data() + r * Lk;
    for (int64_t j = 0; j < Le; j += kLanes) {
      const FV x = Load(row + j);
      const FV e = x == -INFINITY ? FV{} : (FV)ExpForBf16((__m512)(x * g.scale - shift));
      tot += e;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh((__m512)e));
    }
    total[r] = Sum(tot);
  }
  float* ob = s.out.data();
  WeightedTiles<D / 16>(s.p.data(), s.v2.data(), Lk, Le, ob);
  for (int r = 0; r < R; ++r) {
    const FV inv = Splat(1.0f / total[r]);
    uint16_t* o = out + g.At(b, rows_i[r], h);
    for (int v = 0; v < D / kLanes; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + kLanes * v),
                          (__m256i)_mm512_cvtneps_pbh((__m512)(Load(ob + r * D + kLanes * v) * inv)));
    lse[(b * g.H + h) * L + rows_i[r]] = row_max[r] + std::log(total[r]);
  }
}

template <int D>
void ForwardHeadAmx(const Dims& g, int64_t b, int64_t h, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                    const bool* mask, uint16_t* out, float* lse, AmxScratch& s) {
  const int64_t L = g.L, Lk = RoundUp64(L);
  // Keys to [D/2, Lk, 2]: a key's feature pairs moved as 32-bit words, one a row.
  uint32_t* k2 = reinterpret_cast<uint32_t*>(s.k2.data());
  for (int64_t j = 0; j < L; ++j) {
    uint32_t words[D / 2];
    std::memcpy(words, k + g.At(b, j, h), 2 * D);
    for (int w = 0; w < D / 2; ++w) k2[w * Lk + j] = words[w];
  }
  // Values to [Lk/2, D, 2]: rows j and j + 1 interleaved (the zero row past an odd L's end).
  static const uint16_t kZeros[64] = {};
  for (int64_t j = 0; j < L; j += 2) {
    const uint16_t* a = v + g.At(b, j, h);
    const uint16_t* c = j + 1 < L ? v + g.At(b, j + 1, h) : kZeros;
    uint16_t* o = s.v2.data() + j * D;
    for (int d = 0; d < D; ++d) o[2 * d] = a[d], o[2 * d + 1] = c[d];
  }
  float* lse_L = lse + (b * g.H + h) * L;
  ConfigureTiles();
  ForEachRowBlock<kTileRows, true>(
      g, mask + b * L * L,
      [&](int64_t i, int64_t j) {  // softmax over one key: probability 1
        const uint16_t* qi = q + g.At(b, i, h);
        const uint16_t* kj = k + g.At(b, j, h);
        const uint16_t* vj = v + g.At(b, j, h);
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += Bf16ToFloat(qi[d]) * Bf16ToFloat(kj[d]);
        std::memcpy(out + g.At(b, i, h), vj, 2 * D);
        lse_L[i] = g.scale * dot;
      },
      [&](int64_t i) {
        std::fill_n(out + g.At(b, i, h), D, uint16_t(0));
        lse_L[i] = -INFINITY;
      },
      [&](const int64_t* rows, int R, int64_t end) { ForwardRowsAmx<D>(g, b, h, rows, R, end, q, mask, out, lse, s); });
  _tile_release();
}

// The kernel's process asks Linux for the tiles' state once (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA);
// without it the first tile instruction faults.
bool AmxPermitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}
#endif  // AMX

// Features a head as V whole vectors: the kernels are instantiated for 16, 32, 48 and 64.
template <typename F>
bool DispatchV(int64_t D, F f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16 / kLanes>{}); return true;
    case 32: f(std::integral_constant<int, 32 / kLanes>{}); return true;
    case 48: f(std::integral_constant<int, 48 / kLanes>{}); return true;
    case 64: f(std::integral_constant<int, 64 / kLanes>{}); return true;
    default: return false;
  }
}

// Runs work(pair, scratch) for every (trial, head) pair on the caller and the pool (see the file's comment).
template <typename Scratch = HeadScratch, typename Work>
void ForEachHead(ffi::ThreadPool& pool, const Dims& g, Work work) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t running = 0;
  };
  const int64_t pairs = g.B * g.H;
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, pairs, g, work]() {
    Scratch scratch;
    scratch.Resize(g.L, std::max<int64_t>(g.D, 1));
    for (int64_t p = shared->next.fetch_add(1); p < pairs; p = shared->next.fetch_add(1)) work(p, scratch);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), pairs - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([shared, pairs, drain]() {
      {
        std::lock_guard<std::mutex> lock(shared->mu);
        if (shared->next.load() >= pairs) return;  // nothing left: the caller may already be gone
        ++shared->running;
      }
      drain();
      std::lock_guard<std::mutex> lock(shared->mu);
      if (--shared->running == 0) shared->cv.notify_all();
    });
  }
  drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->running == 0; });
}

Dims DimsOf(const ffi::Buffer<ffi::F32>& q, float scale) {
  auto d = q.dimensions();
  return Dims{d[0], d[1], d[2], d[3], scale};
}

// Runs head_fn<V>(b, h, scratch) for every (trial, head), with V vectors of kLanes features a head.
template <typename HeadFn>
ffi::Error RunHeads(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& q, float scale, HeadFn head_fn) {
  if (q.dimensions().size() != 4) return ffi::Error::InvalidArgument("q must be [B, L, H, D]");
  const Dims g = DimsOf(q, scale);
  const bool known = DispatchV(g.D, [&](auto V) {
    ForEachHead(pool, g, [=](int64_t p, HeadScratch& s) { head_fn(V, g, p / g.H, p % g.H, s); });
  });
  if (!known) return ffi::Error::InvalidArgument("features a head must be 16, 32, 48 or 64");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const bool* pm = mask.typed_data();
  float *po = out->typed_data(), *pl = lse->typed_data();
  return RunHeads(pool, q, scale, [=](auto V, const Dims& g, int64_t b, int64_t h, HeadScratch& s) {
    ForwardHead<decltype(V)::value>(g, b, h, pq, pk, pv, pm, po, pl, s);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *po = out.typed_data(), *pl = lse.typed_data(), *pd = dout.typed_data();
  const bool* pm = mask.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  return RunHeads(pool, q, scale, [=](auto V, const Dims& g, int64_t b, int64_t h, HeadScratch& s) {
    BackwardHead<decltype(V)::value>(g, b, h, pq, pk, pv, pm, po, pl, pd, pdq, pdk, pdv, s);
  });
}

// bf16 q, k, v on AMX: out in bf16 (rounded once from float32), lse as Forward's. Features a head: 32 or 64.
ffi::Error ForwardBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                       ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::PRED> mask, float scale,
                       ffi::ResultBuffer<ffi::BF16> out, ffi::ResultBuffer<ffi::F32> lse) {
#if defined(IBL_AMX)
  auto d = q.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("q must be [B, L, H, D]");
  if (!AmxPermitted()) return ffi::Error::Internal("the OS did not grant AMX tiles");
  const Dims g{d[0], d[1], d[2], d[3], scale};
  const uint16_t *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const bool* pm = mask.typed_data();
  uint16_t* po = out->typed_data();
  float* pl = lse->typed_data();
  auto run = [&](auto D) {
    ForEachHead<AmxScratch>(pool, g, [=](int64_t p, AmxScratch& s) {
      ForwardHeadAmx<decltype(D)::value>(g, p / g.H, p % g.H, pq, pk, pv, pm, po, pl, s);
    });
  };
  if (g.D == 32) run(std::integral_constant<int, 32>{});
  else if (g.D == 64) run(std::integral_constant<int, 64>{});
  else return ffi::Error::InvalidArgument("bf16 attention: features a head must be 32 or 64");
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("bf16 attention: built without AMX");
#endif
}

// Both handlers start with the thread pool, q, k, v and the mask.
auto BindQkvMask() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IblAttentionForward, Forward,
                              BindQkvMask()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, L, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse [B, H, L]

XLA_FFI_DEFINE_HANDLER_SYMBOL(IblAttentionForwardBf16, ForwardBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // k
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // out [B, L, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse [B, H, L]

// 1 when IblAttentionForwardBf16 can run here: built with AMX and the OS grants its tiles.
extern "C" int IblAttentionBf16Available() {
#if defined(IBL_AMX)
  return AmxPermitted() ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(IblAttentionBackward, Backward,
                              BindQkvMask()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
