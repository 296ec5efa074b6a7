// Sealing and selection for one wave of selection chunks (CPU): the native counterparts of
// `seal_units` and `select_units` in vllm_infllm/core/ops/torch_ops.py (the reference they are
// tested against). Semantics: docs/design.md sections 2.3, 2.4 and 2.7.
//
// seal_units: every not-yet-sealed unit among the last `chunk / B + 2` candidates of each chunk
//   gets its representative rows: per query head, the mean raw key of its repr_topk tokens with
//   the largest fp32 scores (unit_score="mean_topk"), those keys apart, most-attended first
//   ("max_topk"), or per KV head the per-channel min and max of the unit's raw keys ("minmax").
//   Raw = un-rotated by R(-j) with the model's table. Units are gathered first (two chunks may
//   share a prefix-cached block) and sealed once each, in parallel.
// select_units: q̄ = the mean over the chunk's selecting queries of R(n_local-1-p) q(p) (one
//   query with chunking="aligned", the last select_queries with "step" and m > 0, else all);
//   each candidate scored against the representatives, per selection group (the layer, or each
//   KV head); the topk best (contiguity c > 0: ranked by the best score within c units, then own
//   score, then position), returned ascending, then -1.
// select_units_exact: the same with the exact score (unit_score="exact", retrieval_layer): per
//   query head, the best <q̄_h, k_raw> over every raw key of the unit (h's KV head), summed
//   over the group's heads. No representatives: the unit's keys are read where they lie, in the
//   pool or the store, each un-rotated once for the G query heads that share it.
// select_units with unit_score="sketch": the exact score of the 4-bit sketches sealing stored
//   (torch_ops.sketch_unit_scores): per KV head, rows 2g/2g+1 of the unit's representatives are
//   the box lo/hi, and the bytes after the box rows are the codes [Hkv, B, D/2] (low nibble:
//   channel i, high nibble: channel i + D/2). <q, lo + c * step> = <q, lo> + <q * step, c>: per
//   head one constant and one scaled query, then each key's codes are unpacked once for the G
//   heads that share them.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "simd.h"
#include "store.h"

