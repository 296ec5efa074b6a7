// InfLLM attention for one wave of selection chunks, straight over the paged KV cache (CPU).
//
// The native counterpart of `attend` in vllm_infllm/core/ops/torch_ops.py (the reference it is
// tested against) and of `_attend_kernel` in triton_ops.py (the same loop structure). Semantics:
// docs/design.md section 2. For every query p of the wave, one softmax over
//   local window  [w(p), p]                      keys and query as stored (ordinary RoPE);
//   init          [0, min(n_init, w(p)))          global keys,
//   selected      the chunk's units (whole),      global keys,
//   remainder     [n_init + K*B, w(p))            global keys,
// where w(p) = max(0, p - n_local + 1) and K the chunk's candidates. A global logit is
// positions="fixed": <R(n_local-1-p) q(p), R(-j) k(j)>  (every global key at distance n_local-1);
// positions="ordered": <q(p), R(shift) k(j)> with one shift per block (the gap the unselected
// candidates leave; computed as <R(-shift) q, k>, which rotates G query rows instead of B keys).
// Optional: logit soft-capping, a learned sink logit per query head, and the fp32 softmax mass
// each local key receives ("representative scores", the paper's unit statistics).
//
// Work items are (chunk, KV head, query tile); each reads its K/V blocks in place through the
// block table, converts them to fp32 once per block and serves the G query heads of that KV
// head from them (GQA). Items run in parallel (OpenMP, the caller's thread count; a decode with
// fewer items than threads splits each item's blocks and merges the parts). The local keys'
// mass is kept per item and added to `scores` afterwards, item by item in a fixed order, by KV
// head: two requests may share a prefix-cached block, so no score is written by two threads,
// and sums do not depend on scheduling.
//
// All arithmetic is fp32; caches and queries may be fp32, bf16 or fp16. Head sizes 64, 128 and
// 256 run micro-kernels over AVX-512 or AVX2 registers (simd.h; built with -O3 -march=native
// where the compiler takes it, see vllm_infllm/core/ops/native.py): a per-row kernel for items of
// few queries (decode), and for prefill items a tiled one with the rows across the vector lanes
// (logits and values as outer products, no horizontal sums). Other head sizes, and builds without
// those ISAs, run the portable loops below.

#include <torch/extension.h>

#include "ops.h"
#include "simd.h"
#include "store.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace infllm {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Rows fetched ahead of the first pass over a block (a block's rows are 4 KB pages apart at
// most; the hardware prefetcher starts over at every page). Prefetches past the block's end
// touch other rows of the cache, never fault, and are harmless.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

// Floats a tiled item keeps for its score pass: Rp probabilities per local key, then the max
// of each local block per row (tiled_mass).
inline int64_t tiled_keep_size(int64_t Rp, int64_t span, int64_t w_first, int64_t B) {
  return Rp * (span + (w_first + span - 1) / B - w_first / B + 1);
}

#if INFLLM_SIMD_WIDTH
// One row's online-softmax step over keys [ka, kb) of a block, head dim D a multiple of the
// vector width: the query (pre-scaled) sits in registers while the logits are taken, the
// accumulator while the values are added, so a key costs D/W multiply-adds twice plus one
// horizontal sum. s: scratch for the block's logits (>= kb + kW floats).
template <int D, bool PREFETCH>
inline void row_block(const float* __restrict qr, const float* __restrict k, int64_t ks, const float* __restrict v,
                      int64_t vs, int64_t ka, int64_t kb, float scale, bool softcap_on, float softcap,
                      float* __restrict s, float& m, float& l, float* __restrict accr, float* keep) {
  constexpr int N = D / kW;
  vfloat q[N];
  for (int i = 0; i < N; ++i) q[i] = vmul(vload(qr + i * kW), vset1(scale));
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t o = ka; o < kb; ++o) {
    const float* kr = k + o * ks;
    if constexpr (PREFETCH) {  // the block's first pass reads it from memory: ask for rows ahead
      for (int i = 0; i < D; i += 16) {
        __builtin_prefetch(kr + kPrefetchRows * ks + i, 0, 3);
        __builtin_prefetch(v + (o + kPrefetchRows) * vs + i, 0, 3);
      }
    }
    vfloat x = vmul(q[0], vload(kr));
    for (int i = 1; i < N; ++i) x = vfma(q[i], vload(kr + i * kW), x);
    float t = vsum(x);
    if (softcap_on) {  // cap * tanh(t / cap), tanh(y) = (1 - e^-2|y|) / (1 + e^-2|y|) with y's sign
      const float y = t / softcap, e = exp_neg(-2.f * std::fabs(y)), th = (1.f - e) / (1.f + e);
      t = softcap * (y < 0.f ? -th : th);
    }
    s[o] = t;
    mx = std::max(mx, t);
  }
  if (keep != nullptr) std::memcpy(keep + ka, s + ka, (kb - ka) * sizeof(float));
  vfloat a[N];
  if (mx > m) {
    const float alpha = std::isinf(m) ? 0.f : exp_neg(m - mx);  // m = -inf at first: acc, l are 0
    l *= alpha;
    for (int i = 0; i < N; ++i) a[i] = vmul(vload(accr + i * kW), vset1(alpha));
    m = mx;
  } else {
    for (int i = 0; i < N; ++i) a[i] = vload(accr + i * kW);
  }
  const vfloat mv = vset1(m);
  vfloat sumv = vset1(0.f);
  int64_t o = ka;
  for (; o + kW <= kb; o += kW) {
    const vfloat p = vexp_neg(vsub(vload(s + o), mv));
    vstore(s + o, p);
    sumv = vadd(sumv, p);
  }
  float sum = vsum(sumv);
  for (; o < kb; ++o) {
    s[o] = exp_neg(s[o] - m);
    sum += s[o];
  }
  for (o = ka; o < kb; ++o) {
    const vfloat p = vset1(s[o]);
    const float* vr = v + o * vs;
    for (int i = 0; i < N; ++i) a[i] = vfma(p, vload(vr + i * kW), a[i]);
  }
  for (int i = 0; i < N; ++i) vstore(accr + i * kW, a[i]);
  l += sum;
}

