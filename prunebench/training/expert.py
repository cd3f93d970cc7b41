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
(``_choose_rim``). For flat objects (cream cheese, butter) the grasp target lies below what the fingers
reach, so they are pushed down to the table and close after at most ``DESCEND_STEPS``.

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
HOLLOW = ("akita_black_bowl",)  # held at the rim: the fingers would close on nothing at the centre
HAND_CLEARANCE = 0.10  # m from the grasp point the hand needs free of taller things
REACH = 0.72  # m, horizontal, from the robot's base: beyond it the arm stalls at carrying height
FINGER_LENGTH = 0.05  # m from the grasp point up to the hand
FINGER_OFFSET = 0.045  # m from the grasp point to each finger, along y, when open
FINGER_CLEARANCE = 0.015  # m an outer finger needs free of things above the grasp height
RIM_ANGLE = 35.0  # degrees off the y axis where a piece of rim still runs roughly along x
RIM_BAND = 0.015  # m: wall pieces whose top is this close to the object's top form the rim
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


class PickPlaceExpert:
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
        self.env = env
        self.relation, self.obj, target = goal
        self.target = target.removesuffix("_contain_region")
        self.surface = float(env.env.env.workspace_offset[2])
        self.phase, self.timer = "approach", 0
        self._heights: list[float] = []  # eef z during a descent, to detect a blocked one
        self._hang = 0.0  # eef z minus the held object's bottom, measured when the grasp closes
        self._geoms = self._collision_geoms(self.obj)
        self._target_geoms = self._collision_geoms(self.target)
        self._grasps = 0  # descents so far: a slipped grasp is retried up to MAX_GRASPS times
        self._held = np.zeros(2)  # eef xy minus the held object's xy (a bowl is held at its rim)
        # rounded to the micrometre, so the floor scene's heights are exactly its former 0.30 / 0.24 m
        self._lift_z = round(self.surface + LIFT_ABOVE, 6)
        self._finger_floor = -np.inf  # top of what the outer finger would land on, beside a bowl
        self._rim = self._choose_rim()

    # ------------------------------------------------------------------ privileged state
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

    def _flat(self) -> bool:
        return _is_flat(self._object_top(), self._obs(f"{self.obj}_pos")[2])

    def _grasp_point(self) -> np.ndarray:
        pos = self._obs(f"{self.obj}_pos")
        top = self._object_top()
        z = max(top - GRASP_DEPTH, pos[2])
        if _is_flat(top, pos[2]):
            z = pos[2] - 0.02  # push the fingers down to the table around a flat object
        if self._rim is not None:  # follow the chosen piece of rim as the bowl moves
            pos = self.env.sim.data._data.geom_xpos[self._rim]
            z = min(max(z, self._finger_floor + FINGER_CLEARANCE), top - 0.01)
        return np.array([pos[0], pos[1], z])

    def _choose_rim(self) -> int | None:
        """The piece of a bowl's rim to hold, chosen once. The fingers close along y, so they
        straddle a wall that runs along x: a piece within RIM_ANGLE of the bowl's +y or -y
        extreme. Preferred: the side nearer the robot once over the target (the arm then never
        reaches further than the target itself), the piece nearest the extreme; but only where
        the hand clears taller fixtures (a cabinet beside the bowl) and the outer finger clears
        what stands next to the bowl (a cookie box). Read from the geoms, so a bowl tilted on a
        ramekin is held where its rim really is."""
        if _category(self.obj) not in HOLLOW:
            return None
        data = self.env.sim.data._data
        top = self._object_top()
        grasp_z = top - GRASP_DEPTH
        rim = [g for g in self._geoms if self._extent([g], +1) > top - RIM_BAND]
        centre = np.mean([data.geom_xpos[g][:2] for g in rim], axis=0)
        preferred = -1.0 if self._target_point()[0][1] > 0 else 1.0
        best, best_score = None, -np.inf
        for g in rim:
            offset = data.geom_xpos[g][:2] - centre
            side = np.sign(offset[1])
            off_axis = np.degrees(np.arctan2(abs(offset[0]), abs(offset[1])))
            if off_axis > RIM_ANGLE:
                continue
            point = data.geom_xpos[g]
            hand = self._clearance(point, grasp_z + FINGER_LENGTH) / HAND_CLEARANCE
            # the outer finger may rest on something low beside the bowl: the grasp is then made
            # higher on the wall, above it (see _grasp_point)
            under = max((top for gap, top in self._surroundings(point + [0, side * FINGER_OFFSET, 0])
                         if gap < FINGER_CLEARANCE), default=-np.inf)
            fits = min(hand, 1.0)  # 1 once the hand clears; the rest only breaks ties
            score = fits * 1000 + (side == preferred) * 100 - off_axis - 1000 * max(under - grasp_z, 0)
            if score > best_score:
                best, best_score, self._finger_floor = g, score, under
        return best

    def _clearance(self, point: np.ndarray, above: float) -> float:
        """Horizontal distance from ``point`` to the nearest collision geom (not the object, robot or
        table) that rises higher than ``above``."""
        return min((gap for gap, top in self._surroundings(point) if top > above), default=np.inf)

    def _surroundings(self, point: np.ndarray) -> list[tuple[float, float]]:
        """(horizontal distance from ``point``, top z) of every collision geom that is not the
        object, the robot or the table."""
        model, data = self.env.sim.model._model, self.env.sim.data._data
        found = []
        for g in range(model.ngeom):
            body = model.body(model.geom_bodyid[g]).name
            if (model.geom_contype[g] == 0 or body.startswith((self.obj, "robot", "gripper", "mount"))
                    or body in ("table", "floor", "world")):
                continue
            half = np.abs(data.geom_xmat[g].reshape(3, 3)) @ model.geom_aabb[g][3:]
            gap = np.maximum(np.abs(point[:2] - data.geom_xpos[g][:2]) - half[:2], 0)
            found.append((float(np.linalg.norm(gap)), float(data.geom_xpos[g][2] + half[2])))
        return found

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
        return self._within_reach(self._target_point()[0][:2] + self._held)

    def _within_reach(self, xy: np.ndarray) -> np.ndarray:
        """``xy`` pulled back toward the robot's base to at most REACH from it: a stretched-out arm
        is singular and the controller stalls there."""
        base = np.asarray(self.env.sim.data.body_xpos[self.env.sim.model.body_name2id("robot0_base")][:2])
        away = xy - base
        distance = np.linalg.norm(away)
        return xy if distance <= REACH else base + away * (REACH / distance)

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
            target = self._grasp_point() + [0, 0, APPROACH_HEIGHT]
            # descend once above the object, without first hovering to a stop at approach height
            if np.linalg.norm((target - eef)[:2]) < REACHED and abs(target[2] - eef[2]) < 3 * REACHED:
                self.phase, self.timer, self._heights = "descend", 0, []
                self._grasps += 1
        if self.phase == "descend":
            target = self._grasp_point()
            self.timer += 1
            # close at grasp height, or where the fingers are blocked (a flat object's grasp point
            # lies below what they reach; a policy that overshoots sees the same rule in the data)
            blocked = not self._flat() and self._blocked(eef[2])
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

    def _dropped(self, eef: np.ndarray) -> bool:
        """Whether the held object hangs DROPPED further below the fingers than when grasped."""
        bottom = self._extent(self._geoms, -1)
        return bottom is not None and eef[2] - bottom > self._hang + DROPPED

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


def make_expert(env: LiberoEnv) -> PickPlaceExpert:
    """The scripted expert for the env's task."""
    return PickPlaceExpert(env)
