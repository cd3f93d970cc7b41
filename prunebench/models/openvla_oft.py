"""OpenVLA-OFT checkpoints (``moojink/openvla-7b-oft-finetuned-libero-*``) as a model the engine runs.

Modules are named exactly as in the released files (github.com/moojink/openvla-oft,
prismatic/extern/hf/modeling_prismatic.py and prismatic/models/action_heads.py), so the checkpoint
loads as it is:

    vision_backbone.featurizer        DINOv2 ViT-L/14, 4 registers (timm layout)
    vision_backbone.fused_featurizer  SigLIP so400m/14 (timm layout)
    projector.fc1/fc2/fc3             fused GELU MLP, 2176 -> 8704 -> 4096 -> 4096
    language_model.model              Llama-2-7B decoder (transformers' LlamaModel)
    proprio_projector.fc1/fc2         proprio_projector--<step>_checkpoint.pt
    action_head.model.*               action_head--<step>_checkpoint.pt (L1 MLP-ResNet)

Each vision tower returns its second-to-last block's patch tokens (OFT calls timm's
``get_intermediate_layers``; we simply do not build the last block, whose output is never used).
The engine owns the LLM layer loop: the adapter only encodes an observation into the OFT sequence
(BOS | 256 + 256 patches | proprio | prompt | 56 zero action slots | STOP) and reads actions out.
Bidirectional attention is enforced by prunebench.engine.transformers_compat on every transformers release.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import LlamaConfig, LlamaModel

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.interface import Observation
from prunebench.contract.layout import TokenLayout
from prunebench.engine.transformers_compat import forward_bidirectional, make_bidirectional
from prunebench.models.mini_oft import Encoded, patch_pixels

PROMPT = "In: What action should the robot take to {task}?\nOut:"
EMPTY_PIECE = "▁"  # Llama's id 29871; predict_action appends it when the prompt does not end in it
CHUNK, ACTION_DIM, PROPRIO_DIM = 8, 7, 8  # LIBERO constants (openvla-oft's prismatic/vla/constants.py)
CROP_AREA = 0.9  # training used random crops of 90 % area; evaluation centre-crops the same box
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


class OFTSpec(BaseModel):
    """What the adapter builds, read from a checkpoint's config.json."""

    model_config = ConfigDict(frozen=True)
    vision_backbone_id: str
    image_size: int = 224
    views: tuple[str, ...] = ("agentview", "wrist")  # third-person, then wrist (num_images_in_input=2)
    text_config: dict
    chunk: int = CHUNK
    action_dim: int = ACTION_DIM
    proprio_dim: int = PROPRIO_DIM

    @property
    def towers(self) -> tuple[TowerSpec, TowerSpec]:
        if self.vision_backbone_id not in VISION_BACKBONES:
            raise PrunebenchError(f"config.json vision_backbone_id {self.vision_backbone_id!r} is not "
                                  f"supported; known: {', '.join(VISION_BACKBONES)}")
        return VISION_BACKBONES[self.vision_backbone_id]

    @property
    def grid(self) -> int:
        return self.image_size // self.towers[0].patch


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


class _LanguageModel(nn.Module):
    """Holds the decoder under the checkpoint's name (``language_model.model``); no lm_head: OFT's
    L1 head reads hidden states, so the 32064-way logits are never needed."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.model = LlamaModel(config)


# ---------------------------------------------------------------------------------- image pipeline
def resize_like_rlds(image: np.ndarray, size: int) -> np.ndarray:
    """OFT's resize_image_for_policy: JPEG round trip, then Lanczos-3 with antialiasing, to uint8.

    OFT does this with TensorFlow; we use PIL (JPEG quality 95 as TF's default, LANCZOS = Lanczos-3
    with antialiasing). On real LIBERO frames the result is up to 17 grey levels from TF's (1.1 on
    average), almost all of it from the two JPEG codecs (docs/gpu.md); LIBERO frames must be resized
    (256 -> 224)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    decoded = Image.open(buffer).convert("RGB")
    return np.asarray(decoded.resize((size, size), Image.LANCZOS))