// ---- The tiled kernel: a prefill item's rows across the vector lanes ----
// A prefill item has G * qn rows that all read the same key blocks. Held transposed (row r of
// channel d at qt[d * Rp + r], Rp the rows padded to whole vectors), a block's logits are outer
// products: channel d of key o broadcast against the query columns, so a logit costs D / W
// multiply-adds and no horizontal sum; the values update has the same shape
// (acc[d][rows] += p[o][rows] * v[o][d]). Each step holds NV row vectors times KB keys (or DB
// channels) of accumulators in registers. Used for items of at least kTiledMinQueries queries;
// a decode (one query: W - 1 of W lanes would be padding) keeps the per-row kernel above.
#if INFLLM_SIMD_WIDTH == 16
constexpr int kAccRegs = 24;  // accumulators, of 32 zmm registers (the rest: query columns, a broadcast)
constexpr int kMaxRowVecs = 4;
#else
constexpr int kAccRegs = 12;  // of 16 ymm registers
constexpr int kMaxRowVecs = 2;
#endif
constexpr int64_t kTiledMinQueries = kW / 2;

constexpr int pow2_floor(int x) { return x >= 16 ? 16 : x >= 8 ? 8 : x >= 4 ? 4 : x >= 2 ? 2 : 1; }

// st[(o + kk) * Rp + lanes] = logits of keys o .. o + KB - 1 for NV row vectors (qt, st: the
// group's first column; rows pre-scaled).
template <int D, int NV, int KB>
inline void logits_keys(const float* __restrict qt, int64_t Rp, const float* __restrict k, int64_t ks, int64_t o,
                        float* __restrict st) {
  vfloat acc[KB][NV];
#pragma GCC unroll 32
  for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[kk][v] = vset1(0.f);
  const float* kr = k + o * ks;
  for (int d = 0; d < D; ++d) {
    vfloat q[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) q[v] = vload(qt + d * Rp + v * kW);
#pragma GCC unroll 32
    for (int kk = 0; kk < KB; ++kk) {
      const vfloat x = vset1(kr[kk * ks + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[kk][v] = vfma(q[v], x, acc[kk][v]);
    }
  }
#pragma GCC unroll 32
  for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(st + (o + kk) * Rp + v * kW, acc[kk][v]);
}

template <int D, int NV>
inline void logits_tile(const float* qt, int64_t Rp, const float* k, int64_t ks, int64_t a, int64_t b, float* st) {
  constexpr int KB = kAccRegs / NV;
  int64_t o = a;
  for (; o + KB <= b; o += KB) logits_keys<D, NV, KB>(qt, Rp, k, ks, o, st);
  for (; o < b; ++o) logits_keys<D, NV, 1>(qt, Rp, k, ks, o, st);
}

// acc[d * Rp + lanes] <- acc * alpha + sum over keys [a, b) of p[o * Rp + lanes] * v[o][d], for
// NV row vectors (acct, pt, alpha: the group's first column).
template <int D, int NV>
inline void values_tile(const float* __restrict pt, int64_t Rp, const float* __restrict val, int64_t vs, int64_t a,
                        int64_t b, const float* __restrict alpha, float* __restrict acct) {
  constexpr int DB = pow2_floor(kAccRegs / NV);
  vfloat al[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) al[v] = vload(alpha + v * kW);
  for (int d0 = 0; d0 < D; d0 += DB) {
    vfloat acc[DB][NV];
#pragma GCC unroll 16
    for (int dd = 0; dd < DB; ++dd)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[dd][v] = vmul(vload(acct + (d0 + dd) * Rp + v * kW), al[v]);
    for (int64_t o = a; o < b; ++o) {
      vfloat p[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) p[v] = vload(pt + o * Rp + v * kW);
      const float* vr = val + o * vs + d0;
#pragma GCC unroll 16
      for (int dd = 0; dd < DB; ++dd) {
        const vfloat x = vset1(vr[dd]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[dd][v] = vfma(p[v], x, acc[dd][v]);
      }
    }
#pragma GCC unroll 16
    for (int dd = 0; dd < DB; ++dd)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) vstore(acct + (d0 + dd) * Rp + v * kW, acc[dd][v]);
  }
}

// The online-softmax step of row vector `vi` over the block's logits st[o * Rp + vi * kW],
// o in [a, b): soft-capping, the per-row key ranges [lo, hi) (when `masked`), the new max and
// sum, and alpha, the factor the accumulator is rescaled by. Masked keys get p = 0 exactly, as
// the per-row kernel skips them. A local block also keeps its probabilities (key o at
// keep[(o - a) * Rp]) and the max they are relative to (keep_m[Rp]): a key's final softmax mass
// is p * e^(keep_m - m) / l once the row's m and l are final (tiled_mass), one exp per row and
// block instead of one per key.
inline void softmax_vec(float* st, int64_t Rp, int64_t a, int64_t b, int64_t vi, const float* loT, const float* hiT,
                        bool masked, bool softcap_on, float cap, float* mT, float* lT, float* alpha, float* keep,
                        float* keep_m) {
  const int64_t c = vi * kW;
  const vfloat lo = vload(loT + c), hi = vload(hiT + c);
  vfloat mx = vset1(kNegInf);
  for (int64_t o = a; o < b; ++o) {
    float* sp = st + o * Rp + c;
    vfloat x = vload(sp);
    if (softcap_on) x = vsoftcap(x, cap);
    if (masked) x = vkeep_range(x, vset1(static_cast<float>(o)), lo, hi, kNegInf);
    if (softcap_on || masked) vstore(sp, x);
    mx = vmax(mx, x);
  }
  const vfloat m_old = vload(mT + c);
  const vfloat m_new = vmax(m_old, mx);
  const vfloat m_safe = vreplace_eq(m_new, kNegInf, 0.f);  // a row with no key yet: p and alpha ~ 0
  const vfloat al = vexp_neg(vsub(m_old, m_safe));         // m_old = -inf: acc and l are 0 anyway
  vfloat sum = vset1(0.f);
  for (int64_t o = a; o < b; ++o) {
    float* sp = st + o * Rp + c;
    vfloat p = vexp_neg(vsub(vload(sp), m_safe));
    if (masked) p = vkeep_range(p, vset1(static_cast<float>(o)), lo, hi, 0.f);
    vstore(sp, p);
    if (keep != nullptr) vstore(keep + (o - a) * Rp + c, p);
    sum = vadd(sum, p);
  }
  if (keep != nullptr) vstore(keep_m + c, m_safe);
  vstore(mT + c, m_new);
  vstore(lT + c, vfma(vload(lT + c), al, sum));
  vstore(alpha + c, al);
}

// Rotation of transposed query columns: yt <- R(sign * a) xt (rotate() above, rows in the lanes).
inline void rotate_cols(const float* xt, float* yt, const float* c, const float* s, float sign, int64_t half,
                        int64_t Rp) {
  for (int64_t i = 0; i < half; ++i) {
    const vfloat ci = vset1(c[i]), sn = vset1(sign * s[i]);
    for (int64_t u = 0; u < Rp; u += kW) {
      const vfloat a = vload(xt + i * Rp + u), b = vload(xt + (i + half) * Rp + u);
      vstore(yt + i * Rp + u, vsub(vmul(a, ci), vmul(b, sn)));
      vstore(yt + (i + half) * Rp + u, vfma(a, sn, vmul(b, ci)));
    }
  }
}

// The local keys' softmax mass of a tiled item, once its softmax is final: ms[gg * span + x] +=
// sum over the item's queries of head gg of p * e^(m_block - m) / l, from what softmax_vec kept
// key-major (key x at keep[x * Rp], rows in the transposed order rt = gg * qn_pad + i, so a
// head's queries are whole vectors; then each local block's max, Rp per block). Keys x count
// from w_first, the window start of the item's first query. m, l: final, in the row layout
// r = i * G + gg. Padding rows kept p = 0 and weigh 0.
inline void tiled_mass(const float* keep, int64_t Rp, int64_t G, int64_t qn, int64_t span, int64_t w_first, int64_t B,
                       const float* m, const float* l, float* mt, float* f, float* ms) {
  const int64_t qn_pad = Rp / G;
  std::fill(mt, mt + Rp, 0.f);
  std::fill(f, f + Rp, 0.f);
  for (int64_t i = 0; i < qn; ++i)
    for (int64_t gg = 0; gg < G; ++gg) {
      const int64_t r = i * G + gg, rt = gg * qn_pad + i;
      mt[rt] = m[r] == kNegInf ? 0.f : m[r];
      f[rt] = l[r] > 0.f ? 1.f / l[r] : 0.f;  // 1 / l, then times the block's e^(m_block - m)
    }
  const float* keep_m = keep + Rp * span;
  for (int64_t blk = w_first / B, bi = 0; blk * B < w_first + span; ++blk, ++bi) {
    const float* mb = keep_m + bi * Rp;
    float* fb = f + Rp;  // this block's factors (f holds Rp more floats: the caller's scratch)
    for (int64_t u = 0; u < Rp; u += kW) vstore(fb + u, vmul(vload(f + u), vexp_neg(vsub(vload(mb + u), vload(mt + u)))));
    const int64_t xa = std::max(blk * B, w_first) - w_first, xb = std::min((blk + 1) * B, w_first + span) - w_first;
    int64_t x = xa;
    for (; x + kW <= xb; x += kW) {  // kW keys at once: their kW row sums reduced together
      for (int64_t gg = 0; gg < G; ++gg) {
        vfloat sums[kW];
        for (int j = 0; j < kW; ++j) {
          vfloat sum = vset1(0.f);
          for (int64_t u = gg * qn_pad; u < (gg + 1) * qn_pad; u += kW)
            sum = vfma(vload(keep + (x + j) * Rp + u), vload(fb + u), sum);
          sums[j] = sum;
        }
        float* dst = ms + gg * span + x;
        vstore(dst, vadd(vload(dst), vsum_each(sums)));
      }
    }
    for (; x < xb; ++x) {
      for (int64_t gg = 0; gg < G; ++gg) {
        vfloat sum = vset1(0.f);
        for (int64_t u = gg * qn_pad; u < (gg + 1) * qn_pad; u += kW)
          sum = vfma(vload(keep + x * Rp + u), vload(fb + u), sum);
        ms[gg * span + x] += vsum(sum);
      }
    }
  }
}

// One block for a tiled item: row groups of up to kMaxRowVecs vectors, each logits -> softmax
// -> values while the block's rows are in L1.
template <int D>
void tiled_block(const float* qt, int64_t Rp, const float* k, int64_t ks, const float* val, int64_t vs, int64_t a,
                 int64_t b, const float* loT, const float* hiT, bool masked, bool softcap_on, float cap, float* st,
                 float* mT, float* lT, float* alpha, float* acct, float* keep, float* keep_m) {
  const int64_t NVt = Rp / kW;
  for (int64_t v0 = 0; v0 < NVt; v0 += kMaxRowVecs) {
    const int64_t nv = std::min<int64_t>(kMaxRowVecs, NVt - v0), c = v0 * kW;
    switch (nv) {
      case 1: logits_tile<D, 1>(qt + c, Rp, k, ks, a, b, st + c); break;
      case 2: logits_tile<D, 2>(qt + c, Rp, k, ks, a, b, st + c); break;
#if INFLLM_SIMD_WIDTH == 16
      case 3: logits_tile<D, 3>(qt + c, Rp, k, ks, a, b, st + c); break;
      case 4: logits_tile<D, 4>(qt + c, Rp, k, ks, a, b, st + c); break;
#endif
    }
    for (int64_t vi = v0; vi < v0 + nv; ++vi)
      softmax_vec(st, Rp, a, b, vi, loT, hiT, masked, softcap_on, cap, mT, lT, alpha, keep, keep_m);
    switch (nv) {
      case 1: values_tile<D, 1>(st + c, Rp, val, vs, a, b, alpha + c, acct + c); break;
      case 2: values_tile<D, 2>(st + c, Rp, val, vs, a, b, alpha + c, acct + c); break;
#if INFLLM_SIMD_WIDTH == 16
      case 3: values_tile<D, 3>(st + c, Rp, val, vs, a, b, alpha + c, acct + c); break;
      case 4: values_tile<D, 4>(st + c, Rp, val, vs, a, b, alpha + c, acct + c); break;
#endif
    }
  }
}
#endif

struct Geometry {
  int64_t D, B, Hq, Hkv, G;
  int64_t n_init, n_local, topk;
  bool ordered, scores_on, softcap_on, sinks_on;
  float scale, softcap;
};

struct Item {
  int64_t chunk, kvh, t0, qn;  // queries [t0, t0 + qn) of the chunk
  int64_t mass_off, span;      // this item's local-mass slice (span keys from w(first query))
  int64_t rp;                  // tiled kernel: rows padded to whole vectors (0: the per-row kernel)
};

// A block of keys an item attends: offsets [a, b) of logical block blk.
constexpr int kLocal = 0;         // in the local window: keys and queries as stored
constexpr int kBeforeWindow = 1;  // init or remainder: global keys before w(p), row by row
constexpr int kUnit = 2;          // a whole selected unit: global keys every row sees
struct BlockTask {
  int64_t blk, a, b;
  int kind;
  int64_t shift;  // positions="ordered": the block's forward rotation (0: none)
};

// Splits of one item's key blocks at most (decode of a batch smaller than the threads).
constexpr int64_t kMaxSplits = 8;

// One work item: G * qn rows (query i, head g of the KV head), online softmax over all keys.
template <typename T>
struct ItemRunner {
  const Geometry& g;
  const T* kv;
  int64_t s_cb, s_ch, s_co;
  const float* cos;
  const float* sin;
  int64_t s_cos, s_sin;

  // The loaded block: K row o at k + o * k_stride, V row o at v + o * v_stride (fp32). An fp32
  // cache is read in place; other dtypes, and keys that must be un-rotated, go through kbuf/vbuf.
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t k_stride = 0, v_stride = 0;
  std::vector<float> kbuf, vbuf, sbuf;

  ItemRunner(const Geometry& geo, const T* kv_, int64_t cb, int64_t ch, int64_t co, const float* c,
             const float* s, int64_t sc, int64_t ss)
      : g(geo), kv(kv_), s_cb(cb), s_ch(ch), s_co(co), cos(c), sin(s), s_cos(sc), s_sin(ss) {
    kbuf.resize(g.B * g.D);
    vbuf.resize(g.B * g.D);
    sbuf.resize(g.B + 16);  // vector loads may run past the block's last key
  }

  // Keys [a, b) of physical block `phys` of the pool (offsets in the block).
  // rotate_keys: K row of logical position j0 + o un-rotated by R(-(j0 + o)) (positions="fixed").
  void load_block(int64_t phys, int64_t kvh, int64_t a, int64_t b, int64_t j0, bool rotate_keys) {
    load_at(kv + phys * s_cb, s_ch, s_co, kvh, a, b, j0, rotate_keys);
  }

  // The same for a block at `block` whose heads are `ch` and rows `co` apart (the pool's, or
  // an offloaded unit's in the store).
  void load_at(const T* block, int64_t ch, int64_t co, int64_t kvh, int64_t a, int64_t b, int64_t j0,
               bool rotate_keys) {
    const int64_t D = g.D, half = D / 2;
    const T* base = block + kvh * ch;
    if constexpr (std::is_same_v<T, float>) {
      v = base + D;
      v_stride = co;
      if (!rotate_keys) {
        k = base;
        k_stride = co;
        return;
      }
      for (int64_t o = a; o < b; ++o) {
        const int64_t j = j0 + o;
        rotate(base + o * co, kbuf.data() + o * D, cos + j * s_cos, sin + j * s_sin, -1.f, half);
      }
    } else {
      float tmp[512];
      for (int64_t o = a; o < b; ++o) {
        const T* row = base + o * co;
        if (rotate_keys) {
          load_row(row, tmp, D);
          const int64_t j = j0 + o;
          rotate(tmp, kbuf.data() + o * D, cos + j * s_cos, sin + j * s_sin, -1.f, half);
        } else {
          load_row(row, kbuf.data() + o * D, D);
        }
        load_row(row + D, vbuf.data() + o * D, D);
      }
      v = vbuf.data();
      v_stride = D;
    }
    k = kbuf.data();
    k_stride = D;
  }

#if INFLLM_SIMD_WIDTH
  std::vector<float> tbuf;  // the tiled kernel's logits, key o at tbuf[o * Rp]

  void attend_block_tiled(const float* qt, int64_t Rp, int64_t a, int64_t b, const float* loT, const float* hiT,
                          bool masked, float* mT, float* lT, float* alpha, float* acct, float* keep, float* keep_m) {
    if (tbuf.size() < static_cast<size_t>(g.B * Rp)) tbuf.resize(g.B * Rp);
    auto run = g.D == 64 ? &tiled_block<64> : g.D == 128 ? &tiled_block<128> : &tiled_block<256>;
    run(qt, Rp, k, k_stride, v, v_stride, a, b, loT, hiT, masked, g.softcap_on, g.softcap, tbuf.data(), mT, lT,
        alpha, acct, keep, keep_m);
  }
#endif

  // Logits of rows [0, R) against keys [a, b) of the loaded block; row r sees keys
  // [max(a, lo[r]), min(b, hi[r])). Then the online-softmax update of (m, l, acc).
  // `keep` (row stride keep_stride, key o at keep_off + o): where the local logits are kept
  // for the score pass.
  void attend_block(const float* q, int64_t R, int64_t a, int64_t b, const int64_t* lo, const int64_t* hi,
                    float* m, float* l, float* acc, float* keep, int64_t keep_stride, int64_t keep_off) {
    const int64_t D = g.D;
    float* s = sbuf.data();
#if INFLLM_SIMD_WIDTH
    if (D == 64 || D == 128 || D == 256) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t ka = std::max(a, lo[r]), kb = std::min(b, hi[r]);
        if (ka >= kb) continue;
        float* kp = keep == nullptr ? nullptr : keep + r * keep_stride + keep_off;
        auto run = r == 0 ? (D == 64 ? &row_block<64, true> : D == 128 ? &row_block<128, true> : &row_block<256, true>)
                          : (D == 64 ? &row_block<64, false> : D == 128 ? &row_block<128, false> : &row_block<256, false>);
        run(q + r * D, k, k_stride, v, v_stride, ka, kb, g.scale, g.softcap_on, g.softcap, s, m[r], l[r],
            acc + r * D, kp);
      }
      return;
    }
#endif
    for (int64_t r = 0; r < R; ++r) {
      const int64_t ka = std::max(a, lo[r]), kb = std::min(b, hi[r]);
      if (ka >= kb) continue;
      const float* qr = q + r * D;
      if (r == 0) {  // the first pass over the block reads it from memory: fetch rows ahead
        for (int64_t o = ka; o < kb; ++o) {
          prefetch_row(k + (o + kPrefetchRows) * k_stride, D);
          prefetch_row(v + (o + kPrefetchRows) * v_stride, D);
          s[o] = dot(qr, k + o * k_stride, D) * g.scale;
        }
      } else {
        for (int64_t o = ka; o < kb; ++o) s[o] = dot(qr, k + o * k_stride, D) * g.scale;
      }
      if (g.softcap_on) {  // cap * tanh(s / cap), tanh(x) = 1 - 2 / (e^2x + 1)
        const float inv = 2.f / g.softcap, cap = g.softcap;
#pragma omp simd
        for (int64_t o = ka; o < kb; ++o) {
          const float x = s[o] * inv;  // e^2x from e^-|2x|: exp_neg's domain
          const float e = exp_neg(-std::fabs(x));
          const float t = (1.f - e) / (1.f + e);
          s[o] = cap * (x < 0.f ? -t : t);
        }
      }
      float mx = kNegInf;
#pragma omp simd reduction(max : mx)
      for (int64_t o = ka; o < kb; ++o) mx = std::max(mx, s[o]);
      if (keep != nullptr) std::memcpy(keep + r * keep_stride + keep_off + ka, s + ka, (kb - ka) * sizeof(float));
      float* accr = acc + r * D;
      if (mx > m[r]) {
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - mx);
        l[r] *= alpha;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) accr[d] *= alpha;
        m[r] = mx;
      }
      const float mr = m[r];
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t o = ka; o < kb; ++o) {
        s[o] = exp_neg(s[o] - mr);
        sum += s[o];
      }
      for (int64_t o = ka; o < kb; ++o) axpy(s[o], v + o * v_stride, accr, D);
      l[r] += sum;
    }
  }
};

