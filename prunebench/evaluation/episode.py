"""One closed-loop LIBERO episode in one process: the OFT protocol's control loop.

Physics runs every step; cameras render only at query steps and at the ``history_frames`` steps a
strategy (or the stream recorder) needs before each query. A strategy's ``on_env_step`` may ask for
an early re-query; the rest of the chunk is then dropped. So that such a re-query gets its history
too, a strategy that needs history and overrides ``on_env_step`` has every step rendered.

Unless the strategy is ``none``, every query also runs the dense model on the same observation in
the same process (in random order), which gives the speedup vs dense and the action deviation; the
dense actions are never executed.
"""

from __future__ import annotations

import random
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.strategy import EnvStep, Observation, Strategy
from prunebench.evaluation import metrics
from prunebench.evaluation.libero_env import SimulationError, SimulatorRaised
from prunebench.evaluation.results import ClosedLoopQuery, EpisodeResult
from prunebench.evaluation.runner import StreamRunner, query_seed
from prunebench.evaluation.streams import StreamQuery
from prunebench.plugins.dense import DENSE, Dense

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.evaluation.closed_loop import EvalConfig

GRIPPER = -1  # index of the gripper dimension

@dataclass(frozen=True)
class Job:
    suite: str
    task_id: int
    init_state_id: int
    episode_index: int  # position in the run: ordering and reports only, never seeds

    @property
    def seed_key(self) -> int:
        """The episode's number for seeding: a function of (suite, task, init state) alone, so an episode
        gets the same seeds in any run, shard or order, and every strategy's episode pairs with dense's.
        crc32, not ``hash``: Python salts string hashes per process."""
        return zlib.crc32(f"{self.suite}/{self.task_id}/{self.init_state_id}".encode())


def postprocess_action(action: np.ndarray) -> np.ndarray:
    """The one readout convention: clip to [-1, 1]; gripper by sign (+1 close, -1 open)."""
    out = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    out[GRIPPER] = 1.0 if out[GRIPPER] > 0 else -1.0
    return out


# --------------------------------------------------------------------------- one process
class EpisodeRunner:
    """Everything one process needs to run episodes: model, engine, strategies, a cached env."""

    def __init__(self, cfg: EvalConfig, make_env: Callable[[Job], object] | None = None) -> None:
        from prunebench.engine.loop import PruningEngine
        from prunebench.evaluation.contention import set_threads
        from prunebench.models import load_model, model_device
        from prunebench.plugins.manager import MANAGER

        self.cfg = cfg
        set_threads(cfg.threads)  # this process's torch threads (default: every core)
        model, _ = load_model(cfg.model, seed=cfg.seed, suite=cfg.suite, device=cfg.device)
        self.model = model
        self.device = model_device(model)
        self.engine = PruningEngine(model)
        self.strategy = MANAGER.create(cfg.strategy, cfg.config)
        self.dense = Dense() if cfg.dense_reference and cfg.strategy != DENSE else None
        self.history = max(self.strategy.history_frames, cfg.record_history)
        self.env = None
        self._env_key = None
        self._make_env = make_env or self._libero_env

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def _libero_env(self, job: Job):
        from prunebench.evaluation.libero_env import LiberoEnv

        return LiberoEnv(job.suite, job.task_id, camera_size=self.cfg.camera_size, render=self.cfg.render,
                         render_quality=self.cfg.render_quality, hard_reset=self.cfg.hard_reset,
                         views=self.model.cfg.views)

    def _env_for(self, job: Job):
        """One env per process, rebuilt only when the task changes (or after a failure)."""
        key = (job.suite, job.task_id)
        if self.env is None or self._env_key != key:
            self.close()
            self.env = self._make_env(job)
            self._env_key = key
        return self.env

    def run(self, job: Job) -> EpisodeResult:
        import torch

        from prunebench.evaluation.contention import load_average, of_records

        t0 = time.perf_counter()
        load_start = load_average()
        info = {"suite": job.suite, "task_id": job.task_id, "init_state_id": job.init_state_id,
                "episode_index": job.episode_index, "seed": self.cfg.seed}
        episode = _Episode(self, job)
        error = trace = None
        try:
            env = self._env_for(job)
            info.update(task=env.task.name, instruction=env.task.instruction)
            episode.play(env)
        except SimulatorRaised as err:
            error, trace = f"{type(err.__cause__ or err).__name__}: {err}", traceback.format_exc()
            self.close()  # a broken env is rebuilt for the next episode
        except SimulationError as err:  # the policy drove the physics unstable: its failure
            episode.failure = f"simulation: {err}"
            self.close()
        except Exception as err:  # noqa: BLE001 - an error of this episode, counted as one
            error, trace = _one_line(err), traceback.format_exc()
            self.close()
        info.setdefault("task", "")
        info.setdefault("instruction", "")
        failure = None if episode.success or error else episode.failure or "timeout"
        return EpisodeResult(**info, success=episode.success and not error, steps=episode.steps,
                             n_queries=len(episode.queries), early_requeries=episode.requeries,
                             failure_reason=failure, error=error, traceback=trace,
                             wall_s=time.perf_counter() - t0, video=episode.video,
                             stream=episode.stream, threads=torch.get_num_threads(), device=self.device,
                             contention=of_records(episode.queries, [load_start, load_average()],
                                                   device=self.device),
                             queries=episode.queries)


