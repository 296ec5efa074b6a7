"""The classic passkey retrieval prompt (Landmark Attention / InfLLM), sized in model tokens.

Filler sentences repeated around one needle at a chosen depth; the model must complete
"The pass key is" with the number. Shared by the demo, the end-to-end tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import random
import re

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    num_tokens: int  # prompt length in tokens of the tokenizer used to build it
    needle_token: int  # token index where the needle starts

    def is_correct(self, answer: str) -> bool:
        """The first number in the answer is the key."""
        m = re.search(r"\d+", answer)
        return bool(m) and m.group(0) == self.key


def make_passkey_prompt(tokenizer, num_tokens: int, depth: float, seed: int = 0) -> PasskeyPrompt:
    """A prompt of about `num_tokens` tokens (never more) with the needle at `depth` in [0, 1]
    of the filler (0 = right after the intro, 1 = just before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    key = str(random.Random(f"{seed}-{num_tokens}-{depth}").randint(10000, 99999))
    needle = NEEDLE.format(key=key)

    def count(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    fixed = count(INTRO) + count(needle) + count(QUESTION)
    per_filler = count(FILLER * 20) / 20
    n_filler = max(0, int((num_tokens - fixed) / per_filler))
    while True:
        before = round(n_filler * depth)
        text = INTRO + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION
        total = count(text)
        if total <= num_tokens or n_filler == 0:
            break
        n_filler -= max(1, int((total - num_tokens) / per_filler))
    needle_token = count(INTRO + FILLER * before)
    return PasskeyPrompt(text=text, key=key, num_tokens=total, needle_token=needle_token)