namespace infllm {
namespace {

enum UnitScore : int64_t { kMeanTopk = 0, kMinmax = 1, kMaxTopk = 2, kExact = 3, kSketch = 4 };

template <typename T>
void seal_impl(const torch::Tensor& kv_cache, torch::Tensor& reprs, const torch::Tensor& scores,
               torch::Tensor& sealed, const torch::Tensor& block_table, const torch::Tensor& req_t,
               const torch::Tensor& ncand_t, const torch::Tensor& cos_t, const torch::Tensor& sin_t, int64_t B,
               int64_t n_init, int64_t chunk, int64_t repr_topk, int64_t unit_score, int64_t num_threads) {
  const int64_t n = req_t.size(0), Hkv = kv_cache.size(1), D = kv_cache.size(3) / 2, half = D / 2;
  const int64_t Hq = scores.size(1), G = Hq / Hkv, init_blocks = n_init / B;
  const int32_t* req = req_t.data_ptr<int32_t>();
  const int32_t* ncand = ncand_t.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t s_bt = block_table.stride(0);
  bool* seal = sealed.data_ptr<bool>();
  const int64_t s_seal = sealed.stride(0);
  // Units to seal: (physical block, unit index), each block once.
  std::vector<std::pair<int64_t, int64_t>> todo;
  const int64_t window = chunk / B + 2;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t u = std::max<int64_t>(0, ncand[c] - window); u < ncand[c]; ++u) {
      const int64_t phys = bt[req[c] * s_bt + init_blocks + u];
      if (seal[phys * s_seal]) continue;
      bool seen = false;
      for (const auto& x : todo) seen |= x.first == phys;
      if (!seen) todo.emplace_back(phys, u);
    }
  }
  if (todo.empty()) return;
  const T* kv = kv_cache.data_ptr<T>();
  const int64_t s_cb = kv_cache.stride(0), s_ch = kv_cache.stride(1), s_co = kv_cache.stride(2);
  const float* sc = scores.data_ptr<float>();
  const int64_t s_sb = scores.stride(0), s_sh = scores.stride(1), s_so = scores.stride(2);
  T* rp = reprs.data_ptr<T>();
  const int64_t s_rb = reprs.stride(0), s_rr = reprs.stride(1);
  const float* cosp = cos_t.data_ptr<float>();
  const float* sinp = sin_t.data_ptr<float>();
  const int64_t s_cos = cos_t.stride(0), s_sin = sin_t.stride(0);

#pragma omp parallel for num_threads(std::max<int64_t>(1, num_threads)) schedule(dynamic, 1)
  for (int64_t t = 0; t < static_cast<int64_t>(todo.size()); ++t) {
    const int64_t phys = todo[t].first, u = todo[t].second;
    const int64_t j0 = n_init + u * B;  // position of the unit's first token
    std::vector<float> key(D), out(D);
    auto raw_key = [&](int64_t kvh, int64_t o) {  // un-rotated K of offset o
      const T* row = kv + phys * s_cb + kvh * s_ch + o * s_co;
      for (int64_t d = 0; d < D; ++d) key[d] = static_cast<float>(row[d]);
      rotate(key.data(), key.data(), cosp + (j0 + o) * s_cos, sinp + (j0 + o) * s_sin, -1.f, half);
    };
    if (unit_score == kMinmax) {
      std::vector<float> lo(D), hi(D);
      for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
        std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
        std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
        for (int64_t o = 0; o < B; ++o) {
          raw_key(kvh, o);
          for (int64_t d = 0; d < D; ++d) {  // a NaN key makes the box NaN (as torch's amin/amax)
            const float x = key[d];
            if (!std::isnan(lo[d]) && (std::isnan(x) || x < lo[d])) lo[d] = x;
            if (!std::isnan(hi[d]) && (std::isnan(x) || x > hi[d])) hi[d] = x;
          }
        }
        T* r0 = rp + phys * s_rb + (2 * kvh) * s_rr;
        T* r1 = rp + phys * s_rb + (2 * kvh + 1) * s_rr;
        for (int64_t d = 0; d < D; ++d) {
          r0[d] = static_cast<T>(lo[d]);
          r1[d] = static_cast<T>(hi[d]);
        }
      }
    } else {
      std::vector<int64_t> order(B);
      for (int64_t h = 0; h < Hq; ++h) {
        const float* s = sc + phys * s_sb + h * s_sh;
        std::iota(order.begin(), order.end(), 0);
        // the repr_topk most-attended tokens, most-attended first (ties: earlier offset); a NaN
        // score ranks first, as in torch.topk, so a broken key shows in the representatives
        std::partial_sort(order.begin(), order.begin() + repr_topk, order.end(), [&](int64_t a, int64_t b) {
          const float x = s[a * s_so], y = s[b * s_so];
          if (std::isnan(x) != std::isnan(y)) return std::isnan(x);
          return x > y || ((x == y || std::isnan(x)) && a < b);
        });
        std::fill(out.begin(), out.end(), 0.f);
        for (int64_t i = 0; i < repr_topk; ++i) {
          raw_key(h / G, order[i]);
          if (unit_score == kMaxTopk) {
            T* r = rp + phys * s_rb + (h * repr_topk + i) * s_rr;
            for (int64_t d = 0; d < D; ++d) r[d] = static_cast<T>(key[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) out[d] += key[d];
          }
        }
        if (unit_score == kMeanTopk) {
          T* r = rp + phys * s_rb + h * s_rr;
          for (int64_t d = 0; d < D; ++d) r[d] = static_cast<T>(out[d] / static_cast<float>(repr_topk));
        }
      }
    }
    seal[phys * s_seal] = true;
  }
}

// Candidates ahead whose representatives are prefetched.
constexpr int64_t kPrefetchAhead = 2;

// dots[t] = <q, rows[t]> for the m rows of D floats at `rows` (row t at rows + t * D): a full
// tile of kW rows at once (one shuffle tree, not kW reductions), otherwise row by row.
inline void tile_dots(const float* q, const float* rows, int64_t m, int64_t D, float* dots) {
#if INFLLM_SIMD_WIDTH
  if (m == kW && D % kW == 0) {
    vfloat acc[kW];
    for (int t = 0; t < kW; ++t) {
      const float* r = rows + t * D;
      vfloat a = vmul(vload(q), vload(r));
      for (int64_t d = kW; d < D; d += kW) a = vfma(vload(q + d), vload(r + d), a);
      acc[t] = a;
    }
    vstore(dots, vsum_each(acc));
    return;
  }
#endif
  for (int64_t t = 0; t < m; ++t) dots[t] = dot(q, rows + t * D, D);
}

