"""How MiniOFT's instruction reaches more than the LLM's prompt tokens (both off by default).

A policy trained from scratch on libero_goal, whose ten tasks share one scene and differ only in
their words, learnt to ignore the words when they reached it through the prompt tokens alone
(docs/policy.md). Two extra paths, each fed the instruction's mean word embedding, layer-normed:

* ``film``: FiLM on the patch stem, as OpenVLA-OFT+ conditions its vision backbone;
* ``instruction_slots``: the vector is added to every action slot's input, so the slots whose
  hidden states become the actions ask for patches by the instruction from the first layer on.

Both start at zero, so a fresh model computes what a model without them computes.
"""

from __future__ import annotations

import torch
from torch import nn


def mean_word_embedding(embed_tokens: nn.Embedding, prompt_ids: torch.Tensor, head_len: int,
                        tail_len: int) -> torch.Tensor:
    """(B, P) prompt ids -> (B, D): the mean embedding of the instruction's words, the prompt
    template's fixed words left out (they are the same for every task)."""
    words = prompt_ids[:, head_len:prompt_ids.shape[1] - tail_len]
    return embed_tokens(words).sum(1) / max(1, words.shape[1])


class _ZeroInitProjection(nn.Module):
    """LayerNorm then a zero-initialised Linear. The norm matters: word embeddings start at std
    0.02, and two instructions' means differ by one word in six, too little for a projection to
    grow from (a first libero_goal run without it stayed inert)."""

    def __init__(self, text_width: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(text_width)
        self.proj = nn.Linear(text_width, out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(text))


class FiLM(_ZeroInitProjection):
    """Feature-wise linear modulation (Perez et al., arXiv 1709.07871): per-channel scale and shift
    of a (B, C, H, W) feature map from the (B, D) instruction vector."""

    def __init__(self, text_width: int, channels: int) -> None:
        super().__init__(text_width, 2 * channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale, shift = super().forward(text)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class SlotConditioning(_ZeroInitProjection):
    """The (B, D) instruction vector as a (B, 1, hidden) offset for every action slot's input."""

    def forward(self, text: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(text).unsqueeze(1)
