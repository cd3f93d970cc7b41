"""A scripted pick-and-place expert for LIBERO that reads the simulator's privileged object poses.

It solves one-object "in" and "on" goals with a state machine that drives a P-controller on the
end-effector position and never rotates:

    approach (above the grasp point) -> descend -> close -> lift -> carry (over the target)
    -> lower -> open

* "in" a container (libero_object's basket): carry at ``LIFT_ABOVE`` over the workspace surface,
  lower to ``PLACE_ABOVE`` and drop.
* "on" an object or a fixture's region (libero_spatial's plate, libero_goal's stove or cabinet
  top): carry high enough to clear both ends, lower until the held object would rest on the
  target's top, or until the descent is blocked, then open.

The grasp height is ``max(top of the object's collision geoms - GRASP_DEPTH, object origin z)``, so
tall bottles are grasped below their cap instead of pushed over. Bowls are grasped at the rim
(``grasp_choice``). Flat objects (cream cheese, butter) are grasped just above the table
(``FLAT_GRASP_HEIGHT``).

The expert is only used to make training demonstrations; evaluation never sees it.
"""

from __future__ import annotations

import numpy as np

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.libero_env import LiberoEnv
from prunebench.training.grasp_choice import FINGER_OFFSET, Grasp, choose_grasp

GAIN = 10.0  # action units per metre of position error (actions are 0.05 m per unit)
APPROACH_HEIGHT = 0.10  # m above the grasp point
GRASP_DEPTH = 0.035  # m below the object's top
FLAT = 0.03  # m: objects lower than this are grasped at the table
FLAT_GRASP_HEIGHT = 0.008  # m above a flat object's bottom where its grasp closes
HOLLOW = ("akita_black_bowl",)  # held at the rim: the fingers would close on nothing at the centre
REACH = 0.72  # m, horizontal, from the robot's base: beyond it the arm stalls at carrying height
# The Panda's shoulder (joint 2) to wrist (joint 6) is longest, 0.719 m, at elbow -0.47 rad; a target
# beyond flips the elbow over to its limit (-0.07 rad), where the wrist is pinned to a 0.705 m sphere
ARM = 0.70  # m, shoulder to wrist, at most
WRIST = (0.07, 0.21)  # m the wrist lies nearer the base and above the eef (hand down, tilted a little)
FINGER_CLEARANCE = 0.015  # m an outer finger needs free of things above the grasp height
RIM_DEPTH = 0.018  # m: deepest rim grasp below the top (deeper: libero_goal task 3 4/12, not 12/12)
CLOSE_STEPS = 13
DESCEND_STEPS = 30
LIFT_ABOVE = 0.335  # m above the workspace surface when carrying into a container (0.30 m on the floor)
PLACE_ABOVE = 0.275  # m above the workspace surface where a container drop opens
CLEARANCE = 0.08  # m above the higher end of an "on" move while carrying
DROP = 0.01  # m between the held object's bottom and the target's top when opening
OPEN_STEPS = 10
DROPPED = 0.03  # m: a held object this much lower under the fingers than at the grasp slipped out
MAX_GRASPS = 3
REACHED = 0.01  # m
STALL = 0.002  # m: a descent that moves less than this in STALL_STEPS steps is blocked
STALL_STEPS = 3
MIN_SPEED = 0.2  # action units: no slow exponential creep at the end of a move


def _is_flat(top: float, origin_z: float) -> bool:
    """Objects lower than FLAT (cream cheese, butter) are grasped at the table."""
    return top - origin_z < FLAT


def _category(name: str) -> str:
    """``akita_black_bowl_1`` -> ``akita_black_bowl`` (LIBERO numbers its instances)."""
    return name.rsplit("_", 1)[0]


