"""Where the scripted expert grasps an object: chosen once, before anything moves, from the
simulator's collision geometry, so that neither the hand nor a finger lands on what stands beside
the object.

The gripper never rotates and its fingers close along y. A solid object is grasped at its centre,
or shifted along x when a neighbour is in the way there (a cluttered floor). A hollow object (a
bowl) is held at a piece of its rim where the wall runs along x, near its +y or -y extreme; the
side nearer the robot once over the target is preferred, so the arm never reaches further than the
target itself. Where a wide-open finger would land on a wall as high as the rim (a bowl in a
drawer), the fingers open only ``NARROW_OFFSET`` either side of the rim, so they fit between the
bowl and the wall, and the grasp is made high enough for the hand to clear what is under it. That
narrow opening is held by servoing the gripper (it follows only the sign of its action), which a
policy whose gripper is read out by sign does not learn, so it is the last resort: a wide grasp on
the other side of the rim wins even where that side is not the preferred one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HAND_HALF = np.array([0.034, 0.09])  # m: half the Panda hand's footprint (x, y), its rounded ends trimmed
HAND_BOTTOM = 0.022  # m: the hand's underside above the grasp point
HAND_TOLERANCE = 0.01  # m: a rim that grazes the hand's underside does not stop a grasp
PAD_HALF = np.array([0.01, 0.006])  # m: half a finger pad's footprint
FINGER_OFFSET = 0.045  # m from the grasp point to each open finger, along y
NARROW_OFFSET = 0.014  # m from a rim piece to each finger's pad when open only part way
# a finger beside its pad, as high as a wall it passes: its body slants outward above the pad
FINGER_HALF, FINGER_OUT = np.array([0.011, 0.012]), 0.008  # m: half its footprint; centre beyond the pad
SHIFTS = (0.0, 0.015, -0.015, 0.03, -0.03)  # m along x where a solid object may be grasped
RIM_ANGLE = 35.0  # degrees off the y axis where a piece of rim still runs roughly along x
RIM_BAND = 0.015  # m: wall pieces whose top is this close to the object's top form the rim
SIDE_COST = 0.5  # the cost of grasping a rim on the side not preferred
NARROW_COST = 1.0  # the cost of a narrow opening: more than the side's (see the module's docstring)
IGNORED = ("robot", "gripper", "mount")  # bodies that are never in the way
SUPPORTS = ("table", "floor", "world")  # what everything stands on


@dataclass(frozen=True)
class Grasp:
    rim: int | None  # the rim geom to follow (hollow objects), else None
    shift: float  # m along x from the object's centre (solid objects)
    floor: float  # top of what a finger lands on: a rim grasp is made above it (-inf: nothing)
    opening: float = FINGER_OFFSET  # m from the grasp point to each finger's pad before closing


def box(model, data, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(centre, half extent) of geom ``g``'s world-aligned bounding box."""
    rot = data.geom_xmat[g].reshape(3, 3)
    return data.geom_xpos[g] + rot @ model.geom_aabb[g][:3], np.abs(rot) @ model.geom_aabb[g][3:]


