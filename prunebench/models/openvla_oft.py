"""OpenVLA-OFT checkpoints (``moojink/openvla-7b-oft-finetuned-libero-*``) as a model the engine runs.

The modules (oft_modules.py) are named exactly as in the released files, so the checkpoint loads as
it is; the image pipeline is oft_images.py. The engine owns the LLM layer loop: the adapter only
encodes an observation into the OFT sequence (BOS | 256 + 256 patches | proprio | prompt | 56 zero
action slots | STOP) and reads actions out. Bidirectional attention is enforced by
prunebench.engine.transformers_compat on every transformers release.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import LlamaConfig, LlamaModel

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.layout import TokenLayout
from prunebench.contract.model import Encoded, VLAModel
from prunebench.contract.strategy import Observation
from prunebench.engine.transformers_compat import forward_bidirectional, make_bidirectional
from prunebench.models.mini_oft import patch_pixels
from prunebench.models.oft_images import oft_frame
from prunebench.models.oft_modules import (
    VISION_BACKBONES,
    FusedVisionBackbone,
    L1RegressionActionHead,
    LanguageModel,
    Projector,
    ProprioProjector,
    TowerSpec,
)

PROMPT = "In: What action should the robot take to {task}?\nOut:"
EMPTY_PIECE = "▁"  # Llama's id 29871; predict_action appends it when the prompt does not end in it
CHUNK, ACTION_DIM, PROPRIO_DIM = 8, 7, 8  # LIBERO constants (openvla-oft's prismatic/vla/constants.py)


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


class OpenVLAOFT(nn.Module):
    """OpenVLA-OFT as a :class:`prunebench.VLAModel`: encode, llm, head, unnormalize_actions, ..."""

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
        self.language_model = LanguageModel(config)
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


VLAModel.register(OpenVLAOFT)


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