class ScriptedExpert:
    """What every scripted expert reads and how it moves: privileged object poses and collision
    geometry, P-control of the end effector, and the arm's reach. ``phase`` names its current step
    ("close", "open" and "done" are never disturbed by the demonstrations' noise)."""

    def __init__(self, env: LiberoEnv, obj: str) -> None:
        self.env, self.obj = env, obj
        self.phase = "approach"
        self._heights: list[float] = []  # eef z during a descent, to detect a blocked one
        self._geoms = self._collision_geoms(obj)

    def _obs(self, key: str) -> np.ndarray:
        return np.asarray(self.env.observation[key], dtype=np.float64)

    def _collision_geoms(self, body_prefix: str) -> list[int]:
        model = self.env.sim.model._model
        return [g for g in range(model.ngeom) if model.geom_contype[g] != 0
                and model.body(model.geom_bodyid[g]).name.startswith(body_prefix)]

    def _extent(self, geoms: list[int], sign: float) -> float | None:
        """Highest (sign +1) or lowest (sign -1) world z of the geoms' bounding boxes."""
        model, data = self.env.sim.model._model, self.env.sim.data._data
        ends = []
        for g in geoms:
            half = model.geom_aabb[g][3:]
            rot = data.geom_xmat[g].reshape(3, 3)
            ends.append(data.geom_xpos[g][2] + sign * (np.abs(rot[2]) @ half))
        return (max if sign > 0 else min)(ends) if ends else None

    def _object_top(self) -> float:
        top = self._extent(self._geoms, +1)
        return top if top is not None else float(self._obs(f"{self.obj}_pos")[2])

    def _within_reach(self, xy: np.ndarray, reach: float = REACH) -> np.ndarray:
        """``xy`` pulled back toward the robot's base to at most ``reach`` from it: a stretched-out arm
        is singular and the controller stalls there."""
        base = np.asarray(self.env.sim.data.body_xpos[self.env.sim.model.body_name2id("robot0_base")][:2])
        away = xy - base
        distance = np.linalg.norm(away)
        return xy if distance <= reach else base + away * (reach / distance)

    def _arm_reach(self, z: float) -> float:
        """How far (m, horizontally) from the base the eef goes at height ``z`` with the elbow bent
        (longest with the wrist at the shoulder's height)."""
        shoulder = self.env.sim.data._data.xanchor[self.env.sim.model._model.joint("robot0_joint2").id]
        rise = z + WRIST[1] - shoulder[2]
        return WRIST[0] + np.sqrt(max(ARM**2 - rise**2, 0.0))

    def _blocked(self, z: float) -> bool:
        """Whether a descent has stopped moving (it rests on something)."""
        self._heights.append(z)
        return len(self._heights) > STALL_STEPS and self._heights[-STALL_STEPS - 1] - z < STALL

    @staticmethod
    def _move(error: np.ndarray, floor: float) -> np.ndarray:
        """P-control with a floor on the speed (until within REACHED), each axis clipped to 1."""
        distance = np.linalg.norm(error)
        if distance < REACHED:
            return np.clip(GAIN * error, -1, 1)
        speed = max(GAIN * distance, floor)
        return np.clip(error / distance * speed, -1, 1)


