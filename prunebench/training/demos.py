"""Demonstration datasets for training the built-in policy, made by the scripted expert.

Each demonstration starts from an initial state that LIBERO samples from an env seed (never one of
the official evaluation init states), waits the protocol's 10 no-op steps, then lets
:class:`~prunebench.training.expert.PickPlaceExpert` act. DART-style noise perturbs the *executed* actions
while the expert's *intended* actions are recorded, so the data shows how to recover from small
errors. Only successful demonstrations are kept.

One ``.npz`` file per attempt (``task03/seed0301234.npz``; a failed attempt leaves a ``.fail``
marker), so generation resumes where it stopped and runs in parallel processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.libero_env import WAIT_ACTION, WAIT_STEPS, LiberoEnv, SimulationError, stock_max_steps, tasks
from prunebench.runtime.inputs import load_config
from prunebench.training.expert import make_expert
from prunebench.training.fixture_expert import goal_expert
from prunebench.training.placements import shuffle_placements

SEEDS_PER_TASK = 100_000  # env seeds of task t are t * SEEDS_PER_TASK + seed_offset + k


class DemoConfig(BaseModel):
    """What ``prunebench demos`` generates."""

    model_config = ConfigDict(extra="forbid")
    suite: str = "libero_object"
    tasks: list[int] | None = None  # None = every task
    per_task: int = Field(40, ge=1)  # successful demonstrations per task
    max_steps: int | None = Field(None, ge=1)  # None: the suite's stock limit (280 for libero_object)
    noise: float = Field(0.3, ge=0)  # std of the xyz noise added to executed actions (action units)
    # per-task std where the expert fails under ``noise`` (libero_goal's plate push: the noise lifts
    # the fingers over the plate's wall); the std each demo got is recorded in it
    noise_per_task: dict[int, Annotated[float, Field(ge=0)]] = {}
    noise_hold: int = Field(4, ge=1)  # steps each noise sample is held (correlated pushes)
    noisy_fraction: float = Field(0.75, ge=0, le=1)  # share of demos with noise (rest are clean)
    # share of demos whose loose objects swap places first (training.placements), so that
    # the named object is not always in the same place: a policy must find it in the image
    shuffle_fraction: float = Field(0.0, ge=0, le=1)
    render_every: int = Field(3, ge=1)  # camera frames every k-th step (training samples)
    camera_size: int = Field(128, ge=16)
    render_quality: Literal["stock", "fast"] = "fast"
    seed_offset: int = Field(0, ge=0)
    workers: int = Field(2, ge=1)


def max_steps(cfg: DemoConfig) -> int:
    """The step limit of one demonstration: the config's, else the suite's stock limit."""
    limit = cfg.max_steps or stock_max_steps(cfg.suite)
    if limit is None:
        raise PrunebenchError(f"max_steps: suite {cfg.suite} has no stock step limit; set one")
    return limit


def noise_std(cfg: DemoConfig, task_id: int, rng: np.random.Generator) -> float:
    """The executed-action noise of one demo: the task's std in ``noisy_fraction`` of the demos, else 0."""
    return cfg.noise_per_task.get(task_id, cfg.noise) if rng.random() < cfg.noisy_fraction else 0.0


def task_folder(out: Path, task_id: int) -> Path:
    return Path(out) / f"task{task_id:02d}"


def demo_path(out: Path, task_id: int, seed: int) -> Path:
    return task_folder(out, task_id) / f"seed{seed:07d}.npz"


def is_dataset(out: Path) -> bool:
    """Whether ``out`` holds a dataset of ours (``generate`` writes its config.json first)."""
    try:
        config = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"suite", "per_task"} <= config.keys()


def existing(out: Path, task_id: int) -> tuple[int, int]:
    """(successful demos, failed attempts) already on disk for a task."""
    folder = task_folder(out, task_id)
    return len(list(folder.glob("*.npz"))), len(list(folder.glob("*.fail")))


