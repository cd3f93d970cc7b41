"""Shuffled placements: a scene whose loose objects swapped places, for demonstrations in which the
named object is not always where its task's layout puts it (LIBERO-PRO's ``_swap`` variants exchange
two of these places, and a policy that memorised the layout fails them)."""

from __future__ import annotations

import numpy as np

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.libero_env import LiberoEnv


def loose_objects(env: LiberoEnv) -> list[str]:
    """The objects that start on a region of the floor, in the task's initial-state order, without
    the goal's container: libero_object's groceries (a table scene's objects stand on fixtures of
    their own and are not loose in this sense)."""
    problem = env.env.env.parsed_problem
    goal_targets = {arg for _, *args in problem["goal_state"] for arg in args[1:]}
    return [obj for _, obj, region in problem["initial_state"]
            if region.startswith("floor_") and not any(t.startswith(obj) for t in goal_targets)]


def shuffle_placements(env: LiberoEnv, rng: np.random.Generator) -> list[str]:
    """Permute where the loose objects stand, each keeping its own height and orientation, and
    refresh the env; returns them in their old places' order: ``result[i]`` now stands where the
    i-th of :func:`loose_objects` stood. The wait steps that follow a reset settle the scene."""
    names = loose_objects(env)
    if len(names) < 2:
        raise PrunebenchError(f"task {env.task.name}: fewer than two loose objects on a floor region, "
                              "nothing to shuffle (only the floor scene's objects shuffle)")
    data = env.sim.data
    joints = [env.env.env.objects_dict[n].joints[-1] for n in names]
    poses = [data.get_joint_qpos(j).copy() for j in joints]
    order = rng.permutation(len(names))
    for joint, pose, src in zip(joints, poses, order):
        moved = pose.copy()
        moved[:2] = poses[src][:2]  # the place of another object; own height and orientation
        data.set_joint_qpos(joint, moved)
        data.set_joint_qvel(joint, np.zeros(6))
    env.set_sim_state(env.sim.get_state().flatten())
    return [names[i] for i in np.argsort(order)]
