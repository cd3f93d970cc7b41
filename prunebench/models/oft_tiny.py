"""OpenVLA-OFT's exact module structure at toy width, with random weights.

Same towers (class + register tokens, layer scale, second-to-last block), projector, proprio
projector, Llama decoder, L1 head, image size (224, two views of 16 x 16 patches), prompt template,
norm-stat keys and checkpoint file layout as the released 7B checkpoints; only the widths and depths
are small. It lets the adapter, the loader and every strategy be tested on a CPU without the 15 GB
download, and `benchmarks/gpu_oft7b.py --smoke` run anywhere.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from prunebench.models.oft_checkpoint import write_checkpoint
from prunebench.models.openvla_oft import EMPTY_PIECE, OFTSpec, OpenVLAOFT

TINY_BACKBONE = "prunebench-tiny-dinosiglip"
SPECIALS = ["<unk>", "<s>", "</s>", "<PAD>"]
TEMPLATE_WORDS = ["In", "What", "Out", "\n"]


def tiny_text_config(vocab_size: int) -> dict:
    return {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": vocab_size,
            "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def tiny_tokenizer():
    """A word-level fast tokenizer with Llama's special tokens and the empty piece, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = resources.files("prunebench.models").joinpath("vocab.txt").read_text().split()
    vocab = {}
    for word in SPECIALS + [EMPTY_PIECE] + TEMPLATE_WORDS + words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<PAD>")


def tiny_norm_stats() -> dict:
    """BOUNDS_Q99 statistics under OFT's keys, with LIBERO-like ranges (gripper unmasked in [0, 1])."""
    action = {"q01": [-0.75, -0.66, -0.94, -0.11, -0.21, -0.18, 0.0],
              "q99": [0.94, 0.88, 0.93, 0.10, 0.18, 0.15, 1.0],
              "mask": [True] * 6 + [False]}
    proprio = {"q01": [-0.3, -0.3, 0.0, 2.0, -1.0, -1.0, 0.0, -0.04],
               "q99": [0.3, 0.3, 1.3, 3.5, 1.0, 1.0, 0.04, 0.0]}
    return {f"{suite}_no_noops": {"action": action, "proprio": proprio}
            for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10")}


def build_tiny_oft(seed: int = 0, attn_implementation: str = "sdpa") -> OpenVLAOFT:
    """A random tiny OFT (float32), identical for the same seed."""
    tokenizer = tiny_tokenizer()
    spec = OFTSpec(vision_backbone_id=TINY_BACKBONE, text_config=tiny_text_config(len(tokenizer)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OpenVLAOFT(spec, tokenizer, tiny_norm_stats(), "libero_object_no_noops", attn_implementation)
        for name, p in model.named_parameters():  # visible scales (defaults are 0 / 1)
            if name.endswith(("scale_factor", "cls_token", "reg_token")):
                p.data.normal_(0, 0.5)
    return model.eval()


def write_tiny_checkpoint(root: str | Path, seed: int = 0) -> Path:
    """A tiny random checkpoint in the released layout, including the tensors the adapter skips
    (LM head, each tower's last block and final norm) so that their handling is exercised."""
    model = build_tiny_oft(seed)
    extra = {"language_model.lm_head.weight": torch.randn(len(model.tokenizer), model.llm.config.hidden_size)}
    for name, tower in zip(("featurizer", "fused_featurizer"), model.cfg.towers):
        last = getattr(model.vision_backbone, name).blocks[-1]
        prefix = f"vision_backbone.{name}."
        extra.update({f"{prefix}blocks.{tower.depth - 1}.{k}": v.clone() for k, v in last.state_dict().items()})
        extra.update({f"{prefix}norm.weight": torch.ones(tower.embed_dim),
                      f"{prefix}norm.bias": torch.zeros(tower.embed_dim)})
    return write_checkpoint(model, root, extra_tensors=extra)
