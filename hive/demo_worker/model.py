"""The fake model: deterministic words derived from the prompt, one word per token.

The same prompt always gives the same words, so tests and benchmarks can compare answers across
workers and runs. No weights, no GPU: a hash picks each word from a small vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: Tokens generated when a request names no limit.
DEFAULT_MAX_TOKENS = 16
#: The largest number of tokens one request may ask for (also the fake context size).
MAX_TOTAL_TOKENS = 4096
#: The fake model's vocabulary: the words of the generated text are drawn from it.
VOCABULARY = (
    "amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "island", "juniper",
    "kelp", "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "river", "saffron",
    "tundra", "umber", "valley", "willow", "xenon", "yarrow", "zephyr", "bee", "comb", "hive",
    "honey", "pollen", "swarm",
)  # fmt: skip


def words_for(prompt: str, count: int) -> list[str]:
    """``count`` words derived from ``prompt``: the same prompt always gives the same words."""
    words = []
    for index in range(count):
        digest = hashlib.sha256(f"{index}\x00{prompt}".encode()).digest()
        words.append(VOCABULARY[int.from_bytes(digest[:4], "big") % len(VOCABULARY)])
    return words


def count_tokens(prompt: str) -> int:
    return len(prompt.split())


@dataclass(frozen=True)
class Completion:
    """One generated text, as the pieces a stream sends (their concatenation is the text)."""

    pieces: list[str]
    prompt_tokens: int
    completion_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)