// A running max in which a NaN sticks (as torch's amax): a broken key ranks its unit first.
inline void keep_max(float& best, float v) {
  if (!std::isnan(best) && (std::isnan(v) || v > best)) best = v;
}

// unit_score="sketch", one KV head of one unit: best[i] = max over the B keys of <qs_i, c_k>,
// c_k the key's D codes as floats. The caller adds <q_i, lo> after the max: max(x) + k rounds as
// max(x + k) does, fl(x + k) being monotonic in x. `codes` holds B keys of D/2 bytes, byte d =
// channel d in its low nibble and channel d + D/2 in its high one; `raw` and `lanes` are scratch
// for max(kW, 1) * D and max(kW, 1) * G floats. (benchmarks/RESULTS.md 2n: the same maxima as a
// plain unpack loop and key-by-key dots, in a third of the time over cached codes, 1.5x less in
// a decode step at 32K, where the codes come from memory.)
inline void sketch_best(const uint8_t* codes, const float* qs, int64_t B, int64_t D, int64_t G, float* raw,
                        float* lanes, float* best) {
  const int64_t half = D / 2;
  // Key t's codes as D floats at out (the nibbles are exact in fp32).
  const auto unpack = [&](int64_t t, float* out) {
    const uint8_t* p = codes + t * half;
    int64_t d = 0;
#if INFLLM_SIMD_WIDTH  // AVX2 or AVX-512 (which has AVX2's instructions)
    // 8 bytes at a time: zero-extended to 8 int32 lanes, then the low and high nibbles converted.
    const __m256i m15 = _mm256_set1_epi32(15);
    for (; d + 8 <= half; d += 8) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + d)));
      _mm256_storeu_ps(out + d, _mm256_cvtepi32_ps(_mm256_and_si256(b, m15)));
      _mm256_storeu_ps(out + d + half, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
    }
#endif
    for (; d < half; ++d) {
      out[d] = static_cast<float>(p[d] & 15);
      out[d + half] = static_cast<float>(p[d] >> 4);
    }
  };
  for (int64_t i = 0; i < G; ++i) best[i] = -std::numeric_limits<float>::infinity();
  int64_t o0 = 0;
#if INFLLM_SIMD_WIDTH
  if (D % kW == 0) {
    // Full tiles of kW keys: unpacked once for the G heads, then per head the kW dots with the
    // query chunk outermost (one load of q per chunk, kW accumulators), summed lane-wise by one
    // shuffle tree; the lanes keep their own running max (NaN sticky) until the end.
    for (int64_t i = 0; i < G; ++i) vstore(lanes + i * kW, vset1(-std::numeric_limits<float>::infinity()));
    for (; o0 + kW <= B; o0 += kW) {
      for (int t = 0; t < kW; ++t) unpack(o0 + t, raw + t * D);
      for (int64_t i = 0; i < G; ++i) {
        const float* q = qs + i * D;
        vfloat acc[kW];
        const vfloat q0 = vload(q);
        for (int t = 0; t < kW; ++t) acc[t] = vmul(q0, vload(raw + t * D));
        for (int64_t d = kW; d < D; d += kW) {
          const vfloat qd = vload(q + d);
          for (int t = 0; t < kW; ++t) acc[t] = vfma(qd, vload(raw + t * D + d), acc[t]);
        }
        vstore(lanes + i * kW, vmax_sticky(vload(lanes + i * kW), vsum_each(acc)));
      }
    }
    for (int64_t i = 0; i < G; ++i)
      for (int t = 0; t < kW; ++t) keep_max(best[i], lanes[i * kW + t]);
  }
#endif
  for (; o0 < B; ++o0) {  // the keys left (and every key without SIMD): one at a time
    unpack(o0, raw);
    for (int64_t i = 0; i < G; ++i) keep_max(best[i], dot(qs + i * D, raw, D));
  }
}