def center_crop(image: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """TensorFlow's crop_and_resize of the central box of side sqrt(area), bilinear, back to the same
    size, through float [0, 1], then convert_image_dtype back to uint8 (x * 255.5, truncated)."""
    h, w = image.shape[:2]
    side = math.sqrt(area)
    lo, hi = (1 - side) / 2, (1 + side) / 2
    x = torch.tensor(image, dtype=torch.float32) / 255.0

    def sample_axis(n: int):  # TF: y1*(n-1) + i*(y2-y1)*(n-1)/(crop-1), and crop == n here
        coords = lo * (n - 1) + torch.arange(n, dtype=torch.float64) * (hi - lo)
        low = coords.floor().long().clamp(0, n - 1)
        high = coords.ceil().long().clamp(0, n - 1)
        return low, high, (coords - coords.floor()).float()

    top, bottom, fy = sample_axis(h)
    left, right, fx = sample_axis(w)
    rows_top, rows_bottom = x[top], x[bottom]
    fx = fx[None, :, None]
    upper = rows_top[:, left] + (rows_top[:, right] - rows_top[:, left]) * fx
    lower = rows_bottom[:, left] + (rows_bottom[:, right] - rows_bottom[:, left]) * fx
    out = (upper + (lower - upper) * fy[:, None, None]).clamp(0, 1)
    return (out * 255.5).to(torch.uint8).numpy()


def oft_frame(image: np.ndarray, size: int) -> np.ndarray:
    """A camera frame (uint8 HxWx3, already rotated 180 degrees like OFT's get_libero_image) as the
    policy sees it: resized to ``size`` if needed, then centre-cropped (center_crop=True)."""
    if image.shape[0] != size or image.shape[1] != size:
        image = resize_like_rlds(image, size)
    return center_crop(image)


# ---------------------------------------------------------------------------------- the model
class OpenVLAOFT(nn.Module):
    """OpenVLA-OFT with the engine interface: encode, llm, head, unnormalize_actions, patch_pixels."""

    def __init__(self, spec: OFTSpec, tokenizer, norm_stats: dict, unnorm_key: str,
                 attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.cfg = spec
        self.tokenizer = tokenizer
        self.vision_backbone = FusedVisionBackbone(spec)
        config = LlamaConfig(**spec.text_config)
        config._attn_implementation = attn_implementation
        d = config.hidden_size
        self.projector = Projector(self.vision_backbone.embed_dim, d)
        self.language_model = _LanguageModel(config)
        make_bidirectional(self.llm)
        self.proprio_projector = ProprioProjector(spec.proprio_dim, d)
        self.action_head = L1RegressionActionHead(d, spec.action_dim)
        self.norm_stats, self.unnorm_key = norm_stats, unnorm_key
        stats = norm_stats[unnorm_key]
        self._action_bounds = _Q99Bounds(stats["action"])
        self._proprio_bounds = _Q99Bounds(stats["proprio"])
        self._head_ids, self._tail_ids = _template_ids(tokenizer)

    def _apply(self, fn, recurse=True):
        """Every cast and move (``to``, ``bfloat16()``, ``cuda()``) keeps the rotary ``inv_freq`` buffers
        float32, as OFT's ``from_pretrained(torch_dtype=torch.bfloat16)`` does: in bfloat16 they move the
        rotary angles (position x inv_freq) and so the actions."""
        rotary = {name: buf.float() for name, buf in self.named_buffers(remove_duplicate=False)
                  if name.endswith("inv_freq")}  # per model or per layer, by transformers release
        super()._apply(fn, recurse)
        for name, buf in rotary.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner)
            setattr(module, attr, buf.to(getattr(module, attr).device))
        return self

    # -- what the engine reads
    @property
    def llm(self) -> LlamaModel:
        return self.language_model.model

    @property
    def n_layers(self) -> int:
        return len(self.llm.layers)

    @property
    def attn_implementation(self) -> str:
        return self.llm.config._attn_implementation

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.fc1.weight.dtype

    # -- inputs
    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids after BOS, as predict_action builds them (the task lower-cased)."""
        ids = self.tokenizer(PROMPT.format(task=instruction.lower()))["input_ids"]
        empty = self.tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
        if ids[-1] != empty:
            ids = ids + [empty]
        return ids[1:]

    def preprocess_images(self, obs: Observation) -> torch.Tensor:
        """(views, 3, S, S) floats in [0, 1]: resized and centre-cropped frames."""
        missing = [v for v in self.cfg.views if v not in obs.images]
        if missing:
            raise ValueError(f"observation.images lacks view(s) {missing}; model expects {self.cfg.views}")
        frames = [oft_frame(np.ascontiguousarray(obs.images[v]), self.cfg.image_size) for v in self.cfg.views]
        return torch.stack([torch.as_tensor(f).permute(2, 0, 1) for f in frames]).float() / 255.0

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """PrismaticImageProcessor: per image, each tower's normalisation, channels stacked."""
        planes = []
        for image in images:
            for tower in self.cfg.towers:
                mean, std = torch.tensor(tower.mean)[:, None, None], torch.tensor(tower.std)[:, None, None]
                planes.append((image - mean) / std)
        return torch.cat(planes)[None].to(self.device, self.dtype)

    def normalize_proprio(self, proprio) -> torch.Tensor:
        """BOUNDS_Q99 to [-1, 1] on masked dimensions, then clipped (OFT's normalize_proprio)."""
        unit = self._proprio_bounds.to_unit(np.asarray(proprio, dtype=np.float64))
        return torch.as_tensor(np.clip(unit, -1, 1), dtype=torch.float32)

    def layout_for(self, n_prompt: int) -> TokenLayout:
        g = self.cfg.grid
        return TokenLayout.build([(v, g, g) for v in self.cfg.views], n_proprio=1, n_prompt=n_prompt,
                                 n_template_head=len(self._head_ids), n_template_tail=len(self._tail_ids),
                                 n_actions=self.cfg.chunk * self.cfg.action_dim)

    @torch.inference_mode()
    def encode(self, obs: Observation) -> Encoded:
        images = self.preprocess_images(obs)
        visual = self.projector(self.vision_backbone(self.pixel_values(images)))
        proprio = self.proprio_projector(self.normalize_proprio(obs.proprio).to(self.device, self.dtype))
        ids = self.prompt_ids(obs.instruction)
        tok = self.llm.embed_tokens
        text = tok(torch.tensor([[self.tokenizer.bos_token_id] + ids + [self.tokenizer.eos_token_id]],
                                device=self.device))
        actions = torch.zeros(1, self.cfg.chunk * self.cfg.action_dim, text.shape[-1], device=self.device,
                              dtype=text.dtype)  # predict_action zeroes the placeholder embeddings
        embeds = torch.cat([text[:, :1], visual, proprio[None, None], text[:, 1:-1], actions, text[:, -1:]], 1)
        return Encoded(embeds, self.layout_for(len(ids)), images)

    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return patch_pixels(images, self.cfg.towers[0].patch)

    # -- outputs
    def head(self, readout: torch.Tensor) -> torch.Tensor:
        """(B, 56, D) -> (B, 8, 7) normalised actions."""
        return self.action_head.model(readout.reshape(readout.shape[0], self.cfg.chunk, -1))

    def unnormalize_q99(self, normalized: np.ndarray) -> np.ndarray:
        """OFT's _unnormalize_actions (BOUNDS_Q99) on the masked dimensions; the gripper passes as is."""
        return self._action_bounds.from_unit(normalized)

    def normalize_q99(self, actions: np.ndarray) -> np.ndarray:
        """The inverse of unnormalize_q99 (to compare actions in the head's units)."""
        return self._action_bounds.to_unit(actions)

    def unnormalize_actions(self, normalized: torch.Tensor) -> torch.Tensor:
        """Env actions: unnormalize_q99, then the LIBERO gripper convention of OFT's eval: gripper
        [0, 1] -> [-1, 1], binarised by sign, inverted (-1 open, +1 close)."""
        a = self.unnormalize_q99(normalized.float().cpu().numpy())
        a[..., -1] = -np.sign(2 * a[..., -1] - 1)
        return torch.as_tensor(a, dtype=torch.float32)

    # -- the model's own forward, the engine's reference
    @torch.inference_mode()
    def predict_normalized(self, obs: Observation) -> np.ndarray:
        """Dense (8, 7) head output through ``LlamaModel.forward``, read at predict_action's fixed
        offsets (NUM_PATCHES + NUM_PROMPT_TOKENS), independent of the engine's layout bookkeeping."""
        enc = self.encode(obs)
        hidden = forward_bidirectional(self.llm, enc.embeds)
        num_patches = enc.layout.n_visual + 1  # + proprio
        n_prompt = enc.layout.prompt[1] - enc.layout.prompt[0]
        start = num_patches + n_prompt
        readout = hidden[:, start:start + self.cfg.chunk * self.cfg.action_dim]
        return self.head(readout)[0].float().cpu().numpy()

    def predict(self, obs: Observation) -> torch.Tensor:
        """Dense env actions of the model's own forward."""
        return self.unnormalize_actions(torch.as_tensor(self.predict_normalized(obs)))


class _Q99Bounds:
    """OFT's BOUNDS_Q99 normalisation of one quantity: [q01, q99] <-> [-1, 1] on the dimensions its
    mask marks (all when it has none); other dimensions pass unchanged."""

    def __init__(self, stats: dict) -> None:
        self.low, self.high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        self.mask = np.asarray(stats.get("mask", np.ones_like(self.low, dtype=bool)))

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        return np.where(self.mask, 2 * (x - self.low) / (self.high - self.low + 1e-8) - 1, x)

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        return np.where(self.mask, 0.5 * (x + 1) * (self.high - self.low + 1e-8) + self.low, x)


def _template_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The prompt template's own tokens: the common prefix and suffix of two different prompts."""
    a = tokenizer(PROMPT.format(task="pick up the bowl"))["input_ids"][1:]
    b = tokenizer(PROMPT.format(task="open the drawer"))["input_ids"][1:]
    head = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    tail = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y)
    empty = tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
    return a[:head], a[len(a) - tail:] + ([] if a[-1] == empty else [empty])
