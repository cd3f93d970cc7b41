"""Run strategies over observation streams (the closed-loop LIBERO runner builds on this)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from prunebench.engine import PruningEngine, QueryResult
from prunebench.interface import EpisodeInfo, Strategy
from prunebench.streams import StreamQuery


def query_seed(run_seed: int, episode: int, query: int) -> int:
    """Seed of one query's randomness: same (seed, episode, query) -> same value."""
    return int(np.random.SeedSequence([run_seed, episode, query]).generate_state(1)[0])


@dataclass
class StreamRunner:
    """Feeds one strategy a stream: env-step events, frame history, then the query."""

    engine: PruningEngine
    strategy: Strategy
    seed: int = 0
    episode: int = 0
    results: list[QueryResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._frames: deque = deque(maxlen=max(1, self.strategy.history_frames))
        self._eef: list[np.ndarray] = []

    def start(self, instruction: str) -> None:
        self._frames.clear()
        self._eef.clear()
        self.results.clear()
        self.strategy.on_episode_start(EpisodeInfo(self.episode, self.seed, instruction))

    def step(self, item: StreamQuery) -> QueryResult:
        for event in item.env_steps:
            self.strategy.on_env_step(event)  # a stream cannot re-query early; requests are ignored
            self._eef.append(event.eef_pos)
        self._frames.extend(item.frames)
        result = self.engine.query(
            self.strategy, item.observation, query_index=len(self.results), step_index=item.step_index,
            seed=query_seed(self.seed, self.episode, len(self.results)),
            frames=list(self._frames) if self.strategy.history_frames else [],
            eef_history=self._eef, actions_since_last_query=[e.action for e in item.env_steps])
        self._frames.append(item.observation.images)
        self.results.append(result)
        return result


def run_stream(engine: PruningEngine, strategy: Strategy, stream, seed: int = 0) -> list[QueryResult]:
    runner = StreamRunner(engine, strategy, seed)
    items = list(stream)
    runner.start(items[0].observation.instruction if items else "")
    for item in items:
        runner.step(item)
    return runner.results


def run_interleaved(engine: PruningEngine, strategies: dict[str, Strategy], stream,
                    seed: int = 0) -> dict[str, list[QueryResult]]:
    """Run several strategies over one stream, query by query in shuffled order, so that machine
    noise (other load, thermal state) hits every strategy alike."""
    items = list(stream)
    runners = {name: StreamRunner(engine, s, seed) for name, s in strategies.items()}
    for r in runners.values():
        r.start(items[0].observation.instruction if items else "")
    order = random.Random(seed)
    names = list(runners)
    for item in items:
        order.shuffle(names)
        for name in names:
            runners[name].step(item)
    return {name: r.results for name, r in runners.items()}