template <typename T, typename R>
void select_impl(const torch::Tensor& query, const torch::Tensor& reprs, const torch::Tensor& block_table,
                 const torch::Tensor& req_t, const torch::Tensor& c0_t, const torch::Tensor& len_t,
                 const torch::Tensor& q0_t, const torch::Tensor& ncand_t, const torch::Tensor& cos_t,
                 const torch::Tensor& sin_t, torch::Tensor& selected, int64_t Hkv, int64_t B, int64_t n_init,
                 int64_t n_local, int64_t topk, int64_t repr_topk, int64_t unit_score, int64_t groups,
                 int64_t contiguity, int64_t used_queries, bool aligned, int64_t num_threads,
                 const StoreSlabs<R>& store) {
  const int64_t n = req_t.size(0), Hq = query.size(1), D = query.size(2), half = D / 2;
  const int64_t G = Hq / Hkv, init_blocks = n_init / B, heads_per_group = Hq / groups;
  const int32_t* req = req_t.data_ptr<int32_t>();
  const int32_t* c0 = c0_t.data_ptr<int32_t>();
  const int32_t* len = len_t.data_ptr<int32_t>();
  const int32_t* q0 = q0_t.data_ptr<int32_t>();
  const int32_t* ncand = ncand_t.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t s_bt = block_table.stride(0);
  const T* q = query.data_ptr<T>();
  const int64_t s_qt = query.stride(0), s_qh = query.stride(1);
  const R* rp = reprs.data_ptr<R>();
  const int64_t s_rb = reprs.stride(0), s_rr_pool = reprs.stride(1);
  // Candidate u's representative rows (first row, row stride): in its pool block, or in the
  // store once the unit has left the pool.
  const auto unit_reprs = [&](int64_t c, int64_t u) -> std::pair<const R*, int64_t> {
    const int32_t slot = store.slot(req[c], init_blocks + u);
    if (slot >= 0) return {store.unit(slot), store.s_1};
    return {rp + static_cast<int64_t>(bt[req[c] * s_bt + init_blocks + u]) * s_rb, s_rr_pool};
  };
  // kExact: `reprs` is the layer's KV cache [blocks, Hkv, B, 2*D] and the store's slabs hold
  // K/V: candidate u's keys (first row, KV-head stride, offset stride).
  const int64_t s_ro_pool = unit_score == kExact ? reprs.stride(2) : 0;
  const auto unit_keys = [&](int64_t c, int64_t u) -> std::tuple<const R*, int64_t, int64_t> {
    const int32_t slot = store.slot(req[c], init_blocks + u);
    if (slot >= 0) return {store.unit(slot), store.s_1, store.s_2};
    return {rp + static_cast<int64_t>(bt[req[c] * s_bt + init_blocks + u]) * s_rb, s_rr_pool, s_ro_pool};
  };
  const float* cosp = cos_t.data_ptr<float>();
  const float* sinp = sin_t.data_ptr<float>();
  const int64_t s_cos = cos_t.stride(0), s_sin = sin_t.stride(0);
  int64_t* out = selected.data_ptr<int64_t>();  // [n, groups, topk], contiguous
  const float kInf = std::numeric_limits<float>::infinity();

  const int nt = static_cast<int>(std::max<int64_t>(1, num_threads));
  // Chunks with more candidates than topk score them: slots [off[c], off[c+1]) of `score`
  // (groups x K each); the others take all their candidates.
  std::vector<int64_t> off(n + 1, 0);
  for (int64_t c = 0; c < n; ++c) {
    int64_t* dst = out + c * groups * topk;
    std::fill(dst, dst + groups * topk, -1);
    const int64_t K = ncand[c];
    const bool scoring = K > topk && len[c] > 0;
    if (!scoring && len[c] > 0)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t u = 0; u < K; ++u) dst[g * topk + u] = u;
    off[c + 1] = off[c] + (scoring ? K : 0);
  }
  const int64_t total = off[n];
  if (total == 0) return;
  std::vector<int32_t> chunk_of(total);
  for (int64_t c = 0; c < n; ++c) std::fill(chunk_of.begin() + off[c], chunk_of.begin() + off[c + 1], c);

  // q̄ of each scoring chunk: the mean of R(n_local-1-p) q(p) over its selecting queries, fp32.
  std::vector<float> qbars(n * Hq * D, 0.f);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < n; ++c) {
    if (off[c + 1] == off[c]) continue;
    int64_t first = 0, used = len[c];
    if (aligned) {
      used = 1;
    } else if (used_queries > 0 && used_queries < used) {
      first = used - used_queries;
      used = used_queries;
    }
    float* qbar = qbars.data() + c * Hq * D;
    std::vector<float> row(D);
    for (int64_t i = first; i < first + used; ++i) {
      const int64_t p = c0[c] + i, a = p >= n_local ? p - (n_local - 1) : 0;
      for (int64_t h = 0; h < Hq; ++h) {
        const T* src = q + (q0[c] + i) * s_qt + h * s_qh;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
        rotate(row.data(), row.data(), cosp + a * s_cos, sinp + a * s_sin, -1.f, half);
        for (int64_t d = 0; d < D; ++d) qbar[h * D + d] += row[d];
      }
    }
    if (used > 1)
      for (int64_t x = 0; x < Hq * D; ++x) qbar[x] /= static_cast<float>(used);
  }

  // Every (chunk, candidate) scored in parallel: a decode of one request spreads its candidates
  // over the threads. score[groups * off[c] + g * K + u].
  std::vector<float> score(groups * total, 0.f);
  // A unit's representative rows as one span of bytes to prefetch (rows s_rr_pool apart; a
  // store's rows are packed, at most as far apart).
  const int64_t repr_rows = unit_score == kMinmax   ? 2 * Hkv
                           : unit_score == kMaxTopk ? Hq * repr_topk
                           : unit_score == kExact   ? 1  // no prefetch: B rows per head, read in order
                           : unit_score == kSketch  ? 1
                                                    : Hq;
  const int64_t repr_bytes = ((repr_rows - 1) * s_rr_pool + D) * static_cast<int64_t>(sizeof(R));
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> r(D), ones(D, 1.f), best(G);
#if INFLLM_SIMD_WIDTH
    const int64_t tile = kW;
