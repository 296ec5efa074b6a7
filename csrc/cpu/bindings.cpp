// Python bindings of the native CPU ops (built by vllm_infllm/core/ops/native.py).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vllm-infllm native CPU kernels";
  m.def("attend", &infllm::attend, "InfLLM attention of one wave over the paged cache (see csrc/cpu/attend.cpp)");
  m.def("seal_units", &infllm::seal_units, "representatives of a wave's new candidates (csrc/cpu/select.cpp)");
  m.def("select_units", &infllm::select_units, "each chunk's topk candidates (csrc/cpu/select.cpp)");
  m.def("select_units_exact", &infllm::select_units_exact,
        "each chunk's topk candidates by the exact score over their keys (csrc/cpu/select.cpp)");
  m.def("write_kv", &infllm::write_kv, "scatter K/V into the paged cache, reset reused blocks (csrc/cpu/select.cpp)");
  m.def("hold_selections", &infllm::hold_selections, "aligned chunks' stored selections (csrc/cpu/select.cpp)");
}
