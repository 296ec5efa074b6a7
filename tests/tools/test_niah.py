"""The essay-needle prompts (tools/niah.py) with the embedded model's tokenizer: sized in tokens,
the needle where asked, and `start` reading another stretch of the essays around it."""

from __future__ import annotations

import pytest

from vllm_infllm.tools import assets
from vllm_infllm.tools.niah import INTRO, make_niah_prompt


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    d = assets.default_model_dir()
    if not assets.is_converted(d):
        pytest.fail(f"{d} is missing or stale: run `bash scripts/setup.sh`", pytrace=False)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("start", [0, 40_000])
def test_prompt_holds_the_needle_at_its_depth_within_the_budget(tokenizer, start):
    for depth in (0.1, 0.5, 0.9):
        p = make_niah_prompt(tokenizer, 3000, depth, start=start)
        assert 2900 <= p.num_tokens <= 3000
        needle = f"The special magic number is {p.key}."
        assert p.text.count(needle) == 1
        at = len(tokenizer(p.text[: p.text.index(needle)], add_special_tokens=False)["input_ids"])
        assert abs(at / p.num_tokens - depth) < 0.05
        assert p.is_correct(f" {p.key}.") and not p.is_correct(" 1234567.")


def test_start_reads_other_essays_from_a_sentence_and_keeps_the_key(tokenizer):
    first = make_niah_prompt(tokenizer, 3000, 0.5)
    other = make_niah_prompt(tokenizer, 3000, 0.5, start=40_000)
    assert other.key == first.key  # the seed alone draws the key
    a, b = first.text[len(INTRO):], other.text[len(INTRO):]
    assert a[:200] != b[:200]
    assert b[0].isspace() and b.strip()[0].isupper(), b[:80]  # a sentence's start
    assert make_niah_prompt(tokenizer, 3000, 0.5, start=0).text == first.text
    with pytest.raises(ValueError, match="start=10000000 must be in"):
        make_niah_prompt(tokenizer, 3000, 0.5, start=10_000_000)