def _one_line(err: BaseException) -> str:
    """An error as one line: our own errors by their message, others by type and message."""
    text = str(err) if isinstance(err, PrunebenchError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


class _Episode:
    """The control loop of one episode (state that lives only while it runs)."""

    def __init__(self, owner: EpisodeRunner, job: Job) -> None:
        self.owner, self.job = owner, job
        self.success, self.steps, self.requeries = False, 0, 0
        self.failure: str | None = None
        self.queries: list[ClosedLoopQuery] = []
        self.video: str | None = None
        self.stream: str | None = None
        self.video_frames: list[np.ndarray] = []

    def play(self, env) -> None:
        from prunebench.evaluation.libero_env import WAIT_ACTION, WAIT_STEPS, stock_max_steps
        from prunebench.evaluation.replay import StreamRecorder

        cfg, job = self.owner.cfg, self.job
        max_steps = cfg.max_steps or stock_max_steps(job.suite)
        seed_of_episode = query_seed(cfg.seed, job.seed_key, 0)
        runner = StreamRunner(self.owner.engine, self.owner.strategy, cfg.seed, job.seed_key)
        dense = (StreamRunner(self.owner.engine, self.owner.dense, cfg.seed, job.seed_key)
                 if self.owner.dense else None)
        recorder = StreamRecorder(meta={
            "suite": job.suite, "task_id": job.task_id, "task": env.task.name,
            "init_state_id": job.init_state_id, "episode_index": job.episode_index, "seed_key": job.seed_key,
            "camera_size": cfg.camera_size, "render_quality": cfg.render_quality}) if cfg.record_dir else None
        instruction = env.task.instruction
        state = env.reset(job.init_state_id, seed=seed_of_episode % 2**31)
        for r in filter(None, (runner, dense)):
            r.start(instruction, env.task.name)
        for _ in range(WAIT_STEPS):
            state = env.step(WAIT_ACTION)

        queue: deque = deque()
        events: list[EnvStep] = []  # executed since the last query
        rendered: deque = deque(maxlen=self.owner.history + 1)  # (state index, images), newest last
        # a re-query may come after any step: its history needs every step rendered
        every_step = self.owner.history > 0 and _may_requery(self.owner.strategy)
        order = random.Random(seed_of_episode)
        while self.steps < max_steps:
            now = WAIT_STEPS + self.steps  # env steps executed so far = index of this state
            if not queue:
                images = env.render()
                history = _frames_before(rendered, now, self.owner.history)
                obs = Observation(images=images, proprio=state.proprio, instruction=instruction)
                queue.extend(self._query(runner, dense, obs, now, order, history))
                if recorder:
                    recorder.add(StreamQuery(obs, now, events, history))
                if cfg.video_dir:
                    self.video_frames.append(np.concatenate([images[v] for v in images], axis=1))
                rendered.append((now, images))
                events = []
            action = queue.popleft()
            if self.steps >= cfg.skip_first_actions:
                state = env.step(action)
            self.steps += 1
            event = EnvStep(step_index=now, action=action, eef_pos=state.eef_pos, eef_quat=state.eef_quat,
                            actions_left_in_chunk=len(queue))
            events.append(event)
            if state.success:
                self.success = True
                break
            if runner.observe_step(event) and queue:
                self.requeries += 1
                queue.clear()
            needed = every_step or len(queue) <= self.owner.history  # a frame a coming query needs
            if queue and needed and self.steps < max_steps:
                rendered.append((now + 1, env.render()))
        if recorder and recorder.items:
            name = f"{job.suite}_task{job.task_id}_init{job.init_state_id}.npz"
            self.stream = str(recorder.save(Path(cfg.record_dir) / name))
        if cfg.video_dir and self.video_frames:
            self.video = _write_video(self.video_frames, Path(cfg.video_dir) /
                                      f"{job.suite}_task{job.task_id}_init{job.init_state_id}_"
                                      f"{'success' if self.success else 'failure'}.mp4")

    def _query(self, runner: StreamRunner, dense: StreamRunner | None, obs: Observation,
               step_index: int, order: random.Random, frames: list[dict]) -> list[np.ndarray]:
        dense_first = dense is not None and order.random() < 0.5
        reference = dense.query(obs, step_index) if dense_first else None
        result = runner.query(obs, step_index, frames)
        if dense is not None and not dense_first:
            reference = dense.query(obs, step_index)
        record = ClosedLoopQuery(**result.record.model_dump())
        if reference is not None:
            record.dense_ms = reference.record.ms
            record.action_error_vs_dense = metrics.action_error(result.normalized, reference.normalized)
        self.queries.append(record)
        return [postprocess_action(a) for a in result.actions]


def _may_requery(strategy) -> bool:
    """Whether the strategy can ask for early re-queries (it overrides ``Strategy.on_env_step``)."""
    return type(strategy).on_env_step is not Strategy.on_env_step


def _frames_before(rendered: deque, now: int, wanted: int) -> list[dict]:
    """The frames of states now-1, now-2, ... (oldest first), as far back as they were rendered."""
    frames: list[dict] = []
    for index, images in reversed(rendered):
        if index != now - 1 - len(frames) or len(frames) == wanted:
            break
        frames.insert(0, images)
    return frames


def _write_video(frames: list[np.ndarray], path: Path) -> str | None:
    """An mp4 of the query frames (both views side by side), at the query rate (20 Hz / 8)."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 2.5, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return str(path)
