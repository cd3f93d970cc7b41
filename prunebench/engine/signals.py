"""On-demand signals: computed only at the layers and query rows a plan asks for.

Attention probabilities of the requested query rows: softmax over all current keys, averaged over
heads and rows. From transformers 4.48 on they come from the q and k the layer computes itself
(``attention_from_layer``, called inside the layer through ``llama_compat.run_layer(observe=)``),
so a signal costs the softmax of its rows and nothing more; before 4.48 they are recomputed from
the layer's ``input_layernorm`` / ``q_proj`` / ``k_proj`` with rotary (``attention_recomputed``).
Either way the layer itself runs with the model's backend (SDPA), so no layer ever runs eager
attention just to expose its weights (the SpecPrune-VLA and VLA-Pruner releases switch every layer
to eager attention for that).

Values stay on the model's device until ``to_host`` moves them (the engine does so when a stage or
``on_forward_end`` reads them): one wait for the device per stage, not one per signal.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from prunebench.contract.layout import TokenLayout
from prunebench.engine.transformers_compat import attention_scaling


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:  # (1, n, H*hd) -> (1, H, n, hd)
    return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def _on(device: torch.device, index: torch.Tensor) -> torch.Tensor:
    """A small CPU index tensor on ``device`` without waiting for the device (no-op on the CPU)."""
    return index if index.device == device else index.to(device, non_blocking=True)


def to_host(values: torch.Tensor, columns: torch.Tensor | None, n_visual: int) -> torch.Tensor:
    """Signal values on the host in float32. ``columns``: the visual indices of the entries along
    ``values``' last dimension (the result then has n_visual entries there, NaN where absent;
    several signals' rows go in one call); None: ``values`` are already indexed by visual index."""
    if values.device.type != "cpu":
        values = values.cpu()
    if values.dtype != torch.float32:
        values = values.float()
    if columns is None:
        return values
    out = torch.full((*values.shape[:-1], n_visual), float("nan"), dtype=torch.float32)
    out[..., columns] = values
    return out


def _keys(attn, x: torch.Tensor) -> torch.Tensor:
    """(1, H, n, hd) keys of the normalised input ``x``, KV heads repeated to the query heads."""
    cfg = attn.config
    k = _heads(attn.k_proj(x), cfg.num_key_value_heads)
    return k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)


def _queries(attn, x: torch.Tensor) -> torch.Tensor:
    return _heads(attn.q_proj(x), attn.config.num_attention_heads)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _row_attention(queries: list[torch.Tensor], k: torch.Tensor, scaling: float,
                   layout: TokenLayout, form: str = "mean", bias: torch.Tensor | None = None):
    """For each group's query rows (1, H, r, hd): softmax over all keys ``k`` (1, H, n_keys, hd)
    (plus ``bias``), mean over heads, on the device. ``form`` (``SignalRequest.form``):

    * mean: (len(queries), n visual keys), also averaged over rows, at the present visual slots,
      then at the keys after the sequence's own (reused tokens' cached keys);
    * per_row: a list with one (r, n visual keys) tensor per group (no mean over rows);
    * entropy: a list with one (1,) tensor per group: the entropy (nats) of each row's distribution
      over all keys, averaged over rows (VLA-Cache's per-layer entropy).

    per_row and entropy are computed in float32 (a bfloat16 entropy near 5 nats moves in steps of
    0.03); mean in the model's dtype, one reduction over heads and rows, as it always was."""
    first, stop = layout.visual_span()  # the present visual tokens fill one run of slots
    n = layout.current_length
    # scale the few query rows, not the scores
    logits = [(q * scaling) @ k.transpose(-1, -2) for q in queries]
    if bias is not None:
        logits = [x + bias for x in logits]
    if form == "mean":
        probs = [torch.softmax(x, dim=-1).mean(dim=(0, 1, 2)) for x in logits]
    else:
        probs = [torch.softmax(x.float(), dim=-1).mean(dim=(0, 1)) for x in logits]
    if form == "entropy":
        return [-(p * torch.log(p + 1e-10)).sum(dim=-1).mean().reshape(1) for p in probs]
    if k.shape[-2] > n:  # reused keys after the sequence
        probs = [torch.cat([p[..., first:stop], p[..., n:]], dim=-1) for p in probs]
        first, stop = 0, None
    if form == "per_row":
        return [p[:, first:stop] for p in probs]
    return torch.stack(probs)[:, first:stop]


