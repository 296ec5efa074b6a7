// Offloaded memory units as the native ops read them: the twin of vllm_infllm/core/offload.py's
// StoreView. A logical block whose slot in the slot table (the block table's twin) is >= 0 has
// left the KV pool: its K/V (attend) or representatives (select) are read from row
// slot % per_slab of slab slot / per_slab, with the slab's own strides.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace infllm {

template <typename T>
struct StoreSlabs {
  const int32_t* slots = nullptr;  // [num_reqs, max_blocks] int32; nullptr: no store
  int64_t s_slots = 0;
  std::vector<const T*> slabs;  // nullptr for a released slab (no slot names it)
  int64_t per_slab = 1;
  int64_t s_unit = 0, s_1 = 0, s_2 = 0;  // strides of a slab: unit, then its next two dims

  // slot_table: as block_table; slabs: [per_slab, d1, d2, ...] like `like` past its first dim.
  StoreSlabs(const c10::optional<torch::Tensor>& slot_table, const std::vector<torch::Tensor>& slab_list,
             int64_t units_per_slab, const torch::Tensor& block_table, const torch::Tensor& like, const char* op) {
    if (!slot_table.has_value()) return;
    const torch::Tensor& st = slot_table.value();
    TORCH_CHECK(st.scalar_type() == at::kInt && st.dim() == 2 && st.stride(1) == 1 &&
                    st.size(0) == block_table.size(0) && st.size(1) == block_table.size(1),
                op, ": the store's slot table must be int32 with contiguous rows, shaped as the block table");
    TORCH_CHECK(units_per_slab >= 1, op, ": slab_units must be >= 1");
    slots = st.data_ptr<int32_t>();
    s_slots = st.stride(0);
    per_slab = units_per_slab;
    bool first = true;
    for (const auto& s : slab_list) {
      if (s.numel() == 0) {
        slabs.push_back(nullptr);
        continue;
      }
      TORCH_CHECK(s.scalar_type() == like.scalar_type() && s.dim() == like.dim() && s.size(0) == per_slab &&
                      s.stride(s.dim() - 1) == 1,
                  op, ": store slabs must be [slab_units, ...] in the dtype of ", like.scalar_type(),
                  " with contiguous rows");
      for (int64_t d = 1; d < like.dim(); ++d)
        TORCH_CHECK(s.size(d) == like.size(d), op, ": a store slab's shape does not match the pool's");
      if (first) {
        s_unit = s.stride(0);
        s_1 = s.stride(1);
        s_2 = s.dim() > 2 ? s.stride(2) : 0;
        first = false;
      } else {
        TORCH_CHECK(s.stride(0) == s_unit && s.stride(1) == s_1 && (s.dim() <= 2 || s.stride(2) == s_2), op,
                    ": store slabs must share their strides");
      }
      slabs.push_back(s.data_ptr<T>());
    }
    // Every slot the table names must be in a live slab: a stale table would read freed memory.
    const int64_t rows = st.size(0), width = st.size(1);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < width; ++b) {
        const int32_t x = slots[r * s_slots + b];
        TORCH_CHECK(x < 0 || (x / per_slab < static_cast<int64_t>(slabs.size()) && slabs[x / per_slab] != nullptr),
                    op, ": the slot table names store slot ", x, ", which is in no live slab (a slot table older ",
                    "than the store: build it with UnitStore.slot_table for this step)");
      }
  }

  // The slot of logical block `blk` of block-table row `row`, -1 = in the pool.
  int32_t slot(int64_t row, int64_t blk) const { return slots ? slots[row * s_slots + blk] : -1; }
  const T* unit(int32_t slot) const { return slabs[slot / per_slab] + (slot % per_slab) * s_unit; }
};

}  // namespace infllm
