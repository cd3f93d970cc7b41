"""``lightvla-free``: LightVLA's parameter-free token selector, applied training-free.

LightVLA (Jiang et al. 2025, "The Better You Learn, The Smarter You Prune", arXiv 2509.12594,
https://arxiv.org/abs/2509.12594; code https://github.com/LiAutoAD/LightVLA, read at
``LiAutoAD/LightVLA@22b7abe`` (22b7abe51737dc2ea003db910341a47540ed33b8; unchanged at a4680fd),
``prismatic/extern/hf/modeling_prismatic.py``, class ``TokenPruner``).

**This is not LightVLA.** LightVLA fine-tunes OpenVLA-OFT (LoRA) with the selector in the loop, so
the released checkpoints learned to work with, and to produce embeddings for, this selection. Here
the same parameter-free selector runs on a model that was never trained with it (the shipped
MiniOFT policy, or a stock OpenVLA-OFT checkpoint): results measure the selector alone, without
LightVLA's fine-tuning, and are not LightVLA's results.

Before the first decoder layer, on the LLM input embeddings:

1. RMS-normalise (no learned weight, eps 1e-6) the visual tokens P (n_visual x D) and the *task*
   tokens T (every token after the visual ones: proprio, prompt, the 56 action slots, STOP);
2. one query per visual token: Q = softmax(P T^T / sqrt(D)) T, one attention head over the full
   hidden size, then RMS-normalised;
3. scores S = Q P^T / sqrt(D), (n_visual x n_visual): query i rates every visual token j;
4. every query picks its argmax token (the first index on ties); the **union of the picks** is kept,
   in its original order. No budget: how many survive depends on the input (at most n_visual, at
   least 1). BOS and every non-visual token are always kept; position ids stay the original ones.

``score`` returns, per visual token, how many queries picked it (0 = pruned); ``select`` returns
the tokens with at least one pick.

What we read in the release (line numbers at 22b7abe):

* ``TokenPruner.forward`` (l.100-121): the sequence is split into [first token | ``num_patches`` |
  the rest]; the first token (BOS) is kept untouched, the rest is the "task" span; in eval mode
  (``vla.eval()``) the mask of argmax picks selects the patches and their *original* position ids.
* ``num_patches`` = patches per image x images (l.675, and ``set_num_images_in_input`` l.1056-1058,
  called by the LIBERO eval with 2 images): OFT's proprio token, appended after the patches
  (``_process_proprio_features``, l.771-780), is *not* a patch: it is the first task token and is
  never pruned. The task span also holds the prompt (with the "▁" token ``predict_action`` appends,
  l.1299), the 56 action slots, zeroed at inference (l.1218), and STOP: our ``post_visual`` row
  group, exactly (the OpenVLA-OFT adapter zeroes the action slots too).
* ``rms_norm`` (l.63-68): float32, eps 1e-6, no weight, cast back to the input dtype;
  ``get_score`` (l.70-78): patches and task normalised, ``F.scaled_dot_product_attention(patches,
  task, task)`` on 3-D tensors (one head, scale 1/sqrt(D)), queries normalised, scores against the
  *normalised* patches times 1/sqrt(hidden_size).
* ``score_to_mask`` (l.80-90): ``score.argmax(-1)`` over all ``num_patches`` at once, both cameras
  together; the union of the picks is the mask.
* Training only (never here): ``score_to_indices`` (l.92-98) adds uniform noise
  ``rand_like(score) * noise_scale`` (the paper says Gumbel softmax), annealed from 1 to 0 over
  fine-tuning (``vla-scripts/finetune.py`` l.1032), with a straight-through one-hot.

Defaults = the release: ``task_rows = "post_visual"``, ``per_view = False`` (argmax over every
visual token), ``max_keep_ratio = None`` (no cap), float32.

Differences from the release:

* No fine-tuning (above). On the built-in MiniOFT the 56 action slots are learned queries, not
  zeros, so its task span holds 56 non-zero vectors the release never has; ``task_rows`` can
  choose ``prompt``, ``text``, ``language`` or ``nonvision`` instead.
* Precision: float32 on the host (signals reach strategies in float32); the release computes in
  the model's dtype, bfloat16, where near-equal scores tie more often and ties go to the lowest
  index. ``dtype="bfloat16"`` repeats the release's rounding (RMS in float32 cast back to
  bfloat16, attention and scores in bfloat16).
* Read-out: the release reads the action hidden states from the last 56 positions of the sequence
  (``[-56:]``, l.1241-1244); the harness reads every strategy with OpenVLA-OFT's shifted slice.
* Additions for studies, off by default: ``per_view`` (each query picks within its own camera) and
  ``max_keep_ratio`` (if the union exceeds the cap, keep its most-picked tokens, per camera when
  ``per_view``; ties to the lowest index).
* The selector runs on the host, where strategies receive their signals, and its time is charged
  to the query's overhead; on OpenVLA-OFT-7B it is about 3 GFLOPs per query, mostly the
  n_visual x n_visual x D score matrix (the release computes it on the GPU, inside the LLM's forward).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

import prunebench
from prunebench import BEFORE_LLM, EMBEDDINGS, Budget, PrunePlan, Stage, Strategy, StrategyConfig, row_embeddings
from prunebench.selection import top_k, top_k_per_view

RMS_EPS = 1e-6  # TokenPruner.rms_norm's default
TASK_ROWS = ("post_visual", "prompt", "text", "language", "nonvision")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LightVLAFreeConfig(StrategyConfig):
    task_rows: Literal["post_visual", "prompt", "text", "language", "nonvision"] = Field(
        "post_visual", description="row group the queries attend to; post_visual = the release's task span")
    per_view: bool = Field(False, description="each query picks within its own camera; False = over all (release)")
    max_keep_ratio: float | None = Field(
        None, gt=0, le=1, description="cap on the kept share of visual tokens (most-picked first); None = none")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="arithmetic of the selector; bfloat16 = the release's rounding")

    @classmethod
    def search_space(cls, trial):
        # a cap of 1.0 never binds (the union has at most n_visual tokens): the release's behaviour
        return cls(task_rows=trial.suggest_categorical("task_rows", list(TASK_ROWS)),
                   per_view=trial.suggest_categorical("per_view", [False, True]),
                   max_keep_ratio=trial.suggest_float("max_keep_ratio", 0.05, 1.0))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """RMS normalisation without weight, in float32, back in ``x``'s dtype (the release's)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype)


