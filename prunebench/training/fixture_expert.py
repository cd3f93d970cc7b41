"""Scripted experts for libero_goal's tasks that :class:`PickPlaceExpert` alone cannot do: open the
top drawer, turn on the stove, push the plate in front of the stove, put the bowl in the top drawer.

The hand never rotates and is 21 cm long along y, across its fingers, so it cannot hook the
cabinet's handles (the closed fingers do not fit the 1.5 cm gap behind a bar, and the hand cannot
get below the cabinet's top). Every expert here moves a part by its fingertips and reads the
state each step: the closed fingertips press down on a drawer handle's top and drag it (friction);
the open fingers straddle the stove knob's grip, or a plate's wall, and one flat pad pushes it.

The middle and bottom drawers cannot be opened without pitching the hand: the drawer above covers
their handles (:func:`goal_expert` raises for them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.libero_env import LiberoEnv
from prunebench.training.expert import REACHED, PickPlaceExpert, ScriptedExpert
from prunebench.training.grasp_choice import HAND_BOTTOM, HAND_HALF, Obstacles, box

FINGER_BOTTOM = 0.010  # m from the eef down to the closed fingertips (they rest on a surface there)
PRESS = 0.1  # m below the pressed surface that the fingertips aim: the normal force for friction
PRESS_OBJECT = 0.01  # m, lighter on a loose object: pressing it harder on the table only brakes it
PAD_REACH = 0.038  # m from the eef to an open finger's pad face (along y)
GAP = 0.005  # m between that pad and the wall it will push, when it goes down
INNER = 0.025  # m ahead of a bowl's centre where the closed fingertips go in, near its wall
FIRM = 0.5  # action units at least while off target: firm against noise
ALIGNED = 0.015  # m from the hover point where the descent starts; it goes on aligning
HOVER = 0.03  # m above the pressed point when approaching it
AHEAD = 0.07  # m the dragged point's target leads it: drags at about 0.7 action units
SLIP = 0.04  # m: the pressed point this far (horizontally) from under the fingers was lost
LOST = 0.02  # m: fingertips this far above the pressed surface no longer press it
MISSED = 0.015  # m: fingertips this far below it slid off its edge
LEAVE_HEIGHT = 0.12  # m above the pressed point where the hand leaves to: over the fixtures around
LEAVE = 0.08  # m the hand moves on along the drag while lifting off: its fingers clear a handle
LEVER = 0.035  # m from a knob's axis to where its grip is pushed
GRIP_DEPTH = 0.02  # m below the grip's top where the fingertips push it
ROOM = 0.05  # m an object is dragged off where a drawer will open (see _make_room)
INSIDE = 0.6  # share of a zone's half-size within which a pushed object's centre is aimed
SHRINKS = (1.0, 0.9, 0.8)  # shares of an object's footprint tried for standing free
Q_DONE = 0.25  # a joint stops this share of the way into its target range (LIBERO's own bounds)


class PressDragExpert(ScriptedExpert):
    """Puts the fingertips on a point of a movable part and drags (or pushes) it, closed-loop:

        approach (above the point) -> descend (until blocked) -> drag -> lift (and on) -> done

    A drag that loses the point (noise pushed the fingers off it) approaches it again. Subclasses
    say where the point is, where it should go next, and when the goal is reached.
    """

    def __init__(self, env: LiberoEnv, part: str) -> None:
        super().__init__(env, part)
        self.press, self.grip = PRESS, 1.0  # closed: the fingertips press as one flat tip
        self.leaves = True  # whether the hand leaves the part once done (the next expert may not)
        self._heading, self._leave = np.zeros(2), np.zeros(3)  # the drag's direction, where it leaves

    def reachable(self) -> bool:
        """Whether the hand fits above the pressed point: nothing under its footprint rises above its
        underside (a handle under another drawer's is out of reach)."""
        touch = self._press_point() + [0, 0, FINGER_BOTTOM]
        return Obstacles(self.env, self.obj).rise(touch, HAND_HALF, touch[2] + HAND_BOTTOM) == 0.0

    def _press_point(self) -> np.ndarray:
        """World xyz on the part where the fingertips go down (on its top surface when pressing)."""
        raise NotImplementedError

    def _ahead(self, point: np.ndarray) -> np.ndarray:
        """Where the pressed point should be a moment from now (at most about AHEAD away)."""
        raise NotImplementedError

    def _finished(self) -> bool:
        raise NotImplementedError

    def act(self) -> np.ndarray:
        eef = self._obs("robot0_eef_pos")
        point = self._press_point()
        touch = point + [0, 0, FINGER_BOTTOM]  # the eef where the fingertips touch the point
        target = eef
        if self.phase == "approach":
            target = touch + [0, 0, HOVER]
            if eef[2] < touch[2] + HOVER / 2:  # lift off first: across, low fingers would shove the part
                target = np.append(eef[:2], target[2])
            # descend once over the point and clear above what is beside it
            if np.linalg.norm((target - eef)[:2]) < ALIGNED and eef[2] > touch[2] + HOVER / 2:
                self.phase, self._heights = "descend", []
        if self.phase == "descend":
            target = touch - [0, 0, self.press]
            if np.linalg.norm((touch - eef)[:2]) > ALIGNED:  # pushed off: align before going lower
                target = np.append(touch[:2], eef[2])
            if eef[2] < touch[2] - MISSED:  # beside the part, not on it
                self.phase = "approach"
            elif self._blocked(eef[2]):  # on the part, or on something beside it: align again
                self.phase = "drag" if eef[2] < touch[2] + LOST else "approach"
        if self.phase == "drag":
            if np.linalg.norm((eef - touch)[:2]) > SLIP or not -MISSED < eef[2] - touch[2] < LOST:
                self.phase = "approach"  # noise pushed the fingers off the part: press it again
                return self.act()
            ahead = self._ahead(point)
            target = ahead + [0, 0, FINGER_BOTTOM - self.press]
            if np.linalg.norm((ahead - point)[:2]) > REACHED:
                self._heading = (ahead - point)[:2] / np.linalg.norm((ahead - point)[:2])
            if self._finished():  # leave up and onward, off the part: never back across it
                self.phase, self._leave = "lift", eef
                if self.leaves:
                    self._leave = np.append(eef[:2] + LEAVE * self._heading, touch[2] + LEAVE_HEIGHT)
        if self.phase in ("lift", "done"):
            target = self._leave
            if np.linalg.norm(target - eef) < 3 * REACHED:
                self.phase = "done"
        target = np.append(self._within_reach(target[:2]), target[2])  # a stretched arm stalls
        action = np.zeros(7)
        action[:3] = self._move(target - eef, floor=0.0 if self.phase == "done" else FIRM)
        action[6] = self.grip
        return action


class JointDragger(PressDragExpert):
    """Drives a fixture's slide or hinge joint to ``goal`` by dragging a point of its moving body;
    done once the joint is past ``done``."""

    def __init__(self, env: LiberoEnv, joint: str, goal: float, done: float) -> None:
        model = env.sim.model._model
        self.joint = model.joint(joint).id
        body = model.body(model.jnt_bodyid[self.joint]).name
        self.goal, self.done = goal, done
        super().__init__(env, body)

    def _q(self) -> float:
        model = self.env.sim.model._model
        return float(self.env.sim.data._data.qpos[model.jnt_qposadr[self.joint]])

    def _ahead(self, point: np.ndarray) -> np.ndarray:
        """AHEAD along the way the point moves as the joint goes toward its goal (along a slide's
        axis, or a hinge's tangent): a full lead up to the end, a shorter one pulls too weakly
        against the joint's damping."""
        data = self.env.sim.data._data
        axis = np.asarray(data.xaxis[self.joint])
        if self.env.sim.model._model.jnt_type[self.joint] == 3:  # mjJNT_HINGE
            axis = np.cross(axis, point - data.xanchor[self.joint])
        return point + np.sign(self.goal - self._q()) * AHEAD * axis / np.linalg.norm(axis)

    def _finished(self) -> bool:
        return (self._q() - self.done) * np.sign(self.goal - self.done) >= 0

    def _geom_top(self, g: int) -> np.ndarray:
        """Centre of the top face of geom ``g``'s bounding box."""
        data = self.env.sim.data._data
        return np.append(data.geom_xpos[g][:2], self._extent([g], +1))


class DrawerOpener(JointDragger):
    """Drags a drawer open by the top of its handle: the geom that sticks out furthest along the
    drawer's opening motion."""

    def pull(self) -> np.ndarray:
        """The unit direction (world) in which the drawer opens."""
        return np.asarray(self.env.sim.data._data.xaxis[self.joint]) * np.sign(self.goal - self.done)

    def _press_point(self) -> np.ndarray:
        """On the handle's front edge: the fingers overhang it as far forward (where they may slip
        ahead) as back (where they would land on the drawer's front)."""
        model, data = self.env.sim.model._model, self.env.sim.data._data
        pull = self.pull()
        handle = max(self._geoms, key=lambda g: float(data.geom_xpos[g] @ pull))
        half = np.abs(data.geom_xmat[handle].reshape(3, 3)) @ model.geom_aabb[handle][3:]
        return self._geom_top(handle) + pull * (half @ np.abs(pull))


class KnobTurner(JointDragger):
    """Turns a knob by its grip (its highest geom), LEVER from the axis: the open fingers straddle
    the grip, GRIP_DEPTH below its top, and the one behind pushes it round (the closed fingers
    taper: pushed against the grip's top edge they ride up onto it)."""

    def __init__(self, env: LiberoEnv, joint: str, goal: float, done: float) -> None:
        super().__init__(env, joint, goal, done)
        self.press, self.grip = 0.0, -1.0  # pushes with open fingers, does not press

    def _press_point(self) -> np.ndarray:
        data = self.env.sim.data._data
        grip = max(self._geoms, key=lambda g: self._extent([g], +1))
        top = self._geom_top(grip)
        anchor = np.asarray(data.xanchor[self.joint])
        arm = (top - anchor) * [1, 1, 0]
        point = anchor + LEVER * arm / np.linalg.norm(arm)
        return np.append(point[:2], top[2] - GRIP_DEPTH - FINGER_BOTTOM)


class ObjectDragger(PressDragExpert):
    """Pushes a hollow object until its centre is within ``tolerance`` (per axis) of ``goal``
    (x, y), by its wall ahead (friction alone drags nothing on the table). A low wall (a plate's,
    9 mm: a closed fingertip rides up over it) is straddled by the open fingers, the inner one on
    the floor (the lowest geom) pushing with its flat pad; in a bowl the closed fingertips go down
    INNER ahead of the centre, the hand resting on the rim."""

    def __init__(self, env: LiberoEnv, obj: str, goal: np.ndarray, tolerance: np.ndarray) -> None:
        super().__init__(env, obj)
        self.goal, self.tolerance = np.asarray(goal, dtype=np.float64), np.asarray(tolerance)
        self._way = np.zeros(2)  # unit direction to the goal
        self._floor = min(self._geoms, key=lambda g: self._extent([g], +1))
        self.straddle = self._object_top() - self._extent([self._floor], +1) < FINGER_BOTTOM + HAND_BOTTOM
        self.press, self.grip = PRESS_OBJECT, -1.0 if self.straddle else 1.0
        self.leaves = False  # the next expert's approach lifts out of it first

    def _press_point(self) -> np.ndarray:
        model, data = self.env.sim.model._model, self.env.sim.data._data
        centre = self._obs(f"{self.obj}_pos")[:2]
        away = self.goal - centre
        if np.linalg.norm(away) > REACHED:  # near the goal the direction is noise: keep the last
            self._way = away / np.linalg.norm(away)
        reach = INNER
        if self.straddle:  # the eef beyond the floor's edge: the inner pad GAP short of the wall
            half = np.abs(data.geom_xmat[self._floor].reshape(3, 3)) @ model.geom_aabb[self._floor][3:]
            reach = float(half[:2] @ np.abs(self._way)) + PAD_REACH - GAP
        return np.append(centre + reach * self._way, self._extent([self._floor], +1))

    def _ahead(self, point: np.ndarray) -> np.ndarray:
        # a full lead up to the goal: a shorter one pushes too weakly to overcome table friction
        return point + np.append(AHEAD * self._way, 0.0)

    def _finished(self) -> bool:
        return bool(np.all(np.abs(self._obs(f"{self.obj}_pos")[:2] - self.goal) < self.tolerance))


def into_zone(env: LiberoEnv, obj: str, zone: str) -> ObjectDragger:
    """Pushes ``obj`` into a zone of the table: to the point of the zone's inner part (INSIDE of its
    half-size) where nothing else stands under the object, nearest to the object (at the zone's
    centre libero_goal's plate would end on the cream cheese)."""
    model, data = env.sim.model._model, env.sim.data._data
    site = model.site(zone).id
    centre, size = data.site_xpos[site], model.site_size[site][:2]
    boxes = [box(model, data, g) for g in range(model.ngeom)
             if model.geom_contype[g] and model.body(model.geom_bodyid[g]).name.startswith(obj)]
    pos = np.asarray(env.observation[f"{obj}_pos"], dtype=np.float64)
    half = np.max([np.abs(c[:2] - pos[:2]) + h[:2] for c, h in boxes], axis=0)  # its footprint
    obstacles = Obstacles(env, obj)

    def crowding(point: np.ndarray) -> float:  # 1 - the largest share of the footprint standing free
        return 1.0 - next((s for s in SHRINKS if max(obstacles.tops(point, s * half), default=0.0)
                           < centre[2] + REACHED), 0.0)

    shares = (-INSIDE, 0.0, INSIDE)
    candidates = [centre + [dx * size[0], dy * size[1], 0] for dx in shares for dy in shares]
    goal = min(candidates, key=lambda c: (crowding(c), float(np.linalg.norm(c[:2] - pos[:2]))))
    return ObjectDragger(env, obj, goal[:2].copy(), np.full(2, REACHED))


class SequenceExpert:
    """Runs experts one after another; each is built when its turn comes (from the state then),
    and the next starts once the current one's phase is "done"."""

    def __init__(self, makers: list[Callable[[], object]]) -> None:
        self._makers = list(makers)
        self.current = self._makers.pop(0)()

    @property
    def phase(self) -> str:
        return self.current.phase

    def act(self) -> np.ndarray:
        while self.current.phase == "done" and self._makers:
            self.current = self._makers.pop(0)()
        return self.current.act()


# --------------------------------------------------------------------------- choosing the expert
def _joint_target(env: LiberoEnv, fixture: str, joint: str, key: str, other: str) -> tuple[float, float]:
    """(goal, done) for ``joint`` in the fixture's range ``key`` (LIBERO's bound of its predicate,
    ``default_open_ranges``...), away from range ``other``: its far end, and Q_DONE of the way in."""
    props = env.env.env.get_object(fixture).object_properties["articulation"]
    near, far = sorted(props[key], key=lambda q: abs(q - np.mean(props[other])))
    return far, near + Q_DONE * (far - near)


def _drawer_opener(env: LiberoEnv, region: str) -> DrawerOpener:
    site = env.env.env.object_sites_dict[region]
    joint = site.joints[0]
    goal, done = _joint_target(env, site.parent_name, joint, "default_open_ranges", "default_close_ranges")
    opener = DrawerOpener(env, joint, goal, done)
    if not opener.reachable():
        raise PrunebenchError(f"cannot open {region}: what lies above its handle (the drawer above) "
                              "keeps the hand off it, and the expert never pitches the hand")
    return opener


def _make_room(env: LiberoEnv, obj: str, opener: DrawerOpener) -> ObjectDragger:
    """Pushes ``obj`` ROOM away from the drawer's side and ROOM out along its pull: libero_goal's bowl
    stands partly under where the top drawer opens, and lifting it would hit the drawer's floor
    (straight sideways it would hit the wine bottle)."""
    pull = opener.pull()[:2] / np.linalg.norm(opener.pull()[:2])
    side = np.array([-pull[1], pull[0]])
    centre = np.asarray(env.observation[f"{obj}_pos"][:2], dtype=np.float64)
    drawer = env.sim.data._data.xpos[env.sim.model._model.jnt_bodyid[opener.joint]][:2]
    side *= np.sign((centre - drawer) @ side)
    return ObjectDragger(env, obj, centre + ROOM * (side + pull), np.full(2, REACHED))


def goal_expert(env: LiberoEnv) -> object | None:
    """The expert for the env's task when it needs more than :class:`PickPlaceExpert` (libero_goal's
    drawer, stove, plate-pushing and bowl-in-drawer tasks); None when PickPlaceExpert alone is right."""
    goals = env.env.env.parsed_problem["goal_state"]
    if len(goals) != 1:
        return None
    relation, *args = goals[0]
    site = env.env.env.object_sites_dict.get(args[-1])
    drawer = site is not None and bool(site.joints)  # a region that moves with a drawer's slide
    if relation == "open" and drawer:
        return _drawer_opener(env, args[0])
    if relation == "turnon":
        fixture = args[0]
        joint = env.env.env.get_object(fixture).joints[0]
        goal, done = _joint_target(env, fixture, joint, "default_turnon_ranges", "default_turnoff_ranges")
        return KnobTurner(env, joint, goal, done)
    if relation == "on" and site is not None and site.parent_name is None:  # a zone of the table
        return into_zone(env, *args)
    if relation == "in" and drawer:
        obj, region = args  # make room, open the drawer, then set the object down on its floor
        return SequenceExpert([lambda: _make_room(env, obj, _drawer_opener(env, region)),
                               lambda: _drawer_opener(env, region),
                               lambda: PickPlaceExpert(env, goal=("on", obj, region))])
    return None
