"""Training the built-in policy (MiniOFT) on scripted-expert demonstrations (prunebench.training.demos).

OpenVLA-OFT's recipe at small scale: L1 regression on 8-step action chunks (the target chunk of a
frame at step t is the expert's intended actions t..t+7, the last one repeated past the end),
q01/q99 normalisation to [-1, 1], conditioning on the instruction, images and proprio.

Normalisation rule: an action dimension or proprio input whose
1st..99th percentile span is below ``neutral_span`` (or a proprio input listed in
``neutral_proprio``) is *neutral* (q01 = q99 = its median): the
model never sees it as an input and predicts exactly that constant for it. Otherwise a constant
rotation, normalised by a percentile rule, becomes a target of +1 and the policy learns to rotate.

Augmentation: random shifts (``shift`` pixels, edge-replicated), brightness/contrast jitter, and
Gaussian noise on the normalised proprio. Training is reproducible from ``seed`` on one machine.

Resuming: at every evaluation the weights and a checkpoint beside them are replaced atomically, so
a run stopped without warning continues (``resume=True``) to the same weights, bit for bit, as a run
never stopped (prunebench.training.checkpoint). The checkpoint is removed once training completes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig
from prunebench.runtime.inputs import load_config
from prunebench.training.checkpoint import (
    capture,
    checkpoint_path,
    read_checkpoint,
    replace_atomically,
    restore,
    run_config,
    write_checkpoint,
)
from prunebench.training.demos import demo_files


class TrainConfig(BaseModel):
    """What ``prunebench train`` does. ``model`` holds MiniOFTConfig fields."""

    model_config = ConfigDict(extra="forbid")
    data: str = "data/demos/libero_object"
    tasks: list[int] | None = None  # train on these tasks of the dataset only (None: all of them)
    model: dict = Field(default_factory=dict)  # MiniOFTConfig fields; {} = the built-in size
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int = Field(100, ge=0)
    final_lr_fraction: float = Field(0.05, ge=0, le=1)
    shift: int = Field(4, ge=0)  # pixels at the model's resolution
    jitter: float = Field(0.1, ge=0)  # brightness and contrast
    proprio_noise: float = Field(0.02, ge=0)  # in normalised units
    neutral_span: float = Field(1e-3, ge=0)
    # proprio inputs forced neutral: the axis-angle (3..5) only drifts, as the expert never rotates,
    # and an out-of-distribution drift at eval time must not steer the policy
    neutral_proprio: list[int] = Field(default_factory=lambda: [3, 4, 5])
    # frames whose target chunk opens or closes the gripper are drawn this many times as often:
    # the few frames where the gripper must switch decide the task (one close, one open per demo)
    switch_weight: float = Field(3.0, ge=1)
    val_fraction: float = Field(0.05, ge=0, lt=1)  # demos held out for validation
    eval_every: int = Field(250, ge=1)
    threads: int = Field(2, ge=1)
    seed: int = 0


# --------------------------------------------------------------------------- data
@dataclass
class Samples:
    """Every rendered frame of a set of demos, at the model's resolution."""

    images: torch.Tensor  # (N, V, 3, S, S) uint8
    proprio: np.ndarray  # (N, 8) raw
    chunks: np.ndarray  # (N, chunk, 7) raw intended actions
    prompt: list[tuple[int, ...]]  # token ids per sample
    demo: np.ndarray  # (N,) demo index

    def __len__(self) -> int:
        return len(self.proprio)


def load_samples(files: list[Path], model: MiniOFT) -> Samples:
    size, chunk = model.cfg.image_size, model.cfg.chunk
    images, proprio, chunks, prompts, demo = [], [], [], [], []
    for i, path in enumerate(files):
        with np.load(path) as d:
            steps, actions = d["frame_steps"], d["actions"]
            x = torch.as_tensor(d["images"]).permute(0, 1, 4, 2, 3)  # (R, V, 3, H, W)
            if x.shape[-1] != size:  # the model's own resize, once per frame, stored as uint8
                r, v = x.shape[:2]
                x = model.resize(x.flatten(0, 1).float() / 255)
                x = (x * 255).round().to(torch.uint8).reshape(r, v, 3, size, size)
            images.append(x)
            proprio.append(d["proprio"][steps])
            idx = np.minimum(steps[:, None] + np.arange(chunk), len(actions) - 1)
            chunks.append(actions[idx])
            prompts += [tuple(model.tokenizer.prompt_ids(str(d["instruction"])))] * len(steps)
            demo.append(np.full(len(steps), i))
    return Samples(torch.cat(images), np.concatenate(proprio), np.concatenate(chunks), prompts,
                   np.concatenate(demo))


