"""The Llama decoder API across transformers releases, in one place.

The engine runs Llama decoder layers one by one. Their call signature changed over time
(transformers' ``models/llama/modeling_llama.py`` of each release):

* transformers 4.40 - 4.43 (OpenVLA-OFT pins 4.40.1): no model-level rotary table; each attention
  module computes (cos, sin) from ``position_ids``; layers return a tuple.
* 4.44 - 4.47: a model-level ``rotary_emb``; layers take ``position_embeddings=(cos, sin)`` and return
  a tuple. Their SDPA attention is hard-wired causal whenever the mask is None.
* 4.48 and later (5.x included): SDPA honours ``is_causal=False`` per call; 5.x layers return a tensor.

OpenVLA-OFT attends bidirectionally. We enforce it ourselves on every release: an all-zero additive
mask before 4.48 (stock SDPA then calls the kernel with ``is_causal=False``; eager adds nothing), and
``is_causal=False`` with no mask from 4.48 on (keeps the flash/efficient SDPA kernels available).

Attention signals: from 4.48 on each attention module looks its attention function up by name
(``config._attn_implementation``) in transformers' registry on every call. ``run_layer(...,
observe=f)`` runs that one layer through a registered function that calls the model's own backend
unchanged and hands ``f`` the q and k (after rotary) the layer computed, so a signal costs only the
softmax of the rows it needs. Before 4.48 there is no registry: the engine recomputes q and k
(``signals.attention_recomputed``).
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

_RELEASE = Version(transformers.__version__).release
# Before 4.48 a None mask means causal SDPA in a layer call; pass an explicit zero mask instead.
NEEDS_ZERO_MASK = _RELEASE < (4, 48)
# Before 5.0, LlamaModel.forward ignores config.is_causal and builds a causal mask unless given one.
FORWARD_NEEDS_MASK = _RELEASE < (5,)
# From 4.48 on, attention modules call their attention function through a registry (observe=...).
HAS_ATTENTION_REGISTRY = _RELEASE >= (4, 48)
OBSERVING_ATTENTION = "prunebench_observing"


def _observing_attention(module, query, key, value, attention_mask, *, prunebench_observe, **kwargs):
    """The layer's own backend (same kernel, same numerics) on the layer's own arguments, except:
    ``keys(module, key, value)`` may replace the keys and values attended to (a ``reuse`` stage
    appends cached ones), ``bias`` (1, 1, 1, n_keys) is an additive mask over the keys (proportional
    attention); then ``observe(module, query, key, bias)`` sees the q and the keys attended to
    (rotary applied, KV heads not repeated)."""
    backend, observe, keys, bias = prunebench_observe
    if keys is not None:
        key, value = keys(module, key, value)
    if bias is not None:
        attention_mask = bias
    out = backend(module, query, key, value, attention_mask, **kwargs)
    if observe is not None:
        observe(module, query, key, bias)
    return out


if HAS_ATTENTION_REGISTRY:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hasattr(ALL_ATTENTION_FUNCTIONS, "register"):  # AttentionInterface (4.50+)
        ALL_ATTENTION_FUNCTIONS.register(OBSERVING_ATTENTION, _observing_attention)
    else:  # 4.48, 4.49: a plain dict
        ALL_ATTENTION_FUNCTIONS[OBSERVING_ATTENTION] = _observing_attention


def _attention_function(name: str):
    """The function a Llama attention module calls for backend ``name`` (eager is not registered)."""
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def make_bidirectional(llm) -> None:
    """Mark a LlamaModel bidirectional: the config (read by ``LlamaModel.forward`` in 5.x) and every
    attention module (read by SDPA in a manual layer loop from 4.48 on)."""
    llm.config.is_causal = False
    for layer in llm.layers:
        layer.self_attn.is_causal = False


def rotary(llm, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (1, n, head_dim) for ``position_ids`` (1, n), from the model-level table or,
    on releases without one, from the first attention module's (all layers share the same table)."""
    table = getattr(llm, "rotary_emb", None) or llm.layers[0].self_attn.rotary_emb
    return table(h, position_ids)


def zero_mask(h: torch.Tensor) -> torch.Tensor:
    """An additive (1, 1, n, n) mask that masks nothing."""
    n = h.shape[1]
    return torch.zeros(h.shape[0], 1, n, n, dtype=h.dtype, device=h.device)


def run_layer(llm, layer, h: torch.Tensor, position_ids: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, observe=None, keys=None, bias=None) -> torch.Tensor:
    """One decoder layer, bidirectional, at the given positions. Returns the new hidden states.

    ``observe(module, query, key, bias)`` is called inside the layer's attention with the q and k it
    computes; the layer's output is unchanged, bit for bit. ``keys(module, key, value) -> (key,
    value)``: the keys and values the layer attends to instead of its own (the queries stay the
    layer's tokens); ``bias``: an additive (1, 1, 1, n_keys) attention mask. All three need
    ``HAS_ATTENTION_REGISTRY`` except ``bias``, which older releases add to their zero mask; with
    none of them the layer runs exactly as the library runs it."""
    hooked = observe is not None or keys is not None or bias is not None
    if NEEDS_ZERO_MASK:
        if observe is not None or keys is not None:
            raise RuntimeError("observing a layer's attention or changing its keys needs transformers >= 4.48")
        mask = zero_mask(h) if bias is None else zero_mask(h) + bias
        kwargs = {"attention_mask": mask, "position_ids": position_ids}
        if getattr(llm, "rotary_emb", None) is not None:
            kwargs["position_embeddings"] = (cos, sin)
        out = layer(h, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    kwargs = {"attention_mask": None, "position_ids": position_ids, "position_embeddings": (cos, sin),
              "is_causal": False}
    if not hooked:
        out = layer(h, **kwargs)
    else:  # for this call only, the module finds our function under its config's backend name
        config = layer.self_attn.config
        backend = config._attn_implementation
        config._attn_implementation = OBSERVING_ATTENTION
        try:
            out = layer(h, prunebench_observe=(_attention_function(backend), observe, keys, bias), **kwargs)
        finally:
            config._attn_implementation = backend
    return out[0] if isinstance(out, tuple) else out


def forward_bidirectional(llm, embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The library's own ``LlamaModel.forward``, bidirectional: last hidden state (after the final norm).

    The reference the engine's layer loop is tested against."""
    # A 4-D mask of ones attends everywhere under both meanings a 4-D mask has had before 5.0:
    # 1 = attend (4.40, 4.41), and additive (4.42+: a constant shift, which softmax ignores).
    mask = torch.ones_like(zero_mask(embeds)) if FORWARD_NEEDS_MASK else None
    return llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
               use_cache=False).last_hidden_state


def attention_scaling(attn) -> float:
    """Softmax scale of an attention module (``scaling`` from 4.48 on, 1/sqrt(head_dim) before)."""
    return getattr(attn, "scaling", None) or attn.head_dim ** -0.5
