"""OpenVLA-OFT's modules, named exactly as in the released files (github.com/moojink/openvla-oft,
prismatic/extern/hf/modeling_prismatic.py and prismatic/models/action_heads.py), so a checkpoint
loads as it is; ``OpenVLAOFT`` (openvla_oft.py) assembles them.

    vision_backbone.featurizer        DINOv2 ViT-L/14, 4 registers (timm layout)
    vision_backbone.fused_featurizer  SigLIP so400m/14 (timm layout)
    projector.fc1/fc2/fc3             fused GELU MLP, 2176 -> 8704 -> 4096 -> 4096
    language_model.model              Llama-2-7B decoder (transformers' LlamaModel)
    proprio_projector.fc1/fc2         proprio_projector--<step>_checkpoint.pt
    action_head.model.*               action_head--<step>_checkpoint.pt (L1 MLP-ResNet)

Each vision tower returns its second-to-last block's patch tokens (OFT calls timm's
``get_intermediate_layers``; we simply do not build the last block, whose output is never used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import LlamaConfig, LlamaModel

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.models.openvla_oft import OFTSpec

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TowerSpec(BaseModel):
    """One timm ViT tower of the fused backbone."""

    model_config = ConfigDict(frozen=True)
    embed_dim: int
    depth: int  # blocks in the released tower; we build depth - 1 (second-to-last output)
    heads: int
    mlp_hidden: int
    patch: int
    class_token: bool
    registers: int
    layer_scale: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# vision_backbone_id (config.json) -> (featurizer, fused_featurizer). Pixel channels follow this order.
VISION_BACKBONES = {
    "dinosiglip-vit-so-224px": (
        TowerSpec(embed_dim=1024, depth=24, heads=16, mlp_hidden=4096, patch=14, class_token=True,
                  registers=4, layer_scale=True, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        TowerSpec(embed_dim=1152, depth=27, heads=16, mlp_hidden=4304, patch=14, class_token=False,
                  registers=0, layer_scale=False, mean=(0.5,) * 3, std=(0.5,) * 3)),
    # the same structure at toy width, for tests and CPU smoke runs (prunebench.models.oft_tiny)
    "prunebench-tiny-dinosiglip": (
        TowerSpec(embed_dim=32, depth=3, heads=2, mlp_hidden=64, patch=14, class_token=True,
                  registers=4, layer_scale=True, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        TowerSpec(embed_dim=40, depth=3, heads=2, mlp_hidden=72, patch=14, class_token=False,
                  registers=0, layer_scale=False, mean=(0.5,) * 3, std=(0.5,) * 3)),
}


# ---------------------------------------------------------------------------------- vision towers
class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))  # OFT renames timm's `gamma`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        d = spec.embed_dim
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn, self.mlp = _Attention(d, spec.heads), _Mlp(d, spec.mlp_hidden)
        self.ls1 = _LayerScale(d) if spec.layer_scale else nn.Identity()
        self.ls2 = _LayerScale(d) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch, spec.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTower(nn.Module):
    """A timm VisionTransformer (same parameter names) returning the patch tokens after its
    second-to-last block: positions are added to the patches only (timm's ``no_embed_class``), then
    the class and register tokens are prepended, and dropped again at the end."""

    def __init__(self, spec: TowerSpec, image_size: int) -> None:
        super().__init__()
        d, grid = spec.embed_dim, image_size // spec.patch
        self.patch_embed = _PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.registers, d)) if spec.registers else None
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.depth - 1))
        self.n_prefix = int(spec.class_token) + spec.registers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, self.n_prefix:]


class FusedVisionBackbone(nn.Module):
    """Both towers on every image; features concatenated per patch, images along the sequence."""

    def __init__(self, spec: OFTSpec) -> None:
        super().__init__()
        first, second = spec.towers
        self.featurizer = VisionTower(first, spec.image_size)
        self.fused_featurizer = VisionTower(second, spec.image_size)
        self.embed_dim = first.embed_dim + second.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 6 * images, S, S), per image 3 channels per tower -> (B, images * grid², embed_dim)."""
        images = torch.split(pixel_values, 6, dim=1)
        return torch.cat([torch.cat([self.featurizer(img[:, :3]), self.fused_featurizer(img[:, 3:])], dim=2)
                          for img in images], dim=1)


# ---------------------------------------------------------------------------------- projectors, head
class Projector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class ProprioProjector(nn.Module):
    def __init__(self, proprio_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(proprio_dim, llm_dim), nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class _MLPResNet(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.layer_norm1, self.fc1 = nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden)
        self.mlp_resnet_blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(2))
        self.layer_norm2, self.fc2 = nn.LayerNorm(hidden), nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    def __init__(self, llm_dim: int, action_dim: int) -> None:
        super().__init__()
        self.model = _MLPResNet(action_dim * llm_dim, llm_dim, action_dim)


class LanguageModel(nn.Module):
    """Holds the decoder under the checkpoint's name (``language_model.model``); no lm_head: OFT's
    L1 head reads hidden states, so the 32064-way logits are never needed."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.model = LlamaModel(config)