def attention_from_layer(module, query: torch.Tensor, key: torch.Tensor, layout: TokenLayout,
                         rows: list[str], form: str = "mean", bias: torch.Tensor | None = None):
    """Attention of each row group in ``rows`` to the visual keys (present, then reused), from the q
    and the keys a layer's attention ``module`` attended with (rotary applied, KV heads not yet
    repeated): (len(rows), n visual keys) on the device (other ``form``s: see ``_row_attention``)."""
    k = key
    if query.shape[1] != key.shape[1]:  # KV heads -> query heads
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    queries = [query[:, :, _on(query.device, layout.row_slots(group))] for group in rows]
    return _row_attention(queries, k, attention_scaling(module), layout, form, bias)


def keys_from_layer(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The present visual tokens' keys as a layer computed them, rotary undone (a rotation by -angle)
    and averaged over heads (ToMe's similarity metric): (n present visual, head_dim) on the device."""
    first, stop = layout.visual_span()
    k = key[:, :, first:stop]
    c, s = cos[:, first:stop].unsqueeze(1), sin[:, first:stop].unsqueeze(1)
    return (k * c - rotate_half(k) * s).mean(dim=(0, 1))


def keys_recomputed(layer, h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The same as ``keys_from_layer``, recomputed from ``layer``'s weights (transformers < 4.48)."""
    first, stop = layout.visual_span()
    return _keys(layer.self_attn, layer.input_layernorm(h[:, first:stop])).mean(dim=(0, 1))


def attention_recomputed(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         layout: TokenLayout, rows: list[str], form: str = "mean",
                         bias: torch.Tensor | None = None):
    """The same as ``attention_from_layer``, recomputed from ``layer``'s weights on its input ``h``
    (transformers < 4.48, where a layer's q and k cannot be observed). Keys once for all groups."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = _rotate(_keys(attn, x), cos, sin)
    queries = []
    for group in rows:
        slots = _on(h.device, layout.row_slots(group))
        queries.append(_rotate(_queries(attn, x[:, slots]), cos[:, slots], sin[:, slots]))
    return _row_attention(queries, k, attention_scaling(attn), layout, form, bias)


def attention_to_visual(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        layout: TokenLayout, rows: list[str]) -> dict[str, torch.Tensor]:
    """Head- and row-averaged softmax attention of each row group in ``rows`` to every visual
    token at ``layer`` (recomputed), on the host: group -> (n_visual,), NaN where absent."""
    values = attention_recomputed(layer, h, cos, sin, layout, rows)
    present = layout.present_visual()
    return {group: to_host(v, present, layout.n_visual) for group, v in zip(rows, values)}


def qk_logits_to_visual(layer, embeds: torch.Tensor, layout: TokenLayout, rows: str) -> torch.Tensor:
    """Raw q·k/√d logits of ``rows`` to visual tokens on the input embeddings: no rotary, no
    softmax, averaged over heads and rows (ADP's retrieval weight). (n_visual,) float32 on the
    model's device; ``layout`` is the unpruned input's."""
    attn = layer.self_attn
    cfg = attn.config
    row_slots = layout.row_slots(rows)
    slots = torch.cat([row_slots, layout.visual_slots()])  # the norm is per token: only these are needed
    x = layer.input_layernorm(embeds[:, _on(embeds.device, slots)])
    q, k = attn.q_proj(x[:, :len(row_slots)]), attn.k_proj(x[:, len(row_slots):])
    # the mean over rows and heads of q·k is linear in q: average the query rows first (a
    # matrix-vector product instead of rows x keys), and sum the query heads sharing a KV head
    q = q[0].float().mean(dim=0).view(cfg.num_key_value_heads, -1, k.shape[-1] // cfg.num_key_value_heads)
    logits = k[0].float() @ q.sum(dim=1).flatten()
    return logits * (attention_scaling(attn) / cfg.num_attention_heads)


def row_embeddings(embeds: torch.Tensor, layout: TokenLayout, rows: str) -> torch.Tensor:
    """Input embeddings of the ``rows`` tokens, (n_rows, D), from the unpruned input (on the model's
    device)."""
    return embeds[0, _on(embeds.device, layout.row_slots(rows))]


def visual_embeddings(embeds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Input embeddings of all visual tokens, (n_visual, D), from the unpruned input (on the
    model's device)."""
    start = layout.visual_start
    return embeds[0, start:start + layout.n_visual]
