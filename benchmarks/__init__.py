"""Benchmarks by level: `ops/` (the core alone: kernels, synthetic needles) and `engine/` (a real
vLLM engine on the embedded model). Results and how they were obtained: RESULTS.md."""
