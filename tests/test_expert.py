"""The scripted experts that make the built-in policy's demonstrations solve their tasks, without
noise, from an initial state LIBERO samples (never an official one): one task of each kind."""

import pytest

from prunebench.evaluation.libero_env import BASE_MAX_STEPS, WAIT_ACTION, WAIT_STEPS, LiberoEnv, libero_available

pytestmark = [pytest.mark.libero, pytest.mark.skipif(not libero_available(), reason="LIBERO not installed")]


@pytest.mark.parametrize("suite, task_id", [
    ("libero_object", 6),   # butter: a flat box, grasped just above the floor
    ("libero_spatial", 0),  # a bowl held at its rim, placed on the plate
    ("libero_goal", 7),     # turn on the stove: the knob pushed round (fixture_expert)
])
def test_expert_solves_a_sampled_initial_state(suite, task_id):
    from prunebench.training.demos import SEEDS_PER_TASK
    from prunebench.training.expert import make_expert
    from prunebench.training.fixture_expert import goal_expert

    env = LiberoEnv(suite, task_id, render_quality="fast", hard_reset=True)
    try:
        env.reset_sampled(task_id * SEEDS_PER_TASK + 50_000)
        for _ in range(WAIT_STEPS):
            env.step(WAIT_ACTION)
        expert = goal_expert(env) or make_expert(env)
        success = False
        for _ in range(BASE_MAX_STEPS[suite]):
            if env.step(expert.act()).success:
                success = True
                break
        assert success, f"the expert failed {suite} task {task_id} (last phase {expert.phase})"
    finally:
        env.close()


def test_obstacle_prefilter_skips_only_geoms_that_cannot_stand_in_the_rectangle():
    """Obstacles.tops tests only geoms whose bounding sphere reaches the rectangle (10x faster):
    the same tops as testing every geom, on random rectangles over libero_goal's crowded table."""
    import numpy as np

    from prunebench.training.grasp_choice import Obstacles

    def every_geom(obstacles, point, half):
        grid = np.stack(np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 9)), -1).reshape(-1, 2) * half
        found = []
        for rot, centre, h, top in zip(obstacles.rot, obstacles.centre, obstacles.half, obstacles.top):
            heights = np.linspace(centre[2] - top, top - centre[2], 5)
            offsets = np.array([[*(point[:2] + xy - centre[:2]), z] for xy in grid for z in heights])
            if np.any(np.all(np.abs(offsets @ rot) <= h, axis=1)):
                found.append(float(top))
        return found

    env = LiberoEnv("libero_goal", 3, render_quality="fast", hard_reset=True)
    try:
        env.reset_sampled(123)
        obstacles, rng = Obstacles(env, "akita_black_bowl_1"), np.random.default_rng(0)
        queries = [(np.append(rng.uniform(-0.45, 0.45, 2), 0.9), rng.uniform(0.005, 0.12, 2)) for _ in range(60)]
        expected = [every_geom(obstacles, point, half) for point, half in queries]
        assert sum(map(bool, expected)) > 10  # rectangles that do meet something
        assert [obstacles.tops(point, half) for point, half in queries] == expected
    finally:
        env.close()


def test_a_bowl_is_grasped_wide_open_where_either_side_of_its_rim_allows_it():
    """libero_spatial task 1's bowl stands next to the ramekin, whose wall a wide-open finger would
    meet on the preferred side of the rim: the expert grasps the other side wide open rather than
    servo the gripper to a narrow opening, which a policy whose gripper is read out by sign does
    not learn (29 of 50 such demonstrations made the policy trained on them fail 49 of 50 episodes)."""
    from prunebench.training.demos import SEEDS_PER_TASK
    from prunebench.training.expert import make_expert
    from prunebench.training.grasp_choice import FINGER_OFFSET

    env = LiberoEnv("libero_spatial", 1, render_quality="fast", hard_reset=True)
    try:
        env.reset_sampled(1 * SEEDS_PER_TASK)  # the first demonstration's state: narrow before the fix
        assert make_expert(env)._grasp.opening == FINGER_OFFSET
    finally:
        env.close()


def test_shuffled_placements_permute_the_loose_objects_and_keep_each_ones_height():
    """Demos with ``shuffle_fraction`` start from a scene whose loose floor objects swapped places
    (so the named object is not always where the task's layout puts it); the goal's basket stays,
    and a table scene, whose objects stand on fixtures of their own, refuses."""
    import numpy as np

    from prunebench.contract.errors import PrunebenchError
    from prunebench.training.placements import shuffle_placements

    env = LiberoEnv("libero_object", 0, render_quality="fast", hard_reset=True)
    try:
        env.reset_sampled(7)
        objects = env.env.env.objects_dict
        before = {n: env.sim.data.get_joint_qpos(o.joints[-1]).copy() for n, o in objects.items()}
        order = shuffle_placements(env, np.random.default_rng(3))
        after = {n: env.sim.data.get_joint_qpos(o.joints[-1]).copy() for n, o in objects.items()}
        assert "basket_1" not in order and "alphabet_soup_1" in order and len(order) == 6
        np.testing.assert_array_equal(after["basket_1"], before["basket_1"])
        initial = env.env.env.parsed_problem["initial_state"]
        old_places = [obj for _, obj, _ in initial if obj in order]  # the order the method permutes
        assert sorted(old_places) == sorted(order) and order != old_places
        for place, name in zip(old_places, order):  # `name` now stands where `place` stood
            np.testing.assert_allclose(after[name][:2], before[place][:2])
            np.testing.assert_allclose(after[name][2:], before[name][2:])
        np.testing.assert_allclose(env.observation["alphabet_soup_1_pos"][:2], after["alphabet_soup_1"][:2])
    finally:
        env.close()
    table = LiberoEnv("libero_spatial", 0, render_quality="fast", hard_reset=True)
    try:
        table.reset_sampled(7)
        with pytest.raises(PrunebenchError, match="floor"):
            shuffle_placements(table, np.random.default_rng(3))
    finally:
        table.close()
