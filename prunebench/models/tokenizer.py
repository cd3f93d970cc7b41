"""Word-level tokenizer for the built-in model (vocabulary shipped in vocab.txt, no hub access).

The prompt mirrors OpenVLA-OFT's template, ``In: What action should the robot take to {task}?
Out:``, so the layout has the same fixed template head (9 tokens) and tail (3 tokens).
"""

from __future__ import annotations

import re
from importlib import resources

TEMPLATE_HEAD = "In: What action should the robot take to"
TEMPLATE_TAIL = "? Out:"
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    pad, bos, eos, unk = 0, 1, 2, 3

    def __init__(self, vocab: list[str] | None = None) -> None:
        if vocab is None:
            vocab = resources.files("prunebench.models").joinpath("vocab.txt").read_text().split()
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.head_len = len(self.split(TEMPLATE_HEAD))
        self.tail_len = len(self.split(TEMPLATE_TAIL))

    @staticmethod
    def split(text: str) -> list[str]:
        return _TOKEN.findall(text.lower())

    def encode_words(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk) for w in self.split(text)]

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the full prompt (after BOS): template head, task words, template tail."""
        task = instruction.strip().rstrip(".?!")
        return self.encode_words(f"{TEMPLATE_HEAD} {task}{TEMPLATE_TAIL}")

    def __len__(self) -> int:
        return len(self.vocab)
