"""Observation streams: what a policy sees, query by query, without a simulator.

A stream yields :class:`StreamQuery` items: the observation at a query, plus the env steps executed
and camera frames seen since the previous query (for strategies with histories). The synthetic
stream is a moving scene: a textured table with coloured blocks that drift smoothly, seen from a
fixed camera and a "wrist" camera that follows the end effector. Recorded LIBERO streams use the
same item type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from prunebench.contract.strategy import EnvStep, Observation

INSTRUCTIONS = (
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the black bowl next to the plate and place it on the plate",
    "open the middle drawer of the cabinet",
)


@dataclass
class StreamQuery:
    observation: Observation
    step_index: int
    env_steps: list[EnvStep] = field(default_factory=list)
    frames: list[dict[str, np.ndarray]] = field(default_factory=list)  # one per env step, oldest first


@dataclass
class SyntheticStream:
    """Deterministic for a seed. ``chunk`` env steps (with frames) separate two queries."""

    n_queries: int = 16
    seed: int = 0
    image_size: int = 128
    chunk: int = 8
    views: tuple[str, ...] = ("agentview", "wrist")
    instruction: str = INSTRUCTIONS[0]

    @property
    def history_frames(self) -> int:
        """Frames before every query: one per env step of the chunk before it."""
        return self.chunk - 1

    def describe(self) -> dict:
        return {"kind": "synthetic", "n_queries": self.n_queries, "seed": self.seed,
                "image_size": self.image_size, "chunk": self.chunk, "instruction": self.instruction}

    def __iter__(self) -> Iterator[StreamQuery]:
        rng = np.random.default_rng(self.seed)
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s] / s
        table = (0.55 + 0.1 * np.sin(23 * xx) * np.cos(17 * yy))[..., None] * np.array([0.8, 0.7, 0.55])
        blocks = rng.uniform(0.15, 0.85, size=(4, 2))
        velocity = rng.normal(0, 0.004, size=(4, 2))
        colours = rng.uniform(0.1, 1.0, size=(4, 3))
        eef = np.array([0.0, 0.0, 0.3])
        step = 0
        for query in range(self.n_queries):
            steps, frames = [], []
            for _ in range(self.chunk if query else 1):
                blocks = np.clip(blocks + velocity, 0.1, 0.9)
                action = np.concatenate([rng.normal(0, 0.3, 3), np.zeros(3), [1.0 if query % 4 < 2 else -1.0]])
                eef = eef + 0.01 * action[:3]
                frames.append(self._render(table, blocks, colours, eef, xx, yy))
                steps.append(EnvStep(step_index=step, action=action, eef_pos=eef.copy()))
                step += 1
            proprio = np.concatenate([eef, np.zeros(3), [0.04, -0.04]]).astype(np.float32)
            obs = Observation(images=frames[-1], proprio=proprio, instruction=self.instruction)
            yield StreamQuery(obs, step_index=step, env_steps=steps, frames=frames[:-1])

    def _render(self, table, blocks, colours, eef, xx, yy) -> dict[str, np.ndarray]:
        image = table.copy()
        for (bx, by), colour in zip(blocks, colours):
            image[(np.abs(xx - bx) < 0.06) & (np.abs(yy - by) < 0.06)] = colour
        # the wrist view: a 2x zoom around the end effector's (x, y)
        cx, cy = np.clip(0.5 + eef[:2], 0.25, 0.75)
        s = image.shape[0]
        x0, y0 = int((cx - 0.25) * s), int((cy - 0.25) * s)
        wrist = image[y0:y0 + s // 2, x0:x0 + s // 2].repeat(2, 0).repeat(2, 1)
        to_uint8 = lambda a: (np.clip(a, 0, 1) * 255).astype(np.uint8)
        return {self.views[0]: to_uint8(image), self.views[1]: to_uint8(wrist)}
