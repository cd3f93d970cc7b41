"""MiniOFT: a small OpenVLA-OFT-shaped VLA that runs on a CPU.

Same data flow as OpenVLA-OFT (Kim et al., arXiv 2502.19645; github.com/moojink/openvla-oft),
scaled down:

    camera views --conv patch stem--> patch tokens --GELU MLP projector--> LLM width
    proprio (8) --MLP--> 1 token
    (optional, cfg.film / cfg.instruction_slots: the instruction's mean word embedding scales and
     shifts the stem, as OFT+ does, and is added to the action slots: models/instruction.py)
    BOS | view patches ... | proprio | prompt | 56 action slots (8 x 7) | STOP
    --> transformers LlamaModel, bidirectional --> final RMSNorm
    --> read 56 hidden states one position before each action slot (OFT's shifted slice)
    --> reshape (8, 7*D) --> L1-regression MLP-ResNet head --> (8, 7) actions in [-1, 1]
    --> un-normalise with q01/q99 bounds (neutral on constant dimensions).

Weights and normalisation statistics are saved together as one safetensors file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import LlamaConfig, LlamaModel

from prunebench.contract.layout import TokenLayout
from prunebench.contract.model import Encoded, VLAModel
from prunebench.contract.strategy import Observation
from prunebench.engine.transformers_compat import forward_bidirectional, make_bidirectional
from prunebench.models.instruction import FiLM, SlotConditioning, mean_word_embedding
from prunebench.models.mini_oft_io import check_header, load_weights, read_header, write_file
from prunebench.models.tokenizer import WordTokenizer


class MiniOFTConfig(BaseModel):
    """Sizes of the built-in model: small enough to train on 2 CPU cores in under an hour
    (docs/policy.md), 64 visual tokens per view."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # views and n_layers have upper bounds: each is a module to build, so a config read from a file
    # stays cheap to check (MiniOFT.load)
    views: tuple[str, ...] = Field(("agentview", "wrist"), min_length=1, max_length=8)
    image_size: int = Field(96, ge=16)
    patch_size: int = Field(12, ge=4)
    stem_channels: int = Field(32, ge=1)
    vision_width: int = Field(64, ge=1)
    hidden_size: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1, le=128)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = None
    intermediate_size: int = Field(384, ge=1)
    head_hidden: int = Field(256, ge=1)
    proprio_dim: int = 8
    action_dim: int = 7
    chunk: int = 8
    rope_theta: float = 10000.0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # the instruction beyond the prompt tokens (models/instruction.py): FiLM on the patch stem
    # (OpenVLA-OFT+) and an offset on the action slots' inputs
    film: bool = False
    instruction_slots: bool = False

    @model_validator(mode="after")
    def _check(self) -> "MiniOFTConfig":
        if self.patch_size % 4 or self.image_size % self.patch_size:
            raise ValueError("patch_size must be a multiple of 4 that divides image_size")
        if self.hidden_size % self.n_heads:
            raise ValueError("hidden_size must be divisible by n_heads")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class ViewEncoder(nn.Module):
    """Conv patch stem (two stride-2 convs, then a patch-sized stride) + learned positions; with
    ``cfg.film`` the instruction modulates both hidden stem stages."""

    def __init__(self, cfg: MiniOFTConfig) -> None:
        super().__init__()
        c, k = cfg.stem_channels, cfg.patch_size // 4
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.GELU(),
            nn.Conv2d(c, c, 4, 2, 1), nn.GELU(),
            nn.Conv2d(c, cfg.vision_width, k, k),
        )
        self.film = nn.ModuleList(FiLM(cfg.hidden_size, c) for _ in range(2)) if cfg.film else None
        self.pos = nn.Parameter(torch.zeros(cfg.grid * cfg.grid, cfg.vision_width))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """(B,3,H,W) images and (B,D) instruction vectors (read only with FiLM) -> (B, grid², width)."""
        x = image
        for i, layer in enumerate(self.stem):
            x = layer(x)
            if self.film is not None and isinstance(layer, nn.GELU):
                x = self.film[i // 2](x, text)
        return x.flatten(2).transpose(1, 2) + self.pos


class L1RegressionHead(nn.Module):
    """OFT's MLP-ResNet head: LN -> Linear -> act -> 2 residual blocks -> LN -> Linear(7).

    GELU where OFT has ReLU: trained from scratch, 70 % of the ReLU units died in the first few
    hundred steps (no gradient ever reaches them again), which capped what the policy learned."""

    def __init__(self, in_dim: int, hidden: int, action_dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.fc_in = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()) for _ in range(2))
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, action_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc_in(self.norm_in(x)))
        for block in self.blocks:
            x = x + block(x)
        return self.fc_out(self.norm_out(x))


