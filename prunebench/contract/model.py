"""The model contract: what the engine and the evaluation read from a Vision-Language-Action model.

A model encodes an observation into LLM input embeddings and a :class:`TokenLayout`; the engine
then runs the decoder layers itself (so it can prune between them), applies the final norm, and
hands the read-out hidden states to the model's action head. :class:`VLAModel` lists every member
that prunebench/engine, prunebench/evaluation, prunebench/study, the CLI and benchmarks/ read from
a model object, and nothing more. Two classes implement it: ``MiniOFT`` (the built-in policy) and
``OpenVLAOFT`` (the released 7B checkpoints). Training (prunebench/training) builds a ``MiniOFT``
and uses its own API; it is not part of this contract.

A :class:`ModelFamily` says which ``--model`` sources it can load and loads them; plugins add
families through the ``prunebench_register_models`` hook (docs/model.md).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from prunebench.contract.layout import TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.contract.strategy import Observation

__all__ = ["DecoderConfig", "DecoderLayer", "DecoderStack", "Encoded", "ModelFamily", "ModelShape",
           "VLAModel", "missing_members"]


@dataclass
class Encoded:
    """The LLM input of one query, before any removal: what :meth:`VLAModel.encode` returns."""

    embeds: torch.Tensor  # (1, L, D) input embeddings on the model's device, in the layout's order
    layout: TokenLayout  # where each token sits: BOS, views' patches, proprio, prompt, action slots
    images: torch.Tensor  # (views, 3, S, S) preprocessed frames in [0, 1] (passed to patch_pixels)


@runtime_checkable
class ModelShape(Protocol):
    """``model.cfg``: the sizes the evaluation reads (a pydantic config in both built-in models)."""

    views: tuple[str, ...]  # camera views read from Observation.images, in token order
    image_size: int  # side of the square frames the model sees (synthetic streams render at it)
    chunk: int  # actions per query; the closed loop executes the chunk open-loop

    @property
    def grid(self) -> int:
        """Patches per side of one view (a view has grid² visual tokens)."""


@runtime_checkable
class DecoderConfig(Protocol):
    """``model.llm.config`` (a transformers ``LlamaConfig``): sizes and the attention backend."""

    hidden_size: int  # D: FLOP accounting
    intermediate_size: int  # MLP width: FLOP accounting
    num_attention_heads: int  # attention signals split q and k into heads
    num_key_value_heads: int  # grouped-query attention: KV heads repeated to the query heads
    _attn_implementation: str  # backend every layer runs with ("sdpa", "eager", ...), in results


@runtime_checkable
class DecoderLayer(Protocol):
    """One decoder layer with the call signature and attributes of transformers'
    ``LlamaDecoderLayer``: the engine calls it as ``layer(h, attention_mask=..., position_ids=...,
    position_embeddings=(cos, sin), ...)`` (prunebench.engine.transformers_compat.run_layer)."""

    self_attn: Any  # Llama attention: config, q_proj, k_proj, head_dim/scaling (signals recompute q·k)
    input_layernorm: Callable[[torch.Tensor], torch.Tensor]  # pre-attention norm (signals apply it)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The layer's new hidden states (or a tuple whose first item they are)."""


@runtime_checkable
class DecoderStack(Protocol):
    """``model.llm``: a transformers ``LlamaModel`` (or an object with the same members), marked
    bidirectional (``transformers_compat.make_bidirectional``). The rotary table is read from
    ``llm.rotary_emb`` where the release has one, else from ``layers[0].self_attn.rotary_emb``."""

    layers: Sequence[DecoderLayer]  # the decoder layers in order; the engine runs them one by one
    norm: Callable[[torch.Tensor], torch.Tensor]  # final norm, applied after the last layer
    config: DecoderConfig  # sizes and attention backend


@runtime_checkable
class VLAModel(Protocol):
    """What the engine and the evaluation need from a VLA model.

    ``isinstance(model, VLAModel)`` checks that every member is present, not their types. From
    Python 3.12 on it looks members up statically, so a ``torch.nn.Module``'s submodules (``llm``)
    are not seen: the built-in models are registered (``VLAModel.register(MiniOFT)``), and
    :func:`missing_members` checks any object on every Python version."""

    cfg: ModelShape  # views, image size, action chunk, patch grid
    llm: DecoderStack  # the decoder layers, the final norm and the LLM config

    @property
    def n_layers(self) -> int:
        """Decoder depth, ``len(llm.layers)`` (plots and paper-layer scaling read it)."""

    @property
    def attn_implementation(self) -> str:
        """The attention backend the layers run with, recorded in results files."""

    @property
    def device(self) -> torch.device:
        """Where the weights are; ``encode`` creates its tensors there."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The weights (``torch.nn.Module.parameters``): the engine and ``model_device`` read the
        first one's device."""

    def encode(self, obs: Observation) -> Encoded:
        """An observation as LLM input embeddings, their token layout and the preprocessed frames."""

    def layout_for(self, n_prompt: int) -> TokenLayout:
        """The token layout of a query whose prompt has ``n_prompt`` tokens (studies count the
        visual tokens with it)."""

    def preprocess_images(self, obs: Observation) -> torch.Tensor:
        """``obs.images`` as the model sees them: (views, 3, S, S) floats in [0, 1]."""

    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Raw pixels (0..255) of every visual token's patch, (n_visual, patch² · 3), from
        ``preprocess_images`` output (``QueryContext.patch_pixels``)."""

    def head(self, readout: torch.Tensor) -> torch.Tensor:
        """The action head: read-out hidden states (B, layout.readout_slots(), D), after the final
        norm, to normalised actions (B, chunk, action_dim)."""

    def unnormalize_actions(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised head output to environment actions (same shape)."""


def missing_members(obj: object, protocol: type | None = None) -> list[str]:
    """The members of ``protocol`` (default :class:`VLAModel`) that ``obj`` lacks, looked up as the
    engine does (``hasattr``: an ``nn.Module``'s submodules count)."""
    protocol = protocol or VLAModel
    members = set(inspect.get_annotations(protocol))  # data members
    members |= {k for k in vars(protocol) if not k.startswith("_")}  # methods and properties
    return [m for m in sorted(members) if not hasattr(obj, m)]


@dataclass(frozen=True)
class ModelFamily:
    """A kind of model ``--model`` can name, returned by ``prunebench_register_models`` hooks.

    ``load_model(source, seed=, suite=, device=)`` asks the registered families in turn (plugins'
    before the built-in ones) and loads ``source`` with the first whose ``claims`` accepts it.
    """

    name: str  # unique short name, shown in errors ("mini-oft", "openvla-oft")
    # whether this family loads ``source``: a path or hub id as given to --model; None: no --model
    claims: Callable[[str | None], bool]
    # load(source, *, seed, suite, device) -> (model, info); info goes to results files and must
    # hold "source" (str) and "trained" (bool: False prints a note that the weights are random)
    load: Callable[..., tuple[VLAModel, dict]]
    description: str = ""  # what sources it takes, one phrase (listed when no family claims one)
    # depth(source) -> decoder layers, read cheaply (a config file) so a study can fit its search
    # space to the model before any worker loads it; None: the model is loaded to count them
    depth: Callable[[str | None], int] | None = None
