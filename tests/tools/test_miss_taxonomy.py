"""The miss taxonomy's classification rule (benchmarks/engine/miss_taxonomy.py), on hand-made
selections: which needle tokens only selection can bring, and the four kinds of miss."""

from benchmarks.engine.miss_taxonomy import classify
from vllm_infllm.core.config import InfLLMConfig

CFG = InfLLMConfig.paper(n_init=128, n_local=1024, block_size=128, topk=4)
P = 8000  # answering query: window [6977, 8000], 53 candidates, remainder [6912, 6977)


def test_needle_attended_without_selection():
    for needle in [(7000, 7020), (10, 30), (6920, 6940), (6960, 6990)]:  # window, init, remainder, edge
        r = classify(needle, P, CFG, [[1, 2], [3, 4]])
        assert r["kind"] == "attended" and r["needle_units"] == [], (needle, r)
    assert classify((7000, 7020), P, CFG, [])["num_candidates"] == 53


def test_selection_boundary_copy():
    one_unit = (1000, 1020)  # unit (1000 - 128) // 128 = 6
    r = classify(one_unit, P, CFG, [[6, 1], [2, 3], [5, 7]])
    assert (r["kind"], r["full"], r["partial"], r["none"], r["needle_units"]) == ("selection", 1, 0, 2, [6])
    assert r["missing_in"] == [1, 2]
    two_units = (1140, 1160)  # units 7 and 8
    r = classify(two_units, P, CFG, [[7, 8], [7, 1], [8, 0]])
    assert (r["kind"], r["full"], r["partial"], r["none"], r["needle_units"]) == ("boundary", 1, 2, 0, [7, 8])
    r = classify(two_units, P, CFG, [[8, 7, 1], [0, 7, 8]])
    assert (r["kind"], r["full"]) == ("copy", 2)
    # A needle straddling the last candidate and the remainder needs only its candidate part.
    r = classify((6900, 6930), P, CFG, [[52], [1]])
    assert r["needle_units"] == [52] and (r["full"], r["none"], r["kind"]) == (1, 1, "selection")
