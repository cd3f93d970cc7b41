"""The closed-loop results schema: aggregation, Wilson intervals, JSON round trip, safe writes."""

import pytest

from prunebench.evaluation.metrics import wilson_interval
from prunebench.evaluation.results import (
    ClosedLoopQuery,
    EpisodeResult,
    EvalResults,
    StrategyInfo,
    read_eval_results,
    write_json,
)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 2)
    assert lo == 0.0 and hi == pytest.approx(0.6576, abs=1e-4)


def episode(task, init, success, total_ms=10.0, dense_ms=20.0):
    query = ClosedLoopQuery(tokens_per_layer=[100, 60], visual_per_layer=[80, 40], llm_flops=1.0,
                            dense_llm_flops=2.0, ms={"vision": 1, "llm": total_ms - 2, "head": 1,
                                                     "overhead": 0, "total": total_ms},
                            dense_ms={"llm": dense_ms - 2, "total": dense_ms}, action_error_vs_dense=0.1)
    return EpisodeResult(suite="libero_object", task_id=task, task="t", instruction="i",
                         init_state_id=init, episode_index=2 * task + init, seed=0, success=success,
                         steps=50 if success else 280, n_queries=1, wall_s=1.0,
                         failure_reason=None if success else "timeout", queries=[query])


def results(episodes):
    return EvalResults(seed=0, config={"suite": "libero_object"}, model={}, protocol={},
                       strategy=StrategyInfo(name="random", config={}, position_ids="original"),
                       init_state_ids={}, attention_backend="sdpa", environment={},
                       episodes=episodes).aggregate()


def test_aggregation_per_task_suite_and_overall(tmp_path):
    r = results([episode(0, 0, True), episode(0, 1, False), episode(1, 0, True), episode(1, 1, True)])
    assert r.per_task["libero_object/0"].success_rate == 0.5
    assert r.per_task["libero_object/1"].n_success == 2
    assert r.overall.n_episodes == 4 and r.overall.success_rate == 0.75
    assert r.overall.failures == {"timeout": 1} and r.overall.mean_steps == (50 * 3 + 280) / 4
    assert r.overall.speedup_vs_dense == {"total": 2.0, "llm": 18 / 8}
    assert r.overall.success_ci95 == wilson_interval(3, 4)
    assert r.per_suite["libero_object"].queries.mean_visual_tokens == 60.0
    path = write_json(tmp_path / "r.json", r)
    assert read_eval_results(path).model_dump(mode="json") == r.model_dump(mode="json")


def test_a_failed_write_leaves_the_earlier_file_intact(tmp_path, monkeypatch):
    path = write_json(tmp_path / "r.json", results([episode(0, 0, True)]))
    before = path.read_text()
    bad = results([episode(0, 0, False)])
    monkeypatch.setattr(EvalResults, "model_dump_json", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_json(path, bad)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["r.json"]