# --------------------------------------------------------------------------- one demonstration
class DemoMaker:
    """Makes demonstrations of one suite's tasks in one process, keeping one env per task."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.envs: dict[int, LiberoEnv] = {}

    def env(self, task_id: int) -> LiberoEnv:
        if task_id not in self.envs:
            # hard resets: a soft reset samples objects that stand on a fixture (a bowl on the
            # stove or the cabinet) from the fixture's previous pose, and they fall off the table
            self.envs[task_id] = LiberoEnv(self.cfg.suite, task_id, camera_size=self.cfg.camera_size,
                                           render_quality=self.cfg.render_quality, hard_reset=True)
        return self.envs[task_id]

    def make(self, task_id: int, seed: int) -> dict | None:
        """Run the expert from the state sampled with ``seed``; the recorded arrays, or None on failure."""
        cfg, env = self.cfg, self.env(task_id)
        rng = np.random.default_rng(seed)
        noise = noise_std(cfg, task_id, rng)
        state = env.reset_sampled(seed)
        placement = []  # the shuffled objects, in their old places' order; [] = as sampled
        shuffle_rng = np.random.default_rng([seed, 1])  # its own stream: the noise stays as it was
        if shuffle_rng.random() < cfg.shuffle_fraction:
            placement = shuffle_placements(env, shuffle_rng)  # before the wait steps that settle it
        for _ in range(WAIT_STEPS):
            state = env.step(WAIT_ACTION)
        expert = goal_expert(env) or make_expert(env)
        proprio, intended, executed, frame_steps, frames = [], [], [], [], []
        push = np.zeros(3)
        for t in range(max_steps(cfg)):
            if t % cfg.render_every == 0:
                frame_steps.append(t)
                frame = env.render()
                frames.append(np.stack([frame[v] for v in env.views]))
            action = expert.act()
            if t % cfg.noise_hold == 0:
                push = rng.normal(0.0, noise, 3)
            done_action = action.copy()
            if expert.phase not in ("close", "open", "done"):  # never disturb a grasp or release
                done_action[:3] = np.clip(action[:3] + push, -1, 1)
            proprio.append(state.proprio)
            intended.append(action)
            executed.append(done_action)
            state = env.step(done_action)
            if state.success:
                break
        if not state.success:
            return None
        return {"images": np.stack(frames), "frame_steps": np.asarray(frame_steps, dtype=np.int32),
                "proprio": np.asarray(proprio, dtype=np.float32),
                "actions": np.asarray(intended, dtype=np.float32),
                "executed": np.asarray(executed, dtype=np.float32),
                "instruction": np.asarray(env.task.instruction), "task_id": np.asarray(task_id),
                "seed": np.asarray(seed), "noise": np.asarray(noise), "placement": np.asarray(placement, dtype=str),
                "views": np.asarray(list(env.views))}


_MAKER: DemoMaker | None = None


def _init_worker(cfg: DemoConfig) -> None:
    global _MAKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _MAKER = DemoMaker(cfg)


def _attempt(out: str, task_id: int, seed: int) -> tuple[int, bool]:
    """One attempt in a worker; writes the demo (atomically) or a .fail marker."""
    path = demo_path(Path(out), task_id, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        demo = _MAKER.make(task_id, seed)
        reason = "expert did not succeed"
    except SimulationError as err:
        demo, reason = None, f"simulation: {err}"
        _MAKER.envs.pop(task_id).close()
    if demo is None:
        path.with_suffix(".fail").write_text(reason + "\n")
        return task_id, False
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **demo)
    tmp.replace(path)
    return task_id, True


# --------------------------------------------------------------------------- the dataset
def generate(cfg: DemoConfig, out: str | Path) -> dict:
    """Generate until every task has ``per_task`` successful demos (resuming what is on disk).

    Gives up on a task after ``4 * per_task`` failed attempts. Returns a per-task summary, also
    written to ``out/manifest.json``.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task_ids = cfg.tasks if cfg.tasks is not None else [t.task_id for t in tasks(cfg.suite)]
    max_steps(cfg)  # a suite without a stock limit fails here, before any worker starts
    (out / "config.json").write_text(cfg.model_dump_json(indent=1))
    done = {t: existing(out, t) for t in task_ids}
    next_seed = {t: sum(done[t]) for t in task_ids}  # attempts so far = seeds used so far
    wanted = len(task_ids) * cfg.per_task
    bar = tqdm(total=wanted, initial=sum(min(ok, cfg.per_task) for ok, _ in done.values()),
               desc=f"demos {cfg.suite}", unit="demo", file=sys.stderr)

    def seed_of(t: int, k: int) -> int:
        return t * SEEDS_PER_TASK + cfg.seed_offset + k

    def pending(t: int) -> bool:
        ok, failed = done[t]
        return ok + in_flight.count(t) < cfg.per_task and failed < 4 * cfg.per_task

    in_flight: list[int] = []
    pool = ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(cfg,))
    futures = set()
    try:
        while True:
            for t in task_ids:  # keep every worker busy, one attempt per task at a time or more
                while pending(t) and len(futures) < 2 * cfg.workers:
                    futures.add(pool.submit(_attempt, str(out), t, seed_of(t, next_seed[t])))
                    next_seed[t] += 1
                    in_flight.append(t)
            if not futures:
                break
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for fut in finished:
                t, success = fut.result()
                in_flight.remove(t)
                ok, failed = done[t]
                done[t] = (ok + success, failed + (not success))
                if success and ok < cfg.per_task:
                    bar.update(1)
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
    manifest = {"suite": cfg.suite, "config": cfg.model_dump(), "tasks": {
        str(t): {"demos": ok, "failed": failed} for t, (ok, failed) in done.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    short = [t for t, (ok, _) in done.items() if ok < cfg.per_task]
    if short:
        print(f"warning: tasks {short} have fewer than {cfg.per_task} demos (expert failures)",
              file=sys.stderr)
    return manifest


def load_demo_config(path: str | None, **fields) -> DemoConfig:
    return load_config(DemoConfig, path, **fields)


def demo_files(root: str | Path, tasks: list[int] | None = None) -> list[Path]:
    """The demonstrations under ``root``, of ``tasks`` only where given (each must have some)."""
    files = sorted(p for p in Path(root).glob("task*/seed*.npz") if ".tmp" not in p.name)
    if not files:
        raise PrunebenchError(f"no demonstrations under {root}; run 'prunebench demos' first")
    if tasks is None:
        return files
    folders = {task_folder(root, t): t for t in tasks}
    missing = [t for folder, t in folders.items() if not any(p.parent == folder for p in files)]
    if missing:
        raise PrunebenchError(f"tasks: no demonstrations of task(s) {missing} under {root}")
    return [p for p in files if p.parent in folders]
