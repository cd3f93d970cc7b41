"""Errors travel and failures are visible: a strategy's error names it, survives a worker process,
and an episode that raises is counted as an error, never as a policy failure."""

import pickle

import pytest
import torch

import prunebench
from prunebench import BEFORE_LLM, Budget, PrunePlan, Stage, Strategy, attention
from prunebench.contract.errors import RunAborted, StrategyError
from prunebench.evaluation.closed_loop import EvalConfig
from prunebench.evaluation.episode import EpisodeRunner, Job
from prunebench.evaluation.results import EvalResults, StrategyInfo
from tests.helpers import registered
from tests.test_closed_loop import FakeEnv


def test_strategy_error_survives_pickling():
    """A worker process sends its exception to the parent by pickle."""
    err = pickle.loads(pickle.dumps(StrategyError("boom", "stage before_llm: score() raised")))
    assert isinstance(err, StrategyError) and err.strategy == "boom"
    assert str(err) == "strategy 'boom': stage before_llm: score() raised"


class Raises(Strategy):
    """Prunes before the LLM; raises ValueError in the method named by ``where``."""

    name = "raises"
    where = "score"

    def _maybe(self, where):
        if self.where == where:
            raise ValueError(f"bug in {where}")

    def on_episode_start(self, episode):
        self._maybe("on_episode_start")

    def on_env_step(self, step):
        self._maybe("on_env_step")
        return False

    def schedule(self, ctx):
        self._maybe("schedule")
        return PrunePlan((Stage(BEFORE_LLM, Budget(keep_ratio=0.5)),))

    def score(self, stage, signals, ctx):
        self._maybe("score")
        return torch.rand(ctx.layout.n_visual)

    def select(self, stage, scores, ctx, layout):
        self._maybe("select")
        return super().select(stage, scores, ctx, layout)

    def on_forward_end(self, signals, record):
        self._maybe("on_forward_end")


@pytest.mark.parametrize("where", ["schedule", "score", "select", "on_forward_end"])
def test_an_exception_in_strategy_code_is_that_strategys_error(engine, obs, where):
    strategy = Raises()
    strategy.where = where
    with pytest.raises(StrategyError, match=rf"strategy 'raises': .*{where}\(\) raised ValueError: "
                                            rf"bug in {where}"):
        engine.query(strategy, obs)


def test_reading_an_unrequested_signal_is_a_strategy_error_in_every_callback(engine, obs):
    class Reader(Strategy):
        name = "reader"

        def on_forward_end(self, signals, record):
            signals[attention(1)]

    with pytest.raises(StrategyError, match=r"strategy 'reader': on_forward_end\(\): signal "
                                            r"attention@1:text was not computed"):
        engine.query(Reader(), obs)


def test_an_episode_that_raises_is_an_error_not_a_failure(tiny_path):
    Raises.where = "on_env_step"
    try:
        with registered(Raises):
            cfg = EvalConfig(strategy="raises", model=tiny_path, max_steps=16)
            runner = EpisodeRunner(cfg, make_env=FakeEnv)
            episode = runner.run(Job("libero_object", 0, 0, 0))
    finally:
        Raises.where = "score"
    assert not episode.success and episode.failure_reason is None
    assert episode.error == "strategy 'raises': on_env_step() raised ValueError: bug in on_env_step"
    assert "Traceback" in episode.traceback and "bug in on_env_step" in episode.traceback
    results = EvalResults(seed=0, config={}, model={}, protocol={}, init_state_ids={},
                          strategy=StrategyInfo(name="raises", config={}, position_ids="original"),
                          attention_backend="sdpa", environment={}, episodes=[episode]).aggregate()
    overall = results.overall
    assert overall.n_errors == 1 and overall.n_episodes == 0
    assert overall.success_rate is None  # no outcome: not a 0 % success
    assert overall.errors == {episode.error: 1} and overall.failures == {}


def test_tables_show_errors_and_no_rate_without_outcomes(tiny_path, capsys):
    from prunebench.evaluation.closed_loop import print_summary

    with registered(Raises):
        cfg = EvalConfig(strategy="raises", model=tiny_path, max_steps=16)
        episode = EpisodeRunner(cfg, make_env=FakeEnv).run(Job("libero_object", 0, 0, 0))
    results = EvalResults(seed=0, config={}, model={}, protocol={}, init_state_ids={},
                          strategy=StrategyInfo(name="raises", config={}, position_ids="original"),
                          attention_backend="sdpa", environment={}, episodes=[episode]).aggregate()
    print_summary(results)
    header, _, task, overall = capsys.readouterr().out.splitlines()[:4]
    assert header.split()[:4] == ["task", "episodes", "errors", "success"]
    assert task.split()[1:5] == ["0", "1", "-", "-"]  # 0 outcomes, 1 error, no rate, no interval


@pytest.mark.libero
def test_a_strategy_raising_in_workers_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    """A strategy that raises, two worker processes: one line that names the strategy, exit code 1,
    and the errored episodes' tracebacks in the results file."""
    from prunebench.cli.main import main
    from prunebench.evaluation.libero_env import libero_available
    from tests.test_plugins import write_fake_distribution

    if not libero_available():
        pytest.skip("LIBERO not installed")
    write_fake_distribution(tmp_path, "raising_plugin", """
        import prunebench

        class Boom(prunebench.Strategy):
            name = "boom"
            def schedule(self, ctx):
                raise ValueError("boom at query " + str(ctx.query_index))

        @prunebench.hookimpl
        def prunebench_register_strategies(register):
            register(Boom)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the spawned workers find the plugin too
    monkeypatch.setenv("PRUNEBENCH_LOAD_PLUGINS", "prunebench-fake")
    from prunebench.plugins import manager as plugins

    monkeypatch.setattr(plugins, "MANAGER", plugins.PluginManager())
    out = tmp_path / "boom.json"
    code = main(["run", "--suite", "libero_object", "--tasks", "0", "--episodes", "2", "--workers", "2",
                 "--strategy", "boom", "--render-quality", "fast", "--fast-reset", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: boom: the same error on 2 episodes, run stopped: strategy 'boom': "
                              "schedule() raised ValueError: boom at query 0")
    saved = EvalResults.model_validate_json(out.read_text())
    assert saved.aborted and not saved.complete and len(saved.episodes) == 2
    assert all("ValueError: boom at query 0" in e.traceback for e in saved.episodes)


def test_run_aborted_exits_1_and_bad_input_exits_2():
    assert RunAborted("x").exit_code == 1 and prunebench.PrunebenchError("x").exit_code == 2
