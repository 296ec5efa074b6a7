"""Needle prompts of either task for the retrieval probes (benchmarks/engine: passkey_probe.py,
miss_taxonomy.py, selection_study.py), and where the needle sentence lies in the engine's ids."""

from __future__ import annotations

from .niah import NEEDLES, make_niah_prompt
from .passkey import NEEDLE, make_passkey_prompt


def make_prompt(task: str, tokenizer, num_tokens: int, depth: float, seed: int, start: int = 0):
    """(prompt, needle sentence as inserted): task "passkey" (tools/passkey.py) or "niah" (the
    number needle in Paul Graham essays, tools/niah.py, read from token `start` of the essays)."""
    if task == "niah":
        p = make_niah_prompt(tokenizer, num_tokens, depth, kind="number", seed=seed, start=start)
        return p, NEEDLES["number"]["needle"].format(key=p.key)
    if start:
        raise ValueError("start (another stretch of the essays) applies to the essay needle (task 'niah') only")
    p = make_passkey_prompt(tokenizer, num_tokens, depth, seed=seed)
    return p, NEEDLE.format(key=p.key)


def needle_span(prompt, sentence: str, tokenizer, num_ids: int) -> tuple[int, int]:
    """First and last token of the needle sentence in the engine's `num_ids` prompt ids (the
    engine's prompt may carry a BOS the builder's count did not)."""
    start = prompt.needle_token + num_ids - prompt.num_tokens
    return start, start + len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) - 1