template <typename T>
void attend_impl(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                 const torch::Tensor& req_t, const torch::Tensor& c0_t, const torch::Tensor& len_t,
                 const torch::Tensor& q0_t, const torch::Tensor& ncand_t, const torch::Tensor& selected,
                 const torch::Tensor& cos_t, const torch::Tensor& sin_t, torch::Tensor& scores,
                 torch::Tensor& out, const torch::Tensor& sinks, const Geometry& geo, int64_t query_tile,
                 int64_t num_threads, const StoreSlabs<T>& store) {
  const int64_t n = req_t.size(0);
  const int32_t* req = req_t.data_ptr<int32_t>();
  const int32_t* c0 = c0_t.data_ptr<int32_t>();
  const int32_t* len = len_t.data_ptr<int32_t>();
  const int32_t* q0 = q0_t.data_ptr<int32_t>();
  const int32_t* ncand = ncand_t.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t s_bt = block_table.stride(0);
  const int64_t max_blocks = block_table.size(1);
  const bool has_sel = geo.topk > 0 && selected.defined() && selected.numel() > 0;
  const int64_t* sel = has_sel ? selected.data_ptr<int64_t>() : nullptr;
  const int64_t s_sel = has_sel ? selected.stride(0) : 0;
  const int64_t s_selh = has_sel && selected.size(1) > 1 ? selected.stride(1) : 0;
  const T* q = query.data_ptr<T>();
  const int64_t s_qt = query.stride(0), s_qh = query.stride(1);
  T* o = out.data_ptr<T>();
  const int64_t s_ot = out.stride(0), s_oh = out.stride(1);
  const float* sink = geo.sinks_on ? sinks.data_ptr<float>() : nullptr;
  const int64_t D = geo.D, B = geo.B, G = geo.G, half = D / 2;

  // Work items in a fixed order: chunk, KV head, query tile. Each item keeps (scores_on) the
  // logits of its local keys, R rows x span, for the score pass after its softmax is final.
  std::vector<Item> items;
  int64_t mass_total = 0, keep_total = 0;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t kvh = 0; kvh < geo.Hkv; ++kvh) {
      for (int64_t t0 = 0; t0 < len[c]; t0 += query_tile) {
        Item it{c, kvh, t0, std::min<int64_t>(query_tile, len[c] - t0), 0, 0, 0};
#if INFLLM_SIMD_WIDTH
        if ((D == 64 || D == 128 || D == 256) && it.qn >= kTiledMinQueries)
          it.rp = G * ((it.qn + kW - 1) / kW * kW);
#endif
        if (geo.scores_on) {
          const int64_t p_first = c0[c] + t0, p_last = p_first + it.qn - 1;
          it.span = p_last - std::max<int64_t>(0, p_first - geo.n_local + 1) + 1;
          it.mass_off = mass_total;
          mass_total += G * it.span;
        }
        items.push_back(it);
      }
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  // Few items (a decode of few requests) leave threads idle: split each item's key blocks
  // among `splits` units (every splits-th block), whose partial softmaxes are merged.
  const int64_t threads = std::max<int64_t>(1, num_threads);
  const int64_t splits = n_items >= 2 * threads ? 1 : std::min<int64_t>(kMaxSplits, (2 * threads + n_items - 1) / n_items);
  // Where the local logits wait for the final softmax. A tiled item that is not split finishes
  // its softmax in one unit: it keeps them in its thread's buffer (L2-sized: Rp x span) and
  // adds its mass right there. Every other item keeps them here until phase 2 (its rows write
  // only the keys they see, hence the -inf fill).
  const bool mass_in_unit = splits == 1;
  std::vector<int64_t> keep_off(n_items, -1);
  for (int64_t ii = 0; ii < n_items && geo.scores_on; ++ii) {
    if (items[ii].rp && mass_in_unit) continue;
    keep_off[ii] = keep_total;
    const Item& it = items[ii];
    const int64_t w_first = std::max<int64_t>(0, c0[it.chunk] + it.t0 - geo.n_local + 1);
    keep_total += it.rp ? tiled_keep_size(it.rp, it.span, w_first, B) : G * it.qn * it.span;
  }
  std::vector<float> mass(mass_total, 0.f), keep(keep_total, kNegInf);
  const int64_t R_max = G * query_tile;
  std::vector<float> part_m(n_items * splits * R_max), part_l(n_items * splits * R_max);
  std::vector<float> part_acc(n_items * splits * R_max * D);

  const T* kv = kv_cache.data_ptr<T>();
  const float* cosp = cos_t.data_ptr<float>();
  const float* sinp = sin_t.data_ptr<float>();

  // Phase 1: every (item, split) unit runs its share of the item's key blocks.
#pragma omp parallel num_threads(threads)
  {
    ItemRunner<T> run(geo, kv, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), cosp, sinp,
                      cos_t.stride(0), sin_t.stride(0));
    std::vector<float> ql(R_max * D), qg(R_max * D), qr(R_max * D);
    std::vector<int64_t> lo(R_max), hi(R_max), w(R_max), pos(R_max);
    std::vector<BlockTask> tasks;
#if INFLLM_SIMD_WIDTH  // the tiled kernel's transposed rows (row rt = gg * qn_pad + i, pads zero)
    const int64_t Rp_max = G * ((query_tile + kW - 1) / kW * kW);
    std::vector<float> qlT(D * Rp_max), qgT(D * Rp_max), qrT(D * Rp_max), accT(D * Rp_max);
    std::vector<float> mT(Rp_max), lT(Rp_max), alphaT(Rp_max), loT(Rp_max), hiT(Rp_max), scratch(3 * Rp_max);
    std::vector<float> keep_unit;  // a tiled, unsplit item's kept probabilities (every entry written)
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < n_items * splits; ++unit) {
      const Item& it = items[unit / splits];
      const int64_t split = unit % splits;
      const int64_t c = it.chunk, kvh = it.kvh, R = G * it.qn;
      const int32_t* bt_row = bt + static_cast<int64_t>(req[c]) * s_bt;
      float* m = part_m.data() + unit * R_max;
      float* l = part_l.data() + unit * R_max;
      float* acc = part_acc.data() + unit * R_max * D;
      std::fill(m, m + R, kNegInf);
      std::fill(l, l + R, 0.f);
      std::fill(acc, acc + R * D, 0.f);
      // Rows: r = i * G + gg, query t0 + i, head kvh * G + gg.
      for (int64_t i = 0; i < it.qn; ++i) {
        const int64_t p = c0[c] + it.t0 + i;
        const int64_t row = q0[c] + it.t0 + i;
        for (int64_t gg = 0; gg < G; ++gg) {
          const int64_t r = i * G + gg, h = kvh * G + gg;
          pos[r] = p;
          w[r] = std::max<int64_t>(0, p - geo.n_local + 1);
          load_row(q + row * s_qt + h * s_qh, ql.data() + r * D, D);
          if (geo.ordered) {
            std::copy(ql.begin() + r * D, ql.begin() + (r + 1) * D, qg.begin() + r * D);
          } else {  // R(n_local-1-p) q: rows with p < n_local have no global keys (angle 0)
            const int64_t a = p >= geo.n_local ? p - (geo.n_local - 1) : 0;
            rotate(ql.data() + r * D, qg.data() + r * D, cosp + a * cos_t.stride(0), sinp + a * sin_t.stride(0),
                   -1.f, half);
          }
          if (geo.sinks_on && split == 0) {  // the sink starts the row's softmax (once per row)
            m[r] = sink[h];
            l[r] = 1.f;
          }
        }
      }
      const int64_t Rp = it.rp, qn_pad = Rp / G;
#if INFLLM_SIMD_WIDTH
      if (Rp) {  // transpose the rows (pre-scaled) and their softmax state
        std::fill(qlT.begin(), qlT.begin() + D * Rp, 0.f);
        std::fill(qgT.begin(), qgT.begin() + D * Rp, 0.f);
        std::fill(accT.begin(), accT.begin() + D * Rp, 0.f);
        std::fill(mT.begin(), mT.begin() + Rp, kNegInf);
        std::fill(lT.begin(), lT.begin() + Rp, 0.f);
        for (int64_t i = 0; i < it.qn; ++i) {
          for (int64_t gg = 0; gg < G; ++gg) {
            const int64_t r = i * G + gg, rt = gg * qn_pad + i;
            for (int64_t d = 0; d < D; ++d) {
              qlT[d * Rp + rt] = ql[r * D + d] * geo.scale;
              qgT[d * Rp + rt] = qg[r * D + d] * geo.scale;
            }
            mT[rt] = m[r];
            lT[rt] = l[r];
          }
        }
      }
#endif
      const int64_t p_first = c0[c] + it.t0, p_last = p_first + it.qn - 1;
      const int64_t w_first = std::max<int64_t>(0, p_first - geo.n_local + 1);
      const int64_t w_last = std::max<int64_t>(0, p_last - geo.n_local + 1);
      const int64_t cand = ncand[c];
      const int64_t nsel = std::min<int64_t>(cand, geo.topk);
      const int64_t gap = (cand - nsel) * B;  // ordered: how far the init blocks move forward

      // The item's key blocks, in order: local window [w(p), p] (keys and queries as stored);
      // init [0, min(n_init, w(p))), moved forward by `gap` when ordered; the selected units
      // (ascending ids, then -1), the unit of rank k by gap + (k - u) * B; the remainder
      // [n_init + K*B, w(p)), left the window but not yet a candidate (true distances).
      tasks.clear();
      for (int64_t blk = w_first / B; blk <= p_last / B; ++blk)
        tasks.push_back({blk, std::max<int64_t>(w_first - blk * B, 0), std::min<int64_t>(p_last + 1 - blk * B, B),
                         kLocal, 0});
      const int64_t init_end = std::min(geo.n_init, w_last);
      for (int64_t blk = 0; blk * B < init_end; ++blk)
        tasks.push_back({blk, 0, std::min<int64_t>(B, init_end - blk * B), kBeforeWindow, gap});
      if (has_sel) {
        const int64_t* srow = sel + c * s_sel + kvh * s_selh;
        for (int64_t k = 0; k < nsel; ++k)
          if (srow[k] >= 0) tasks.push_back({geo.n_init / B + srow[k], 0, B, kUnit, gap + (k - srow[k]) * B});
      }
      for (int64_t j = geo.n_init + cand * B; j < w_last; j = (j / B + 1) * B)
        tasks.push_back({j / B, j % B, std::min<int64_t>(B, w_last - j / B * B), kBeforeWindow, 0});

      const int64_t ko = keep_off[unit / splits];
      float* kp = ko >= 0 ? keep.data() + ko : nullptr;
#if INFLLM_SIMD_WIDTH
      if (geo.scores_on && Rp && mass_in_unit) {
        const int64_t w0 = std::max<int64_t>(0, c0[c] + it.t0 - geo.n_local + 1);
        const size_t need = tiled_keep_size(Rp, it.span, w0, B);
        if (keep_unit.size() < need) keep_unit.resize(need);
        kp = keep_unit.data();
      }
#endif
      for (size_t t = split; t < tasks.size(); t += splits) {
        const BlockTask& bt_ = tasks[t];
        const int64_t j0 = bt_.blk * B;
        const int64_t phys = bt_row[std::min(bt_.blk, max_blocks - 1)];
        // An offloaded unit (only selected units leave the pool) is read from the store.
        const int32_t slot = bt_.kind == kUnit ? store.slot(req[c], bt_.blk) : -1;
        const auto load = [&](bool rotate_keys) {
          if (slot >= 0)
            run.load_at(store.unit(slot), store.s_1, store.s_2, kvh, bt_.a, bt_.b, j0, rotate_keys);
          else
            run.load_block(phys, kvh, bt_.a, bt_.b, j0, rotate_keys);
        };
        for (int64_t r = 0; r < R; ++r) {  // the keys row r sees, as offsets in the block
          lo[r] = bt_.kind == kLocal ? w[r] - j0 : 0;
          hi[r] = bt_.kind == kLocal ? pos[r] + 1 - j0 : bt_.kind == kUnit ? B : w[r] - j0;
        }
        const bool keeps = bt_.kind == kLocal && kp != nullptr;
#if INFLLM_SIMD_WIDTH
        if (Rp) {
          // Key ranges as floats (exact: clamped to the block) in the transposed row order;
          // padding rows see no key.
          bool masked = false;
          std::fill(loT.begin(), loT.begin() + Rp, 0.f);
          std::fill(hiT.begin(), hiT.begin() + Rp, 0.f);
          for (int64_t i = 0; i < it.qn; ++i)
            for (int64_t gg = 0; gg < G; ++gg) {
              const int64_t r = i * G + gg, rt = gg * qn_pad + i;
              loT[rt] = static_cast<float>(std::clamp<int64_t>(lo[r], 0, B));
              hiT[rt] = static_cast<float>(std::clamp<int64_t>(hi[r], 0, B));
            }
          for (int64_t rt = 0; rt < Rp; ++rt) masked |= loT[rt] > bt_.a || hiT[rt] < bt_.b;
          const float* qq = bt_.kind == kLocal ? qlT.data() : qgT.data();
          if (bt_.kind != kLocal && geo.ordered && bt_.shift != 0) {
            rotate_cols(qlT.data(), qrT.data(), cosp + bt_.shift * cos_t.stride(0), sinp + bt_.shift * sin_t.stride(0),
                        -1.f, half, Rp);
            qq = qrT.data();
          }
          load(bt_.kind != kLocal && !geo.ordered);
          run.attend_block_tiled(qq, Rp, bt_.a, bt_.b, loT.data(), hiT.data(), masked, mT.data(), lT.data(),
                                 alphaT.data(), accT.data(), keeps ? kp + (j0 + bt_.a - w_first) * Rp : nullptr,
                                 keeps ? kp + (it.span + bt_.blk - w_first / B) * Rp : nullptr);
          continue;
        }
#endif
        const float* qq = bt_.kind == kLocal ? ql.data() : qg.data();
        if (bt_.kind != kLocal && geo.ordered && bt_.shift != 0) {  // <q, R(shift) k> = <R(-shift) q, k>
          for (int64_t r = 0; r < R; ++r)
            rotate(ql.data() + r * D, qr.data() + r * D, cosp + bt_.shift * cos_t.stride(0),
                   sinp + bt_.shift * sin_t.stride(0), -1.f, half);
          qq = qr.data();
        }
        load(bt_.kind != kLocal && !geo.ordered);
        run.attend_block(qq, R, bt_.a, bt_.b, lo.data(), hi.data(), m, l, acc, keeps ? kp : nullptr, it.span,
                         j0 - w_first);
      }
#if INFLLM_SIMD_WIDTH
      if (Rp) {  // back to the row layout the merge and the output read
        for (int64_t i = 0; i < it.qn; ++i)
          for (int64_t gg = 0; gg < G; ++gg) {
            const int64_t r = i * G + gg, rt = gg * qn_pad + i;
            m[r] = mT[rt];
            l[r] = lT[rt];
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] = accT[d * Rp + rt];
          }
        if (geo.scores_on && mass_in_unit)  // the softmax is final: the mass now, from L2
          tiled_mass(kp, Rp, G, it.qn, it.span, w_first, B, m, l, scratch.data(), scratch.data() + Rp,
                     mass.data() + it.mass_off);
      }