#else
    const int64_t tile = 16;
#endif
    const bool keys = unit_score == kExact || unit_score == kSketch;
    std::vector<float> raw(keys ? tile * D : 0), dots(tile), qs(unit_score == kSketch ? G * D : 0), konst(G),
        lanes(unit_score == kSketch ? tile * G : 0), box_lo(unit_score == kSketch ? D : 0),
        box_step(unit_score == kSketch ? D : 0);
#pragma omp for schedule(static)
    for (int64_t x = 0; x < total; ++x) {
      const int64_t c = chunk_of[x], u = x - off[c], K = off[c + 1] - off[c];
      const float* qbar = qbars.data() + c * Hq * D;
      float* sc = score.data() + groups * off[c];
      if (unit_score == kSketch) {
        const auto [base, s_rr] = unit_reprs(c, u);
        const uint8_t* codes = reinterpret_cast<const uint8_t*>(base + 2 * Hkv * s_rr);
        for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
          const R* lo = base + (2 * kvh) * s_rr;
          const R* hi = base + (2 * kvh + 1) * s_rr;
          for (int64_t d = 0; d < D; ++d) {  // the box in fp32, and each channel's step
            box_lo[d] = static_cast<float>(lo[d]);
            box_step[d] = (static_cast<float>(hi[d]) - box_lo[d]) / 15.f;
          }
          for (int64_t i = 0; i < G; ++i) {  // head i of this KV head: <q, lo> and q * step
            const float* qh = qbar + (kvh * G + i) * D;
            for (int64_t d = 0; d < D; ++d) qs[i * D + d] = qh[d] * box_step[d];
            konst[i] = dot(qh, box_lo.data(), D);
          }
          sketch_best(codes + kvh * B * half, qs.data(), B, D, G, raw.data(), lanes.data(), best.data());
          for (int64_t i = 0; i < G; ++i) sc[((kvh * G + i) / heads_per_group) * K + u] += best[i] + konst[i];
        }
        continue;
      }
      if (unit_score == kExact) {
        const auto [keys, s_kh, s_ko] = unit_keys(c, u);
        const int64_t j0 = n_init + u * B;  // position of the unit's first token
        for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
          std::fill(best.begin(), best.end(), -kInf);
          // Keys `tile` at a time: each un-rotated once for the G query heads of its KV head
          // (raw = R(-j) k), then each head's dots with them.
          for (int64_t o0 = 0; o0 < B; o0 += tile) {
            const int64_t m = std::min(tile, B - o0);
            for (int64_t t = 0; t < m; ++t) {
              const R* k = keys + kvh * s_kh + (o0 + t) * s_ko;
              float* rt = raw.data() + t * D;
              for (int64_t d = 0; d < D; ++d) rt[d] = static_cast<float>(k[d]);
              rotate(rt, rt, cosp + (j0 + o0 + t) * s_cos, sinp + (j0 + o0 + t) * s_sin, -1.f, half);
            }
            for (int64_t i = 0; i < G; ++i) {
              const float* qh = qbar + (kvh * G + i) * D;
              tile_dots(qh, raw.data(), m, D, dots.data());
              for (int64_t t = 0; t < m; ++t) keep_max(best[i], dots[t]);  // a NaN dot ranks first
            }
          }
          for (int64_t i = 0; i < G; ++i) sc[((kvh * G + i) / heads_per_group) * K + u] += best[i];
        }
        continue;
      }
      const auto [base, s_rr] = unit_reprs(c, u);
      if (unit_score != kExact && unit_score != kSketch && x + kPrefetchAhead < total) {  // each candidate sits in its own KV page: fetch ahead
        const int64_t xn = x + kPrefetchAhead, cn = chunk_of[xn];
        const char* nb = reinterpret_cast<const char*>(unit_reprs(cn, xn - off[cn]).first);
        for (int64_t b = 0; b < repr_bytes; b += 64) __builtin_prefetch(nb + b, 0, 3);
      }
      for (int64_t h = 0; h < Hq; ++h) {
        const float* qh = qbar + h * D;
        float v;
        if (unit_score == kMinmax) {  // Quest: sum_d max(q lo, q hi) with h's KV head's box
          const R* lo = base + (2 * (h / G)) * s_rr;
          const R* hi = base + (2 * (h / G) + 1) * s_rr;
          for (int64_t d = 0; d < D; ++d)
            r[d] = std::max(qh[d] * static_cast<float>(lo[d]), qh[d] * static_cast<float>(hi[d]));
          v = dot(r.data(), ones.data(), D);
        } else if (unit_score == kMaxTopk) {  // h's best-matching key of the unit
          v = -kInf;
          for (int64_t i = 0; i < repr_topk; ++i) {
            const R* k = base + (h * repr_topk + i) * s_rr;
            for (int64_t d = 0; d < D; ++d) r[d] = static_cast<float>(k[d]);
            v = std::max(v, dot(qh, r.data(), D));
          }
        } else {
          const R* k = base + h * s_rr;
          if constexpr (std::is_same_v<R, float>) {
            v = dot(qh, k, D);
          } else {
            for (int64_t d = 0; d < D; ++d) r[d] = static_cast<float>(k[d]);
            v = dot(qh, r.data(), D);
          }
        }
        sc[(h / heads_per_group) * K + u] += v;
      }
    }
  }

  // Top-k per chunk and group: rank by (near, own score, position); NaN ranks first (as
  // torch.topk), so a broken unit is attended and shows.
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < n; ++c) {
    const int64_t K = off[c + 1] - off[c];
    if (K == 0) continue;
    int64_t* dst = out + c * groups * topk;
    std::vector<int64_t> order(K);
    std::vector<float> near(K);
    for (int64_t g = 0; g < groups; ++g) {
      float* s = score.data() + groups * off[c] + g * K;
      for (int64_t u = 0; u < K; ++u)
        if (std::isnan(s[u])) s[u] = kInf;
      for (int64_t u = 0; u < K; ++u) {
        float best = s[u];
        for (int64_t x = std::max<int64_t>(0, u - contiguity); x <= std::min<int64_t>(K - 1, u + contiguity); ++x)
          best = std::max(best, s[x]);
        near[u] = best;
      }
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + topk, order.end(), [&](int64_t a, int64_t b) {
        if (near[a] != near[b]) return near[a] > near[b];
        if (s[a] != s[b]) return s[a] > s[b];
        return a < b;
      });
      std::sort(order.begin(), order.begin() + topk);
      std::copy(order.begin(), order.begin() + topk, dst + g * topk);
    }
  }
}

}  // namespace

