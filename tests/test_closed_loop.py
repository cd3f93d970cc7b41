"""The closed-loop control logic on a scripted fake env (no simulator): when cameras render, which
frames a strategy gets, early re-queries, success, simulator faults, the dense reference."""

from types import SimpleNamespace

import numpy as np
import pytest

from prunebench import PrunePlan, Strategy
from prunebench.evaluation.closed_loop import EvalConfig
from prunebench.evaluation.episode import EpisodeRunner, Job, postprocess_action
from prunebench.evaluation.libero_env import WAIT_STEPS, SimulationError, StepState
from tests.helpers import registered


class FakeEnv:
    """State index t = env steps executed. Frames carry t in their pixels, so tests can read them."""

    def __init__(self, job, succeed_at=None, fail_at=None):
        self.task = SimpleNamespace(suite=job.suite, task_id=job.task_id, name="fake",
                                    instruction="pick up the alphabet soup and place it in the basket")
        self.succeed_at, self.fail_at = succeed_at, fail_at
        self.renders: list[int] = []
        self.actions: list[np.ndarray] = []

    def reset(self, init_state_id, seed=0):
        self.t, self.seed = 0, seed
        return self._state()

    def step(self, action):
        self.t += 1
        self.actions.append(np.asarray(action))
        if self.t == self.fail_at:
            raise SimulationError("simulation unstable (test)")
        return self._state()

    def render(self):
        self.renders.append(self.t)
        return {v: np.full((32, 32, 3), self.t % 256, np.uint8) for v in ("agentview", "wrist")}

    def close(self):
        pass

    def _state(self):
        return StepState(eef_pos=np.array([0.01 * self.t, 0, 0]), eef_quat=np.array([0, 0, 0, 1.0]),
                         proprio=np.zeros(8, np.float32), success=self.t == self.succeed_at)


class Probe(Strategy):
    """Dense; wants 3 history frames; notes what it saw; never re-queries."""

    name = "probe"
    history_frames = 3
    seen: list = []

    def schedule(self, ctx):
        Probe.seen.append((ctx.step_index, [int(f["agentview"][0, 0, 0]) for f in ctx.frames]))
        return PrunePlan.dense()


class RequeryProbe(Probe):
    """Probe that re-queries after env step REQUERY_AT."""

    name = "requery-probe"
    requery_at: int | None = None

    def on_env_step(self, step):
        return step.step_index == self.requery_at


def run(tiny_path, strategy="probe", jobs=1, max_steps=24, config=None, **env_kw):
    cfg = EvalConfig(strategy=strategy, config=config or {}, model=tiny_path, max_steps=max_steps)
    envs = []

    def make_env(job):
        envs.append(FakeEnv(job, **env_kw))
        return envs[-1]

    runner = EpisodeRunner(cfg, make_env=make_env)
    results = [runner.run(Job("libero_object", 0, i, i)) for i in range(jobs)]
    return results, envs


def test_cameras_render_only_at_queries_and_the_frames_a_strategy_needs(tiny_path):
    Probe.seen = []
    with registered(Probe):
        (episode,), (env,) = run(tiny_path)
    w = WAIT_STEPS
    # queries at states 10, 18, 26 (+ frames 3 steps before each); 24 policy steps in all
    assert episode.n_queries == 3 and episode.steps == 24 and episode.failure_reason == "timeout"
    assert Probe.seen == [(w, []), (w + 8, [w + 5, w + 6, w + 7]), (w + 16, [w + 13, w + 14, w + 15])]
    assert env.renders == [w, w + 5, w + 6, w + 7, w + 8, w + 13, w + 14, w + 15, w + 16,
                           w + 21, w + 22, w + 23]
    assert len(env.actions) == w + 24 and all(np.array_equal(a, env.actions[0]) for a in env.actions[:w])


def test_early_requery_drops_the_rest_of_the_chunk_and_gets_a_contiguous_history(tiny_path):
    Probe.seen, RequeryProbe.requery_at = [], WAIT_STEPS + 2  # after the third policy step
    with registered(RequeryProbe):
        (episode,), (env,) = run(tiny_path, strategy="requery-probe", max_steps=16)
    w = WAIT_STEPS
    assert episode.early_requeries == 1
    # a strategy that may re-query has every step rendered, so the re-query at state 13 gets the
    # frames of states 10 (the first query's), 11 and 12; the next query (at 21) gets 18, 19, 20
    assert Probe.seen[:3] == [(w, []), (w + 3, [w, w + 1, w + 2]), (w + 11, [w + 8, w + 9, w + 10])]
    assert env.renders == list(range(w, w + 16))  # every state of the episode, once


