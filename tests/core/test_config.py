import pytest

from vllm_infllm.core.config import InfLLMConfig, InfLLMConfigError, OffloadConfig


def test_defaults_are_the_papers_sizes_with_the_sketch_ordered_and_load_independent():
    c = InfLLMConfig.from_dict({})
    assert c.to_dict() == dict(n_init=128, n_local=4096, block_size=128, topk=16, repr_topk=4, chunk=512,
                               selection="layer", unit_score="sketch", positions="ordered",
                               contiguity=0, select_queries=0, chunking="aligned", retrieval_layer=-1)
    assert InfLLMConfig.from_dict(None) == c
    assert c.max_attended() == 128 + 4096 + 16 * 128 + 128 + 512


def test_the_papers_rule_by_name():
    """`paper()` is the published rule: every knob beyond the paper at its first choice (the
    paper's), the sizes as given; from JSON the same is two keys over the defaults."""
    p = InfLLMConfig.paper(n_local=1024, topk=4)
    assert p.to_dict() == dict(n_init=128, n_local=1024, block_size=128, topk=4, repr_topk=4, chunk=512,
                               selection="layer", unit_score="mean_topk", positions="fixed",
                               contiguity=0, select_queries=0, chunking="aligned", retrieval_layer=-1)
    assert all(getattr(p, k) == v[0] for k, v in InfLLMConfig.CHOICES.items() if k != "chunking")
    assert InfLLMConfig.from_dict({"n_local": 1024, "topk": 4, "unit_score": "mean_topk", "positions": "fixed"}) == p
    assert InfLLMConfig.paper(unit_score="minmax").unit_score == "minmax"  # overrides win
    with pytest.raises(InfLLMConfigError, match="positions='order'"):
        InfLLMConfig.paper(positions="order")


def test_from_dict_overrides():
    c = InfLLMConfig.from_dict({"n_local": 1024, "topk": 4})
    assert (c.n_local, c.topk, c.n_init) == (1024, 4, 128)


@pytest.mark.parametrize(
    "values, field, words",
    [
        ({"n_init": 100}, "n_init", ["multiple of block_size=128", "n_init=0 or 128"]),
        ({"chunk": 8192}, "chunk", ["chunk <= n_local=4096"]),
        ({"block_size": 256, "n_local": 128, "chunk": 64, "n_init": 0}, "block_size", ["block_size <= n_local"]),
        ({"repr_topk": 0}, "repr_topk", ["1 <= repr_topk <= block_size=128"]),
        ({"repr_topk": 129}, "repr_topk", ["1 <= repr_topk"]),
        ({"topk": -1}, "topk", ["topk >= 0"]),
        ({"n_local": 0}, "n_local", ["n_local >= 1"]),
        ({"topk": 2.5}, "topk", ["must be an integer"]),
        ({"topk": "16"}, "topk", ["must be an integer"]),
        ({"topk": True}, "topk", ["must be an integer"]),
        ({"selection": "kvhead"}, "selection", ["one of 'layer', 'kv_head'", "use 'kv_head'"]),
        ({"selection": 1}, "selection", ["one of 'layer', 'kv_head'"]),
        ({"positions": "order"}, "positions", ["one of 'fixed', 'ordered'", "use 'ordered'"]),
        ({"unit_score": "quest"}, "unit_score", ["one of 'mean_topk', 'minmax'"]),
        ({"contiguity": -1}, "contiguity", ["contiguity >= 0", "use 0"]),
        ({"select_queries": 600, "chunking": "step"}, "select_queries", ["select_queries <= chunk=512", "e.g. 32"]),
        ({"select_queries": -2}, "select_queries", ["0 <= select_queries"]),
        ({"chunking": "align"}, "chunking", ["one of 'step', 'aligned'", "use 'aligned'"]),
        ({"select_queries": 16}, "select_queries",
         ["chunking='step' only", "drop select_queries"]),
        ({"chunking": "aligned", "chunk": 200}, "chunk", ["multiple of block_size=128", "chunk=128"]),
        ({"retrieval_layer": -2}, "retrieval_layer", ["retrieval_layer >= -1", "use -1"]),
        ({"retrieval_layer": 3, "topk": 0}, "retrieval_layer", ["topk=0 reads none", "set topk"]),
    ],
)
def test_bad_values_name_field_value_rule_and_fix(values, field, words):
    with pytest.raises(InfLLMConfigError) as e:
        InfLLMConfig.from_dict(values)
    msg = str(e.value)
    assert f"{field}=" in msg
    assert repr(values[field]) in msg
    for w in words:
        assert w in msg
    if "integer" not in msg:
        assert "Fix:" in msg