def lightvla_scores(patches: torch.Tensor, task: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LightVLA's score matrix (n_patches x n_patches): row i = query i's score of every patch.

    ``patches`` (n_patches, D) and ``task`` (n_task, D) are input embeddings; the arithmetic is in
    ``dtype`` (RMS norms in float32, as the release)."""
    p, t = _rms(patches.to(dtype)), _rms(task.to(dtype))
    queries = _rms(F.scaled_dot_product_attention(p[None], t[None], t[None])[0])
    return (queries @ p.T) * (1.0 / math.sqrt(p.shape[-1]))


def lightvla_picks(patches: torch.Tensor, task: torch.Tensor, view_of: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The patch each query picks (n_patches,): the argmax of its scores, the first index on ties;
    with ``view_of`` (view id per patch) only among the patches of the query's own view."""
    scores = lightvla_scores(patches, task, dtype).float()
    if view_of is not None:
        scores = scores.masked_fill(view_of[:, None] != view_of[None, :], float("-inf"))
    return scores.argmax(dim=-1)


class LightVLAFree(Strategy):
    """LightVLA's selector without its fine-tuning: union of each patch query's argmax, before the LLM.

    No budget: the kept count depends on the input."""

    name = "lightvla-free"
    Config = LightVLAFreeConfig

    def schedule(self, ctx):
        return PrunePlan((Stage(BEFORE_LLM),), signals=(EMBEDDINGS, row_embeddings(self.config.task_rows)))

    def score(self, stage, signals, ctx):
        """Number of queries that picked each visual token (NaN for absent tokens)."""
        layout = ctx.current_layout
        present = layout.present_visual()
        view_of = layout.view_of_visual()[present] if self.config.per_view else None
        picks = lightvla_picks(signals[EMBEDDINGS][present], signals[row_embeddings(self.config.task_rows)],
                               view_of, DTYPES[self.config.dtype])
        votes = torch.full((layout.n_visual,), float("nan"))
        votes[present] = torch.bincount(picks, minlength=present.numel()).float()
        return votes

    def select(self, stage, scores, ctx, layout):
        picked = torch.nonzero(scores > 0, as_tuple=True)[0]  # NaN (absent) compares False
        cap = self.config.max_keep_ratio
        if cap is None:
            return picked
        budget = Budget(keep_ratio=cap, per_view=self.config.per_view)
        if self.config.per_view:
            return top_k_per_view(scores, budget.quotas(layout), layout, among=picked)
        return top_k(scores, budget.total(layout), picked)


@prunebench.hookimpl
def prunebench_register_strategies(register):
    register(LightVLAFree)
