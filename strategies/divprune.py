"""``divprune``: DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175, https://arxiv.org/abs/2503.02175).

Before the LLM, keep the subset of visual tokens that is most *diverse*: the Max-Min Diversity
Problem (maximise the smallest pairwise distance inside the kept set), solved greedily on the LLM
input embeddings of the visual tokens (the projector's outputs) with the cosine distance
d(i, j) = 1 - cos(e_i, e_j). The greedy solver starts from the token farthest from its nearest
neighbour, then repeatedly adds the token whose distance to the nearest kept token is largest
(the first index on ties). It uses no attention and no text: the keep-set depends on the image
alone. Position ids stay the original ones; ``release_positions=true`` renumbers them 0..L'-1 as
the release's host code (LLaVA's ``generate``) does.

What we read in the release (https://github.com/vbdi/divprune, ``vbdi/divprune@799e2d9``,
``LLaVA/llava/model/llava_arch.py``: ``DivPrune`` and the end of
``prepare_inputs_labels_for_multimodal``):

* features: the visual slice of ``new_input_embeds``, the projector's outputs as the LLM receives
  them; distance matrix ``1 - cos`` from L2-normalised rows;
* first pick: per token the second smallest entry of its column of the distance matrix (the
  smallest being its own zero distance), i.e. the distance to its nearest neighbour; argmax;
* next picks: per token the minimum distance to the tokens picked so far; argmax;
* budget: ``int(round(SUBSET_RATIO * n_visual))`` kept tokens, removal only when
  ``LAYER_INDEX=0`` (before the first decoder layer), kept tokens in their original order;
* positions: ``position_ids`` stays None after the removal and ``generate`` derives it from the
  shortened attention mask (``cumsum - 1``), so the kept sequence is renumbered 0..L'-1. That is
  LLaVA's code path, not part of the method (the paper selects tokens; it says nothing of
  positions), so here it is a flag, ``release_positions``, off by default: on the shipped policy,
  trained with fixed positions, renumbering alone multiplies the replay action error of *random*
  keep 0.5 by 2.5 (0.014 -> 0.035) and took DivPrune keep 0.5 from 0.014 error to 0.036 and to
  0/20 closed-loop successes (docs/strategies.md).

Defaults and where they come from:

* ``keep_ratio = 0.098``: the release's ``SUBSET_RATIO`` in ``run_Divprune.sh`` and
  ``eval_time.sh`` ("the default retained ratio is set to 0.098", its README; ``tflops.py`` uses
  0.098 for images, 0.1 for video): the paper's ~90 % pruning headline. On the built-in model
  (2 x 64 tokens) that is round(12.5) = 13 tokens, 7 + 6; on OpenVLA-OFT (2 x 256) 50, 25 + 25.
* ``after_layer = BEFORE_LLM`` (the release's ``LAYER_INDEX=0``). Any later removal point is
  allowed for ablations; the features are then still the LLM *input* embeddings of the visual
  tokens (the ``EMBEDDINGS`` signal), not the hidden states at that layer.
* ``per_view = True``. The paper prunes one image (LLaVA-1.5: 576 tokens); on LLaVA-1.6 the
  release puts the base image's and every crop's tokens (newline tokens included) into one pool.
  OpenVLA-OFT sees two cameras whose tokens come from different viewpoints: per view, each camera
  keeps its share of the budget (proportional to its size, as every built-in per-view strategy
  does), so a cluttered primary view cannot take the whole budget from the wrist camera that
  guides the grasp, and the comparison with ``random``, ``downsample``, ``fastv`` and
  ``vla-pruner`` differs only in how tokens are chosen within a view. ``per_view=false`` is the
  release's single pool over both cameras.

Differences from the release: per-view budgets by default (above; the per-camera split is
largest-remainder and the total is at least 1 token); a picked token is never picked again (the
release does not mask picked tokens: with fewer distinct features than the budget it can pick one
twice and duplicate it in the sequence); a token's own distance is excluded exactly when its
nearest neighbour is sought (the release takes the second smallest entry of the column, which
differs only when rounding makes the self-distance larger than a near-duplicate's); distances in
float32 (the release: the model's dtype, fp16); a zero feature vector has distance 1 to every
token (the release divides by its zero norm). The greedy loop is the shared
``prunebench.selection.max_min_diverse`` / ``max_min_diverse_per_view`` (also VLA-Pruner's
diversity filter), whose first pick and distance are the release's.
"""

from __future__ import annotations

import torch
from pydantic import Field

import prunebench
from prunebench import BEFORE_LLM, EMBEDDINGS, Budget, PrunePlan, Stage, Strategy
from prunebench.selection import max_min_diverse, max_min_diverse_per_view
from prunebench.strategies.common import KeepAtPointConfig


class DivPruneConfig(KeepAtPointConfig):
    keep_ratio: float = Field(0.098, gt=0, le=1,
                              description="fraction of visual tokens kept (release's SUBSET_RATIO 0.098)")
    per_view: bool = Field(True, description="each camera keeps its share; False = one pool (the release)")
    release_positions: bool = Field(False, description="renumber positions 0..L'-1 after the removal, as "
                                                       "LLaVA's generate does in the release")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.05, 1.0),
                   after_layer=trial.suggest_int("after_layer", BEFORE_LLM, trial.n_layers // 2),
                   per_view=trial.suggest_categorical("per_view", [True, False]))


class DivPrune(Strategy):
    """Greedy max-min cosine diversity of the visual input embeddings, before the LLM (DivPrune)."""

    name = "divprune"
    Config = DivPruneConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.position_ids = "recompact" if self.config.release_positions else "original"

    def schedule(self, ctx):
        budget = Budget(keep_ratio=self.config.keep_ratio, per_view=self.config.per_view)
        return PrunePlan((Stage(self.config.after_layer, budget),), signals=(EMBEDDINGS,))

    def score(self, stage, signals, ctx):
        """No importance score: ``select`` reads the embeddings (NaN marks absent tokens)."""
        scores = torch.full((ctx.layout.n_visual,), float("nan"))
        scores[ctx.current_layout.present_visual()] = 0.0
        return scores

    def select(self, stage, scores, ctx, layout):
        present = layout.present_visual()
        features = ctx.signals[EMBEDDINGS]
        if stage.budget.per_view:
            return max_min_diverse_per_view(present, features, stage.budget.quotas(layout), layout)
        return max_min_diverse(present, features, stage.budget.total(layout))


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(DivPrune)
