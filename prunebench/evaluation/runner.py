"""Run strategies over observation streams (the closed-loop LIBERO runner builds on this)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from prunebench.contract.errors import strategy_code
from prunebench.contract.strategy import EnvStep, EpisodeInfo, Observation, Strategy
from prunebench.engine.loop import PruningEngine, QueryResult
from prunebench.evaluation.streams import StreamQuery


def query_seed(run_seed: int, episode: int, query: int) -> int:
    """Seed of one query's randomness: same (seed, episode, query) -> same value."""
    return int(np.random.SeedSequence([run_seed, episode, query]).generate_state(1)[0])


@dataclass
class StreamRunner:
    """Drives one strategy through an episode: env-step events, frame history, then queries.

    The closed-loop LIBERO runner calls :meth:`observe_step` after every env step and :meth:`query`
    with the frames it rendered; :meth:`step` feeds a recorded or synthetic stream item the same way.
    """

    engine: PruningEngine
    strategy: Strategy
    seed: int = 0
    episode: int = 0
    results: list[QueryResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._frames: deque = deque(maxlen=max(1, self.strategy.history_frames))
        self._eef: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []

    def start(self, instruction: str, task: str = "") -> None:
        self._frames.clear()
        self._eef.clear()
        self._actions.clear()
        self.results.clear()
        with strategy_code(self.strategy.label, "on_episode_start()"):
            self.strategy.on_episode_start(EpisodeInfo(self.episode, self.seed, instruction, task))

    def observe_step(self, event: EnvStep) -> bool:
        """Report one executed env step; True when the strategy asks for a re-query now."""
        self._eef.append(event.eef_pos)
        self._actions.append(event.action)
        with strategy_code(self.strategy.label, "on_env_step()"):
            return bool(self.strategy.on_env_step(event))

    def query(self, observation: Observation, step_index: int,
              frames: list[dict[str, np.ndarray]] | None = None) -> QueryResult:
        """``frames``: the frames of the steps just before this one, oldest first. None: the frames
        kept so far (the previous query's, then those added since), when they are contiguous."""
        n, k = len(self.results), self.strategy.history_frames
        if frames is not None:
            self._frames.clear()
            self._frames.extend(frames)
        result = self.engine.query(
            self.strategy, observation, query_index=n, step_index=step_index,
            seed=query_seed(self.seed, self.episode, n),
            frames=list(self._frames)[-k:] if k else [],
            eef_history=self._eef, actions_since_last_query=list(self._actions))
        self._actions.clear()
        self._frames.append(observation.images)
        self.results.append(result)
        return result

    def step(self, item: StreamQuery) -> QueryResult:
        """One stream item. A stream cannot re-query early, so re-query requests are ignored."""
        for event in item.env_steps:
            self.observe_step(event)
        last = self.results[-1].record.step_index if self.results else None
        if last is not None and last + len(item.frames) + 1 == item.step_index:
            self._frames.extend(item.frames)  # contiguous with the previous query's frame
            return self.query(item.observation, item.step_index)
        return self.query(item.observation, item.step_index, item.frames)


def run_stream(engine: PruningEngine, strategy: Strategy, stream, seed: int = 0) -> list[QueryResult]:
    runner = StreamRunner(engine, strategy, seed)
    items = list(stream)
    runner.start(items[0].observation.instruction if items else "")
    for item in items:
        runner.step(item)
    return runner.results


def run_interleaved(engine: PruningEngine, strategies: dict[str, Strategy], stream,
                    seed: int = 0, episode: int = 0) -> dict[str, list[QueryResult]]:
    """Run several strategies over one stream, query by query in shuffled order, so that machine
    noise (other load, thermal state) hits every strategy alike."""
    items = list(stream)
    runners = {name: StreamRunner(engine, s, seed, episode) for name, s in strategies.items()}
    for r in runners.values():
        r.start(items[0].observation.instruction if items else "")
    order = random.Random(seed + 1_000_003 * episode)
    names = list(runners)
    for item in items:
        order.shuffle(names)
        for name in names:
            runners[name].step(item)
    return {name: r.results for name, r in runners.items()}