def test_selection_groups():
    assert InfLLMConfig().selection_groups(8) == 1
    assert InfLLMConfig(selection="kv_head").selection_groups(8) == 8
    assert InfLLMConfig.paper().repr_rows(32, 8) == 32
    assert InfLLMConfig(unit_score="minmax").repr_rows(32, 8) == 16
    assert InfLLMConfig(unit_score="max_topk", repr_topk=3).repr_rows(32, 8) == 96
    # "sketch": the box, then 128 keys x 8 KV heads x 64 bytes of codes in rows of D elements
    assert InfLLMConfig(unit_score="sketch").repr_rows(32, 8, 2) == 16 + 128 * 8 // 4
    assert InfLLMConfig(unit_score="sketch").repr_rows(32, 8, 4) == 16 + 128 * 8 // 8
    with pytest.raises(ValueError, match="unit_score='sketch' stores 4-bit codes in rows of the cache dtype.*"
                                         "pass elem_size"):
        InfLLMConfig(unit_score="sketch").repr_rows(32, 8)
    with pytest.raises(ValueError, match=r"block_size \* num_kv_heads \(4\) to be a multiple of 8"):
        InfLLMConfig(unit_score="sketch", block_size=4, n_init=4, chunk=8, n_local=16).repr_rows(2, 1, 4)
    assert not InfLLMConfig(unit_score="sketch").accumulates_scores
    assert InfLLMConfig.paper().accumulates_scores
    assert InfLLMConfig(unit_score="max_topk").accumulates_scores
    assert not InfLLMConfig(unit_score="minmax").accumulates_scores


def test_layer_roles():
    assert InfLLMConfig().layer_role(None) == "own"  # off: no index needed
    c = InfLLMConfig(retrieval_layer=2)
    assert [c.layer_role(i) for i in range(5)] == ["own", "own", "retrieval", "reader", "reader"]
    with pytest.raises(ValueError, match=r"retrieval_layer=2 needs each layer's index.*pass layer="):
        c.layer_role(None)


def test_unknown_key_suggests_closest():
    with pytest.raises(InfLLMConfigError, match=r"unknown key 'top_k'.*Did you mean 'topk'"):
        InfLLMConfig.from_dict({"top_k": 4})
    with pytest.raises(InfLLMConfigError, match="Valid keys: n_init, n_local"):
        InfLLMConfig.from_dict({"zzz": 1})
    with pytest.raises(InfLLMConfigError, match="JSON object"):
        InfLLMConfig.from_dict([("topk", 1)])


def test_candidate_rule():
    c = InfLLMConfig(n_init=32, n_local=64, block_size=16, topk=2, repr_topk=2, chunk=32)
    # w(c0) = c0 - 63; units end at 32 + 16 (k+1)
    assert c.window_start(10) == 0 and c.window_start(100) == 37
    assert c.num_candidates(63 + 47) == 0  # w = 47: unit 0 ends at 48
    assert c.num_candidates(63 + 48) == 1
    assert c.num_candidates(63 + 80) == 3


def test_offload_config_defaults_and_errors():
    cfg = InfLLMConfig(topk=4)
    assert OffloadConfig.from_dict({}, cfg) == OffloadConfig(cache_units=8, path=None)  # 2 x topk
    assert OffloadConfig.from_dict({"cache_units": 0, "path": "/x"}, cfg) == OffloadConfig(0, "/x")
    for values, words in [({"cache_unit": 3}, "Did you mean 'cache_units'"),
                          ({"cache_units": -1}, "must be an integer >= 0"),
                          ({"cache_units": True}, "must be an integer >= 0"),
                          ({"path": 3}, "must be a directory name"),
                          ([1], "must be a JSON object")]:
        with pytest.raises(InfLLMConfigError, match=words):
            OffloadConfig.from_dict(values, cfg)
    with pytest.raises(InfLLMConfigError, match="offload needs memory units to read"):
        OffloadConfig.from_dict({}, InfLLMConfig(topk=0))
