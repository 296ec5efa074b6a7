// The native CPU ops' entry points, declared once for their definitions (attend.cpp,
// select.cpp) and the Python bindings (bindings.cpp). Semantics: vllm_infllm/core/ops/torch_ops.py.
#pragma once

#include <torch/extension.h>

namespace infllm {
void attend(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
            const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length, const torch::Tensor& q0,
            const torch::Tensor& num_cand, const c10::optional<torch::Tensor>& selected, const torch::Tensor& cos,
            const torch::Tensor& sin, torch::Tensor scores, torch::Tensor out,
            const c10::optional<torch::Tensor>& sinks, int64_t block_size, int64_t n_init, int64_t n_local,
            int64_t topk, bool ordered, bool scores_on, double scale, double softcap, int64_t query_tile,
            int64_t num_threads, const c10::optional<torch::Tensor>& store_slots,
            const std::vector<torch::Tensor>& store_kv, int64_t store_slab_units);
void seal_units(const torch::Tensor& kv_cache, torch::Tensor reprs, const torch::Tensor& scores, torch::Tensor sealed,
                const torch::Tensor& block_table, const torch::Tensor& req, const torch::Tensor& num_cand,
                const torch::Tensor& cos, const torch::Tensor& sin, int64_t block_size, int64_t n_init, int64_t chunk,
                int64_t repr_topk, int64_t unit_score, int64_t num_threads);
void select_units(const torch::Tensor& query, const torch::Tensor& reprs, const torch::Tensor& block_table,
                  const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length,
                  const torch::Tensor& q0, const torch::Tensor& num_cand, const torch::Tensor& cos,
                  const torch::Tensor& sin, torch::Tensor selected, int64_t num_kv_heads, int64_t block_size,
                  int64_t n_init, int64_t n_local, int64_t topk, int64_t repr_topk, int64_t unit_score,
                  int64_t groups, int64_t contiguity, int64_t select_queries, bool aligned, int64_t num_threads,
                  const c10::optional<torch::Tensor>& store_slots, const std::vector<torch::Tensor>& store_reprs,
                  int64_t store_slab_units);
void select_units_exact(const torch::Tensor& query, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                        const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length,
                        const torch::Tensor& q0, const torch::Tensor& num_cand, const torch::Tensor& cos,
                        const torch::Tensor& sin, torch::Tensor selected, int64_t n_init, int64_t n_local,
                        int64_t topk, int64_t groups, int64_t contiguity, int64_t select_queries, bool aligned,
                        int64_t num_threads, const c10::optional<torch::Tensor>& store_slots,
                        const std::vector<torch::Tensor>& store_kv, int64_t store_slab_units);
void write_kv(torch::Tensor kv_cache, const torch::Tensor& key, const torch::Tensor& value,
              const torch::Tensor& slot_mapping, c10::optional<torch::Tensor> scores,
              c10::optional<torch::Tensor> sealed);
void hold_selections(torch::Tensor selected, torch::Tensor chosen, const torch::Tensor& block_table,
                     const torch::Tensor& req, const torch::Tensor& c0, const torch::Tensor& length,
                     const torch::Tensor& a0, int64_t block_size, int64_t chunk);
}  // namespace infllm