def bounds(values: np.ndarray, neutral_span: float,
           neutral: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension q01/q99; a dimension whose span is below ``neutral_span``, or listed in
    ``neutral``, gets q01 = q99 = median, which the model treats as neutral (input 0, output
    that constant)."""
    q01, q99 = np.quantile(values, 0.01, axis=0), np.quantile(values, 0.99, axis=0)
    med = np.median(values, axis=0)
    flat = (q99 - q01) < neutral_span
    flat[list(neutral)] = True
    q01, q99 = np.where(flat, med, q01), np.where(flat, med, q99)
    return torch.tensor(q01, dtype=torch.float32), torch.tensor(q99, dtype=torch.float32)


def augment(images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, V, 3, S, S) -> float [0, 1], randomly shifted and colour-jittered per image."""
    x = images.float() / 255
    b, v, c, s, _ = x.shape
    x = x.reshape(b * v, c, s, s)
    if cfg.shift:
        p = cfg.shift
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dx, dy = torch.randint(0, 2 * p + 1, (2, b * v), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b * v)])
    if cfg.jitter:
        bright = 1 + cfg.jitter * (2 * torch.rand(b * v, 1, 1, 1, generator=gen) - 1)
        contrast = 1 + cfg.jitter * (2 * torch.rand(b * v, 1, 1, 1, generator=gen) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * bright
    return x.clamp(0, 1).reshape(b, v, c, s, s)


def switch_weights(samples: Samples, weight: float) -> np.ndarray:
    """Sampling weight per frame: ``weight`` where the target chunk switches the gripper, else 1."""
    gripper = samples.chunks[..., -1]
    switches = (gripper != gripper[:, :1]).any(axis=1)
    return np.where(switches, weight, 1.0)


def batches(samples: Samples, indices: np.ndarray, batch_size: int, rng: np.random.Generator,
            weights: np.ndarray | None = None):
    """Endless random batches, frames drawn in proportion to ``weights`` (default uniform); one batch
    never mixes prompt lengths (no padding, as at inference). Between batches the stream's only state
    is ``rng``'s (nothing is drawn ahead), so a stream built on a restored ``rng`` continues it."""
    weights = np.ones(len(samples)) if weights is None else weights
    by_length: dict[int, np.ndarray] = {}
    for n in sorted({len(samples.prompt[i]) for i in indices}):
        by_length[n] = np.array([i for i in indices if len(samples.prompt[i]) == n])
    lengths = list(by_length)
    totals = np.array([weights[by_length[n]].sum() for n in lengths])
    while True:
        pool = by_length[lengths[rng.choice(len(lengths), p=totals / totals.sum())]]
        p = weights[pool] / weights[pool].sum()
        yield pool[rng.choice(len(pool), min(batch_size, len(pool)), p=p)]


# --------------------------------------------------------------------------- model pieces
def forward(model: MiniOFT, images: torch.Tensor, proprio: torch.Tensor,
            prompt: torch.Tensor) -> torch.Tensor:
    """Batched dense forward (the same computation as ``MiniOFT.predict``): normalised (B, 8, 7)."""
    return model.dense_actions(model.embed(images, proprio, prompt), model.layout_for(prompt.shape[1]))


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


def _batch_tensors(model, samples: Samples, idx: np.ndarray, cfg: TrainConfig, gen, train: bool):
    images = samples.images[torch.as_tensor(idx)]
    images = augment(images, cfg, gen) if train else images.float() / 255
    proprio = model.normalize_proprio(samples.proprio[idx])
    if train and cfg.proprio_noise:
        proprio = proprio + cfg.proprio_noise * torch.randn(proprio.shape, generator=gen)
        proprio = torch.where(model.proprio_q99 == model.proprio_q01, torch.zeros_like(proprio), proprio)
    prompt = torch.tensor([samples.prompt[i] for i in idx])
    target = model.normalize_actions(samples.chunks[idx])
    return images, proprio, prompt, target


def l1_loss(model: MiniOFT, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 over the dimensions that are not neutral (constant ones are not learned)."""
    learned = model.action_q99 != model.action_q01
    return (pred - target).abs()[..., learned].mean()


@torch.no_grad()
def validate(model: MiniOFT, samples: Samples, indices: np.ndarray, cfg: TrainConfig) -> float:
    model.eval()
    losses, rng = [], np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    for _, idx in zip(range(max(1, len(indices) // cfg.batch_size)), batches(samples, indices, cfg.batch_size, rng)):
        images, proprio, prompt, target = _batch_tensors(model, samples, idx, cfg, gen, train=False)
        losses.append(float(l1_loss(model, forward(model, images, proprio, prompt), target)))
    model.train()
    return float(np.mean(losses))


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, output: str | Path, log=print, resume: bool = False) -> dict:
    """Train and save weights + normalisation to ``output`` (safetensors). ``resume``: continue from
    ``checkpoint_path(output)``, which must have been written with the same config."""
    output, ckpt = Path(output), checkpoint_path(output)
    files = demo_files(cfg.data, cfg.tasks)
    config = run_config(cfg, len(files))
    state = read_checkpoint(ckpt, config) if resume else None  # a wrong config fails before any work
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = MiniOFT.random(MiniOFTConfig(**cfg.model), seed=cfg.seed)
    t0 = time.perf_counter()
    samples = load_samples(files, model)
    log(f"loaded {len(files)} demos, {len(samples)} frames in {time.perf_counter() - t0:.0f} s")

    n_val = int(round(cfg.val_fraction * len(files)))
    val_demos = set(rng.permutation(len(files))[:n_val].tolist())
    is_val = np.array([d in val_demos for d in samples.demo])
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    q01, q99 = bounds(samples.chunks[train_idx].reshape(-1, samples.chunks.shape[-1]), cfg.neutral_span)
    model.action_q01.copy_(q01), model.action_q99.copy_(q99)
    q01, q99 = bounds(samples.proprio[train_idx], cfg.neutral_span, cfg.neutral_proprio)
    model.proprio_q01.copy_(q01), model.proprio_q99.copy_(q99)
    neutral_actions = (model.action_q99 == model.action_q01).nonzero().flatten().tolist()
    neutral_proprio = (model.proprio_q99 == model.proprio_q01).nonzero().flatten().tolist()
    log(f"neutral action dims {neutral_actions}, neutral proprio dims {neutral_proprio}")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    first, history, running = 0, [], []
    if state:  # after the set-up above, which draws the same numbers as the first run did
        restore(state, model, opt, rng, gen)
        first, history, running = state["step"], state["history"], state["running"]
        log(f"resumed from {ckpt} at step {first}")
    stream = batches(samples, train_idx, cfg.batch_size, rng, switch_weights(samples, cfg.switch_weight))
    # minutes count training time across resumptions (not the time lost after the last checkpoint)
    t_train = time.perf_counter() - 60 * (history[-1]["minutes"] if history else 0)
    for step in range(first, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        images, proprio, prompt, target = _batch_tensors(model, samples, next(stream), cfg, gen, True)
        loss = l1_loss(model, forward(model, images, proprio, prompt), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = validate(model, samples, val_idx, cfg) if len(val_idx) else float("nan")
            row = {"step": step + 1, "train_l1": float(np.mean(running)), "val_l1": val,
                   "minutes": (time.perf_counter() - t_train) / 60}
            history.append(row)
            running = []
            complete = step + 1 == cfg.steps
            summary = {"demos": len(files), "frames": len(samples), "train_frames": len(train_idx),
                       "val_demos": n_val, "steps": step + 1, "train_minutes": row["minutes"],
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "neutral_action_dims": neutral_actions, "neutral_proprio_dims": neutral_proprio,
                       "history": history, "config": cfg.model_dump(), "complete": complete}
            # the weights first: a stale checkpoint only redoes steps, to the same weights
            replace_atomically(output, lambda tmp: model.save(tmp, extra={"training": summary}))
            if complete:
                ckpt.unlink(missing_ok=True)
            else:
                write_checkpoint(ckpt, capture(model, opt, rng, gen, config=config, step=step + 1,
                                               history=history, running=running))
            log(json.dumps(row))  # logged once on disk
    model.eval()
    return summary


def load_train_config(path: str | None, **fields) -> TrainConfig:
    return load_config(TrainConfig, path, **fields)


def main_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
