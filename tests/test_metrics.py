"""One definition per metric: tables, results, replay and studies report the same quantity."""

import numpy as np
import pytest

from prunebench.evaluation import metrics
from prunebench.evaluation.replay import replay
from prunebench.evaluation.runner import run_interleaved
from prunebench.evaluation.streams import SyntheticStream
from prunebench.evaluation.tables import compare_rows
from prunebench.plugins.dense import Dense
from prunebench.plugins.manager import MANAGER


def test_definitions_on_hand_computed_values():
    dense = [{"total": 10.0, "llm": 6.0}, {"total": 12.0, "llm": 7.0}, {"total": 30.0, "llm": 8.0}]
    pruned = [{"total": 5.0, "llm": 2.0}, {"total": 6.0, "llm": 3.0}, {"total": 100.0, "llm": 4.0}]
    assert metrics.latency_ms(dense) == 12.0  # the median: one slow query does not move it
    assert metrics.speedup(dense, pruned) == 2.0 and metrics.speedups(dense, pruned)["llm"] == 7 / 3
    a, b = np.array([[0.5, -1.0], [1.0, 0.0]]), np.array([[0.0, -1.0], [0.0, 0.0]])
    assert metrics.action_error(a, b) == 0.375
    assert metrics.flops_ideal_speedup([4.0, 4.0], [1.0, 3.0]) == 2.0
    assert metrics.success_rate(0, 0) is None and metrics.success_rate(3, 4) == 0.75


def test_compare_table_speedup_is_its_own_latency_columns_divided(engine):
    strategies = {"none": Dense(), "random": MANAGER.create("random", {"keep_ratio": 0.25})}
    rows = {r.strategy: r for r in compare_rows(run_interleaved(
        engine, strategies, SyntheticStream(n_queries=5, seed=0, image_size=32)))}
    dense, pruned = rows["none"], rows["random"]
    assert pruned.speedup_total == pytest.approx(dense.query_ms / pruned.query_ms)
    assert pruned.speedup_llm == pytest.approx(dense.llm_ms / pruned.llm_ms)
    lo, hi = (float(v) for v in pruned.speedup_ci95.strip("[]").split(", "))  # bootstrap over query pairs
    assert lo <= round(pruned.speedup_total, 2) <= hi and dense.speedup_ci95 == "-"


def test_action_error_means_the_same_in_compare_and_replay(engine):
    """Both on normalised actions (compare used normalised and replay unnormalised ones)."""
    stream = SyntheticStream(n_queries=4, seed=3, image_size=32)
    strategy = lambda: MANAGER.create("random", {"keep_ratio": 0.25})  # noqa: E731
    rows = compare_rows(run_interleaved(engine, {"none": Dense(), "random": strategy()}, stream))
    report = replay(engine, strategy(), [stream], name="random")
    assert report.action_error.mean == pytest.approx(rows[1].action_error_vs_dense)
    out = run_interleaved(engine, {"dense": Dense(), "random": strategy()}, stream)
    expected = np.mean([np.abs(p.normalized - d.normalized).mean()
                        for p, d in zip(out["random"], out["dense"])])
    assert report.action_error.mean == pytest.approx(expected)


def test_a_study_objective_against_dense_needs_the_dense_reference(tmp_path):
    from prunebench.contract.errors import PrunebenchError
    from prunebench.study.definition import load_study_definition

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nstrategies: {random: {}}\nobjectives: [success_rate, action_error]\n"
                    "evaluation: {closed_loop: {suite: libero_object, dense_reference: false}}\n")
    with pytest.raises(PrunebenchError, match="action_error is measured against the dense reference"):
        load_study_definition(path)