void seal_units(const torch::Tensor& kv_cache, torch::Tensor reprs, const torch::Tensor& scores, torch::Tensor sealed,
                const torch::Tensor& block_table, const torch::Tensor& req, const torch::Tensor& num_cand,
                const torch::Tensor& cos, const torch::Tensor& sin, int64_t block_size, int64_t n_init, int64_t chunk,
                int64_t repr_topk, int64_t unit_score, int64_t num_threads) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.stride(3) == 1 && reprs.stride(2) == 1,
              "infllm native seal: kv_cache [blocks, Hkv, B, 2*D] and reprs with contiguous rows");
  TORCH_CHECK(reprs.scalar_type() == kv_cache.scalar_type() && scores.scalar_type() == at::kFloat &&
                  sealed.scalar_type() == at::kBool,
              "infllm native seal: reprs in the cache dtype, fp32 scores, bool sealed flags");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && req.scalar_type() == at::kInt &&
                  num_cand.scalar_type() == at::kInt && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "infllm native seal: int32 tables, fp32 rotary table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "infllm_seal", [&] {
    seal_impl<scalar_t>(kv_cache, reprs, scores, sealed, block_table, req, num_cand, cos, sin, block_size, n_init,
                        chunk, repr_topk, unit_score, num_threads);
  });
}

