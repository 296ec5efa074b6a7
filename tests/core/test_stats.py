"""The per-step statistics (core/stats.py) count what the oracle attends.

The oracle is made to report its own key counts: with every query zero all logits are equal, so
each query's softmax is uniform over the keys it attends, and with v = 1 on token 0 (attended by
every query: local, then init) and 0 elsewhere, its output is 1 / (keys attended)."""

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.plan import plan_step
from vllm_infllm.core.reference import infllm_reference_trace
from vllm_infllm.core.stats import StepStats, step_stats

T, PROMPT, Hq, Hkv, D = 300, 260, 4, 2, 8


@pytest.mark.parametrize(
    "modes,steps",
    [
        ({"chunking": "aligned"}, [0, 100, 251]),
        ({"chunking": "aligned", "selection": "kv_head"}, [0, 45, 200]),
        ({"chunking": "step"}, [0, 77, 200]),
        ({"chunking": "aligned", "unit_score": "minmax", "topk": 3}, [0, 259]),
        ({"chunking": "aligned", "topk": 0}, [0, 130]),  # the sliding-window control
    ],
)
def test_step_stats_count_what_the_oracle_attends(modes, steps):
    cfg = InfLLMConfig.paper(**{"n_init": 32, "n_local": 64, "block_size": 16, "topk": 2, "repr_topk": 3,
                          "chunk": 32, **modes})
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(T, Hq, D)
    k = torch.randn(T, Hkv, D, generator=g)
    v = torch.zeros(T, Hkv, D)
    v[0] = 1.0
    one, zero = torch.ones(T, D // 2), torch.zeros(T, D // 2)
    # The scheduler's steps: prefill spans starting at `steps`, then one decode step per token.
    bounds = [*steps, PROMPT, *range(PROMPT + 1, T + 1)]
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    # chunking="step" cuts at step starts and before each step's last query (plan_step's doc).
    step_bounds = sorted({a for a, _ in spans} | {b - 1 for _, b in spans if b <= PROMPT})
    trace = infllm_reference_trace(q, k, v, one, zero, cfg, prefill_len=PROMPT, step_bounds=step_bounds)
    attended = (1.0 / trace.out[:, :, 0]).round().long()  # [T, Hq]: keys each query attends
    assert (attended == attended[:, :1]).all()  # the same count in every head

    expect = StepStats(queries=T, dense_keys=T * (T + 1) // 2, attended_keys=int(attended[:, 0].sum()))
    for c in trace.chunks:
        units = len(c.per_kv_head[0])
        assert all(len(u) == units for u in c.per_kv_head)
        expect.units += (c.c1 - c.c0) * units
        expect.memory_queries += (c.c1 - c.c0) if units else 0

    got = StepStats()
    for a, b in spans:
        got += step_stats(plan_step([0, b - a], [b], cfg, prompt_lens=[PROMPT]), cfg)
    assert got == expect
    # The bounded cost (what the statistics are for): beyond init + local, fewer keys than dense.
    assert got.attended_keys < got.dense_keys and int(attended.max()) <= cfg.max_attended()
    if cfg.topk:
        assert 0 < got.memory_queries < got.queries


def test_step_stats_of_a_batch_add_up_per_request():
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)
    alone = StepStats()
    for n, L in ((40, 200), (1, 301), (7, 90)):
        alone += step_stats(plan_step([0, n], [L], cfg, prompt_lens=[L]), cfg)
    batch = step_stats(plan_step([0, 40, 41, 48], [200, 301, 90], cfg, prompt_lens=[200, 301, 90]), cfg)
    assert batch == alone and batch.queries == 48