#endif
    }
  }

  // Phase 2, per item: merge its splits (log-sum-exp), write the output, and turn the kept
  // local logits into each local key's softmax mass summed over the item's queries.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t ii = 0; ii < n_items; ++ii) {
    const Item& it = items[ii];
    const int64_t R = G * it.qn;
    float* m = part_m.data() + ii * splits * R_max;
    float* l = part_l.data() + ii * splits * R_max;
    float* acc = part_acc.data() + ii * splits * R_max * D;
    for (int64_t sp = 1; sp < splits; ++sp) {  // into split 0's slots
      const float* ms = m + sp * R_max;
      const float* ls = l + sp * R_max;
      const float* as = acc + sp * R_max * D;
      for (int64_t r = 0; r < R; ++r) {
        if (ms[r] == kNegInf) continue;  // this split saw no key of the row
        const float mx = std::max(m[r], ms[r]);
        const float f0 = m[r] == kNegInf ? 0.f : std::exp(m[r] - mx), f1 = std::exp(ms[r] - mx);
        l[r] = l[r] * f0 + ls[r] * f1;
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] = acc[r * D + d] * f0 + as[r * D + d] * f1;
        m[r] = mx;
      }
    }
    for (int64_t i = 0; i < it.qn; ++i) {
      const int64_t row = q0[it.chunk] + it.t0 + i;
      for (int64_t gg = 0; gg < G; ++gg) {
        const int64_t r = i * G + gg;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        T* dst = o + row * s_ot + (it.kvh * G + gg) * s_oh;
        const float* src = acc + r * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * inv);
      }
    }
    if (geo.scores_on && it.rp) {
#if INFLLM_SIMD_WIDTH
      if (!mass_in_unit) {  // a tiled item that was split: its splits are merged now
        std::vector<float> scratch(3 * it.rp);
        const int64_t w_first = std::max<int64_t>(0, c0[it.chunk] + it.t0 - geo.n_local + 1);
        tiled_mass(keep.data() + keep_off[ii], it.rp, G, it.qn, it.span, w_first, B, m, l, scratch.data(),
                   scratch.data() + it.rp,
                   mass.data() + it.mass_off);
      }
#endif
    } else if (geo.scores_on) {
      float* ms = mass.data() + it.mass_off;
      for (int64_t r = 0; r < R; ++r) {
        const float mr = m[r], inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const float* kr = keep.data() + keep_off[ii] + r * it.span;
        float* dst = ms + (r % G) * it.span;
        int64_t x = 0;
#if INFLLM_SIMD_WIDTH
        // masked logits (-inf) become e^-87 * inv, about 1e-38: below anything the scores hold
        const vfloat mv = vset1(mr), iv = vset1(inv);
        for (; x + kW <= it.span; x += kW)
          vstore(dst + x, vfma(vexp_neg(vsub(vload(kr + x), mv)), iv, vload(dst + x)));
#endif
        for (; x < it.span; ++x)  // masked logits (-inf) add exactly 0
          dst[x] += kr[x] == kNegInf ? 0.f : exp_neg(kr[x] - mr) * inv;
      }
    }
  }

  if (!geo.scores_on) return;
  // Add the masses in item order; KV heads write disjoint head rows, so they run in parallel.
  float* sc = scores.data_ptr<float>();
  const int64_t s_sb = scores.stride(0), s_sh = scores.stride(1), s_so = scores.stride(2);