void select_units(const torch::Tensor& query, const torch::Tensor& reprs, const torch::Tensor& block_table,
                  const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length,
                  const torch::Tensor& q0, const torch::Tensor& num_cand, const torch::Tensor& cos,
                  const torch::Tensor& sin, torch::Tensor selected, int64_t num_kv_heads, int64_t block_size,
                  int64_t n_init, int64_t n_local, int64_t topk, int64_t repr_topk, int64_t unit_score,
                  int64_t groups, int64_t contiguity, int64_t select_queries, bool aligned, int64_t num_threads,
                  const c10::optional<torch::Tensor>& store_slots, const std::vector<torch::Tensor>& store_reprs,
                  int64_t store_slab_units) {
  TORCH_CHECK(query.stride(2) == 1 && reprs.stride(2) == 1 && selected.is_contiguous() &&
                  selected.scalar_type() == at::kLong,
              "infllm native select: contiguous rows, int64 [n, groups, topk] output");
  TORCH_CHECK(query.scalar_type() == reprs.scalar_type(), "infllm native select: query and reprs share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "infllm native select: fp32 rotary table");
  TORCH_CHECK(unit_score != kSketch || reprs.stride(1) == reprs.size(2),
              "infllm native select: unit_score='sketch' reads each unit's rows as one run of bytes "
              "(reprs[block] a contiguous [R, D])");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "infllm_select", [&] {
    const StoreSlabs<scalar_t> store(store_slots, store_reprs, store_slab_units, block_table, reprs,
                                     "infllm native select");
    select_impl<scalar_t, scalar_t>(query, reprs, block_table, req, c0, length, q0, num_cand, cos, sin, selected,
                                    num_kv_heads, block_size, n_init, n_local, topk, repr_topk, unit_score, groups,
                                    contiguity, select_queries, aligned, num_threads, store);
  });
}

void select_units_exact(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                        const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length,
                        const torch::Tensor& q0, const torch::Tensor& num_cand, const torch::Tensor& cos,
                        const torch::Tensor& sin, torch::Tensor selected, int64_t n_init, int64_t n_local,
                        int64_t topk, int64_t groups, int64_t contiguity, int64_t select_queries, bool aligned,
                        int64_t num_threads, const c10::optional<torch::Tensor>& store_slots,
                        const std::vector<torch::Tensor>& store_kv, int64_t store_slab_units) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.stride(3) == 1 && query.stride(2) == 1 && selected.is_contiguous() &&
                  selected.scalar_type() == at::kLong,
              "infllm native select_units_exact: kv_cache [blocks, Hkv, B, 2*D] and query with contiguous rows, ",
              "int64 [n, groups, topk] output");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type(),
              "infllm native select_units_exact: query and kv_cache share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "infllm native select_units_exact: fp32 rotary table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "infllm_select_exact", [&] {
    const StoreSlabs<scalar_t> store(store_slots, store_kv, store_slab_units, block_table, kv_cache,
                                     "infllm native select_units_exact");
    select_impl<scalar_t, scalar_t>(query, kv_cache, block_table, req, c0, length, q0, num_cand, cos, sin, selected,
                                    kv_cache.size(1), kv_cache.size(2), n_init, n_local, topk, 1, kExact, groups,
                                    contiguity, select_queries, aligned, num_threads, store);
  });
}

}  // namespace infllm