def test_success_ends_the_episode(tiny_path):
    (episode,), _ = run(tiny_path, strategy="none", succeed_at=WAIT_STEPS + 5)
    assert episode.success and episode.steps == 5 and episode.failure_reason is None


def test_a_simulator_fault_fails_one_episode_and_the_next_one_runs(tiny_path):
    (bad, good), envs = run(tiny_path, strategy="none", jobs=2, max_steps=8, fail_at=WAIT_STEPS + 3)
    assert not bad.success and bad.failure_reason.startswith("simulation: ")
    assert bad.n_queries == 1 and len(envs) == 2  # the broken env was rebuilt
    assert good.failure_reason.startswith("simulation")  # the fake fails again: still recorded
    assert good.episode_index == 1


def test_dense_reference_gives_speedup_and_action_error_and_is_deterministic(tiny_path):
    (a,), _ = run(tiny_path, strategy="random", config={"keep_ratio": 0.25}, max_steps=16)
    (b,), _ = run(tiny_path, strategy="random", config={"keep_ratio": 0.25}, max_steps=16)
    assert all(q.dense_ms and q.action_error_vs_dense > 0 for q in a.queries)
    assert a.queries[0].visual_per_layer[0] == round(0.25 * 32)  # TINY: 2 views x 4x4 patches
    assert [q.action_error_vs_dense for q in a.queries] == [q.action_error_vs_dense for q in b.queries]
    (dense,), _ = run(tiny_path, strategy="none", max_steps=8)
    assert dense.queries[0].dense_ms is None


def test_an_episode_plays_the_same_in_any_run_that_holds_it(tiny_path):
    """Seeds come from (run seed, suite, task, init state), not from the episode's position in the
    run: task 1 alone and task 1 after task 0 are the same episode, so runs and shards pair."""
    cfg = EvalConfig(strategy="random", config={"keep_ratio": 0.25}, model=tiny_path, max_steps=16)

    def play(tasks):
        envs = []
        runner = EpisodeRunner(cfg, make_env=lambda job: envs.append(FakeEnv(job)) or envs[-1])
        runner.engine.record_kept = True
        episodes = [runner.run(Job("libero_object", t, 3, i)) for i, t in enumerate(tasks)]
        return episodes[-1], envs[-1]

    (both, env_both), (alone, env_alone) = play([0, 1]), play([1])
    assert (both.episode_index, alone.episode_index) == (1, 0)  # positions differ ...
    assert (both.success, both.failure_reason, both.steps) == (alone.success, alone.failure_reason, alone.steps)
    assert env_both.seed == env_alone.seed
    assert np.array_equal(np.stack(env_both.actions), np.stack(env_alone.actions))
    kept = lambda e: [[s.kept for s in q.stages] for q in e.queries]  # noqa: E731
    assert kept(both) == kept(alone) and kept(both)[0][0] is not None  # ... the episode does not
    assert Job("libero_object", 1, 3, 0).seed_key != Job("libero_object", 1, 4, 0).seed_key


def test_action_readout_convention():
    out = postprocess_action(np.array([2.0, -3.0, 0.5, 0, 0, 0, 0.2]))
    assert out.tolist() == [1.0, -1.0, 0.5, 0, 0, 0, 1.0]
    assert postprocess_action(np.zeros(7))[-1] == -1.0  # undecided gripper stays open


def test_bad_eval_config_is_one_line_error_naming_the_field():
    from prunebench.contract.errors import PrunebenchError
    from prunebench.evaluation.closed_loop import load_eval_config

    with pytest.raises(PrunebenchError, match="field 'episodes'"):
        load_eval_config(None, strategy="none", episodes=0)
    with pytest.raises(PrunebenchError, match="field 'render'"):
        load_eval_config(None, strategy="none", render="sometimes")


def test_missing_libero_is_one_clear_error(monkeypatch, capsys):
    import sys

    from prunebench.cli.main import main
    from prunebench.evaluation import libero_env as libero

    libero.libero_modules.cache_clear()
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")] + ["libero"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes "import libero..." raise ImportError
    try:
        assert main(["run", "--suite", "libero_object", "--strategy", "none"]) == 2
    finally:
        libero.libero_modules.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LIBERO is not installed" in err and "pip install" in err


def test_skip_first_actions_reproduces_the_specprune_release_quirk(tiny_path):
    cfg = EvalConfig(strategy="none", model=tiny_path, max_steps=16, skip_first_actions=9)
    env = FakeEnv(Job("libero_object", 0, 0, 0))
    episode = EpisodeRunner(cfg, make_env=lambda job: env).run(Job("libero_object", 0, 0, 0))
    assert episode.steps == 16 and len(env.actions) == WAIT_STEPS + 16 - 9