class PickPlaceExpert(ScriptedExpert):
    """Closed-loop scripted expert: ``act()`` reads the current state and returns the intended action.

    Being closed-loop, it also tells how to *recover* from a perturbed state, which is what the
    DART-style noisy demonstrations record.
    """

    def __init__(self, env: LiberoEnv, goal: tuple[str, str, str] | None = None) -> None:
        """``goal``: (relation, object, target) as in LIBERO's BDDL; default: the task's own."""
        if goal is None:
            goals = env.env.env.parsed_problem["goal_state"]
            if len(goals) != 1 or goals[0][0] not in ("in", "on"):
                raise PrunebenchError(f"the scripted expert handles one 'in' or 'on' goal, task has {goals}")
            goal = goals[0]
        self.relation, obj, target = goal
        super().__init__(env, obj)
        self.target = target.removesuffix("_contain_region")
        self.surface = float(env.env.env.workspace_offset[2])
        self.timer = 0
        self._hang = 0.0  # eef z minus the held object's bottom, measured when the grasp closes
        self._target_geoms = self._collision_geoms(self.target)
        self._grasps = 0  # descents so far: a slipped grasp is retried up to MAX_GRASPS times
        self._held = np.zeros(2)  # eef xy minus the held object's xy (a bowl is held at its rim)
        # rounded to the micrometre, so the floor scene's heights are exactly its former 0.30 / 0.24 m
        self._lift_z = round(self.surface + LIFT_ABOVE, 6)
        self._grasp = Grasp(None, 0.0, -np.inf)
        top = self._object_top()
        preferred_side = -1.0 if self._target_point()[0][1] > 0 else 1.0
        self._grasp = choose_grasp(env, self.obj, self._geoms, self._grasp_point()[2], top, preferred_side,
                                   hollow=_category(self.obj) in HOLLOW)

    def _grasp_point(self) -> np.ndarray:
        pos = self._obs(f"{self.obj}_pos")
        top = self._object_top()
        z = max(top - GRASP_DEPTH, pos[2])
        if _is_flat(top, pos[2]):
            # just above the table beside a flat object: fingertips pressed into the table stick
            # there by friction and close only part way (the grasp slipped about half the time)
            z = self._extent(self._geoms, -1) + FLAT_GRASP_HEIGHT
        if self._grasp.rim is not None:  # follow the chosen piece of rim as the bowl moves
            pos = self.env.sim.data._data.geom_xpos[self._grasp.rim]
            # above what a finger meets, and no deeper than RIM_DEPTH
            z = min(max(z, self._grasp.floor + FINGER_CLEARANCE, top - RIM_DEPTH), top - 0.01)
        xy = self._within_reach(np.array([pos[0] + self._grasp.shift, pos[1]]), self._arm_reach(z))
        return np.array([*xy, z])  # a far bowl's rim: grasped a little nearer than its middle

    def _target_point(self) -> tuple[np.ndarray, float]:
        """(x, y, z) of the target, and the z of its top surface."""
        key = f"{self.target}_pos"
        if key in self.env.observation:
            pos = self._obs(key)
            top = self._extent(self._target_geoms, +1)
            return pos, (top if top is not None else pos[2])
        model, data = self.env.sim.model._model, self.env.sim.data._data
        pos = np.asarray(data.site_xpos[model.site(self.target).id], dtype=np.float64)
        return pos, float(pos[2])  # a fixture's region: its site lies on the surface

    def _place_xy(self) -> np.ndarray:
        """Where the fingers go over the target: the held object's centre over the target's, pulled
        back toward the robot when that lies beyond the arm's reach (a bowl held at its far rim
        over a distant plate lands a few cm off centre instead of never arriving)."""
        reach = min(self._arm_reach(self._lift_z), self._arm_reach(self._release_z()))
        return self._within_reach(self._target_point()[0][:2] + self._held, max(REACH, reach))

    def _release_z(self) -> float:
        if self.relation == "in":
            return round(self.surface + PLACE_ABOVE, 6)
        return self._target_point()[1] + self._hang + DROP

    # ------------------------------------------------------------------ control
    def act(self) -> np.ndarray:
        eef = self._obs("robot0_eef_pos")
        grip = -1.0
        target = eef
        if self.phase == "approach":
            target, grip = self._grasp_point() + [0, 0, APPROACH_HEIGHT], self._open_grip()
            # descend once above the object, without first hovering to a stop at approach height
            if np.linalg.norm((target - eef)[:2]) < REACHED and abs(target[2] - eef[2]) < 3 * REACHED:
                self.phase, self.timer, self._heights = "descend", 0, []
                self._grasps += 1
        if self.phase == "descend":
            target, grip = self._grasp_point(), self._open_grip()
            self.timer += 1
            # close at grasp height, or where the fingers are blocked (a policy that overshoots
            # sees the same rule in the data)
            blocked = self._blocked(eef[2])
            if eef[2] - target[2] < REACHED or blocked or self.timer >= DESCEND_STEPS:
                self.phase, self.timer = "close", 0
        if self.phase == "close":
            target, grip = self._grasp_point(), 1.0
            self.timer += 1
            if self.timer >= CLOSE_STEPS:
                self.phase = "lift"
                self._hang = eef[2] - (self._extent(self._geoms, -1) or eef[2])
                if self.relation == "on":  # centre the object, not the fingers, on the target
                    self._held = (eef - self._obs(f"{self.obj}_pos"))[:2]
                if self.relation == "on":
                    self._lift_z = max(eef[2], self._release_z()) + CLEARANCE
        if self.phase in ("lift", "carry", "lower") and self._dropped(eef) and self._grasps < MAX_GRASPS:
            self.phase = "approach"  # the object slipped out: open, go back over it and grasp again
        if self.phase == "lift":
            target, grip = np.array([eef[0], eef[1], self._lift_z]), 1.0
            if abs(self._lift_z - eef[2]) < 0.02:
                self.phase = "carry"
        if self.phase == "carry":
            goal = self._place_xy()
            target, grip = np.array([goal[0], goal[1], self._lift_z]), 1.0
            if np.linalg.norm((target - eef)[:2]) < REACHED:
                self.phase, self._heights = "lower", []
        if self.phase == "lower":
            goal, release = self._place_xy(), self._release_z()
            target, grip = np.array([goal[0], goal[1], release]), 1.0
            blocked = self.relation == "on" and self._blocked(eef[2])
            if eef[2] - release < REACHED or blocked:
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

    def _open_grip(self) -> float:
        """-1 (open), or, for a grasp that opens only part way, +-1 that keeps each pad about
        ``opening`` from the grasp point (the gripper follows only the action's sign)."""
        if self._grasp.opening >= FINGER_OFFSET:
            return -1.0
        model, data = self.env.sim.model._model, self.env.sim.data._data
        pads = [data.geom_xpos[model.geom(f"gripper0_finger{i}_pad_collision").id][1] for i in (1, 2)]
        # where the fingers are bound (the commanded opening): the fingers lag it by a few steps
        lead = (data.ctrl[model.actuator("gripper0_gripper_finger_joint1").id]
                - data.qpos[model.joint("gripper0_finger_joint1").id])
        return 1.0 if abs(pads[0] - pads[1]) / 2 + lead > self._grasp.opening else -1.0

    def _dropped(self, eef: np.ndarray) -> bool:
        """Whether the held object hangs DROPPED further below the fingers than when grasped."""
        bottom = self._extent(self._geoms, -1)
        return bottom is not None and eef[2] - bottom > self._hang + DROPPED

def make_expert(env: LiberoEnv) -> PickPlaceExpert:
    """The scripted expert for the env's task."""
    return PickPlaceExpert(env)