#pragma omp parallel for num_threads(std::min(threads, geo.Hkv)) schedule(static, 1)
  for (int64_t kvh = 0; kvh < geo.Hkv; ++kvh) {
    for (const Item& it : items) {
      if (it.kvh != kvh) continue;
      const int32_t* bt_row = bt + static_cast<int64_t>(req[it.chunk]) * s_bt;
      const int64_t p_first = c0[it.chunk] + it.t0;
      const int64_t w_first = std::max<int64_t>(0, p_first - geo.n_local + 1);
      const int64_t j_end = w_first + it.span;
      for (int64_t gg = 0; gg < G; ++gg) {
        const float* src = mass.data() + it.mass_off + gg * it.span;  // key j at src[j - w_first]
        const int64_t h = it.kvh * G + gg;
        for (int64_t j0 = w_first - w_first % B; j0 < j_end; j0 += B) {  // block by block
          float* dst = sc + static_cast<int64_t>(bt_row[j0 / B]) * s_sb + h * s_sh - j0 * s_so;
          const int64_t ja = std::max(j0, w_first), jb = std::min(j0 + B, j_end);
          if (s_so == 1) {
#pragma omp simd
            for (int64_t j = ja; j < jb; ++j) dst[j] += src[j - w_first];
          } else {
            for (int64_t j = ja; j < jb; ++j) dst[j * s_so] += src[j - w_first];
          }
        }
      }
    }
  }
}

}  // namespace