namespace infllm {

// kv_cache[slot / B, :, slot % B] = (K, V) for every slot >= 0; a block written at offset 0
// holds a new sequence's tokens: its fp32 scores are zeroed and its sealed flag cleared. The
// native counterpart of torch_ops.write_kv (one scatter, no index tensors).
void write_kv(torch::Tensor kv_cache, const torch::Tensor& key, const torch::Tensor& value,
              const torch::Tensor& slot_mapping, c10::optional<torch::Tensor> scores,
              c10::optional<torch::Tensor> sealed) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.stride(3) == 1 && key.stride(2) == 1 && value.stride(2) == 1,
              "infllm native write_kv: contiguous head dims");
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() && value.scalar_type() == kv_cache.scalar_type(),
              "infllm native write_kv: key, value and cache share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "infllm native write_kv: int64 slot mapping");
  const int64_t T = slot_mapping.size(0), Hkv = kv_cache.size(1), B = kv_cache.size(2), D = kv_cache.size(3) / 2;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  float* sc = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  bool* seal = sealed.has_value() ? sealed->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "infllm_write_kv", [&] {
    scalar_t* kv = kv_cache.data_ptr<scalar_t>();
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // padding
      const int64_t blk = slot / B, off = slot % B;
      for (int64_t h = 0; h < Hkv; ++h) {
        scalar_t* dst = kv + blk * kv_cache.stride(0) + h * kv_cache.stride(1) + off * kv_cache.stride(2);
        std::memcpy(dst, k + t * key.stride(0) + h * key.stride(1), D * sizeof(scalar_t));
        std::memcpy(dst + D, v + t * value.stride(0) + h * value.stride(1), D * sizeof(scalar_t));
      }
      if (off == 0 && sc != nullptr) {
        for (int64_t h = 0; h < scores->size(1); ++h)
          for (int64_t o = 0; o < scores->size(2); ++o)
            sc[blk * scores->stride(0) + h * scores->stride(1) + o * scores->stride(2)] = 0.f;
        seal[blk * sealed->stride(0)] = false;
      }
    }
  });
}

// chunking="aligned": a chunk an earlier step started (a0 < c0) takes the selection stored at
// the block of a0; a fresh chunk at a multiple of `chunk` stores its own there (see
// ops/ranking.py: hold_selections, the reference). Chunks in wave order.
void hold_selections(torch::Tensor selected, torch::Tensor chosen, const torch::Tensor& block_table,
                     const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length,
                     const torch::Tensor& a0, int64_t block_size, int64_t chunk) {
  TORCH_CHECK(selected.is_contiguous() && selected.scalar_type() == at::kLong && chosen.scalar_type() == at::kInt &&
                  chosen.stride(2) == 1 && chosen.stride(1) == chosen.size(2),
              "infllm native hold_selections: int64 [n, S, topk] selections, int32 chosen rows");
  const int64_t n = selected.size(0), per = selected.size(1) * selected.size(2);
  int64_t* sel = selected.data_ptr<int64_t>();
  int32_t* ch = chosen.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* rq = req.data_ptr<int32_t>();
  const int32_t* c = c0.data_ptr<int32_t>();
  const int32_t* len = length.data_ptr<int32_t>();
  const int32_t* a = a0.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t phys = bt[rq[i] * block_table.stride(0) + a[i] / block_size];
    int32_t* held = ch + phys * chosen.stride(0);
    if (a[i] < c[i]) {
      for (int64_t x = 0; x < per; ++x) sel[i * per + x] = held[x];
    } else if (a[i] % chunk == 0 && len[i] > 0) {
      for (int64_t x = 0; x < per; ++x) held[x] = static_cast<int32_t>(sel[i * per + x]);
    }
  }
}

}  // namespace infllm