class Obstacles:
    """Every collision geom but the object's own, the robot's and the table's: tested in its own
    frame, so a yawed cabinet's footprint is its rectangle, not the larger world-aligned box around it."""

    def __init__(self, env, obj: str) -> None:
        model, data = env.sim.model._model, env.sim.data._data
        keep = [g for g in range(model.ngeom) if model.geom_contype[g]
                and not model.body(model.geom_bodyid[g]).name.startswith((obj, *IGNORED))
                and model.body(model.geom_bodyid[g]).name not in SUPPORTS]
        boxes = [box(model, data, g) for g in keep]  # world-aligned: their centres and tops
        self.rot = np.stack([data.geom_xmat[g].reshape(3, 3) for g in keep]) if keep else np.zeros((0, 3, 3))
        self.centre = np.array([centre for centre, _ in boxes]).reshape(-1, 3)
        self.half = np.array([model.geom_aabb[g][3:] for g in keep]).reshape(-1, 3)  # in the geom's frame
        self.top = np.array([centre[2] + half[2] for centre, half in boxes])

    def tops(self, point: np.ndarray, half: np.ndarray) -> list[float]:
        """Top z of every geom that stands in the rectangle ``point ± half`` (x, y) at any height:
        a grid of vertical lines over the rectangle, sampled through each geom's height."""
        grid = np.stack(np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 9)), -1).reshape(-1, 2) * half
        # only geoms whose bounding sphere can reach the rectangle (the rest cannot hold a sample)
        near = (np.linalg.norm(self.centre[:, :2] - point[:2], axis=1)
                <= np.linalg.norm(half) + np.linalg.norm(self.half, axis=1))
        found = []
        for rot, centre, h, top in zip(self.rot[near], self.centre[near], self.half[near], self.top[near]):
            depth = top - centre[2]
            heights = np.linspace(-depth, depth, 5)
            offsets = np.array([[*(point[:2] + xy - centre[:2]), z] for xy in grid for z in heights])
            if np.any(np.all(np.abs(offsets @ rot) <= h, axis=1)):  # world -> the geom's frame
                found.append(float(top))
        return found

    def rise(self, point: np.ndarray, half: np.ndarray, above: float) -> float:
        """How far (m) the highest of those rises above ``above`` (0: nothing does)."""
        return max([top - above for top in self.tops(point, half)] + [0.0])


def choose_grasp(env, obj: str, geoms: list[int], grasp_z: float, top: float, preferred_side: float,
                 hollow: bool) -> Grasp:
    """The grasp with the least in the way of the hand (first) and the fingers, then the preferred."""
    model, data = env.sim.model._model, env.sim.data._data
    obstacles = Obstacles(env, obj)
    candidates = []  # (cost, Grasp)
    if hollow:
        rim = [g for g in geoms if sum(box(model, data, g))[2] > top - RIM_BAND]  # centre + half: its top
        centre = np.mean([data.geom_xpos[g][:2] for g in rim], axis=0)
        for g in rim:
            offset = data.geom_xpos[g][:2] - centre
            off_axis = np.degrees(np.arctan2(abs(offset[0]), abs(offset[1])))
            if off_axis <= RIM_ANGLE:
                point, side, opening = data.geom_xpos[g], np.sign(offset[1]), FINGER_OFFSET
                floor = max(obstacles.tops(point + [0, side * opening, 0], PAD_HALF), default=-np.inf)
                if floor > top - RIM_BAND:  # the open finger lands on a wall as high as the rim
                    opening = NARROW_OFFSET  # ... and so does the hand: grasp above them both
                    floor = max([*obstacles.tops(point + [0, side * (opening + FINGER_OUT), 0], FINGER_HALF),
                                 *(t - HAND_BOTTOM for t in obstacles.tops(point, HAND_HALF)), -np.inf])
                candidates.append((_cost(obstacles, point, grasp_z, opening) + SIDE_COST * (side != preferred_side)
                                   + NARROW_COST * (opening < FINGER_OFFSET) + off_axis / 1000,
                                   Grasp(g, 0.0, floor, opening)))
    else:
        pos = np.asarray(env.observation[f"{obj}_pos"], dtype=np.float64)
        half_x = max(sum(box(model, data, g))[0] for g in geoms) - pos[0]  # its +x end
        for shift in SHIFTS:
            if abs(shift) <= half_x - 0.01:
                point = pos + [shift, 0, 0]
                candidates.append((_cost(obstacles, point, grasp_z) + abs(shift), Grasp(None, shift, -np.inf)))
    return min(candidates, key=lambda c: c[0])[1] if candidates else Grasp(None, 0.0, -np.inf)


def _cost(obstacles: Obstacles, point: np.ndarray, grasp_z: float, opening: float = FINGER_OFFSET) -> float:
    """What rises into the hand (worst) or under a finger at a grasp at ``point``, in m, weighted."""
    hand = obstacles.rise(point, HAND_HALF, grasp_z + HAND_BOTTOM + HAND_TOLERANCE)
    finger = (FINGER_OUT, FINGER_HALF) if opening < FINGER_OFFSET else (0.0, PAD_HALF)
    fingers = max(obstacles.rise(point + [0, s * (opening + finger[0]), 0], finger[1], grasp_z) for s in (-1, 1))
    return 100 * hand + 10 * fingers