class MiniOFT(nn.Module):
    """The built-in model; implements :class:`prunebench.VLAModel` (encode, llm, head, ...)."""

    def __init__(self, cfg: MiniOFTConfig | None = None, tokenizer: WordTokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MiniOFTConfig()
        self.tokenizer = tokenizer or WordTokenizer()
        self.encoders = nn.ModuleList(ViewEncoder(cfg) for _ in cfg.views)
        w, d = cfg.vision_width, cfg.hidden_size
        self.projector = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, d), nn.GELU(),
                                       nn.Linear(d, d))
        self.proprio_projector = nn.Sequential(nn.Linear(cfg.proprio_dim, d), nn.GELU(), nn.Linear(d, d))
        self.llm = LlamaModel(LlamaConfig(
            vocab_size=len(self.tokenizer), hidden_size=d, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, rope_theta=cfg.rope_theta,
            max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            attn_implementation=cfg.attn_implementation))
        make_bidirectional(self.llm)
        self.action_head = L1RegressionHead(cfg.action_dim * d, cfg.head_hidden, cfg.action_dim)
        # OFT feeds zeroed embeddings in the action slots and relies on a pretrained LLM. Trained
        # from scratch, zero slots all see the same uniform attention at first and the policy
        # learns to ignore the instruction; learned per-slot queries break that symmetry.
        self.action_queries = nn.Parameter(torch.zeros(cfg.chunk * cfg.action_dim, d))
        nn.init.normal_(self.action_queries, std=0.02)
        self.slot_conditioning = SlotConditioning(d, d) if cfg.instruction_slots else None
        # normalisation statistics (BOUNDS_Q99 style); set by training, saved with the weights
        self.register_buffer("action_q01", -torch.ones(cfg.action_dim))
        self.register_buffer("action_q99", torch.ones(cfg.action_dim))
        self.register_buffer("action_mask", torch.ones(cfg.action_dim, dtype=torch.bool))
        self.register_buffer("proprio_q01", -torch.ones(cfg.proprio_dim))
        self.register_buffer("proprio_q99", torch.ones(cfg.proprio_dim))

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def random(cls, cfg: MiniOFTConfig | None = None, seed: int = 0) -> "MiniOFT":
        """Randomly initialised model, identical for the same seed."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls(cfg)
        return model.eval()

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Weights, normalisation, config and vocabulary as one safetensors file (mini_oft_io)."""
        write_file(self, path, extra)

    @classmethod
    def load(cls, path: str | Path) -> "MiniOFT":
        """The model in a file written by :meth:`save`. The file's metadata and tensor shapes (its
        header) are checked against each other before any weight is allocated: a bad file is one
        PrunebenchError naming it and what is wrong, and no file can ask for more than
        MAX_PARAMETERS (mini_oft_io)."""
        cfg, tokenizer, shapes = read_header(path, MiniOFTConfig)
        with torch.device("meta"):  # the model the config describes, without storage
            expected = cls(cfg, tokenizer)
        check_header(path, shapes, expected)
        model = cls(cfg, tokenizer)
        load_weights(model, path)
        return model.eval()

    # ------------------------------------------------------------------ properties the engine reads
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def attn_implementation(self) -> str:
        return self.llm.config._attn_implementation

    @property
    def device(self) -> torch.device:
        """Where the weights are; every input tensor is created there."""
        return self.action_queries.device

    # ------------------------------------------------------------------ pre-LLM
    def preprocess_images(self, obs: Observation) -> torch.Tensor:
        """uint8 HxWx3 per view -> (views, 3, S, S) floats in [0, 1] at the model's resolution."""
        missing = [v for v in self.cfg.views if v not in obs.images]
        if missing:
            raise ValueError(f"observation.images lacks view(s) {missing}; model expects {self.cfg.views}")
        x = torch.stack([torch.as_tensor(np.ascontiguousarray(obs.images[v]), device=self.device)
                         for v in self.cfg.views])
        return self.resize(x.permute(0, 3, 1, 2).float() / 255.0)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> the model's resolution (antialiased bilinear)."""
        if images.shape[-1] == self.cfg.image_size and images.shape[-2] == self.cfg.image_size:
            return images
        return F.interpolate(images, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True,
                             align_corners=False).clamp(0, 1)

    def normalize_proprio(self, proprio: np.ndarray | torch.Tensor) -> torch.Tensor:
        return _to_unit(self._float_input(proprio), self.proprio_q01, self.proprio_q99)

    def normalize_actions(self, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw actions -> the head's [-1, 1] targets (training); inverse of unnormalize_actions."""
        return _to_unit(self._float_input(actions), self.action_q01, self.action_q99)

    def _float_input(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """An array or tensor as float32 on the model's device."""
        if isinstance(x, torch.Tensor):
            return x.to(self.device, torch.float32)
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def layout_for(self, n_prompt: int) -> TokenLayout:
        g = self.cfg.grid
        return TokenLayout.build([(v, g, g) for v in self.cfg.views], n_proprio=1, n_prompt=n_prompt,
                                 n_template_head=self.tokenizer.head_len,
                                 n_template_tail=self.tokenizer.tail_len,
                                 n_actions=self.cfg.chunk * self.cfg.action_dim)

    def embed(self, images: torch.Tensor, proprio: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Batched LLM input embeddings: images (B,V,3,S,S), proprio (B,8) normalised, prompt (B,P)."""
        b = images.shape[0]
        images = (images - 0.5) / 0.25  # centred pixels: image content, not brightness, drives the stem
        tok = self.llm.embed_tokens
        text = None
        if self.cfg.film or self.cfg.instruction_slots:
            text = mean_word_embedding(tok, prompt_ids, self.tokenizer.head_len, self.tokenizer.tail_len)
        patches = torch.cat([enc(images[:, i], text) for i, enc in enumerate(self.encoders)], dim=1)
        visual = self.projector(patches)
        prop = self.proprio_projector(proprio).unsqueeze(1)
        bos = tok(torch.full((b, 1), self.tokenizer.bos, device=visual.device))
        stop = tok(torch.full((b, 1), self.tokenizer.eos, device=visual.device))
        actions = self.action_queries.expand(b, -1, -1)
        if self.slot_conditioning is not None:
            actions = actions + self.slot_conditioning(text)
        return torch.cat([bos, visual, prop, tok(prompt_ids), actions, stop], dim=1)

    @torch.inference_mode()
    def encode(self, obs: Observation) -> Encoded:
        images = self.preprocess_images(obs)
        ids = torch.tensor([self.tokenizer.prompt_ids(obs.instruction)], device=self.device)
        embeds = self.embed(images[None], self.normalize_proprio(obs.proprio)[None], ids)
        return Encoded(embeds, self.layout_for(ids.shape[1]), images)

    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return patch_pixels(images, self.cfg.patch_size)

    # ------------------------------------------------------------------ post-LLM
    def dense_actions(self, embeds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Normalised (B, 8, 7) actions of a batch through ``LlamaModel.forward``, no pruning."""
        hidden = forward_bidirectional(self.llm, embeds)
        return self.head(hidden[:, layout.readout_slots()])

    def head(self, readout: torch.Tensor) -> torch.Tensor:
        """(B, 56, D) hidden states -> (B, 8, 7) normalised actions."""
        b = readout.shape[0]
        return self.action_head(readout.reshape(b, self.cfg.chunk, -1))

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        out = _from_unit(actions, self.action_q01, self.action_q99)
        return torch.where(self.action_mask, out, actions)

    # ------------------------------------------------------------------ reference forward
    @torch.inference_mode()
    def predict(self, obs: Observation) -> torch.Tensor:
        """The model's own dense forward through ``LlamaModel.forward`` (reference for the engine)."""
        enc = self.encode(obs)
        return self.unnormalize_actions(self.dense_actions(enc.embeds, enc.layout))[0]


VLAModel.register(MiniOFT)  # isinstance on Python >= 3.12 cannot see nn.Module submodules (llm)


def patch_pixels(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Raw pixels (0..255) of every visual token's image patch: (n_visual, patch*patch*3), from
    (views, 3, S, S) images in [0, 1]."""
    x = (images.float().cpu() * 255.0).round()
    x = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (V, 3, g, g, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * patch * patch)


def _scale(q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    return q99 - q01


def _to_unit(x: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    """Map [q01, q99] to [-1, 1] (clipped); constant dimensions map to 0 (neutral)."""
    span = _scale(q01, q99)
    constant = span.abs() < 1e-6
    unit = 2 * (x - q01) / torch.where(constant, torch.ones_like(span), span) - 1
    return torch.where(constant, torch.zeros_like(unit), unit.clamp(-1, 1))


def _from_unit(a: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    """Inverse of _to_unit; a constant dimension returns its constant value."""
    return 0.5 * (a + 1) * _scale(q01, q99) + q01
