"""A scripted pick-and-place expert for LIBERO that reads the simulator's privileged object poses.

It solves "pick up the X and place it in the basket" tasks (libero_object) with a state machine that
drives a P-controller on the end-effector position and never rotates:

    approach (above the grasp point) -> descend -> close -> lift -> carry (over the basket)
    -> lower -> open

The grasp height is ``max(top of the object's collision geoms - GRASP_DEPTH, object origin z)``, so
tall bottles are grasped below their cap instead of pushed over. For flat objects (cream cheese,
butter) the grasp target lies below what the fingers reach, so they are pushed down to the table
and close after at most ``DESCEND_STEPS``.

The expert is only used to make training demonstrations; evaluation never sees it.
"""

from __future__ import annotations

import numpy as np

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.libero_env import LiberoEnv

GAIN = 10.0  # action units per metre of position error (actions are 0.05 m per unit)
APPROACH_HEIGHT = 0.10  # m above the grasp point
GRASP_DEPTH = 0.035  # m below the object's top
FLAT = 0.03  # m: objects lower than this are grasped at the table
CLOSE_STEPS = 13
DESCEND_STEPS = 30
LIFT_Z = 0.30
PLACE_Z = 0.24
OPEN_STEPS = 10
REACHED = 0.01  # m
STALL = 0.002  # m: a descent that moves less than this in STALL_STEPS steps is blocked
STALL_STEPS = 3
MIN_SPEED = 0.2  # action units: no slow exponential creep at the end of a move


def _is_flat(top: float, origin_z: float) -> bool:
    """Objects lower than FLAT (cream cheese, butter) are grasped at the table."""
    return top - origin_z < FLAT


class PickPlaceExpert:
    """Closed-loop scripted expert: ``act()`` reads the current state and returns the intended action.

    Being closed-loop, it also tells how to *recover* from a perturbed state, which is what the
    DART-style noisy demonstrations record.
    """

    def __init__(self, env: LiberoEnv) -> None:
        goal = env.env.env.parsed_problem["goal_state"]
        if len(goal) != 1 or goal[0][0] != "in":
            raise PrunebenchError(f"the scripted expert handles one 'in' goal, task has {goal}")
        self.env = env
        self.obj = goal[0][1]
        self.target = goal[0][2].removesuffix("_contain_region")
        self.phase, self.timer = "approach", 0
        self._heights: list[float] = []  # eef z during the descent, to detect a blocked one
        model = env.sim.model._model
        self._geoms = [g for g in range(model.ngeom) if model.geom_contype[g] != 0
                       and model.body(model.geom_bodyid[g]).name.startswith(self.obj)]

    # ------------------------------------------------------------------ privileged state
    def _obs(self, key: str) -> np.ndarray:
        return np.asarray(self.env.observation[key], dtype=np.float64)

    def _object_top(self) -> float:
        """Highest point of the object's collision geoms (world z)."""
        model, data = self.env.sim.model._model, self.env.sim.data._data
        tops = []
        for g in self._geoms:
            half = model.geom_aabb[g][3:]
            rot = data.geom_xmat[g].reshape(3, 3)
            tops.append(data.geom_xpos[g][2] + np.abs(rot[2]) @ half)
        return max(tops) if tops else float(self._obs(f"{self.obj}_pos")[2])

    def _flat(self) -> bool:
        return _is_flat(self._object_top(), self._obs(f"{self.obj}_pos")[2])

    def _grasp_point(self) -> np.ndarray:
        pos = self._obs(f"{self.obj}_pos")
        top = self._object_top()
        z = max(top - GRASP_DEPTH, pos[2])
        if _is_flat(top, pos[2]):
            z = pos[2] - 0.02  # push the fingers down to the table around a flat object
        return np.array([pos[0], pos[1], z])

    # ------------------------------------------------------------------ control
    def act(self) -> np.ndarray:
        eef = self._obs("robot0_eef_pos")
        grip = -1.0
        target = eef
        if self.phase == "approach":
            target = self._grasp_point() + [0, 0, APPROACH_HEIGHT]
            # descend once above the object, without first hovering to a stop at approach height
            if np.linalg.norm((target - eef)[:2]) < REACHED and abs(target[2] - eef[2]) < 3 * REACHED:
                self.phase, self.timer, self._heights = "descend", 0, []
        if self.phase == "descend":
            target = self._grasp_point()
            self.timer += 1
            self._heights.append(eef[2])
            # close at grasp height, or where the fingers are blocked (a flat object's grasp point
            # lies below what they reach; a policy that overshoots sees the same rule in the data)
            blocked = (not self._flat() and len(self._heights) > STALL_STEPS
                       and self._heights[-STALL_STEPS - 1] - eef[2] < STALL)
            if eef[2] - target[2] < REACHED or blocked or self.timer >= DESCEND_STEPS:
                self.phase, self.timer = "close", 0
        if self.phase == "close":
            target, grip = self._grasp_point(), 1.0
            self.timer += 1
            if self.timer >= CLOSE_STEPS:
                self.phase = "lift"
        if self.phase == "lift":
            target, grip = np.array([eef[0], eef[1], LIFT_Z]), 1.0
            if abs(LIFT_Z - eef[2]) < 0.02:
                self.phase = "carry"
        if self.phase == "carry":
            goal = self._obs(f"{self.target}_pos")
            target, grip = np.array([goal[0], goal[1], LIFT_Z]), 1.0
            if np.linalg.norm((target - eef)[:2]) < REACHED:
                self.phase = "lower"
        if self.phase == "lower":
            goal = self._obs(f"{self.target}_pos")
            target, grip = np.array([goal[0], goal[1], PLACE_Z]), 1.0
            if eef[2] - PLACE_Z < REACHED:
                self.phase, self.timer = "open", 0
        if self.phase in ("open", "done"):
            self.timer += 1
            if self.timer >= OPEN_STEPS:
                self.phase = "done"
        action = np.zeros(7)
        # closing: plain P-control keeps the fingers pressed gently around the object
        action[:3] = self._move(target - eef, floor=0.0 if self.phase == "close" else MIN_SPEED)
        action[6] = grip
        return action

    @staticmethod
    def _move(error: np.ndarray, floor: float) -> np.ndarray:
        """P-control with a floor on the speed (until within REACHED), each axis clipped to 1."""
        distance = np.linalg.norm(error)
        if distance < REACHED:
            return np.clip(GAIN * error, -1, 1)
        speed = max(GAIN * distance, floor)
        return np.clip(error / distance * speed, -1, 1)
