"""The retrieval-layer finder (vllm_infllm/tools/retrieval_layer.py): the ranks it records in a
run of the paged runtime against a brute-force exact score from the raw inputs, and its choice."""

import pytest
import torch

from vllm_infllm.core.config import InfLLMConfig
from vllm_infllm.core.ops import torch_ops
from vllm_infllm.core.rope import rope_table, rotate
from vllm_infllm.testing import layer_qkv, make_request, run_paged
from vllm_infllm.tools.retrieval_layer import exact_scores, recommend, record_needle_ranks


def test_recorded_ranks_are_the_exact_scores_ranks_in_every_layer(monkeypatch):
    monkeypatch.setenv("VLLM_INFLLM_CPU_KERNEL", "torch")  # the wrapper is on the torch ops
    monkeypatch.setattr(torch_ops, "attend", torch_ops.attend)  # restored after the test
    cfg = InfLLMConfig.paper(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=3, chunk=32)
    Hq, Hkv, D, layers = 6, 2, 32, 3
    req = make_request([200], 3, Hq, Hkv, D, torch.Generator().manual_seed(4))
    T = req.total
    state = {"pos": T - 1, "needle_units": [3, 4]}  # the last decode query; a two-unit needle
    ranks: list[dict] = []
    record_needle_ranks(torch_ops, state, lambda q, raw: {"exact": exact_scores(q, raw)}, ranks)
    cos, sin = rope_table(D, 1024)
    run_paged([req], cfg, cos, sin, layers=layers)
    assert len(ranks) == layers
    K = cfg.num_candidates(T - 1)
    assert K > cfg.topk
    for layer in range(layers):
        q, k, _ = layer_qkv(req, layer)
        q_bar = rotate(q[T - 1], cos, sin, torch.tensor(cfg.n_local - 1))  # [Hq, D]
        score = torch.tensor([
            sum(max(float(q_bar[h] @ k[t, h // (Hq // Hkv)]) for t in range(32 + 16 * u, 48 + 16 * u))
                for h in range(Hq))
            for u in range(K)])
        best = score[state["needle_units"]].max()
        assert ranks[layer]["exact"] == 1 + int((score > best + 1e-4).sum()), layer


def test_recommend_takes_the_most_hits_then_the_best_mean_rank():
    ranks = [[9, 1, 3, 2], [7, 2, 1, 1], [1, 5, 2, 4]]  # per prompt, rank by layer
    layer, table = recommend(ranks, topk=2)
    assert [t["hits"] for t in table] == [1, 2, 2, 2]
    assert [t["mean_rank"] for t in table] == [5.7, 2.7, 2.0, 2.3]
    assert layer == 2  # layers 1-3 have 2 hits; layer 2's mean rank is the smallest
    assert recommend([[1, 1]], topk=1)[0] == 0  # a full tie: the lower layer
    with pytest.raises(ValueError, match="use longer prompts"):
        recommend([], topk=2)
