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
