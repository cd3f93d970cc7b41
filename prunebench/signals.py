"""On-demand signals: computed only at the layers and query rows a plan asks for.

Attention probabilities are recomputed for the requested query rows from the layer's own
``input_layernorm`` / ``q_proj`` / ``k_proj`` with rotary, softmax over all current keys, averaged
over heads and rows. The layer itself still runs with the model's backend (SDPA), so no layer ever
runs eager attention just to expose its weights (the SpecPrune-VLA and VLA-Pruner releases switch
every layer to eager attention for that).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from prunebench.layout import TokenLayout
from prunebench.llama_compat import attention_scaling


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:  # (1, n, H*hd) -> (1, H, n, hd)
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def _scatter_visual(values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Values over current slots -> a vector over visual indices, NaN where a token is absent."""
    out = torch.full((layout.n_visual,), float("nan"), dtype=torch.float32)
    out[layout.present_visual()] = values[layout.visual_slots()].float().cpu()
    return out


def _keys(attn, x: torch.Tensor) -> torch.Tensor:
    """(1, H, n, hd) keys of the normalised input ``x``, KV heads repeated to the query heads."""
    cfg = attn.config
    k = _heads(attn.k_proj(x), cfg.num_key_value_heads)
    return k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)


def _queries(attn, x: torch.Tensor) -> torch.Tensor:
    return _heads(attn.q_proj(x), attn.config.num_attention_heads)


def attention_to_visual(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        layout: TokenLayout, rows: list[str]) -> dict[str, torch.Tensor]:
    """Head- and row-averaged softmax attention of each row group in ``rows`` to every visual
    token at ``layer``. Keys (with rotary) are computed once for all groups."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = _keys(attn, x)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    out = {}
    for group in rows:
        row_slots = layout.row_slots(group)
        q = _queries(attn, x[:, row_slots])
        cq, sq = cos[:, row_slots].unsqueeze(1), sin[:, row_slots].unsqueeze(1)
        q = (q * cq + rotate_half(q) * sq) * attention_scaling(attn)  # scale the few query rows, not the scores
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (1, H, r, n)
        out[group] = _scatter_visual(probs.mean(dim=(0, 1, 2)), layout)
    return out


def qk_logits_to_visual(layer, embeds: torch.Tensor, layout: TokenLayout, rows: str) -> torch.Tensor:
    """Raw q·k/√d logits of ``rows`` to visual tokens on the input embeddings: no rotary, no
    softmax, averaged over heads and rows (ADP's retrieval weight)."""
    attn = layer.self_attn
    x = layer.input_layernorm(embeds)
    q, k = _queries(attn, x[:, layout.row_slots(rows)]), _keys(attn, x)
    logits = (q @ k.transpose(-1, -2)).float() * attention_scaling(attn)
    return _scatter_visual(logits.mean(dim=(0, 1, 2)), layout)


def visual_embeddings(embeds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Input embeddings of all visual tokens, (n_visual, D), from the unpruned input."""
    start = layout.visual_start
    return embeds[0, start:start + layout.n_visual].float().cpu()