void attend(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
            const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length, const torch::Tensor& q0,
            const torch::Tensor& num_cand, const c10::optional<torch::Tensor>& selected, const torch::Tensor& cos,
            const torch::Tensor& sin, torch::Tensor scores, torch::Tensor out,
            const c10::optional<torch::Tensor>& sinks, int64_t block_size, int64_t n_init, int64_t n_local,
            int64_t topk, bool ordered, bool scores_on, double scale, double softcap, int64_t query_tile,
            int64_t num_threads, const c10::optional<torch::Tensor>& store_slots,
            const std::vector<torch::Tensor>& store_kv, int64_t store_slab_units) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && out.dim() == 3, "infllm native attend: bad ranks");
  const int64_t D = query.size(2);
  TORCH_CHECK(D % 2 == 0 && D <= 512 && kv_cache.size(3) == 2 * D && kv_cache.size(2) == block_size,
              "infllm native attend: kv_cache must be [blocks, Hkv, block_size, 2*D] with even D <= 512");
  TORCH_CHECK(query.stride(2) == 1 && kv_cache.stride(3) == 1 && out.stride(2) == 1,
              "infllm native attend: the head dim must be contiguous");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == kv_cache.scalar_type(),
              "infllm native attend: query, cache and out must share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.stride(1) == 1 &&
                  sin.stride(1) == 1 && cos.size(1) == D / 2,
              "infllm native attend: cos/sin must be fp32 [rows, D/2] with contiguous rows");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1,
              "infllm native attend: block_table must be int32 with contiguous rows");
  for (const auto* t : {&req, &c0, &length, &q0, &num_cand})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "infllm native attend: chunk fields int32");
  TORCH_CHECK(!scores_on || scores.scalar_type() == at::kFloat, "infllm native attend: scores must be fp32");
  Geometry geo;
  geo.D = D;
  geo.B = block_size;
  geo.Hq = query.size(1);
  geo.Hkv = kv_cache.size(1);
  TORCH_CHECK(geo.Hq % geo.Hkv == 0, "infllm native attend: Hq must be a multiple of Hkv");
  geo.G = geo.Hq / geo.Hkv;
  geo.n_init = n_init;
  geo.n_local = n_local;
  geo.topk = topk;
  geo.ordered = ordered;
  geo.scores_on = scores_on;
  geo.softcap_on = softcap != 0.0;
  geo.softcap = static_cast<float>(softcap);
  geo.scale = static_cast<float>(scale);
  torch::Tensor sel, snk;
  if (selected.has_value() && topk > 0) {
    sel = selected.value();
    TORCH_CHECK(sel.scalar_type() == at::kLong && sel.stride(2) == 1 && (sel.size(1) == 1 || sel.size(1) == geo.Hkv),
                "infllm native attend: selected must be int64 [n, 1 | Hkv, topk]");
  }
  geo.sinks_on = sinks.has_value();
  if (geo.sinks_on) {
    snk = sinks.value();
    TORCH_CHECK(snk.scalar_type() == at::kFloat && snk.is_contiguous() && snk.numel() == geo.Hq,
                "infllm native attend: sinks must be fp32 [Hq]");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "infllm_attend", [&] {
    const StoreSlabs<scalar_t> store(store_slots, store_kv, store_slab_units, block_table, kv_cache,
                                     "infllm native attend");
    attend_impl<scalar_t>(query, kv_cache, block_table, req, c0, length, q0, num_cand, sel, cos, sin, scores, out,
                          snk, geo, query_tile, num_threads, store);
  });
}

}  // namespace infllm
