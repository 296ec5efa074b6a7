"""The selection study's unit scores (benchmarks/engine/selection_study.py) against their
definitions: `exact` by brute force, and the per-channel boxes as upper bounds that tighten as
the pieces shrink (a piece's box lies inside the unit's box)."""

import torch

from benchmarks.engine.selection_study import PIECES, unit_scores


def test_unit_scores_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    K, B, Hkv, G, D = 5, 128, 3, 3, 16
    raw = torch.randn(K, B, Hkv, D, generator=g)
    q = torch.randn(Hkv * G, D, generator=g)
    s = unit_scores(q, raw, B)
    exact = torch.zeros(K)
    best_head = torch.full((K,), float("-inf"))
    for u in range(K):
        for h in range(Hkv * G):
            m = max(float(raw[u, b, h // G] @ q[h]) for b in range(B))
            exact[u] += m
            best_head[u] = max(best_head[u], m)
    torch.testing.assert_close(s["exact"], exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s["exact_maxh"], best_head, rtol=1e-5, atol=1e-4)
    # Quest's bound: sum_h sum_d max(q lo, q hi) over the whole unit
    lo, hi = raw.amin(1), raw.amax(1)  # [K, Hkv, D]
    quest = torch.stack([sum(torch.maximum(q[h] * lo[u, h // G], q[h] * hi[u, h // G]).sum()
                             for h in range(Hkv * G)) for u in range(K)])
    torch.testing.assert_close(s["minmax"], quest, rtol=1e-5, atol=1e-4)
    # every bound holds, and smaller pieces give tighter ones
    tighter = [s["minmax"]] + [s[f"minmax{n}"] for n in PIECES]
    for a, b in zip(tighter[:-1], tighter[1:], strict=True):
        assert bool((b <= a + 1e-4).all())
    assert bool((s[f"minmax{PIECES[-1]}"] >= s["exact"] - 1e-4).all())
    assert bool((s[f"minmax{PIECES[-1]}_maxh"] >= s["exact_maxh"] - 1e-4).all())
